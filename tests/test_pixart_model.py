"""runtime.nn.pixart against diffusers' PixArtTransformer2DModel on the same (random) weights: tiny
α-, Σ- and α-1024-like configs built with diffusers' own constructor (no hub), padded prompts, the
precomputed prompt path, units in the zoo's order, and the zoo's full-size configs on the meta device."""

from __future__ import annotations

import pytest
import torch

from runtime.nn.build import build_model
from runtime.nn.pixart import PixArt, sincos_pos_embed
from runtime.nn.units import CachePolicy, UnitPolicy
from schedules.cost import fixed_macs, prologue_macs, step_macs, unit_costs, unit_macs
from schedules.errors import BlockcacheError
from schedules.schedule import span_key
from schedules.zoo import CONFIGS, check_config, model_config, num_labels, unit_names

diffusers = pytest.importorskip("diffusers")
from diffusers import PixArtTransformer2DModel  # noqa: E402
from diffusers.models.embeddings import get_2d_sincos_pos_embed  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

BASE = dict(family="pixart", input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=4,
            mlp_ratio=4.0, learn_sigma=True, caption_channels=32, max_text_tokens=7)
TINY = {
    "alpha": {**BASE, "use_additional_conditions": False, "interpolation_scale": 1},
    "sigma": {**BASE, "use_additional_conditions": False, "interpolation_scale": 0.5, "max_text_tokens": 9,
              "input_size": 12},
    "alpha-1024": {**BASE, "use_additional_conditions": True, "interpolation_scale": 2},
}
PIXART_ZOO = ("pixart-alpha-256", "pixart-alpha-512", "pixart-alpha-1024", "pixart-sigma-512", "pixart-sigma-1024")


def diffusers_kwargs(cfg, explicit=True):
    """The PixArtTransformer2DModel arguments of a blockcache PixArt config, as the conversion scripts
    pass them (`explicit=False`: leave interpolation_scale and use_additional_conditions to diffusers'
    defaults, as the α conversion does)."""
    d, heads = cfg["hidden_size"], cfg["num_heads"]
    kwargs = dict(num_attention_heads=heads, attention_head_dim=d // heads, in_channels=cfg["in_channels"],
                  out_channels=cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1), num_layers=cfg["depth"],
                  cross_attention_dim=d, sample_size=cfg["input_size"], patch_size=cfg["patch_size"],
                  caption_channels=cfg["caption_channels"], attention_bias=True, activation_fn="gelu-approximate",
                  num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    if explicit:
        kwargs.update(interpolation_scale=cfg["interpolation_scale"],
                      use_additional_conditions=cfg["use_additional_conditions"])
    return kwargs


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request):
    """(config, diffusers model, our model with its weights), both in eval mode."""
    cfg = TINY[request.param]
    torch.manual_seed(0)
    ref = PixArtTransformer2DModel(**diffusers_kwargs(cfg)).eval()
    with torch.no_grad():  # move every weight off its init so no branch is near zero or near identity
        g = torch.Generator().manual_seed(1)
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model = PixArt(**cfg).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return cfg, ref, model


