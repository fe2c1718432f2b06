"""DPM-Solver++ 2M (schedules.dpm_solver_multistep) against diffusers' DPMSolverMultistepScheduler
with PixArt's configuration, and against a re-derivation by hand.

How diffusers computes, and what the float64 comparison changes. Its betas and ᾱ are float32
(torch.linspace/cumprod), `set_timesteps` casts its σ table to float32, and `step` casts the sample
to float32 ("upcast to avoid precision issues") before the update. Fed float64 eps, the rest of its
arithmetic promotes to float64. So the float64 runs here (a) hand diffusers the sampler's float64 ᾱ
and σ table (the same numbers, so only the arithmetic differs), and (b) keep `sample.to(float32)`
from rounding a float64 sample, with a narrow patch of `Tensor.to` for the duration of `step`.
The folded form re-associates diffusers' expression, so the latents agree to ~1e-15 relative rather
than bit for bit; the asserted bound is 1e-12. A separate test runs diffusers unpatched (float32, its
own tables) against the sampler, as the PixArt pipeline would.
"""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from schedules.dpm_solver_multistep import DPMSolverPP2MSampler
from schedules.errors import BlockcacheError

pytestmark = pytest.mark.usefixtures("single_thread")

# PixArt-alpha/PixArt-XL-2-1024-MS (and PixArt-Sigma) scheduler/scheduler_config.json, plus the
# diffusers defaults the published file leaves out (final_sigmas_type) spelled out. The published
# file has variance_type null: the pipeline splits off the learned sigma itself (with
# "learned_range" diffusers would keep only the first 3 channels of a 4-channel eps).
PIXART = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
              prediction_type="epsilon", solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
              lower_order_final=True, euler_at_final=False, use_karras_sigmas=False, use_lu_lambdas=False,
              timestep_spacing="linspace", final_sigmas_type="zero", lambda_min_clipped=-math.inf,
              thresholding=False, steps_offset=0, variance_type=None)

SHAPE = (2, 4, 4, 4)


def eps_model(x, t):
    """The deterministic stand-in model both sides use (numpy, so both get the same eps bits)."""
    return np.tanh(0.3 * x + 0.1 * t / 1000)


def x_init(dtype=np.float64):
    return np.random.default_rng(0).standard_normal(SHAPE).astype(dtype)


def rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# --- diffusers in float64 ----------------------------------------------------------------------------

def float64_scheduler(num_steps, **overrides):
    """diffusers' scheduler with the float64 tables of the sampler in place of its float32 ones."""
    sched = DPMSolverMultistepScheduler(**{**PIXART, **overrides})
    ac = np.cumprod(1.0 - np.linspace(0.0001, 0.02, 1000, dtype=np.float64))
    sched.alphas_cumprod = torch.from_numpy(ac)
    sched.set_timesteps(num_steps)
    # set_timesteps ends with `.astype(np.float32)`; redo its table lookup in float64 (np.interp at
    # integer timesteps is the table entry) and final_sigmas_type "zero".
    sigma = np.sqrt((1.0 - ac) / ac)
    sched.sigmas = torch.from_numpy(np.append(sigma[sched.timesteps.numpy()], 0.0))
    return sched


def _keep_float64(to):
    def patched(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and args[0] is torch.float32 and self.dtype == torch.float64:
            return self
        return to(self, *args, **kwargs)

    return patched


def run_diffusers(sched, x, float64=True):
    """All latents x_0 … x_N of diffusers' own loop (scheduler.step, as the pipeline calls it)."""
    dtype = torch.float64 if float64 else torch.float32
    x = torch.from_numpy(np.array(x)).to(dtype)
    out = [x.numpy().copy()]
    patch = mock.patch.object(torch.Tensor, "to", _keep_float64(torch.Tensor.to)) if float64 else _nothing()
    with patch:
        for t in sched.timesteps:
            eps = torch.from_numpy(eps_model(x.numpy(), int(t)).astype(x.numpy().dtype))
            x = sched.step(eps, t, x, return_dict=False)[0]
            assert x.dtype == dtype
            out.append(x.numpy().copy())
    assert "to" not in torch.Tensor.__dict__  # the patch is gone
    return out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- 1. timesteps and tables -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 10, 14, 15, 20, 25, 50, 999])
