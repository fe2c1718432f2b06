"""DPM-Solver++ 2S (schedules.dpm_solver) against independent re-derivations.

The expectations never come from the module itself: the discrete VP schedule is rebuilt here twice,
once in plain Python (math + loops, for hand-worked cases) and once in torch float64 (for a literal
re-implementation of the published single-step second-order update).
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
import torch

from schedules.dpm_solver import DPMSolver2Sampler
from schedules.errors import BlockcacheError

pytestmark = pytest.mark.usefixtures("single_thread")

N = 1000


# --- the discrete VP schedule in plain Python -------------------------------------------------------

def _py_tables():
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    knots, log_alphas, acc = [], [], 0.0
    for n in range(N):
        beta = (lo + (hi - lo) * n / (N - 1)) ** 2
        acc += 0.5 * math.log(1.0 - beta)
        knots.append((n + 1) / N)
        log_alphas.append(acc)
    return knots, log_alphas


KNOTS, LOG_ALPHAS = _py_tables()


def py_log_alpha(t: float) -> float:
    j = min(max(bisect.bisect_left(KNOTS, t), 1), N - 1)  # segment [j-1, j]
    x0, x1, y0, y1 = KNOTS[j - 1], KNOTS[j], LOG_ALPHAS[j - 1], LOG_ALPHAS[j]
    return y0 + (t - x0) * (y1 - y0) / (x1 - x0)


def py_alpha(t):
    return math.exp(py_log_alpha(t))


def py_sigma(t):
    return math.sqrt(1.0 - math.exp(2.0 * py_log_alpha(t)))


def py_lambda(t):
    return math.log(py_alpha(t)) - math.log(py_sigma(t))


def py_inverse_lambda(lam: float) -> float:
    # α² = 1/(1 + e^{−2λ}); then walk the (decreasing) log α table for the enclosing segment.
    la = -0.5 * math.log1p(math.exp(-2.0 * lam))
    for j in range(1, N):
        if LOG_ALPHAS[j] <= la <= LOG_ALPHAS[j - 1]:
            x0, x1, y0, y1 = LOG_ALPHAS[j - 1], LOG_ALPHAS[j], KNOTS[j - 1], KNOTS[j]
            return y0 + (la - x0) * (y1 - y0) / (x1 - x0)
    raise AssertionError(f"lambda {lam} outside the table")


# --- 1. hand-worked cases -----------------------------------------------------------------------------

def test_one_solver_step_linear_model_by_hand():
    k = 0.37  # toy model eps(x, t) = k·x
    s, t = 1.0, 1.0 / N
    lam_s, lam_t = py_lambda(s), py_lambda(t)
    h = lam_t - lam_s
    s1 = py_inverse_lambda(lam_s + 0.5 * h)
    al_s, al_s1, al_t = py_alpha(s), py_alpha(s1), py_alpha(t)
    sg_s, sg_s1, sg_t = py_sigma(s), py_sigma(s1), py_sigma(t)
    phi_11, phi_1 = math.expm1(-0.5 * h), math.expm1(-h)

    x = np.array([[1.0, -2.0], [0.5, 3.25]])
    x0_s = (x - sg_s * (k * x)) / al_s
    x_s1 = (sg_s1 / sg_s) * x - al_s1 * phi_11 * x0_s
    x0_s1 = (x_s1 - sg_s1 * (k * x_s1)) / al_s1
    # The published form, with 0.5/r1 = 1 for r1 = 1/2.
    x_t = (sg_t / sg_s) * x - al_t * phi_1 * x0_s - 1.0 * al_t * phi_1 * (x0_s1 - x0_s)

    sampler = DPMSolver2Sampler(2)
    np.testing.assert_allclose(sampler.timesteps, [1000.0, s1 * 1000.0], rtol=1e-12)
    np.testing.assert_allclose(sampler.outer_times, [1.0, 0.001], rtol=0, atol=1e-15)
    got_s1 = sampler.step(k * x, 0, x)
    np.testing.assert_allclose(got_s1, x_s1, rtol=1e-12)
    got = sampler.step(k * got_s1, 1, got_s1, x)
    np.testing.assert_allclose(got, x_t, rtol=1e-12)

    # The folded constants themselves, from x_t = (σ_t/σ_s)·x − α_t·φ1·(x_s1 − σ_s1·eps_s1)/α_s1.
    a, b = sampler.coefficients()
    c = sampler.carry_coefficients()
    np.testing.assert_allclose(a, [sg_s1 / sg_s - al_s1 * phi_11 / al_s, -al_t * phi_1 / al_s1], rtol=1e-12)
    np.testing.assert_allclose(b, [al_s1 * phi_11 * sg_s / al_s, al_t * phi_1 * sg_s1 / al_s1], rtol=1e-12)
    np.testing.assert_allclose(c, [0.0, sg_t / sg_s], rtol=1e-12)
    assert c[0] == 0.0
    # Sanity of the hand numbers: α(1) is tiny, α(1/1000)² = 1 − β_0.
    assert al_t**2 == pytest.approx(1.0 - 0.00085, rel=1e-12)
    assert 0.0 < al_s < 0.1


def test_four_evaluations_timesteps_by_hand():
    sampler = DPMSolver2Sampler(4)
    # linspace(1, 0.001, 3): the midpoint is (1 + 0.001)/2 = 0.5005.
    outer = [1.0, 0.5005, 0.001]
    np.testing.assert_allclose(sampler.outer_times, outer, rtol=0, atol=1e-15)
    expected = []
    for s, t in zip(outer[:-1], outer[1:]):
        s1 = py_inverse_lambda(0.5 * (py_lambda(s) + py_lambda(t)))
        expected += [s * 1000.0, s1 * 1000.0]
    np.testing.assert_allclose(sampler.timesteps, expected, rtol=1e-12)
    assert sampler.timesteps[0] == 1000.0 and sampler.timesteps[2] == pytest.approx(500.5, abs=1e-12)
    assert sampler.carry_source.tolist() == [0, 0, 2, 2]
    assert sampler.to_dict() == {"name": "dpm-solver-2", "steps": 4}


# --- 2. against a literal torch re-implementation --------------------------------------------------

class TorchVP:
    def __init__(self):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, N, dtype=torch.float64) ** 2
        self.t = torch.arange(1, N + 1, dtype=torch.float64) / N
        self.la = 0.5 * torch.cumsum(torch.log1p(-betas), 0)

    @staticmethod
    def _lerp(x, xp, fp):  # xp increasing; end segments extend
        j = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
        return fp[j - 1] + (x - xp[j - 1]) * (fp[j] - fp[j - 1]) / (xp[j] - xp[j - 1])

    def log_alpha(self, t):
        return self._lerp(t, self.t, self.la)

    def std(self, t):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lam(self, t):
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(1.0 - torch.exp(2.0 * la))

    def inverse_lambda(self, lam):
        la = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        return self._lerp(la, torch.flip(self.la, [0]), torch.flip(self.t, [0]))


def toy_eps(x, t_model):
    # Nonlinear in x and dependent on the model time, so a wrong time or a wrong split of a/b/c shows.
    return torch.tanh(0.3 * x + 0.001 * t_model) * (1.0 + 0.0004 * t_model) + 0.05 * x


def reference_dpmpp_2s(x, nfe):
    vp, seen = TorchVP(), []

    def data_pred(x, t):
        seen.append(float(t) * N)
        eps = toy_eps(x, t * N)
        return (x - vp.std(t) * eps) / torch.exp(vp.log_alpha(t))

    r1 = 0.5
    ts = torch.linspace(1.0, 1.0 / N, nfe // 2 + 1, dtype=torch.float64)
    for i in range(nfe // 2):
        s, t = ts[i : i + 1], ts[i + 1 : i + 2]
        lambda_s, lambda_t = vp.lam(s), vp.lam(t)
        h = lambda_t - lambda_s
        s1 = vp.inverse_lambda(lambda_s + r1 * h)
        sigma_s, sigma_s1, sigma_t = vp.std(s), vp.std(s1), vp.std(t)
        alpha_s1, alpha_t = torch.exp(vp.log_alpha(s1)), torch.exp(vp.log_alpha(t))
        phi_11, phi_1 = torch.expm1(-r1 * h), torch.expm1(-h)
        model_s = data_pred(x, s)
        x_s1 = sigma_s1 / sigma_s * x - alpha_s1 * phi_11 * model_s
        model_s1 = data_pred(x_s1, s1)
        x = sigma_t / sigma_s * x - alpha_t * phi_1 * model_s - (0.5 / r1) * (alpha_t * phi_1) * (model_s1 - model_s)
    return x, seen


def run_sampler(sampler, x):
    """The runtime's loop: each row's input is kept so a row can read its carry's input."""
    inputs = []
    times = sampler.timesteps
    for e, src in enumerate(sampler.carry_source):
        inputs.append(x)
        eps = toy_eps(x, float(times[e]))
        x = sampler.step(eps, e, x, inputs[src])
    return x


