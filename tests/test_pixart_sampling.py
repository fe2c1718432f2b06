"""PixArt sampling end to end: `exporter.reference.sample` against a loop written with diffusers' own
schedulers and model, as PixArtAlphaPipeline.__call__ runs it.

Tiny α-like (no micro-conditions), α-1024-like (micro-conditions) and Σ-like (a longer, padded prompt)
configs are built with diffusers' `PixArtTransformer2DModel` constructor (seeded random weights, no
hub), saved with `save_pretrained` and loaded through `exporter.models.load_model`, which also tests
the folder loading. Then: DPM-Solver++ 2M and DDIM with guidance, the one-line refusals of bad
conditioning, and a cached schedule that really reuses units."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from exporter.models import load_model
from exporter.reference import sample
from schedules import BlockcacheError, Schedule
from schedules.prompts import PromptInputs
from schedules.sampling import initial_noise

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PixArtTransformer2DModel  # noqa: E402
from test_dpm_solver_multistep import PIXART  # noqa: E402  PixArt's published scheduler_config.json
from test_pixart_model import diffusers_kwargs  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

SCALE = 4.5  # the pipelines' default guidance scale
STEPS = 20  # the pipelines' default step count
SIZE = dict(input_size=8, hidden_size=48, depth=2, num_heads=4, caption_channels=32)
# zoo model, its size overrides, the token rows of the two prompts and of the negative one ("" is </s>)
CASES = {
    "alpha": ("pixart-alpha-256", dict(SIZE, max_text_tokens=7), (7, 4), 1),
    "alpha-1024": ("pixart-alpha-1024", dict(SIZE, max_text_tokens=7), (5, 7), 1),
    "sigma": ("pixart-sigma-512", dict(SIZE, max_text_tokens=24, input_size=12), (17, 5), 2),
}
# diffusers' DDIM with PixArt's betas: eta 0, no clipping (blockcache's DDIM, DiT's), ᾱ = 1 after the last step.
DDIM = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
            prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True, steps_offset=0,
            timestep_spacing="leading")


def rel(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, diffusers model, blockcache model loaded from its save_pretrained folder, prompts)."""
    name, overrides, tokens, negative_tokens = CASES[request.param]
    from schedules.zoo import model_config

    cfg = model_config(name, **overrides)
    torch.manual_seed(0)
    ref = PixArtTransformer2DModel(**diffusers_kwargs(cfg)).eval()
    folder = tmp_path_factory.mktemp(request.param) / "transformer"
    ref.save_pretrained(folder)
    model = load_model(name, folder, **overrides)
    length, width = cfg["max_text_tokens"], cfg["caption_channels"]
    rng = np.random.default_rng(1)

    def padded(rows):  # T5 states everywhere (the pipelines keep the padding's states), masks 1 then 0
        embeds = rng.standard_normal((len(rows), length, width)).astype(np.float32)
        mask = (np.arange(length)[None] < np.asarray(rows)[:, None]).astype(np.int64)
        return embeds, mask

    prompts = PromptInputs(*padded(tokens), *padded([negative_tokens]))
    return request.param, ref, model, prompts


def diffusers_loop(ref, scheduler, prompts: PromptInputs, noise, scale=SCALE) -> np.ndarray:
    """PixArtAlphaPipeline.__call__'s loop: [negative; prompt] embeddings and masks, latents doubled, the
    timestep expanded to the batch, micro-conditions (height, width) in pixels and height / width of the
    square default image (the pipeline adds them where sample_size is 128, the configs that have them;
    here the tiny α-1024-like config has them at sample_size 8), guidance uncond + s·(text − uncond) on
    every channel, the learned sigma split off, `scheduler.step`."""
    n = len(prompts)
    embeds = torch.from_numpy(np.concatenate([np.repeat(prompts.negative_embeds, n, 0), prompts.embeds]))
    mask = torch.from_numpy(np.concatenate([np.repeat(prompts.negative_mask, n, 0), prompts.mask]))
    added = {"resolution": None, "aspect_ratio": None}
    if ref.config.use_additional_conditions:
        height = width = ref.config.sample_size * 8  # the pipeline's default: sample_size × vae_scale_factor
        added = {"resolution": torch.tensor([height, width]).repeat(2 * n, 1).float(),
                 "aspect_ratio": torch.tensor([float(height / width)]).repeat(2 * n, 1)}
    latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            out = ref(x_in, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                      timestep=t[None].expand(x_in.shape[0]), added_cond_kwargs=added, return_dict=False)[0]
            uncond, text = out.chunk(2)
            out = uncond + scale * (text - uncond)
            eps = out.chunk(2, dim=1)[0]
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    return latents.numpy()


