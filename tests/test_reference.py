"""The eager cached reference (exporter.reference.sample) against hand-written sampling loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_FLAGS, dit_space_timesteps, dit_spaced_tables, tiny_model
from exporter import sample_cli
from exporter.reference import sample
from schedules.errors import BlockcacheError
from schedules.schedule import Schedule

pytestmark = pytest.mark.usefixtures("single_thread")

UNITS = ("blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp")
NULL = 1000
C = 4


def dit_tables(n: int, spacing: str):
    """(original timesteps, ᾱ, ᾱ_prev), in sampling order, re-derived from DiT's respacing."""
    kept = sorted(dit_space_timesteps(1000, f"ddim{n}" if spacing == "ddim" else str(n)))
    tmap, ac, ac_prev = dit_spaced_tables(kept)
    return tmap[::-1].copy(), ac[::-1].copy(), ac_prev[::-1].copy()


def ddim_ab_float32(n: int, spacing: str):
    """x_prev = a·x + b·eps folded from x0 = √(1/ᾱ)x − √(1/ᾱ−1)eps, x_prev = √ᾱ_prev·x0 + √(1−ᾱ_prev)eps."""
    _, ac, ac_prev = dit_tables(n, spacing)
    a = np.sqrt(ac_prev) * np.sqrt(1.0 / ac)
    b = np.sqrt(1.0 - ac_prev) - np.sqrt(ac_prev) * np.sqrt(1.0 / ac - 1.0)
    return torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32))


def guide(eps, n, scale, channels):
    cond, uncond = eps[:n], eps[n:]
    guided = uncond + scale * (cond - uncond)
    return guided if channels == "all" else torch.cat([guided[:, :3], cond[:, 3:]], 1)


@torch.no_grad()
def hand_loop(model, n_steps, spacing, labels, noise, scale, channels="first3"):
    """Plain DDIM sampling: model(x, t, y) with no unit callback, CFG on [x; x] / [y; null]."""
    timesteps, _, _ = dit_tables(n_steps, spacing)
    a, b = ddim_ab_float32(n_steps, spacing)
    n = len(labels)
    x = torch.from_numpy(np.asarray(noise, np.float32))
    y = torch.tensor(labels, dtype=torch.int64)
    cfg = scale > 1
    if cfg:
        y = torch.cat([y, torch.full((n,), NULL, dtype=torch.int64)])
    for s, t in enumerate(timesteps):
        x_in = torch.cat([x, x]) if cfg else x
        eps = model(x_in, torch.full((len(x_in),), int(t), dtype=torch.int64), y)[:, :C]
        if cfg:
            eps = guide(eps, n, scale, channels)
        x = a[s] * x + b[s] * eps
    return x.numpy()