def test_timesteps_equal_diffusers(n):
    sched = DPMSolverMultistepScheduler(**PIXART)
    sched.set_timesteps(n)
    sampler = DPMSolverPP2MSampler(n)
    ts = sampler.timesteps
    assert ts.dtype == np.int64 and len(ts) == n == sampler.num_evals
    np.testing.assert_array_equal(ts, sched.timesteps.numpy())
    # diffusers' own (float32) σ table: the same schedule up to its float32 betas and cumprod, whose
    # rounding moves ᾱ by up to 2.5e-7 (so σ = √((1 − ᾱ)/ᾱ) by up to 8e-5 relative at t = 1, 3e-7 above 200).
    sig = sampler.sigmas
    assert len(sig) == n + 1 and sig[-1] == 0.0 == float(sched.sigmas[-1])
    theirs = sched.sigmas.numpy()[:-1].astype(np.float64)
    np.testing.assert_allclose(1.0 / (sig[:-1] ** 2 + 1.0), 1.0 / (theirs**2 + 1.0), rtol=0, atol=5e-7)
    np.testing.assert_allclose(sig[:-1], theirs, rtol=1e-4, atol=0)
    np.testing.assert_allclose(sig[:-1][ts >= 200], theirs[ts >= 200], rtol=1e-6, atol=0)


def test_twenty_step_timesteps_literal():
    assert DPMSolverPP2MSampler(20).timesteps.tolist() == [999, 949, 899, 849, 799, 749, 699, 649, 599, 549,
                                                            500, 450, 400, 350, 300, 250, 200, 150, 100, 50]


def test_float64_table_is_diffusers_schedule():
    # The table handed to diffusers is its linear schedule in float64 (torch computes it alike).
    betas64 = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1.0 - betas64, 0).numpy()
    sched = float64_scheduler(20)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), ac, rtol=1e-14, atol=0)
    np.testing.assert_array_equal(DPMSolverPP2MSampler(20).sigmas, sched.sigmas.numpy())


# --- 2./3. whole loops against diffusers in float64 ----------------------------------------------------

@pytest.mark.parametrize("n", [20, 10, 50, 14, 15, 2, 3, 1])
def test_loop_matches_diffusers_float64(n):
    x = x_init()
    want = run_diffusers(float64_scheduler(n), x)
    got = DPMSolverPP2MSampler(n).sample(x, eps_model)
    assert len(got) == len(want) == n + 1
    worst = max(rel(g, w) for g, w in zip(got[1:], want[1:]))
    assert worst < 1e-12, worst
    if n == 20:
        # The test can fail: first order all the way (DDIM) is far from 2M.
        ddim = run_diffusers(float64_scheduler(n, solver_order=1), x)
        assert rel(ddim[-1], want[-1]) > 1e-4


@pytest.mark.parametrize("n", [14, 15])
def test_lower_order_final_boundary(n):
    # diffusers' `lower_order_final` clause "len(timesteps) < 15" and `lower_order_second` change
    # nothing for solver_order 2 with final_sigmas_type "zero": the last step is first order (to σ = 0)
    # on both sides of 15, and so is it with lower_order_final off.
    x = x_init()
    on = run_diffusers(float64_scheduler(n), x)
    off = run_diffusers(float64_scheduler(n, lower_order_final=False), x)
    for u, v in zip(on, off):
        np.testing.assert_array_equal(u, v)
    sampler = DPMSolverPP2MSampler(n)
    c = sampler.carry_coefficients()
    assert c[0] == 0.0 and c[-1] == 0.0 and np.all(c[1:-1] != 0.0)
    # The last step lands on the data prediction: a = 1/α, b = −σ/α.
    a, b = sampler.coefficients()
    p, q = sampler.carry_output_coefficients()
    assert a[-1] == p[-1] and b[-1] == q[-1]