@pytest.mark.parametrize("nfe", [20, 50])
def test_matches_literal_reference(nfe):
    x_T = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(nfe))
    want, seen = reference_dpmpp_2s(x_T.clone(), nfe)
    sampler = DPMSolver2Sampler(nfe)
    np.testing.assert_allclose(sampler.timesteps, seen, rtol=1e-12)
    got = run_sampler(sampler, x_T.clone())
    assert got.dtype == torch.float64
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-10, float(rel)
    # A wrong solver (e.g. first-order DDIM-like update) would be far off, so the test can fail.
    assert (got - x_T).norm() / x_T.norm() > 0.1


# --- 3. properties ----------------------------------------------------------------------------------

@pytest.mark.parametrize("nfe", [2, 4, 10, 20, 50, 100])
def test_times_decrease_and_intermediates_lie_inside(nfe):
    sampler = DPMSolver2Sampler(nfe)
    ts = sampler.timesteps
    outer = sampler.outer_times
    assert ts.dtype == np.float64 and len(ts) == nfe and len(outer) == nfe // 2 + 1
    assert np.all(np.diff(ts) < 0)
    assert ts[0] == 1000.0 and ts[-1] > 1.0
    for i in range(nfe // 2):
        assert outer[i] * 1000 > ts[2 * i + 1] > outer[i + 1] * 1000
    assert sampler.carry_source.tolist() == [2 * (e // 2) for e in range(nfe)]
    assert np.all(sampler.carry_coefficients()[0::2] == 0.0)
    assert np.all(sampler.carry_coefficients()[1::2] > 0.0)


@pytest.mark.parametrize("nfe", [2, 6, 20])
def test_exact_data_model_lands_on_the_marginal(nfe):
    # If the model knows x0 exactly, eps = (x − α·x0)/σ and DPM-Solver++ is exact: the result is
    # α(1/1000)·x0 + σ(1/1000)·n for x_T = α(1)·x0 + σ(1)·n.
    rng = np.random.default_rng(1)
    x0, n = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    sampler = DPMSolver2Sampler(nfe)
    x = py_alpha(1.0) * x0 + py_sigma(1.0) * n
    inputs = []
    for e, src in enumerate(sampler.carry_source):
        inputs.append(x)
        t = sampler.timesteps[e] / 1000.0
        eps = (x - py_alpha(t) * x0) / py_sigma(t)
        x = sampler.step(eps, e, x, inputs[src])
    np.testing.assert_allclose(x, py_alpha(0.001) * x0 + py_sigma(0.001) * n, rtol=1e-9, atol=1e-10)


def test_step_is_pure_and_backend_neutral():
    sampler = DPMSolver2Sampler(6)
    rng = np.random.default_rng(0)
    x, eps, carry = (rng.standard_normal((2, 3)) for _ in range(3))
    a, b = sampler.coefficients()
    c = sampler.carry_coefficients()
    for e in range(6):
        want = a[e] * x + b[e] * eps + c[e] * carry
        np.testing.assert_allclose(sampler.step(eps, e, x, carry), want, rtol=1e-15)
        t = sampler.step(torch.from_numpy(eps), e, torch.from_numpy(x), torch.from_numpy(carry))
        np.testing.assert_allclose(t.numpy(), want, rtol=1e-15)
    # Outer rows ignore the carry; intermediate rows cannot run without it.
    np.testing.assert_array_equal(sampler.step(eps, 2, x), sampler.step(eps, 2, x, carry))
    with pytest.raises(ValueError):
        sampler.step(eps, 3, x)
    # Returned arrays are copies: mutating them leaves the sampler intact.
    a[:] = 0.0
    assert np.all(sampler.coefficients()[0] != 0.0)


# --- 4. bad inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 1, 3, 7, -2, 2.0, 4.5, "4", None, True])
def test_bad_num_evals(bad):
    with pytest.raises(BlockcacheError) as info:
        DPMSolver2Sampler(bad)
    assert "\n" not in str(info.value)


def test_numpy_integer_accepted():
    assert DPMSolver2Sampler(np.int64(8)).timesteps.shape == (8,)