@torch.no_grad()
def dit_official_loop(model, n_steps, spacing, labels, noise, scale):
    """DiT's own sampling semantics: doubled latents z = [x; x], `forward_with_cfg` (guides channels 0–2,
    keeps the rest), the learned-sigma split, and ddim_sample's two-stage update with float32 table
    lookups (pred_xstart, eps re-derived from it, then the eta = 0 mean)."""
    timesteps, ac, ac_prev = dit_tables(n_steps, spacing)
    sqrt_recip, sqrt_recipm1 = np.sqrt(1.0 / ac), np.sqrt(1.0 / ac - 1)
    f32 = lambda v: torch.tensor(v).float()  # noqa: E731  (DiT's _extract_into_tensor → .float())
    n = len(labels)
    x = torch.from_numpy(np.asarray(noise, np.float32))
    cfg = scale > 1
    z = torch.cat([x, x]) if cfg else x
    y = torch.tensor(list(labels) + ([NULL] * n if cfg else []), dtype=torch.int64)
    for s, t in enumerate(timesteps):
        tt = torch.full((len(z),), int(t), dtype=torch.int64)
        if cfg:
            half = z[: len(z) // 2]
            out = model(torch.cat([half, half]), tt, y)
            eps3, rest = out[:, :3], out[:, 3:]
            cond, uncond = torch.split(eps3, len(eps3) // 2, dim=0)
            half_eps = uncond + scale * (cond - uncond)
            out = torch.cat([torch.cat([half_eps, half_eps]), rest], 1)
        else:
            out = model(z, tt, y)
        model_output, _ = torch.split(out, C, dim=1)
        pred_xstart = f32(sqrt_recip[s]) * z - f32(sqrt_recipm1[s]) * model_output
        eps = (f32(sqrt_recip[s]) * z - pred_xstart) / f32(sqrt_recipm1[s])
        alpha_bar_prev = f32(ac_prev[s])
        z = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev) * eps
    return z[:n].numpy()


class CachingHooks:
    """Caching implemented by hand: each block's attn / mlp module returns its stored raw output at a
    reuse step (replacing the module's forward), whatever the model does around it."""

    def __init__(self, model, compute):
        self.compute, self.step, self.store, self.modules = compute, 0, {}, []
        for i, block in enumerate(model.blocks):
            for kind in ("attn", "mlp"):
                module, name = getattr(block, kind), f"blocks.{i}.{kind}"
                module.forward = self._wrap(module.forward, UNITS.index(name), name)
                self.modules.append(module)

    def _wrap(self, original, j, name):
        def forward(*args, **kwargs):
            if self.compute[self.step, j]:
                self.store[name] = original(*args, **kwargs)
            return self.store[name]
        return forward

    def remove(self):
        for module in self.modules:
            del module.forward  # back to the class's forward


@torch.no_grad()
def hand_cached_loop(model, compute, spacing, labels, noise, scale, channels="first3"):
    n_steps = len(compute)
    timesteps, _, _ = dit_tables(n_steps, spacing)
    a, b = ddim_ab_float32(n_steps, spacing)
    hooks = CachingHooks(model, compute)
    try:
        n = len(labels)
        x = torch.from_numpy(np.asarray(noise, np.float32))
        y = torch.tensor(labels, dtype=torch.int64)
        cfg = scale > 1
        if cfg:
            y = torch.cat([y, torch.full((n,), NULL, dtype=torch.int64)])
        for s, t in enumerate(timesteps):
            hooks.step = s
            x_in = torch.cat([x, x]) if cfg else x  # the cache holds the doubled batch
            eps = model(x_in, torch.full((len(x_in),), int(t), dtype=torch.int64), y)[:, :C]
            if cfg:
                eps = guide(eps, n, scale, channels)
            x = a[s] * x + b[s] * eps
        return x.numpy()
    finally:
        hooks.remove()


LABELS = [3, 0, 999]


def _noise(seed=0, n=3):
    return np.random.default_rng(seed).standard_normal((n, C, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("scale,channels,spacing,steps", [
    (4.0, "first3", "linspace", 5),
    (1.5, "all", "ddim", 4),
    (1.0, "first3", "linspace", 4),   # no guidance
])
def test_full_schedule_equals_hand_loop_exactly(tiny, scale, channels, spacing, steps):
    schedule = Schedule.full(UNITS, steps, spacing)
    noise = _noise(1)
    got = sample(tiny, schedule, LABELS, noise, guidance_scale=scale, guidance_channels=channels)
    want = hand_loop(tiny, steps, spacing, LABELS, noise, scale, channels)
    assert got.dtype == np.float32 and got.shape == (3, C, 8, 8)
    assert np.array_equal(got, want)
    assert not np.allclose(got, noise, atol=1e-3)


def test_guidance_channel_conventions_differ(tiny):
    schedule, noise = Schedule.full(UNITS, 3), _noise(2)
    first3 = sample(tiny, schedule, LABELS, noise, guidance_scale=4.0, guidance_channels="first3")
    every = sample(tiny, schedule, LABELS, noise, guidance_scale=4.0, guidance_channels="all")
    none = sample(tiny, schedule, LABELS, noise, guidance_scale=1.0)
    assert not np.allclose(first3, every, atol=1e-5) and not np.allclose(first3, none, atol=1e-5)


@pytest.mark.parametrize("scale", [4.0, 1.0])
def test_full_schedule_matches_dit_two_stage_ddim(tiny, scale):
    steps = 8
    noise = _noise(3)
    got = sample(tiny, Schedule.full(UNITS, steps), LABELS, noise, guidance_scale=scale)
    want = dit_official_loop(tiny, steps, "linspace", LABELS, noise, scale)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _hand_schedule():
    rows = ["xx xx",
            ".x x.",
            ".. xx",   # blocks.0.attn reused again: its value is still step 0's
            "x. .."]
    return np.array([[c == "x" for c in r.replace(" ", "")] for r in rows])


@pytest.mark.parametrize("which", ["uniform2", "hand"])
@pytest.mark.parametrize("scale", [4.0, 1.0])
def test_cached_run_equals_hand_written_caching(which, scale):
    model = tiny_model(seed=7)  # its modules get patched: not the shared fixture
    if which == "uniform2":
        schedule = Schedule.uniform(UNITS, 4, 2)
    else:
        schedule = Schedule(UNITS, _hand_schedule(), {"name": "ddim", "steps": 4, "spacing": "linspace"})
    noise = _noise(4)
    cached = sample(model, schedule, LABELS, noise, guidance_scale=scale)
    full = sample(model, Schedule.full(UNITS, 4), LABELS, noise, guidance_scale=scale)
    assert not np.allclose(cached, full, atol=1e-5), "caching changed nothing: vacuous schedule"
    want = hand_cached_loop(model, schedule.compute, "linspace", LABELS, noise, scale)
    assert np.array_equal(cached, want)
    # The hooks were removed: the model is whole again.
    assert np.array_equal(sample(model, Schedule.full(UNITS, 4), LABELS, noise, guidance_scale=scale), full)


def test_reference_checks_inputs(tiny):
    schedule, noise = Schedule.full(UNITS, 2), _noise(0, n=2)
    for labels in ([0, 1000], [-1, 2], [0.5, 1.0], [], [[1, 2]]):
        with pytest.raises(BlockcacheError) as e:
            sample(tiny, schedule, labels, noise)
        assert "\n" not in str(e.value)
    with pytest.raises(BlockcacheError, match="1000"):
        sample(tiny, schedule, [1, 1000], noise)
    for bad in (_noise(0, n=3), np.zeros((2, 4, 16, 16), np.float32), np.zeros((2, 8, 8), np.float32),
                np.full((2, 4, 8, 8), np.nan, np.float32), np.zeros((2, 4, 8, 8), np.int64)):
        with pytest.raises(BlockcacheError):
            sample(tiny, schedule, [1, 2], bad)
    other = Schedule.full(tuple(f"blocks.{i}.{k}" for i in range(3) for k in ("attn", "mlp")), 2)
    with pytest.raises(BlockcacheError, match="units"):
        sample(tiny, other, [1, 2], noise)


def test_sample_cli_writes_the_reference_latents(tmp_path, tiny):
    out = tmp_path / "z.npy"
    rc = sample_cli.main(["--model", "dit-s2", *TINY_FLAGS, "--random-init", "--steps", "3", "--labels", "3,0",
                          "--seed", "5", "--out", str(out), "--quiet"])
    assert rc == 0
    noise = np.random.default_rng(5).standard_normal((2, C, 8, 8), dtype=np.float32)
    want = hand_loop(tiny, 3, "linspace", [3, 0], noise, 4.0)  # default guidance 4.0, --init-seed 0
    assert np.array_equal(np.load(out), want)


def test_sample_cli_with_schedule_and_noise_file(tmp_path, tiny):
    schedule = Schedule(UNITS, _hand_schedule(), {"name": "ddim", "steps": 4, "spacing": "linspace"})
    schedule.save(tmp_path / "s.yaml")
    noise = _noise(9, n=2)
    np.save(tmp_path / "noise.npy", noise)
    out = tmp_path / "z.npy"
    rc = sample_cli.main(["--model", "dit-s2", *TINY_FLAGS, "--random-init", "--schedule", str(tmp_path / "s.yaml"),
                          "--labels", "1,2", "--noise", str(tmp_path / "noise.npy"), "--guidance-scale", "1.5",
                          "--out", str(out), "--quiet"])
    assert rc == 0
    model = tiny_model(seed=0)
    want = hand_cached_loop(model, schedule.compute, "linspace", [1, 2], noise, 1.5)
    assert np.array_equal(np.load(out), want)