@pytest.mark.parametrize("n", [20, 50])
def test_constants_match_diffusers_linear_response(n):
    # diffusers' update is linear in (sample, eps, previous data prediction): one call on the basis
    # (1, 0, 0), (0, 1, 0), (0, 0, 1) as three elements returns its own a, b, c for that step.
    sched = float64_scheduler(n)
    sampler = DPMSolverPP2MSampler(n)
    a, b = sampler.coefficients()
    mine = np.stack([a, b, sampler.carry_coefficients()], 1)
    theirs = []
    basis = [torch.tensor(v, dtype=torch.float64) for v in ([1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0])]
    with mock.patch.object(torch.Tensor, "to", _keep_float64(torch.Tensor.to)):
        for e in range(n):
            sched._step_index, sched.lower_order_nums = e, min(e, 2)
            sched.model_outputs = [None, basis[2]]  # the previous evaluation's data prediction
            theirs.append(sched.step(basis[1], sched.timesteps[e], basis[0], return_dict=False)[0].numpy())
    theirs = np.array(theirs)
    np.testing.assert_allclose(mine, theirs, rtol=1e-13, atol=0)
    assert np.all((theirs[:, 2] == 0.0) == (mine[:, 2] == 0.0))
    # The carry diffusers keeps is the data prediction (x − σ·eps)/α: check p, q through it.
    p, q = sampler.carry_output_coefficients()
    for e in (0, n // 2, n - 1):
        sched._step_index = e
        d = sched.convert_model_output(basis[1], sample=basis[0]).numpy()
        np.testing.assert_allclose([p[e], q[e]], d[:2], rtol=1e-14, atol=0)


def test_native_float32_diffusers_within_float32_noise():
    # The pipeline's scheduler as shipped: float32 tables and arithmetic. The sampler (float64) and
    # its folded constants applied in float32 (as a compiled graph does) both agree to ~1e-6.
    n = 20
    x = x_init(np.float32)
    native = run_diffusers(_native(n), x, float64=False)
    sampler = DPMSolverPP2MSampler(n)
    exact = sampler.sample(x.astype(np.float64), eps_model)
    assert max(rel(u, v) for u, v in zip(native, exact)) < 5e-6
    f = np.float32
    a, b = sampler.coefficients()
    c = sampler.carry_coefficients()
    p, q = sampler.carry_output_coefficients()
    xe, carry, worst = x, np.zeros_like(x), 0.0
    for e, t in enumerate(sampler.timesteps):
        eps = eps_model(xe, int(t)).astype(np.float32)
        xe, carry = f(a[e]) * xe + f(b[e]) * eps + f(c[e]) * carry, f(p[e]) * xe + f(q[e]) * eps
        assert xe.dtype == np.float32
        worst = max(worst, rel(xe, native[e + 1]))
    assert worst < 5e-6, worst


def _native(n):
    sched = DPMSolverMultistepScheduler(**PIXART)
    sched.set_timesteps(n)
    return sched


# --- 4. by hand -----------------------------------------------------------------------------------------

def _alpha_bar(t: int) -> float:
    acc = 1.0
    for k in range(t + 1):
        acc *= 1.0 - (0.0001 + (0.02 - 0.0001) * k / 999)
    return acc


def _vp(t: int):
    """VP α, σ and λ = log(α/σ) at an integer timestep, from ᾱ directly."""
    ab = _alpha_bar(t)
    return math.sqrt(ab), math.sqrt(1.0 - ab), 0.5 * math.log(ab / (1.0 - ab))


def test_two_steps_by_hand():
    # linspace(0, 999, 3) = 0, 499.5, 999; 499.5 rounds half to even → 500.
    sampler = DPMSolverPP2MSampler(2)
    assert sampler.timesteps.tolist() == [999, 500]
    al0, sg0, la0 = _vp(999)
    al1, sg1, la1 = _vp(500)
    # Step 0, first order to t = 500: x1 = (σ1/σ0)·x − α1·(e^{−h} − 1)·(x − σ0·eps)/α0.
    phi = math.expm1(-(la1 - la0))
    a0, b0 = sg1 / sg0 - al1 * phi / al0, al1 * phi * sg0 / al0
    # Step 1, first order to σ = 0 (α = 1, e^{−h} = 0): x2 = (x − σ1·eps)/α1.
    a1, b1 = 1.0 / al1, -sg1 / al1
    a, b = sampler.coefficients()
    np.testing.assert_allclose(a, [a0, a1], rtol=1e-12, atol=0)
    np.testing.assert_allclose(b, [b0, b1], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(sampler.carry_coefficients(), [0.0, 0.0])
    p, q = sampler.carry_output_coefficients()
    np.testing.assert_allclose(p, [1 / al0, 1 / al1], rtol=1e-12, atol=0)
    np.testing.assert_allclose(q, [-sg0 / al0, -sg1 / al1], rtol=1e-12, atol=0)
    # Sanity of the hand numbers: α_999 = √ᾱ_999 ≈ 0.0064, so D_0 = (x − σ0·eps)/α0 and with it a0
    # and b0 are large (≈ ±α1/α0 ≈ ±44) and nearly cancel for eps ≈ x.
    assert 0.006 < al0 < 0.007 and 0.0 < a0 + b0 < 1.0


def test_three_steps_by_hand():
    # linspace(0, 999, 4) = 0, 333, 666, 999: one second-order step in the middle.
    sampler = DPMSolverPP2MSampler(3)
    assert sampler.timesteps.tolist() == [999, 666, 333]
    (al0, sg0, la0), (al1, sg1, la1), (al2, sg2, la2) = _vp(999), _vp(666), _vp(333)
    h, h0 = la2 - la1, la1 - la0
    r0 = h0 / h
    phi = math.expm1(-h)
    # x2 = (σ2/σ1)·x1 − α2·φ·D1 − ½·α2·φ·(D1 − D0)/r0, D_k = (x_k − σ_k·eps_k)/α_k.
    k = al2 * phi * (1.0 + 1.0 / (2.0 * r0))
    a, b = sampler.coefficients()
    c = sampler.carry_coefficients()
    np.testing.assert_allclose(a[1], sg2 / sg1 - k / al1, rtol=1e-12)
    np.testing.assert_allclose(b[1], k * sg1 / al1, rtol=1e-12)
    np.testing.assert_allclose(c, [0.0, al2 * phi / (2.0 * r0), 0.0], rtol=1e-12, atol=0)
    assert c[1] < 0.0  # φ < 0: the multistep correction extrapolates away from D0

    # A whole loop with the update written out (no folded constants) on a linear toy model.
    kk = 0.37
    x = np.array([[1.0, -2.0], [0.5, 3.25]])
    d0 = (x - sg0 * kk * x) / al0
    x1 = (sg1 / sg0) * x - al1 * math.expm1(-(la1 - la0)) * d0
    d1 = (x1 - sg1 * kk * x1) / al1
    x2 = (sg2 / sg1) * x1 - al2 * phi * d1 - 0.5 * al2 * phi * (d1 - d0) / r0
    x3 = (x2 - sg2 * kk * x2) / al2
    got = sampler.sample(x, lambda z, t: kk * z)
    for g, w in zip(got, [x, x1, x2, x3]):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_exact_data_model_returns_the_data(n):
    # If the model knows x0, every data prediction is x0: DPM-Solver++ then follows the marginal
    # α_t·x0 + σ_t·noise exactly and returns x0 at σ = 0.
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    sampler = DPMSolverPP2MSampler(n)
    al, sg, _ = _vp(int(sampler.timesteps[0]))
    latents = sampler.sample(al * x0 + sg * noise, lambda x, t: (x - _vp(t)[0] * x0) / _vp(t)[1])
    for k in range(1, n):
        al, sg, _ = _vp(int(sampler.timesteps[k]))
        np.testing.assert_allclose(latents[k], al * x0 + sg * noise, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(latents[-1], x0, rtol=1e-9, atol=1e-10)


# --- interface ------------------------------------------------------------------------------------------

def test_step_is_pure_and_backend_neutral():
    sampler = DPMSolverPP2MSampler(6)
    rng = np.random.default_rng(0)
    x, eps, carry = (rng.standard_normal((2, 3)) for _ in range(3))
    a, b = sampler.coefficients()
    c = sampler.carry_coefficients()
    p, q = sampler.carry_output_coefficients()
    for e in range(6):
        want = a[e] * x + b[e] * eps + c[e] * carry
        np.testing.assert_allclose(sampler.step(eps, e, x, carry), want, rtol=1e-15)
        t = sampler.step(torch.from_numpy(eps), e, torch.from_numpy(x), torch.from_numpy(carry))
        np.testing.assert_allclose(t.numpy(), want, rtol=1e-15)
        np.testing.assert_allclose(sampler.carry_out(eps, e, x), p[e] * x + q[e] * eps, rtol=1e-15)
    np.testing.assert_array_equal(sampler.step(eps, 0, x), sampler.step(eps, 0, x, carry))
    with pytest.raises(ValueError):
        sampler.step(eps, 1, x)
    a[:] = 0.0
    assert np.all(sampler.coefficients()[0] != 0.0)
    assert sampler.to_dict() == {"name": "dpm-solver++-2m", "steps": 6, "spacing": "linspace"}
    # Its carry is an output of the previous row, not an input latent: no `carry_source` to misread.
    assert not hasattr(sampler, "carry_source")


# --- 5. refusals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [0, -3, 2.5, 20.0, True, "20", None, 1001, 1000])
def test_bad_step_counts_refused_in_one_line(steps):
    with pytest.raises(BlockcacheError) as info:
        DPMSolverPP2MSampler(steps)
    assert "\n" not in str(info.value) and "dpm-solver++-2m" in str(info.value)


@pytest.mark.parametrize("spacing", ["ddim", "trailing", "leading", "time-uniform", ""])
def test_unknown_spacing_refused_in_one_line(spacing):
    with pytest.raises(BlockcacheError) as info:
        DPMSolverPP2MSampler(20, spacing)
    assert "\n" not in str(info.value) and "linspace" in str(info.value)