def noise_for(model, prompts, seed=3):
    c, size = model.in_channels, model.config["input_size"]
    return initial_noise((len(prompts), c, size, size), seed)


def test_dpm_solver_2m_with_guidance_is_diffusers_pipeline_loop(case):
    """DPM-Solver++ 2M, PixArt's default sampler, 20 steps, guidance 4.5 with the negative prompt."""
    _, ref, model, prompts = case
    noise = noise_for(model, prompts)
    scheduler = DPMSolverMultistepScheduler(**PIXART)
    scheduler.set_timesteps(STEPS)
    want = diffusers_loop(ref, scheduler, prompts, noise)
    got = sample(model, Schedule.full(model.unit_names, STEPS, sampler="dpm-solver++-2m"), None, noise,
                 prompts=prompts, guidance_scale=SCALE)
    assert rel(got, want) <= 1e-4
    # not vacuous: the prompts and guidance change the result
    unguided = sample(model, Schedule.full(model.unit_names, STEPS, sampler="dpm-solver++-2m"), None, noise,
                      prompts=PromptInputs(prompts.embeds, prompts.mask), guidance_scale=1.0)
    assert rel(unguided, want) > 1e-2
    # and so does the padding's mask (measured: 0.09 to 0.12 relative; the loops agree to 9e-7)
    unmasked = PromptInputs(prompts.embeds, np.ones_like(prompts.mask), prompts.negative_embeds,
                            np.ones_like(prompts.negative_mask))
    assert rel(sample(model, Schedule.full(model.unit_names, STEPS, sampler="dpm-solver++-2m"), None, noise,
                      prompts=unmasked, guidance_scale=SCALE), want) > 1e-2


def test_ddim_with_guidance_is_diffusers_pipeline_loop(case):
    """DDIM, 20 steps. blockcache's "ddim" spacing (DiT's "ddim20": range(0, 1000, 50)) is diffusers'
    "leading" spacing whenever the step count divides 1000, and only then does diffusers' DDIM step to
    the next kept timestep (it steps from t to t − 1000 // N whatever the spacing); blockcache's
    "linspace" spacing keeps diffusers' "linspace" timesteps but steps between kept ones, which
    diffusers' DDIM does not, so the oracle is the leading spacing at 20 steps."""
    _, ref, model, prompts = case
    noise = noise_for(model, prompts, seed=4)
    scheduler = DDIMScheduler(**DDIM)
    scheduler.set_timesteps(STEPS)
    schedule = Schedule.full(model.unit_names, STEPS, "ddim", sampler="ddim")
    assert schedule.make_sampler().timesteps.tolist() == scheduler.timesteps.tolist()  # sampling order
    want = diffusers_loop(ref, scheduler, prompts, noise)
    got = sample(model, schedule, None, noise, prompts=prompts, guidance_scale=SCALE)
    assert rel(got, want) <= 1e-4


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


@pytest.fixture(scope="module")
def alpha():
    """A tiny random α-like PixArt and its prompts (blockcache's draws, loaded in-process)."""
    model = load_model("pixart-alpha-256", random_init=True, **CASES["alpha"][1])
    rng = np.random.default_rng(2)
    embeds = rng.standard_normal((2, 7, 32)).astype(np.float32)
    mask = np.ones((2, 7), np.int64)
    mask[1, 5:] = 0
    negative = rng.standard_normal((1, 7, 32)).astype(np.float32)
    return model, PromptInputs(embeds, mask, negative, np.ones((1, 7), np.int64))


