"""DPM-Solver++ 2M (multistep, order 2), as diffusers' `DPMSolverMultistepScheduler` runs it for the
PixArt pipelines, in numpy only (no torch).

The configuration is PixArt's (PixArt-alpha/PixArt-XL-2-1024-MS, PixArt-Sigma): 1000 training steps
of linear betas 1e-4 … 0.02, epsilon prediction, `algorithm_type="dpmsolver++"`, `solver_order=2`,
`solver_type="midpoint"`, `lower_order_final=True`, `final_sigmas_type="zero"`, `timestep_spacing=
"linspace"`, `lambda_min_clipped=-inf`, no thresholding, no Karras/Lu/exponential sigmas. The model
sees diffusers' integer timesteps; its eps is the first `in_channels` channels of its output (the
pipeline splits off the learned sigma before `scheduler.step`).

Noise tables. diffusers keeps σ_k = √((1 − ᾱ_k)/ᾱ_k) (its `sigmas`, an EDM-style noise level) and
derives per step α = 1/√(σ² + 1), σ_t = σ·α (the VP pair), λ = log α − log σ_t. Here ᾱ comes from
float64 linear betas (`betas.linear_betas`, the same betas as DiT); diffusers builds them in
float32 (torch.linspace/cumprod) and casts its σ table to float32, which moves ᾱ by up to 2.5e-7 and
σ by up to 3e-6 relative on the 20-step grid (8e-5 at t = 1), but the sampled latents by only ~1e-7
relative, less than diffusers' own float32 arithmetic does (~3e-7 for 20 steps). Every later formula is diffusers' own expression, in the same order, in float64.

One model evaluation per step; a caching schedule's rows are the steps in sampling order. Step e goes
from noise level s = σ_e to t = σ_{e+1} (σ_N = 0) with h = λ_t − λ_s and φ = e^{−h} − 1 (diffusers
writes `torch.exp(-h) - 1.0`, so this does too). With the data prediction of evaluation e

    D_e = (x_e − σ_s·eps_e)/α_s                                     (convert_model_output)

diffusers' updates are

    first order   x_t = (σ_t/σ_s)·x_e − α_t·φ·D_e                    (dpm_solver_first_order_update)
    second order  x_t = (σ_t/σ_s)·x_e − α_t·φ·D0 − ½·α_t·φ·D1,       (multistep_dpm_solver_second_
                  D0 = D_e, D1 = (1/r0)·(D_e − D_{e−1}),              order_update, "midpoint")
                  r0 = h_0/h, h_0 = λ_s − λ_{e−1}.

`step` chooses first order at e = 0 (no earlier D: `lower_order_nums < 1`) and at the last step
(`lower_order_final`: always so with `final_sigmas_type="zero"`, which takes the last step to σ = 0;
the `len(timesteps) < 15` clause adds nothing here, and `lower_order_second` only matters for order
3), second order everywhere else. At σ_N = 0 diffusers gets α_t = 1, λ_t = +inf, φ = −1, so the last
step returns D_{N−1} exactly.

Folding. The second-order update is linear in x_e, eps_e and the previous data prediction D_{e−1},
which no finite set of earlier *latents* gives (it depends on every earlier eps), so the carried
tensor is D_{e−1} itself. Expanding D0 and D1:

    x_{e+1} = a[e]·x_e + b[e]·eps_e + c[e]·carry_e,      carry_e = D_{e−1}
    a = σ_t/σ_s − α_t·φ·(1 + 1/(2r0))/α_s
    b = α_t·φ·(1 + 1/(2r0))·σ_s/α_s
    c = α_t·φ/(2r0)

and for first-order steps (1/(2r0) → 0) a = σ_t/σ_s − α_t·φ/α_s, b = α_t·φ·σ_s/α_s, c = 0 (so c[0] = 0
and c[N−1] = 0; at σ_t = 0: a = 1/α_s, b = −σ_s/α_s). Each evaluation also emits the next carry,

    carry_{e+1} = D_e = p[e]·x_e + q[e]·eps_e,            p = 1/α_s, q = −σ_s/α_s,

so a compiled step graph needs x_e, eps_e and one carried tensor in, x_{e+1} and D_e out, and only
float64 constants (a, b, c, p, q) per row.

Unlike DPM-Solver-2 (dpm_solver.py), whose carry is the *input latent* of an earlier row
(`carry_source`), this carry is an *output* of the previous row, so this sampler has no
`carry_source`: code written for input-latent carries fails on it instead of using the wrong tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BlockcacheError
from .betas import linear_betas

NUM_TRAIN_TIMESTEPS = 1000
SPACINGS = ("linspace",)
NAME = "dpm-solver++-2m"


def _check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise BlockcacheError(f"{NAME} number of steps must be an integer, got {num_steps!r}")
    if not 1 <= num_steps <= NUM_TRAIN_TIMESTEPS:
        raise BlockcacheError(f"{NAME} number of steps must be in 1…{NUM_TRAIN_TIMESTEPS - 1}, got {num_steps}")
    return int(num_steps)


def linspace_timesteps(num_steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """diffusers' "linspace" timesteps in sampling order: linspace(0, T − 1, N + 1) rounded, reversed,
    the last (0) dropped. With `lambda_min_clipped = -inf` diffusers' `last_timestep` is T."""
    return np.linspace(0, num_timesteps - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)


