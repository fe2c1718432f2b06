"""DPM-Solver++ (2S) over Stable Diffusion's discrete noise schedule, in numpy only (no torch).

It follows the DPM-Solver authors' `dpm_solver_pytorch.py` as U-ViT and Learning-to-Cache use it
(Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022):
`NoiseScheduleVP('discrete')` over the "scaled linear" betas, time-uniform outer steps from t = 1 to
t = 1/1000, and the single-step second-order data-prediction update with r1 = 1/2 ("dpmsolver"
solver type), no thresholding and no final denoising step. The model sees the fractional time t·1000.

A solver step costs two model evaluations, and a caching schedule's rows are *evaluations* in
sampling order: row 2i is solver step i's outer evaluation (at s), row 2i+1 its intermediate one (at
s1). Each evaluation's update is folded into float64 constants,
`x_next = a[e]·x_e + b[e]·eps_e + c[e]·x_carry[e]`, where the carry is the latent at the start of
the solver step (the outer evaluation's input), so a compiled graph needs no schedule arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BlockcacheError

NUM_TRAIN_TIMESTEPS = 1000
MAX_EVALUATIONS = 2 * NUM_TRAIN_TIMESTEPS  # at most one solver step per training timestep
R1 = 0.5


def sd_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Stable Diffusion's "scaled linear" betas: linear in √β from √0.00085 to √0.012, squared."""
    return np.linspace(np.sqrt(0.00085), np.sqrt(0.012), num_timesteps, dtype=np.float64) ** 2


def _interp(x, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation over increasing `xp`, extending the end segments linearly.

    np.interp would clamp beyond the ends; the reference `interpolate_fn` extrapolates instead, so
    this does the same (inside the knots both agree).
    """
    x = np.asarray(x, dtype=np.float64)
    hi = np.clip(np.searchsorted(xp, x, side="left"), 1, len(xp) - 1)
    lo = hi - 1
    x0, x1, y0, y1 = xp[lo], xp[hi], fp[lo], fp[hi]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class DiscreteVP:
    """The reference `NoiseScheduleVP('discrete', betas)`: log α(t) interpolated over t = (n+1)/N."""

    def __init__(self, betas: np.ndarray | None = None):
        betas = sd_betas() if betas is None else np.asarray(betas, dtype=np.float64)
        self.total_n = len(betas)
        self.t_array = np.linspace(0.0, 1.0, self.total_n + 1, dtype=np.float64)[1:]
        self.log_alpha_array = 0.5 * np.cumsum(np.log(1.0 - betas))
        # log α decreases with t; inverse_lambda interpolates t over log α, which needs it increasing.
        self._log_alpha_up = self.log_alpha_array[::-1].copy()
        self._t_by_log_alpha = self.t_array[::-1].copy()

    def log_alpha(self, t):
        return _interp(t, self.t_array, self.log_alpha_array)

    def alpha(self, t):
        return np.exp(self.log_alpha(t))

    def sigma(self, t):
        return np.sqrt(1.0 - np.exp(2.0 * self.log_alpha(t)))

    def lambda_(self, t):
        """Half log-SNR, log α − log σ."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * np.log(1.0 - np.exp(2.0 * log_alpha))

    def inverse_lambda(self, lamb):
        # α² = sigmoid(2λ), written as logaddexp so large |λ| does not overflow.
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lamb, dtype=np.float64))
        return _interp(log_alpha, self._log_alpha_up, self._t_by_log_alpha)


def _check_num_evals(num_evals) -> int:
    if isinstance(num_evals, bool) or not isinstance(num_evals, (int, np.integer)):
        raise BlockcacheError(f"dpm-solver-2 number of model evaluations must be an integer, got {num_evals!r}")
    if num_evals < 2 or num_evals % 2 or num_evals > MAX_EVALUATIONS:
        raise BlockcacheError(f"dpm-solver-2 needs an even number of model evaluations (2 per solver step) in "
                              f"2…{MAX_EVALUATIONS}, got {num_evals}")
    return int(num_evals)