def bad_inputs(prompts):
    e, m, ne, nm = prompts.embeds, prompts.mask, prompts.negative_embeds, prompts.negative_mask
    return {
        "width": (dict(prompts=PromptInputs(e[..., :16].copy(), m, ne, nm)), "16 wide but .* takes 32"),
        "length": (dict(prompts=PromptInputs(e[:, :5].copy(), m[:, :5].copy(), ne, nm)), "5 tokens but .* takes 7"),
        "mask": (dict(prompts=PromptInputs(e, m[:, :6].copy(), ne, nm)), "mask has shape"),
        "negative": (dict(prompts=PromptInputs(e, m)), "negative prompt"),
        "negative-width": (dict(prompts=PromptInputs(e, m, ne[..., :8].copy(), nm)), "negative_embeds must be"),
        "labels": (dict(labels=[1, 2], prompts=prompts), "text-to-image model: it takes prompt_embeds, not class"),
    }


@pytest.mark.parametrize("what", ["width", "length", "mask", "negative", "negative-width", "labels"])
def test_bad_conditioning_is_one_line(alpha, what):
    model, prompts = alpha
    kwargs, message = bad_inputs(prompts)[what]
    schedule = Schedule.full(model.unit_names, 4, sampler="dpm-solver++-2m")
    labels = kwargs.pop("labels", None)
    with pytest.raises(BlockcacheError, match=message) as excinfo:
        sample(model, schedule, labels, noise_for(model, prompts), guidance_scale=SCALE, **kwargs)
    one_line(excinfo)


def test_no_prompts_for_pixart_is_one_line(alpha):
    model, prompts = alpha
    with pytest.raises(BlockcacheError, match="text-to-image model: give prompt_embeds") as excinfo:
        sample(model, Schedule.full(model.unit_names, 4, sampler="dpm-solver++-2m"), None,
               noise_for(model, prompts), guidance_scale=SCALE)
    one_line(excinfo)


def test_prompts_for_a_dit_are_one_line(tiny, alpha):
    _, prompts = alpha
    with pytest.raises(BlockcacheError, match="class-conditional: it takes class labels, not prompt_embeds") as e:
        sample(tiny, Schedule.full(tiny.unit_names, 4), [1, 2], initial_noise((2, 4, 8, 8), 0), prompts=prompts)
    one_line(e)


class CountCalls:
    """Counts the forward calls of every unit's module (attn1, attn2, ff of each block): the work a
    sampling run really did, seen from outside the unit policy. The prompt's keys and values
    (`attn2.kv`, once per call) are not forward calls."""

    def __init__(self, model):
        self.counts = {}
        self.handles = []
        for i, block in enumerate(model.transformer_blocks):
            for kind in ("attn1", "attn2", "ff"):
                name = f"transformer_blocks.{i}.{kind}"
                self.counts[name] = 0
                self.handles.append(getattr(block, kind).register_forward_hook(self.hook(name)))

    def hook(self, name):
        def count(module, args, output):
            self.counts[name] += 1
        return count

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("kind", ["uniform", "attn2"])
def test_a_cached_schedule_reuses_units_and_stays_close(alpha, kind):
    model, prompts = alpha
    units = model.unit_names
    noise = noise_for(model, prompts, seed=5)
    full = Schedule.full(units, STEPS, sampler="dpm-solver++-2m")
    if kind == "uniform":  # DeepCache/FORA: every unit every 2nd step
        cached = Schedule.uniform(units, STEPS, 2, sampler="dpm-solver++-2m")
    else:  # the cross-attention reused on every odd step, the rest computed
        compute = np.ones((STEPS, len(units)), bool)
        compute[1::2, [j for j, u in enumerate(units) if u.endswith(".attn2")]] = False
        cached = Schedule(unit_names=units, compute=compute, sampler=full.sampler, source="attn2 reuse")
    counter = CountCalls(model)
    try:
        want = sample(model, full, None, noise, prompts=prompts, guidance_scale=SCALE)
        full_counts = dict(counter.counts)
        counter.counts = dict.fromkeys(counter.counts, 0)
        got = sample(model, cached, None, noise, prompts=prompts, guidance_scale=SCALE)
    finally:
        counter.close()
    assert full_counts == dict.fromkeys(units, STEPS)
    assert counter.counts == {u: int(cached.compute[:, j].sum()) for j, u in enumerate(units)}
    assert sum(counter.counts.values()) < sum(full_counts.values())
    error = rel(got, want)
    assert 1e-6 < error < 0.2, error  # measured: 0.045 (uniform), 0.042 (attn2)
    assert math.isfinite(error)


