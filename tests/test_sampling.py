"""Sampler math (schedules.sampling) against independent re-derivations of DiT's diffusion code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schedules.errors import BlockcacheError
from conftest import dit_space_timesteps, dit_spaced_tables
from schedules.sampling import DDIMSampler, guided_eps, initial_noise, linear_betas, make_sampler, respace

pytestmark = pytest.mark.usefixtures("single_thread")


CASES = [(n, mode) for n in (10, 20, 50, 250) for mode in ("linspace", "ddim")]


@pytest.mark.parametrize("n,mode", CASES)
def test_respace_matches_dit_space_timesteps(n, mode):
    expected = sorted(dit_space_timesteps(1000, f"ddim{n}" if mode == "ddim" else str(n)))
    got = respace(n, mode)
    assert got.tolist() == expected
    assert len(got) == n
    assert np.all(np.diff(got) > 0)


@pytest.mark.parametrize("n", [10, 20, 50, 250])
def test_linspace_closed_form_and_ends(n):
    got = respace(n, "linspace")
    # docs/ARCHITECTURE.md, reference facts: t_k = round(k·999/(N−1)), both ends kept.
    assert got.tolist() == [round(k * 999 / (n - 1)) for k in range(n)]
    assert got[0] == 0 and got[-1] == 999


@pytest.mark.parametrize("n,stride", [(10, 100), (20, 50), (50, 20), (250, 4)])
def test_ddim_spacing_hand_values(n, stride):
    assert respace(n, "ddim").tolist() == list(range(0, 1000, stride))


def test_hand_checked_values():
    lin20 = respace(20, "linspace").tolist()
    assert lin20[:3] == [0, 53, 105]
    assert lin20[-2:] == [946, 999]
    assert respace(50, "ddim").tolist() == [20 * k for k in range(50)]
    assert respace(50, "ddim")[-1] == 980
    assert respace(1, "linspace").tolist() == [0]


@pytest.mark.parametrize("bad", [0, -3, 1001, 20.0, "20", True, None])
def test_respace_bad_step_counts(bad):
    with pytest.raises(BlockcacheError):
        respace(bad)


def test_respace_bad_spacing_and_impossible_ddim():
    with pytest.raises(BlockcacheError, match="spacing"):
        respace(20, "uniform")
    with pytest.raises(BlockcacheError):
        respace(999, "ddim")  # no integer stride gives exactly 999 steps
    with pytest.raises(BlockcacheError):
        make_sampler("dpm", 20)


def test_linear_betas_are_dits():
    b = linear_betas()
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == 1e-4 and b[-1] == 0.02
    assert np.array_equal(b, np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


@pytest.mark.parametrize("n,mode", CASES)
def test_ddim_tables_bit_for_bit(n, mode):
    kept = sorted(dit_space_timesteps(1000, f"ddim{n}" if mode == "ddim" else str(n)))
    tmap, ac, ac_prev = dit_spaced_tables(kept)
    sampler = DDIMSampler(n, mode)
    # Sampling order: noisiest first = DiT's indices N-1 … 0.
    assert sampler.timesteps.tolist() == tmap[::-1].tolist()
    assert sampler.alphas_cumprod.dtype == np.float64
    assert np.array_equal(sampler.alphas_cumprod, ac[::-1])
    assert np.array_equal(sampler.alphas_cumprod_prev, ac_prev[::-1])
    assert sampler.alphas_cumprod_prev[-1] == 1.0


@pytest.mark.parametrize("n,mode", CASES)
def test_ddim_coefficients_vs_two_stage_formula(n, mode):
    kept = sorted(dit_space_timesteps(1000, f"ddim{n}" if mode == "ddim" else str(n)))
    _, ac, ac_prev = dit_spaced_tables(kept)
    ac, ac_prev = ac[::-1], ac_prev[::-1]
    sampler = DDIMSampler(n, mode)
    a, b = sampler.coefficients()
    assert a.dtype == np.float64 and b.dtype == np.float64 and a.shape == b.shape == (n,)
    rng = np.random.default_rng(1)
    for s in range(n):
        x = rng.standard_normal((2, 4, 3, 3))
        eps = rng.standard_normal((2, 4, 3, 3))
        sqrt_recip, sqrt_recipm1 = np.sqrt(1.0 / ac[s]), np.sqrt(1.0 / ac[s] - 1.0)
        x0 = sqrt_recip * x - sqrt_recipm1 * eps
        x_prev = np.sqrt(ac_prev[s]) * x0 + np.sqrt(1.0 - ac_prev[s]) * eps
        np.testing.assert_allclose(a[s] * x + b[s] * eps, x_prev, rtol=0, atol=1e-12)
        # DiT re-derives eps from x0 before the update; same result up to rounding.
        eps2 = (sqrt_recip * x - x0) / sqrt_recipm1
        x_prev2 = x0 * np.sqrt(ac_prev[s]) + np.sqrt(1.0 - ac_prev[s]) * eps2
        np.testing.assert_allclose(sampler.step(eps, s, x), x_prev2, rtol=0, atol=1e-11)
    # The last step lands on x0: a = √(1/ᾱ), b = −√(1/ᾱ−1).
    assert a[-1] == pytest.approx(np.sqrt(1.0 / ac[-1]), rel=1e-15)
    assert b[-1] == pytest.approx(-np.sqrt(1.0 / ac[-1] - 1.0), rel=1e-12)


def test_step_on_torch_tensors():
    sampler = DDIMSampler(10)
    a, b = sampler.coefficients()
    x, eps = torch.randn(1, 4, 2, 2, dtype=torch.float64), torch.randn(1, 4, 2, 2, dtype=torch.float64)
    out = sampler.step(eps, 3, x)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, a[3] * x + b[3] * eps, rtol=0, atol=1e-15)


def test_sampler_to_dict():
    assert make_sampler("ddim", 20, "ddim").to_dict() == {"name": "ddim", "steps": 20, "spacing": "ddim"}


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------------

def _cfg_case(lib):
    cond = np.stack([np.full((2, 2), v, np.float64) for v in (2.0, 4.0, 6.0, 8.0)])[None]   # (1, 4, 2, 2)
    uncond = np.ones_like(cond)
    return (cond, uncond) if lib == "numpy" else (torch.from_numpy(cond), torch.from_numpy(uncond))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_guided_eps_first3_keeps_channel3_conditional(lib):
    cond, uncond = _cfg_case(lib)
    out = guided_eps(cond, uncond, 1.5, "first3")
    out = np.asarray(out)
    # 1 + 1.5·(c − 1): 2 → 2.5, 4 → 5.5, 6 → 8.5; channel 3 keeps the conditional 8.
    for ch, want in enumerate([2.5, 5.5, 8.5, 8.0]):
        assert np.all(out[0, ch] == want), (ch, out[0, ch])
    assert out.shape == (1, 4, 2, 2)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_guided_eps_all_guides_every_channel(lib):
    cond, uncond = _cfg_case(lib)
    out = np.asarray(guided_eps(cond, uncond, 1.5, "all"))
    for ch, want in enumerate([2.5, 5.5, 8.5, 11.5]):
        assert np.all(out[0, ch] == want)


def test_guided_eps_default_is_first3_and_bad_channels():
    cond, uncond = _cfg_case("numpy")
    assert np.all(guided_eps(cond, uncond, 4.0)[0, 3] == 8.0)
    with pytest.raises(BlockcacheError):
        guided_eps(cond, uncond, 4.0, "last1")


def test_guided_eps_fewer_than_four_channels_guides_all():
    cond, uncond = np.full((1, 1, 2, 2), 3.0), np.zeros((1, 1, 2, 2))
    assert np.all(guided_eps(cond, uncond, 2.0, "first3") == 6.0)


def test_initial_noise_is_seeded_float32():
    a, b, c = initial_noise((2, 4, 8, 8), 7), initial_noise((2, 4, 8, 8), 7), initial_noise((2, 4, 8, 8), 8)
    assert a.dtype == np.float32 and a.shape == (2, 4, 8, 8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert abs(float(a.std()) - 1.0) < 0.2