@dataclass(frozen=True)
class DPMSolver2Sampler:
    """DPM-Solver++ 2S (single-step, order 2, r1 = 1/2, data prediction) with `num_evals` = NFE.

    NFE/2 solver steps span `outer_times` = linspace(1, 1/1000, NFE/2 + 1). `timesteps[e]` is the model
    time (t·1000, fractional) of evaluation e in sampling order. `step` is pure and keeps no state;
    the caller keeps the carry (the input of the latest outer evaluation), see `carry_source`.
    """

    num_evals: int

    name = "dpm-solver-2"

    def __post_init__(self):
        nfe = _check_num_evals(self.num_evals)
        vp = DiscreteVP()
        k = nfe // 2
        t_outer = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, k + 1, dtype=np.float64)
        s, t = t_outer[:-1], t_outer[1:]
        lam_s, lam_t = vp.lambda_(s), vp.lambda_(t)
        h = lam_t - lam_s
        s1 = vp.inverse_lambda(lam_s + R1 * h)
        alpha_s, alpha_s1, alpha_t = vp.alpha(s), vp.alpha(s1), vp.alpha(t)
        sigma_s, sigma_s1, sigma_t = vp.sigma(s), vp.sigma(s1), vp.sigma(t)
        phi_11 = np.expm1(-R1 * h)
        phi_1 = np.expm1(-h)

        a = np.empty(nfe, dtype=np.float64)
        b = np.empty(nfe, dtype=np.float64)
        c = np.zeros(nfe, dtype=np.float64)
        # Outer row: x0_s = (x − σ_s·eps)/α_s;  x_s1 = (σ_s1/σ_s)·x − α_s1·φ11·x0_s.
        a[0::2] = sigma_s1 / sigma_s - alpha_s1 * phi_11 / alpha_s
        b[0::2] = alpha_s1 * phi_11 * sigma_s / alpha_s
        # Intermediate row: with r1 = 1/2 the x0_s terms of the 2S update cancel, leaving
        # x_t = (σ_t/σ_s)·x − α_t·φ1·x0_s1 with x0_s1 = (x_s1 − σ_s1·eps_s1)/α_s1, so the step reads
        # x_s1 and eps_s1 plus the carried x (the solver step's start) and nothing else.
        a[1::2] = -alpha_t * phi_1 / alpha_s1
        b[1::2] = alpha_t * phi_1 * sigma_s1 / alpha_s1
        c[1::2] = sigma_t / sigma_s

        times = np.empty(nfe, dtype=np.float64)
        times[0::2] = s * NUM_TRAIN_TIMESTEPS
        times[1::2] = s1 * NUM_TRAIN_TIMESTEPS
        carry = np.repeat(np.arange(0, nfe, 2, dtype=np.int64), 2)

        object.__setattr__(self, "_t_outer", t_outer)
        object.__setattr__(self, "_times", times)
        object.__setattr__(self, "_a", a)
        object.__setattr__(self, "_b", b)
        object.__setattr__(self, "_c", c)
        object.__setattr__(self, "_carry", carry)

    @property
    def num_solver_steps(self) -> int:
        return self.num_evals // 2

    @property
    def outer_times(self) -> np.ndarray:
        """Continuous times of the solver-step boundaries, 1.0 … 1/1000 (NFE/2 + 1 values)."""
        return self._t_outer.copy()

    @property
    def timesteps(self) -> np.ndarray:
        """Model time (t·1000, fractional) of each evaluation in sampling order (noisiest first)."""
        return self._times.copy()

    @property
    def carry_source(self) -> np.ndarray:
        """For each row, the row whose input latent is its carry (2i and 2i+1 → 2i)."""
        return self._carry.copy()

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 (a, b) per evaluation: the coefficients of the evaluation's input and its eps."""
        return self._a.copy(), self._b.copy()

    def carry_coefficients(self) -> np.ndarray:
        """float64 c per evaluation: the coefficient of the carried latent (0 on outer rows)."""
        return self._c.copy()

    def step(self, eps, e: int, x, x_carry=None):
        """The latent after evaluation e: a·x + b·eps + c·x_carry. Works on numpy and torch alike."""
        out = float(self._a[e]) * x + float(self._b[e]) * eps
        c = float(self._c[e])
        if c != 0.0:
            if x_carry is None:
                # A caller bug, not bad user input: the runtime always has the carry at hand.
                raise ValueError(f"evaluation {e} needs x_carry (the input of row {int(self._carry[e])})")
            out = out + c * x_carry
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": self.num_evals}