def inputs(cfg, seed=0):
    """Latents, timesteps, T5 states, a mask that pads the second row's last 3 of 7 tokens, micro-conditions."""
    g = torch.Generator().manual_seed(seed)
    size, c = cfg["input_size"], cfg["in_channels"]
    x = torch.randn(2, c, size, size, generator=g)
    t = torch.tensor([999.0, 17.5])
    embeds = torch.randn(2, 7, cfg["caption_channels"], generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    added = None
    if cfg["use_additional_conditions"]:
        added = {"resolution": torch.tensor([[1024.0, 1024.0], [768.0, 1344.0]]),
                 "aspect_ratio": torch.tensor([[1.0], [0.5714]])}
    return x, t, embeds, mask, added


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_state_dict_keys_are_diffusers(pair):
    cfg, ref, model = pair
    assert list(model.state_dict()) == list(ref.state_dict())
    fresh = PixArt(**cfg)
    assert fresh.load_state_dict(ref.state_dict(), strict=True)  # no missing, no unexpected keys
    for key in ("pos_embed.proj.weight", "transformer_blocks.1.attn2.to_k.weight", "transformer_blocks.0.ff.net.2.bias",
                "transformer_blocks.0.ff.net.0.proj.weight", "adaln_single.linear.weight",
                "caption_projection.linear_2.bias", "scale_shift_table", "proj_out.weight"):
        assert key in fresh.state_dict()
    assert cfg["use_additional_conditions"] == ("adaln_single.emb.resolution_embedder.linear_1.weight" in ref.state_dict())
    # the sin-cos table is not in either state dict, and is diffusers' own
    assert torch.equal(model.pos_table, ref.pos_embed.pos_embed)


def test_forward_equals_diffusers_with_a_padded_prompt(pair):
    cfg, ref, model = pair
    x, t, embeds, mask, added = inputs(cfg)
    with torch.no_grad():
        expected = ref(x, embeds, t, added_cond_kwargs=added, encoder_attention_mask=mask).sample
        out = model(x, t, embeds, mask, added)
        unmasked = model(x, t, embeds, None, added)
    assert out.shape == (2, 2 * cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    assert rel(out, expected) <= 1e-5
    # the padding is masked out of row 1 only (row 0 keeps every token)
    assert rel(unmasked[0], out[0]) <= 1e-6
    assert rel(unmasked[1], out[1]) > 1e-4


def refuse(*args, **kwargs):
    raise AssertionError("the prompt's work ran again")


def test_precomputed_prompt_equals_the_plain_forward(pair):
    cfg, ref, model = pair
    x, t, embeds, mask, added = inputs(cfg, seed=1)
    with torch.no_grad():
        prompt = model.encode_prompt(embeds, mask)
        plain = model(x, t, embeds, mask, added)
        reused = model(x, t, added_cond=added, prompt=prompt)
        # the keys and values are diffusers' attn2 projections of the projected caption, split into heads
        tokens = ref.caption_projection(embeds)
        k = ref.transformer_blocks[1].attn2.to_k(tokens).view(2, 7, cfg["num_heads"], -1).transpose(1, 2)
    assert torch.equal(plain, reused)
    # with a prompt given, nothing of the prompt's work runs again
    prompt_modules = [model.caption_projection] + [getattr(b.attn2, f"to_{n}") for b in model.transformer_blocks
                                                   for n in "kv"]
    for module in prompt_modules:
        module.forward = refuse
    try:
        with torch.no_grad():
            assert torch.equal(model(x, t, added_cond=added, prompt=prompt), plain)
    finally:
        for module in prompt_modules:
            del module.forward
    assert len(prompt.keys) == len(prompt.values) == cfg["depth"]
    assert torch.equal(prompt.tokens, tokens) and torch.equal(prompt.keys[1], k)
    assert torch.equal(prompt.bias[:, 0, 0], (1 - mask.float()) * -10000.0)
    with pytest.raises(BlockcacheError, match="not both"):
        model(x, t, embeds, mask, added, prompt=prompt)


def test_masked_tokens_do_not_matter_and_unmasked_ones_do(pair):
    cfg, ref, model = pair
    x, t, embeds, mask, added = inputs(cfg, seed=2)
    changed_padding, changed_token = embeds.clone(), embeds.clone()
    changed_padding[1, 4:] = 10 * torch.randn(3, cfg["caption_channels"])
    changed_token[1, 2] = 10 * torch.randn(cfg["caption_channels"])
    with torch.no_grad():
        out = model(x, t, embeds, mask, added)
        padding = model(x, t, changed_padding, mask, added)
        token = model(x, t, changed_token, mask, added)
        ref_padding = ref(x, changed_padding, t, added_cond_kwargs=added, encoder_attention_mask=mask).sample
    assert rel(padding, out) <= 1e-6
    assert rel(ref_padding, out) <= 1e-5
    assert rel(token[1], out[1]) > 1e-3
    assert torch.equal(token[0], out[0])  # rows are independent


class Recorder(UnitPolicy):
    def __init__(self):
        self.units, self.blocks, self.values = [], [], {}

    def computed(self, name, value):
        self.units.append(name)
        self.values[name] = value
        return value

    def block(self, name, x, run):
        self.blocks.append(name)
        return run(x)


def test_units_run_in_the_zoo_order_through_the_policy(pair):
    cfg, ref, model = pair
    x, t, embeds, mask, added = inputs(cfg)
    recorder = Recorder()
    with torch.no_grad():
        model(x, t, embeds, mask, added, policy=recorder)
    expected = tuple(f"transformer_blocks.{i}.{kind}" for i in range(cfg["depth"]) for kind in ("attn1", "attn2", "ff"))
    assert tuple(recorder.units) == unit_names(cfg) == model.unit_names == expected
    assert recorder.blocks == [f"transformer_blocks.{i}" for i in range(cfg["depth"])]
    assert all(v.shape == (2, (cfg["input_size"] // 2) ** 2, cfg["hidden_size"]) for v in recorder.values.values())


class RecordingCache(CachePolicy):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def computed(self, name, value):
        self.seen.append(name)
        return super().computed(name, value)


def test_a_cached_span_replays_its_blocks(pair):
    """Blocks run through `run_block`: a skipped span adds its recorded residual and runs none of its units."""
    cfg, ref, model = pair
    x, t, embeds, mask, added = inputs(cfg)
    span = ("transformer_blocks.1", "transformer_blocks.1")
    cache = {}
    with torch.no_grad():
        full = model(x, t, embeds, mask, added, policy=CachePolicy(cache, span_writes=[span]))
        policy = RecordingCache(cache, spans=[span])
        skipped = model(x, t, embeds, mask, added, policy=policy)
    assert span_key(*span) in cache
    assert policy.seen == ["transformer_blocks.0.attn1", "transformer_blocks.0.attn2", "transformer_blocks.0.ff"]
    assert rel(skipped, full) <= 1e-6


def test_reusing_a_unit_changes_only_that_branch(pair):
    """A unit read from the cache replaces the branch output: reusing every unit's own value is the
    identity, and a zeroed cross-attention is the model without it (attn2 has no gate)."""
    cfg, ref, model = pair
    x, t, embeds, mask, added = inputs(cfg)
    cache = {}
    names = unit_names(cfg)
    with torch.no_grad():
        full = model(x, t, embeds, mask, added, policy=CachePolicy(cache))
        reused = model(x, t, embeds, mask, added, policy=CachePolicy(cache, reads=names))
        cache["transformer_blocks.0.attn2"] = torch.zeros_like(cache["transformer_blocks.0.attn2"])
        zeroed = model(x, t, embeds, mask, added, policy=CachePolicy(cache, reads=["transformer_blocks.0.attn2"]))
        attn2 = ref.transformer_blocks[0].attn2  # diffusers without block 0's cross-attention
        attn2.forward = lambda h, **kwargs: torch.zeros_like(h)
        try:
            expected = ref(x, embeds, t, added_cond_kwargs=added, encoder_attention_mask=mask).sample
        finally:
            del attn2.forward
    assert torch.equal(reused, full)
    assert rel(zeroed, expected) <= 1e-5
    assert rel(zeroed, full) > 1e-4


def test_a_config_of_another_family_is_refused_in_one_line():
    with pytest.raises(BlockcacheError) as e:
        PixArt(**model_config("dit-s2"))
    assert "\n" not in str(e.value) and "dit" in str(e.value)
    with pytest.raises(BlockcacheError) as e:
        PixArt(**{**TINY["alpha"], "family": "uvit"})
    assert "\n" not in str(e.value)
    with pytest.raises(BlockcacheError, match="micro-conditions"):
        PixArt(**TINY["alpha-1024"])(*inputs(TINY["alpha-1024"])[:4])


def test_micro_condition_width_is_refused():
    with pytest.raises(BlockcacheError, match="multiple of 3"):
        check_config({**TINY["alpha-1024"], "hidden_size": 64, "num_heads": 4})
    with pytest.raises(BlockcacheError, match="multiple of 4"):
        PixArt(**{**TINY["alpha-1024"], "hidden_size": 66, "num_heads": 6})


@pytest.mark.parametrize("name", PIXART_ZOO)
def test_zoo_configs_build_on_meta_with_diffusers_parameter_count(name):
    cfg = model_config(name)
    assert (cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["patch_size"], cfg["in_channels"]) == (28, 1152, 16, 2, 4)
    assert cfg["learn_sigma"] and cfg["caption_channels"] == 4096 and cfg["mlp_ratio"] == 4.0
    assert cfg["input_size"] == int(name.rsplit("-", 1)[1]) // 8
    assert cfg["max_text_tokens"] == (120 if "alpha" in name else 300)
    assert cfg["use_additional_conditions"] == (name == "pixart-alpha-1024")
    with torch.device("meta"):
        model = build_model(cfg)
        # α's conversion leaves both to diffusers' defaults; Σ's passes them
        ref = PixArtTransformer2DModel(**diffusers_kwargs(cfg, explicit="sigma" in name))
    assert isinstance(model, PixArt)
    assert ref.use_additional_conditions == cfg["use_additional_conditions"]
    assert ref.pos_embed.interpolation_scale == cfg["interpolation_scale"]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(unit_names(cfg)) == 3 * 28 and num_labels(cfg) == 0
    n = sum(p.numel() for p in model.parameters())
    assert 600e6 < n < 620e6  # PixArt-α: "0.6 B parameters" (611 M)


@pytest.mark.parametrize("grid,scale", [(16, 1), (32, 1), (64, 2), (16, 0.5)])
def test_sincos_table_is_diffusers(grid, scale):
    ours = torch.from_numpy(sincos_pos_embed(1152, grid, scale)).float()
    theirs = get_2d_sincos_pos_embed(1152, grid, base_size=grid, interpolation_scale=scale, output_type="pt").float()
    assert torch.equal(ours, theirs)


def test_zoo_lists_the_pixart_models_and_keeps_the_others():
    assert set(PIXART_ZOO) <= set(CONFIGS)
    assert unit_names(model_config("dit-s2"))[:3] == ("blocks.0.attn", "blocks.0.mlp", "blocks.1.attn")
    assert unit_names(model_config("uvit-l2"))[:2] == ("in_blocks.0.attn", "in_blocks.0.mlp")
    assert unit_names(model_config("pixart-sigma-512"))[:4] == (
        "transformer_blocks.0.attn1", "transformer_blocks.0.attn2", "transformer_blocks.0.ff", "transformer_blocks.1.attn1")


@pytest.mark.parametrize("override,message", [
    (dict(max_text_tokens=0), "max_text_tokens"), (dict(max_text_tokens=True), "max_text_tokens"),
    (dict(interpolation_scale=-1), "interpolation_scale"), (dict(interpolation_scale=float("nan")), "interpolation_scale"),
    (dict(use_additional_conditions=1), "use_additional_conditions"), (dict(caption_channels=0), "caption_channels"),
    (dict(num_classes=10), "no option"),
])
def test_bad_pixart_options_are_refused(override, message):
    with pytest.raises(BlockcacheError, match=message):
        model_config("pixart-alpha-512", **override)
    with pytest.raises(BlockcacheError, match="no option"):
        model_config("dit-s2", caption_channels=4096)


def test_cost_model_counts_the_cross_attention():
    cfg = model_config("pixart-sigma-512")
    d, t, L, C = 1152, 32 * 32, 300, 4096
    per = unit_macs(cfg)
    assert per["attn1"] == 4 * t * d * d + 2 * t * t * d
    assert per["attn2"] == 2 * t * d * d + 2 * L * d * d + 2 * t * L * d
    assert per["ff"] == 2 * t * d * 4 * d
    assert unit_costs(cfg) == [per["attn1"], per["attn2"], per["ff"]] * 28
    alpha = model_config("pixart-alpha-512")  # 120 prompt tokens: a cheaper cross-attention, same rest
    assert unit_macs(alpha)["attn2"] < per["attn2"] and unit_macs(alpha)["attn1"] == per["attn1"]
    expected_fixed = t * 4 * 4 * d + (256 * d + d * d) + 6 * d * d + t * d * 4 * 8
    assert fixed_macs(cfg) == expected_fixed
    caption = L * (C * d + d * d)  # the caption projection: once per call with a prologue
    assert prologue_macs(cfg) == caption + 28 * 2 * L * d * d  # and every block's keys and values
    units = 28 * (per["attn1"] + per["attn2"] + per["ff"])
    assert step_macs(cfg, [True] * 84) == expected_fixed + units + caption
    assert step_macs(cfg, [True] * 84, prologue=True) == expected_fixed + units - 28 * 2 * L * d * d
    # without a prologue, a step that reuses every cross-attention projects no caption (nothing reads it)
    no_cross = [not u.endswith(".attn2") for u in unit_names(cfg)]
    assert step_macs(cfg, no_cross) == expected_fixed + 28 * (per["attn1"] + per["ff"])
    micro = model_config("pixart-alpha-1024")
    s = d // 3
    t2 = 64 * 64
    assert fixed_macs(micro) == (t2 * 4 * 4 * d + (256 * d + d * d) + 3 * (256 * s + s * s) + 6 * d * d
                                 + t2 * d * 4 * 8)