def tiny_folder(tmp_path, name, overrides, **save):
    """A diffusers PixArt of zoo model `name`'s tiny config saved with save_pretrained (as the
    conversion scripts build it: interpolation scale and micro-conditions left to diffusers' defaults
    unless the config needs others)."""
    from schedules.zoo import model_config

    cfg = model_config(name, **overrides)
    torch.manual_seed(0)
    ref = PixArtTransformer2DModel(**diffusers_kwargs(cfg)).eval()
    ref.save_pretrained(tmp_path / "transformer", **save)
    return ref, tmp_path / "transformer"


def test_a_sharded_folder_and_a_pipeline_folder_load(tmp_path):
    name, overrides = CASES["alpha"][:2]
    ref, folder = tiny_folder(tmp_path, name, overrides, max_shard_size="20KB")
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    assert len(list(folder.glob("*.safetensors"))) > 2
    for path in (folder, tmp_path):  # the transformer folder, or the pipeline folder above it
        model = load_model(name, path, **overrides)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("given, wanted, message", [
    ("sigma-1024", "alpha-1024", r"use_additional_conditions is False, so it is not pixart-alpha-1024"),
    ("alpha", "alpha-deeper", r"num_layers is 2, so it is not pixart-alpha-256 \(depth 3"),
    ("alpha", "dit", r"holds a PixArtTransformer2DModel, not the DiTTransformer2DModel"),
])
def test_a_folder_of_another_model_is_one_line(tmp_path, given, wanted, message):
    tiny = dict(SIZE, max_text_tokens=7)
    sources = {"sigma-1024": ("pixart-sigma-1024", tiny), "alpha": ("pixart-alpha-256", tiny)}
    targets = {"alpha-1024": ("pixart-alpha-1024", tiny), "alpha-deeper": ("pixart-alpha-256", dict(tiny, depth=3)),
               "dit": ("dit-s2", dict(depth=2, hidden_size=48, num_heads=4, input_size=8))}
    _, folder = tiny_folder(tmp_path, *sources[given])
    with pytest.raises(BlockcacheError, match=message) as excinfo:
        load_model(*targets[wanted][:1], folder, **targets[wanted][1])
    one_line(excinfo)


def test_pickles_and_escaping_shards_are_refused(tmp_path):
    name, overrides = CASES["alpha"][:2]
    ref, folder = tiny_folder(tmp_path, name, overrides)
    weights = folder / "diffusion_pytorch_model.safetensors"
    pickle = tmp_path / "model.pt"
    torch.save(ref.state_dict(), pickle)
    with pytest.raises(BlockcacheError, match="never from a pickle") as excinfo:
        load_model(name, pickle, **overrides)
    one_line(excinfo)
    weights.rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(BlockcacheError, match="diffusion_pytorch_model.bin is a pickle") as excinfo:
        load_model(name, folder, **overrides)
    one_line(excinfo)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"proj_out.weight": "../outside.safetensors"}}')
    with pytest.raises(BlockcacheError, match="not a .safetensors file name inside the folder") as excinfo:
        load_model(name, folder, **overrides)
    one_line(excinfo)
