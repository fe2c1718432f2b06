"""runtime.nn.dit (loaded through exporter.models) against an independent functional DiT written here
from the reference facts in docs/ARCHITECTURE.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, tiny_model
from exporter.models import load_model
from runtime.nn.dit import DiT
from schedules.errors import BlockcacheError
from schedules.zoo import CONFIGS, model_config, unit_names

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------------
# Independent functional DiT: state-dict tensors and plain torch ops only.
# ---------------------------------------------------------------------------------------------------

def sincos_pos_embed(d: int, g: int) -> np.ndarray:
    """(g·g, d): token k = row·g + col; channels [sin(col·ω), cos(col·ω), sin(row·ω), cos(row·ω)],
    ω_i = 1/10000^(i/(d/4)), i < d/4 (docs/ARCHITECTURE.md), in float64."""
    quarter = d // 4
    omega = np.array([1.0 / 10000 ** (i / quarter) for i in range(quarter)])
    out = np.zeros((g * g, d))
    for row in range(g):
        for col in range(g):
            k = row * g + col
            out[k, 0:quarter] = np.sin(col * omega)
            out[k, quarter:2 * quarter] = np.cos(col * omega)
            out[k, 2 * quarter:3 * quarter] = np.sin(row * omega)
            out[k, 3 * quarter:] = np.cos(row * omega)
    return out


def layer_norm_no_affine(x, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def linear(x, sd, prefix):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def functional_dit(sd: dict, cfg: dict, x, t, y):
    d, p, heads = cfg["hidden_size"], cfg["patch_size"], cfg["num_heads"]
    c_in = cfg["in_channels"]
    c_out = 2 * c_in if cfg["learn_sigma"] else c_in
    n = x.shape[0]
    # Patch embedding: a stride-p convolution; tokens in row-major (row, col) order.
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    g = h.shape[-1]
    h = h.reshape(n, d, g * g).permute(0, 2, 1) + sd["pos_embed"]
    # Timestep embedding: 256 frequencies, exp(−ln(10000)·i/128), [cos, sin], then Linear-SiLU-Linear.
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], -1)
    t_emb = linear(F.silu(linear(t_freq, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    y_emb = sd["y_embedder.embedding_table.weight"][y]
    c = t_emb + y_emb
    dh = d // heads
    for i in range(cfg["depth"]):
        b = f"blocks.{i}"
        mod = linear(F.silu(c), sd, f"{b}.adaLN_modulation.1")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, k * d:(k + 1) * d] for k in range(6))
        hm = layer_norm_no_affine(h) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        qkv = linear(hm, sd, f"{b}.attn.qkv")
        q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(n, -1, heads, dh).transpose(1, 2) for j in range(3))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        attn = (weights @ v).transpose(1, 2).reshape(n, -1, d)
        h = h + gate_msa[:, None] * linear(attn, sd, f"{b}.attn.proj")
        hm = layer_norm_no_affine(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        mlp = linear(gelu_tanh(linear(hm, sd, f"{b}.mlp.fc1")), sd, f"{b}.mlp.fc2")
        h = h + gate_mlp[:, None] * mlp
    mod = linear(F.silu(c), sd, "final_layer.adaLN_modulation.1")
    shift, scale = mod[:, :d], mod[:, d:]
    h = layer_norm_no_affine(h) * (1 + scale[:, None]) + shift[:, None]
    h = linear(h, sd, "final_layer.linear")  # (n, T, p·p·c_out), last axis ordered (p, q, c)
    h = h.reshape(n, g, g, p, p, c_out).permute(0, 5, 1, 3, 2, 4)  # n,h,w,p,q,c → n,c,h,p,w,q
    return h.reshape(n, c_out, g * p, g * p)


MODEL_CASES = {
    "s2-tiny": dict(TINY),
    "s4-rgb-no-sigma": dict(depth=3, hidden_size=32, num_heads=2, input_size=16, patch_size=4, in_channels=3,
                            learn_sigma=False, num_classes=10, mlp_ratio=2.0),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_matches_functional_reimplementation(case):
    overrides = MODEL_CASES[case]
    model = load_model("dit-s2", random_init=True, seed=3, **overrides)
    cfg = model_config("dit-s2", **overrides)
    gen = torch.Generator().manual_seed(0)
    n, size, c_in = 3, cfg["input_size"], cfg["in_channels"]
    x = torch.randn(n, c_in, size, size, generator=gen)
    t = torch.tensor([999, 500, 3])
    y = torch.tensor([1, cfg["num_classes"], 7])  # includes the null class
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        got = model(x, t, y)
        want = functional_dit(sd, cfg, x, t, y)
    c_out = 2 * c_in if cfg["learn_sigma"] else c_in
    assert got.shape == want.shape == (n, c_out, size, size)
    assert want.abs().max() > 1e-2  # not a vacuous comparison
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_functional_reimplementation_is_sensitive():
    """The comparison above can fail: a wrong chunk order in the reference breaks the agreement."""
    model = tiny_model(seed=3)
    cfg = model_config("dit-s2", **TINY)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([999, 10]), torch.tensor([1, 2])
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w = sd["blocks.0.adaLN_modulation.1.weight"]
    d = cfg["hidden_size"]
    sd["blocks.0.adaLN_modulation.1.weight"] = torch.cat([w[d:2 * d], w[:d], w[2 * d:]])  # swap shift/scale
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y), functional_dit(sd, cfg, x, t, y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d,g", [(64, 4), (1152, 16), (32, 2)])
def test_pos_embed_is_fixed_sincos(d, g):
    if d == 1152:
        model = DiT(input_size=32, patch_size=2, hidden_size=1152, depth=1, num_heads=16)
    else:
        model = DiT(input_size=2 * g, patch_size=2, hidden_size=d, depth=1, num_heads=4)
    stored = model.state_dict()["pos_embed"]
    assert stored.shape == (1, g * g, d)
    np.testing.assert_allclose(stored[0].double().numpy(), sincos_pos_embed(d, g), rtol=0, atol=1e-6)


def test_random_init_is_random_everywhere():
    model = tiny_model(seed=5)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert p.abs().sum() > 0, f"{name} is all zeros"
        if name != "pos_embed":  # the fixed sin-cos table has sin(0) = 0 entries by design
            assert (p == 0).float().mean() < 0.01, f"{name} is mostly zeros"
            assert p.numel() == 1 or p.std() > 0, f"{name} is constant"
    sd = model.state_dict()
    for key in ("blocks.0.adaLN_modulation.1.weight", "blocks.0.adaLN_modulation.1.bias",
                "blocks.1.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.weight",
                "final_layer.adaLN_modulation.1.bias", "final_layer.linear.weight", "final_layer.linear.bias"):
        assert (sd[key] != 0).all(), key
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, torch.tensor([999, 0]), torch.tensor([3, 1000]))
    assert out.abs().max() > 1e-2
    assert out.std() > 1e-3
    # The conditioning matters: another label gives another output.
    with torch.no_grad():
        out2 = model(x, torch.tensor([999, 0]), torch.tensor([4, 1000]))
    assert not torch.allclose(out[0], out2[0])
    torch.testing.assert_close(out[1], out2[1], rtol=0, atol=0)


def test_random_init_seeds():
    a, b, a2 = tiny_model(seed=1), tiny_model(seed=2), tiny_model(seed=1)
    sa, sb, sa2 = a.state_dict(), b.state_dict(), a2.state_dict()
    for key in sa:
        assert torch.equal(sa[key], sa2[key]), key
        if key == "pos_embed":
            assert torch.equal(sa[key], sb[key])  # fixed, not random
        else:
            assert not torch.equal(sa[key], sb[key]), f"{key} does not depend on the seed"


def test_model_is_eval_float32_and_unit_names():
    model = tiny_model()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.unit_names == ("blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp")
    assert unit_names(model_config("dit-xl2"))[:3] == ("blocks.0.attn", "blocks.0.mlp", "blocks.1.attn")
    assert len(unit_names(model_config("dit-xl2"))) == 56


def test_unit_callback_sees_units_in_order_and_identity_callback_is_exact():
    model = tiny_model()
    seen = []

    def unit(name, fn):
        seen.append(name)
        return fn()

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([500, 500]), torch.tensor([0, 1])
    with torch.no_grad():
        plain, via_unit = model(x, t, y), model(x, t, y, policy=unit)
    assert seen == list(model.unit_names)
    assert torch.equal(plain, via_unit)


# ---------------------------------------------------------------------------------------------------
# The zoo
# ---------------------------------------------------------------------------------------------------

ZOO = {"xl": (28, 1152, 16), "l": (24, 1024, 16), "b": (12, 768, 12), "s": (12, 384, 6)}


def analytic_params(depth, d, heads, p, c=4, classes=1000, input_size=32, learn_sigma=True, mlp_ratio=4.0):
    t = (input_size // p) ** 2
    out = 2 * c if learn_sigma else c
    hidden = int(d * mlp_ratio)
    total = c * p * p * d + d                       # x_embedder conv
    total += t * d                                  # pos_embed (frozen, but a parameter)
    total += 256 * d + d + d * d + d                # t_embedder MLP
    total += (classes + 1) * d                      # label table incl. the null class
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + (d * 6 * d + 6 * d)
    total += depth * block
    total += (d * 2 * d + 2 * d) + (d * p * p * out + p * p * out)
    return total


@pytest.mark.parametrize("size", sorted(ZOO))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_zoo_configs(size, patch):
    name = f"dit-{size}{patch}"
    assert name in CONFIGS
    depth, hidden, heads = ZOO[size]
    cfg = model_config(name)
    assert (cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["patch_size"]) == (depth, hidden, heads, patch)
    assert (cfg["in_channels"], cfg["mlp_ratio"], cfg["num_classes"], cfg["learn_sigma"], cfg["input_size"]) == \
        (4, 4.0, 1000, True, 32)
    with torch.device("meta"):
        model = DiT(**cfg)
    assert len(model.blocks) == depth
    assert model.blocks[0].attn.num_heads == heads
    assert tuple(model.x_embedder.proj.weight.shape) == (hidden, 4, patch, patch)
    assert model.final_layer.linear.out_features == patch * patch * 8
    assert sum(p.numel() for p in model.parameters()) == analytic_params(depth, hidden, heads, patch)


def test_zoo_has_the_twelve_dit_names():
    expected = {f"dit-{s}{p}" for s in ZOO for p in (2, 4, 8)}
    assert expected <= set(CONFIGS)


def test_xl2_parameter_count():
    with torch.device("meta"):
        model = DiT(**model_config("dit-xl2"))
    n = sum(p.numel() for p in model.parameters())
    assert n == analytic_params(28, 1152, 16, 2)
    assert 674.5e6 < n < 675.5e6  # "675 M parameters"


def test_overrides():
    model = load_model("dit-b4", random_init=True, depth=1, hidden_size=32, num_heads=2, input_size=8,
                       in_channels=3, learn_sigma=False, num_classes=5, mlp_ratio=2.0)
    assert len(model.blocks) == 1 and model.blocks[0].attn.num_heads == 2
    assert model.patch_size == 4
    assert model.out_channels == 3
    assert model.y_embedder.embedding_table.weight.shape == (6, 32)
    assert model.blocks[0].mlp.fc1.out_features == 64
    assert model.config["input_size"] == 8
    # None means "keep the config's value" (how the CLIs pass absent flags).
    assert model_config("dit-s2", depth=None)["depth"] == 12


@pytest.mark.parametrize("overrides", [
    dict(depth=0), dict(depth=-1), dict(depth="2"), dict(depth=2.0), dict(hidden_size=64, num_heads=5),
    dict(hidden_size=66, num_heads=6), dict(input_size=9), dict(num_classes=0), dict(mlp_ratio=0.0),
    dict(foo=1), dict(patch=2), dict(depth=True),
])
def test_bad_overrides(overrides):
    with pytest.raises(BlockcacheError) as e:
        load_model("dit-s2", random_init=True, **overrides)
    assert "\n" not in str(e.value)


def test_unknown_model_and_weights_never_implied():
    with pytest.raises(BlockcacheError, match="dit-xxl2"):
        load_model("dit-xxl2", random_init=True)
    with pytest.raises(BlockcacheError, match="weights"):
        load_model("dit-s2", **TINY)  # no checkpoint, no random_init: refuse, do not invent weights
    with pytest.raises(BlockcacheError):
        load_model("dit-s2", "whatever.pt", random_init=True, **TINY)