@dataclass(frozen=True)
class DPMSolverPP2MSampler:
    """DPM-Solver++ 2M with PixArt's diffusers configuration, `num_steps` model evaluations.

    `timesteps[e]` is diffusers' integer timestep of evaluation e (noisiest first). The update of
    evaluation e is `x_next = a[e]·x + b[e]·eps + c[e]·carry`, where `carry` is the previous
    evaluation's data prediction `p[e−1]·x_{e−1} + q[e−1]·eps_{e−1}` (see the module docstring);
    `step` and `carry_out` are pure and keep no state.
    """

    num_steps: int
    spacing: str = "linspace"

    name = NAME
    # What `carry_coefficients` multiplies: the previous row's output D = p·x + q·eps (not an input).
    carry_kind = "previous-data-prediction"

    def __post_init__(self):
        n = _check_num_steps(self.num_steps)
        if self.spacing not in SPACINGS:
            raise BlockcacheError(f"{NAME} has no spacing {self.spacing!r} (its spacings: {', '.join(SPACINGS)})")
        timesteps = linspace_timesteps(n)
        if len(np.unique(timesteps)) != n:
            # From 1000 steps on, rounding repeats a timestep; a repeated σ gives h = 0 and then
            # r0 = 0 in the next step, where diffusers divides by zero.
            raise BlockcacheError(f"{NAME} with {n} steps repeats a timestep (linspace spacing allows at most "
                                  f"{NUM_TRAIN_TIMESTEPS - 1} steps)")
        ac = np.cumprod(1.0 - linear_betas())
        # set_timesteps: σ = ((1 − ᾱ)/ᾱ)^½ (np.interp at integer timesteps picks the table entries
        # exactly), then final_sigmas_type "zero" appends σ_N = 0.
        sigmas = np.append(np.sqrt((1.0 - ac) / ac)[timesteps], 0.0)
        # _sigma_to_alpha_sigma_t and the λ of the update functions, as diffusers writes them.
        alpha_t = 1.0 / np.sqrt(sigmas**2 + 1.0)
        sigma_t = sigmas * alpha_t
        with np.errstate(divide="ignore"):  # σ_t = 0 at the end: λ = +inf, as in diffusers
            lambda_t = np.log(alpha_t) - np.log(sigma_t)

        a = np.empty(n, dtype=np.float64)
        b = np.empty(n, dtype=np.float64)
        c = np.zeros(n, dtype=np.float64)
        for e in range(n):
            al_s, sg_s, al_t, sg_t = alpha_t[e], sigma_t[e], alpha_t[e + 1], sigma_t[e + 1]
            h = lambda_t[e + 1] - lambda_t[e]  # +inf on the last step: exp(−h) − 1 = −1
            alpha_phi = al_t * (np.exp(-h) - 1.0)
            if e == 0 or e == n - 1:
                # First order: x_t = (σ_t/σ_s)·x − α_t·φ·D_e, D_e = (x − σ_s·eps)/α_s.
                k = alpha_phi
            else:
                # Second order (midpoint): D0 = D_e, D1 = (1/r0)·(D_e − D_{e−1}), so
                # x_t = (σ_t/σ_s)·x − α_t·φ·(1 + ½/r0)·D_e + ½·α_t·φ/r0·D_{e−1}.
                r0 = (lambda_t[e] - lambda_t[e - 1]) / h
                half_inv_r0 = 0.5 * (1.0 / r0)
                k = alpha_phi * (1.0 + half_inv_r0)
                c[e] = alpha_phi * half_inv_r0
            a[e] = sg_t / sg_s - k / al_s
            b[e] = k * sg_s / al_s

        object.__setattr__(self, "_timesteps", timesteps)
        object.__setattr__(self, "_sigmas", sigmas)
        object.__setattr__(self, "_alpha", alpha_t)
        object.__setattr__(self, "_sigma", sigma_t)
        object.__setattr__(self, "_a", a)
        object.__setattr__(self, "_b", b)
        object.__setattr__(self, "_c", c)
        # D_e = (x − σ_s·eps)/α_s for every row (the last row's D is its result x_N as well).
        object.__setattr__(self, "_p", 1.0 / alpha_t[:n])
        object.__setattr__(self, "_q", -sigma_t[:n] / alpha_t[:n])

    @property
    def num_evals(self) -> int:
        return self.num_steps

    @property
    def timesteps(self) -> np.ndarray:
        """diffusers' integer timesteps (int64) in sampling order (noisiest first)."""
        return self._timesteps.copy()

    @property
    def sigmas(self) -> np.ndarray:
        """diffusers' `sigmas` (√((1 − ᾱ)/ᾱ) per step, then 0): num_steps + 1 float64 values."""
        return self._sigmas.copy()

    @property
    def alphas(self) -> np.ndarray:
        """VP α = 1/√(σ² + 1) at each step's start and after the last (1.0): num_steps + 1 values."""
        return self._alpha.copy()

    @property
    def vp_sigmas(self) -> np.ndarray:
        """VP σ = σ·α at each step's start and after the last (0.0): num_steps + 1 values."""
        return self._sigma.copy()

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 (a, b) per evaluation: the coefficients of the evaluation's input and its eps."""
        return self._a.copy(), self._b.copy()

    def carry_coefficients(self) -> np.ndarray:
        """float64 c per evaluation: the coefficient of the carry D_{e−1} (0 on the first and last)."""
        return self._c.copy()

    def carry_output_coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 (p, q) per evaluation: the carry it hands on, D_e = p[e]·x_e + q[e]·eps_e."""
        return self._p.copy(), self._q.copy()

    def step(self, eps, e: int, x, x_carry=None):
        """The latent after evaluation e: a·x + b·eps + c·x_carry, x_carry = `carry_out` of row e − 1.
        Works on numpy and torch alike."""
        out = float(self._a[e]) * x + float(self._b[e]) * eps
        c = float(self._c[e])
        if c != 0.0:
            if x_carry is None:
                # A caller bug, not bad user input: the runtime always has the carry at hand.
                raise ValueError(f"evaluation {e} needs x_carry (the data prediction of evaluation {e - 1})")
            out = out + c * x_carry
        return out

    def carry_out(self, eps, e: int, x):
        """The carry evaluation e hands to e + 1: its data prediction D_e = p·x + q·eps."""
        return float(self._p[e]) * x + float(self._q[e]) * eps

    def sample(self, x, eps_fn):
        """The whole loop with the folded constants: `eps_fn(x, timestep) → eps`. Returns the list of
        latents x_0 (the input) … x_N, for tests and the eager reference."""
        latents, carry = [x], None
        for e, t in enumerate(self._timesteps):
            eps = eps_fn(x, int(t))
            x, carry = self.step(eps, e, x, carry), self.carry_out(eps, e, x)
            latents.append(x)
        return latents

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": self.num_steps, "spacing": self.spacing}
