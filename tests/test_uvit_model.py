"""runtime.nn.uvit against an independent functional U-ViT written here from the facts of
baofff/U-ViT `libs/uvit.py` (token order, long skips, key layout), on random-everywhere weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from exporter.models import randomize_
from runtime.nn.uvit import UViT
from schedules.errors import BlockcacheError

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=11)


# ---------------------------------------------------------------------------------------------------
# Independent functional U-ViT: state-dict tensors and plain torch ops only.
# ---------------------------------------------------------------------------------------------------

def lin(x, sd, prefix):
    bias = sd.get(prefix + ".bias")
    return F.linear(x, sd[prefix + ".weight"], bias)


def ln(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-5)


def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def attention(x, sd, prefix, heads):
    n, length, d = x.shape
    dh = d // heads
    qkv = lin(x, sd, prefix + ".qkv")  # last axis ordered (K=3, H, Dh)
    q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(n, length, heads, dh).transpose(1, 2) for j in range(3))
    w = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(dh), dim=-1)
    return lin((w @ v).transpose(1, 2).reshape(n, length, d), sd, prefix + ".proj")


def mlp(x, sd, prefix):
    return lin(gelu_erf(lin(x, sd, prefix + ".fc1")), sd, prefix + ".fc2")


def sinusoid(t, dim):
    """[cos(t·f_i), sin(t·f_i)], f_i = 10000^(−i/(dim/2)), i < dim/2 (dim even here)."""
    half = dim // 2
    f = torch.tensor([10000.0 ** (-i / half) for i in range(half)], dtype=torch.float64)
    a = t.double()[:, None] * f[None]
    return torch.cat([a.cos(), a.sin()], dim=1).float()


def functional_uvit(sd, cfg, x, t, y, zero=(), skip_before_zero=False, time_first=False):
    """`zero`: unit names whose branch output is replaced by zeros. `skip_before_zero` (a deliberately
    wrong variant) pushes onto the skip stack the in-block output computed *without* the zeroing;
    `time_first` (also wrong) swaps the label and time tokens."""
    d, p, heads, c = cfg["hidden_size"], cfg["patch_size"], cfg["num_heads"], cfg["in_channels"]
    n = x.shape[0]
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    g = h.shape[-1]
    h = h.flatten(2).transpose(1, 2)  # tokens in row-major patch order
    tt = sinusoid(t, d)
    if cfg.get("mlp_time_embed"):
        tt = lin(F.silu(lin(tt, sd, "time_embed.0")), sd, "time_embed.2")
    lt = sd["label_emb.weight"][y]
    extra = [tt[:, None], lt[:, None]] if time_first else [lt[:, None], tt[:, None]]
    h = torch.cat(extra + [h], dim=1) + sd["pos_embed"]

    def block(h, name, skip=None, zero_here=True):
        if skip is not None:
            h = lin(torch.cat([h, skip], dim=-1), sd, name + ".skip_linear")
        a = attention(ln(h, sd, name + ".norm1"), sd, name + ".attn", heads)
        if zero_here and name + ".attn" in zero:
            a = torch.zeros_like(a)
        h = h + a
        m = mlp(ln(h, sd, name + ".norm2"), sd, name + ".mlp")
        if zero_here and name + ".mlp" in zero:
            m = torch.zeros_like(m)
        return h + m

    half = cfg["depth"] // 2
    stack = []
    for i in range(half):
        name = f"in_blocks.{i}"
        out = block(h, name)
        stack.append(block(h, name, zero_here=False) if skip_before_zero else out)
        h = out
    h = block(h, "mid_block")
    for i in range(half):
        h = block(h, f"out_blocks.{i}", skip=stack.pop())
    h = lin(ln(h, sd, "norm"), sd, "decoder_pred")[:, 2:]
    # Per-patch channel order (p1, p2, C): out[n, C, a·p + i, b·p + j] = h[n, a·g + b, (i·p + j)·c + C].
    h = h.reshape(n, g, g, p, p, c)
    h = torch.einsum("nabijc->ncaibj", h).reshape(n, c, g * p, g * p)
    if "final_layer.weight" in sd:
        h = F.conv2d(h, sd["final_layer.weight"], sd["final_layer.bias"], padding=1)
    return h


def make(seed=0, **overrides):
    """Random everywhere (`randomize_` draws the affine LayerNorm scales around 1, so that every
    branch, the label and the time token matter)."""
    model = randomize_(UViT(**{**SMALL, **overrides}), seed).eval()
    norms = [p for name, p in model.named_parameters() if name.endswith("norm1.weight")]
    assert all(0.5 < float(p.detach().mean()) < 1.5 for p in norms)
    return model


def inputs(cfg, n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=gen)
    t = torch.tensor([3.7, 998.2][:n])
    y = torch.tensor([cfg["num_classes"] - 1, 2][:n])  # the null class and a real label
    return x, t, y


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("mlp_time_embed", [False, True])
def test_forward_matches_functional_reimplementation(conv, mlp_time_embed):
    model = make(seed=1, conv=conv, mlp_time_embed=mlp_time_embed)
    cfg = model.config
    x, t, y = inputs(cfg)
    with torch.no_grad():
        got = model(x, t, y)
        want = functional_uvit(state(model), cfg, x, t, y)
    assert got.shape == want.shape == x.shape
    assert want.abs().max() > 0.5  # not a vacuous comparison
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_functional_reimplementation_is_sensitive():
    """The comparison above can fail: swapped label/time tokens, a truncated timestep or the wrong skip
    each change the output."""
    model = make(seed=2)
    cfg, sd = model.config, state(model)
    x, t, y = inputs(cfg)
    with torch.no_grad():
        got = model(x, t, y)
        assert not torch.allclose(got, functional_uvit(sd, cfg, x, t, y, time_first=True), rtol=1e-3, atol=1e-4)
        assert not torch.allclose(got, functional_uvit(sd, cfg, x, t.floor(), y), rtol=1e-3, atol=1e-4)
        other = model(x, t, torch.tensor([0, 2]))
    assert not torch.allclose(got[0], other[0])  # the label matters …
    torch.testing.assert_close(got[1], other[1], rtol=0, atol=0)  # … per sample


def test_unit_names_and_order():
    model = make()
    seen = []

    def unit(name, fn):
        seen.append(name)
        return fn()

    x, t, y = inputs(model.config)
    with torch.no_grad():
        plain = model(x, t, y)
        recorded = model(x, t, y, policy=unit)
    assert tuple(seen) == model.unit_names == (
        "in_blocks.0.attn", "in_blocks.0.mlp", "in_blocks.1.attn", "in_blocks.1.mlp",
        "mid_block.attn", "mid_block.mlp",
        "out_blocks.0.attn", "out_blocks.0.mlp", "out_blocks.1.attn", "out_blocks.1.mlp")
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)

    big = UViT(input_size=4, hidden_size=32, num_heads=2, depth=28)
    names = big.unit_names
    assert len(names) == 58 == len(set(names))
    assert names[:2] == ("in_blocks.0.attn", "in_blocks.0.mlp")
    assert names[26:32] == ("in_blocks.13.attn", "in_blocks.13.mlp", "mid_block.attn", "mid_block.mlp",
                            "out_blocks.0.attn", "out_blocks.0.mlp")
    assert names[-2:] == ("out_blocks.13.attn", "out_blocks.13.mlp")


def test_replaced_unit_flows_through_the_long_skip():
    model = make(seed=3)
    cfg, sd = model.config, state(model)
    x, t, y = inputs(cfg)

    def policy(name, fn):
        value = fn()
        return torch.zeros_like(value) if name == "in_blocks.0.mlp" else value

    with torch.no_grad():
        got = model(x, t, y, policy=policy)
        want = functional_uvit(sd, cfg, x, t, y, zero={"in_blocks.0.mlp"})
        wrong_skip = functional_uvit(sd, cfg, x, t, y, zero={"in_blocks.0.mlp"}, skip_before_zero=True)
        plain = model(x, t, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(got, wrong_skip, rtol=1e-3, atol=1e-4)  # the skip carries the changed branch


BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
              "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def test_official_state_dict_layout_and_round_trip(tmp_path):
    model = make(seed=4, depth=2)
    expected = {
        "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "label_emb.weight",
        "in_blocks.0.norm1.weight", "in_blocks.0.norm1.bias", "in_blocks.0.attn.qkv.weight",
        "in_blocks.0.attn.proj.weight", "in_blocks.0.attn.proj.bias", "in_blocks.0.norm2.weight",
        "in_blocks.0.norm2.bias", "in_blocks.0.mlp.fc1.weight", "in_blocks.0.mlp.fc1.bias",
        "in_blocks.0.mlp.fc2.weight", "in_blocks.0.mlp.fc2.bias",
        "mid_block.norm1.weight", "mid_block.norm1.bias", "mid_block.attn.qkv.weight",
        "mid_block.attn.proj.weight", "mid_block.attn.proj.bias", "mid_block.norm2.weight",
        "mid_block.norm2.bias", "mid_block.mlp.fc1.weight", "mid_block.mlp.fc1.bias",
        "mid_block.mlp.fc2.weight", "mid_block.mlp.fc2.bias",
        "out_blocks.0.norm1.weight", "out_blocks.0.norm1.bias", "out_blocks.0.attn.qkv.weight",
        "out_blocks.0.attn.proj.weight", "out_blocks.0.attn.proj.bias", "out_blocks.0.norm2.weight",
        "out_blocks.0.norm2.bias", "out_blocks.0.mlp.fc1.weight", "out_blocks.0.mlp.fc1.bias",
        "out_blocks.0.mlp.fc2.weight", "out_blocks.0.mlp.fc2.bias",
        "out_blocks.0.skip_linear.weight", "out_blocks.0.skip_linear.bias",
        "norm.weight", "norm.bias", "decoder_pred.weight", "decoder_pred.bias",
    }
    sd = model.state_dict()
    assert set(sd) == expected
    d, p, c, tokens = 64, 2, 4, (8 // 2) ** 2
    assert sd["pos_embed"].shape == (1, 2 + tokens, d)
    assert sd["label_emb.weight"].shape == (11, d)
    assert sd["decoder_pred.weight"].shape == (p * p * c, d)
    assert sd["out_blocks.0.skip_linear.weight"].shape == (d, 2 * d)
    assert sd["in_blocks.0.attn.qkv.weight"].shape == (3 * d, d)
    assert sd["in_blocks.0.mlp.fc1.weight"].shape == (4 * d, d)

    full = make(seed=4, depth=2, conv=True, mlp_time_embed=True, qkv_bias=True)
    extra = {"time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight", "time_embed.2.bias",
             "final_layer.weight", "final_layer.bias",
             "in_blocks.0.attn.qkv.bias", "mid_block.attn.qkv.bias", "out_blocks.0.attn.qkv.bias"}
    assert set(full.state_dict()) == expected | extra
    assert full.state_dict()["final_layer.weight"].shape == (c, c, 3, 3)

    path = tmp_path / "uvit.pth"
    torch.save(full.state_dict(), path)
    fresh = UViT(**{k: v for k, v in full.config.items() if k != "family"}).eval()
    fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    x, t, y = inputs(full.config)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, y), full(x, t, y), rtol=0, atol=0)


def test_config_and_attributes():
    model = UViT(**SMALL)
    assert list(model.config) == ["family", "input_size", "patch_size", "in_channels", "hidden_size", "depth",
                                  "num_heads", "mlp_ratio", "num_classes", "qkv_bias", "mlp_time_embed", "conv"]
    assert model.config["family"] == "uvit" and model.config["num_classes"] == 11
    assert model.num_classes == model.null_class == 10
    assert model.in_channels == model.out_channels == 4
    assert model.learned_pos_embed and model.patch_size == 2 and model.num_heads == 4
    assert not model.pos_embed.any()  # learned, zeros at construction
    with pytest.raises(BlockcacheError):
        UViT(**{**SMALL, "depth": 3})


def test_half_precision_on_cpu_close_to_float32():
    model = make(seed=5, mlp_time_embed=True, conv=True)
    x, t, y = inputs(model.config)
    with torch.no_grad():
        want = model(x, t, y)
        got = model.half()(x.half(), t, y)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 1e-2, rel
