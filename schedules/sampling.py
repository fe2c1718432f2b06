"""Sampler math shared by every side of blockcache, in numpy only (no torch).

It mirrors DiT's diffusion code (`diffusion/gaussian_diffusion.py`, `respace.py`): linear betas in
float64, respacing by `space_timesteps`, and the respaced process whose betas are re-derived from the
kept ᾱ values, exactly as `SpacedDiffusion` does, so the float64 tables match DiT's bit for bit.

Steps are counted in *sampling order*: index 0 is the noisiest model evaluation. The DDIM update for
eta = 0 is folded into two float64 coefficients per step, `x_prev = a[s]·x + b[s]·eps`.

Every sampler offers the same interface, so that the exporter can unroll any of them into per-
evaluation graphs: `timesteps` (what the model is called with, per evaluation), `coefficients()`
(a, b) and `carry_coefficients()` c with `x_next = a·x + b·eps + c·x_carry`, where `x_carry` is the
input of evaluation `carry_source[s]` (a second-order single-step solver's intermediate evaluation
needs the latent its solver step started from; DDIM has c = 0) or, for a multistep solver, the carry
the previous evaluation hands on, `p·x + q·eps` (`carry_output_coefficients()`; `carry_term` says
which). DPM-Solver-2 lives in dpm_solver.py, DPM-Solver++ 2M in dpm_solver_multistep.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .betas import NUM_TRAIN_TIMESTEPS, linear_betas
from .errors import BlockcacheError, ParameterError

SPACINGS = ("linspace", "ddim")
# Each sampler's spacings of its model evaluations; the first is its default.
SAMPLER_SPACINGS = {"ddim": SPACINGS, "dpm-solver-2": ("time-uniform",), "dpm-solver++-2m": ("linspace",)}
SAMPLERS = tuple(SAMPLER_SPACINGS)
# Guidance forms: DiT's `uncond + s·(cond − uncond)` on the first three channels (official) or on
# all (diffusers), and U-ViT's `cond + s·(cond − uncond)` on all channels.
GUIDANCE_CHANNELS = ("first3", "all", "uvit")


def respace(num_steps: int, spacing: str = "linspace", num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Kept original timesteps in ascending order (DiT's `space_timesteps` with one section).

    `linspace` is DiT's plain "N" (both ends kept, float stride accumulated and rounded as Python's
    `round` does); `ddim` is DiT's "ddimN" (the smallest integer stride giving exactly N steps).
    """
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool):
        raise BlockcacheError(f"number of steps must be an integer, got {num_steps!r}")
    if not 1 <= num_steps <= num_timesteps:
        raise BlockcacheError(f"number of steps must be in 1…{num_timesteps}, got {num_steps}")
    if spacing == "ddim":
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == num_steps:
                return np.arange(0, num_timesteps, stride, dtype=np.int64)
        raise BlockcacheError(f"ddim spacing cannot make exactly {num_steps} steps out of {num_timesteps}")
    if spacing != "linspace":
        raise BlockcacheError(f"unknown spacing {spacing!r} (expected one of {', '.join(SPACINGS)})")
    if num_steps == 1:
        return np.array([0], dtype=np.int64)
    frac_stride = (num_timesteps - 1) / (num_steps - 1)
    cur, taken = 0.0, []
    for _ in range(num_steps):
        taken.append(round(cur))
        cur += frac_stride
    return np.array(sorted(set(taken)), dtype=np.int64)


@dataclass(frozen=True)
class DDIMSampler:
    """DDIM (eta = 0, no clipping) over a respaced linear-beta process.

    `timesteps[s]` is the original timestep (0…999) the model sees at sampling step s;
    `alphas_cumprod[s]` and `alphas_cumprod_prev[s]` are ᾱ at that step and at the next one (1.0 after
    the last). `step` is pure: it returns the next latent and keeps no state.
    """

    num_steps: int
    spacing: str = "linspace"

    def __post_init__(self):
        kept = respace(self.num_steps, self.spacing)
        if len(kept) != self.num_steps:
            raise BlockcacheError(f"{self.spacing} spacing gives {len(kept)} distinct steps, not {self.num_steps}")
        base_ac = np.cumprod(1.0 - linear_betas())
        # SpacedDiffusion re-derives betas from the kept ᾱ and recomputes the cumulative product;
        # doing the same keeps the float64 tables identical to DiT's.
        new_betas, last = [], 1.0
        for t in kept:
            new_betas.append(1.0 - base_ac[t] / last)
            last = base_ac[t]
        ac = np.cumprod(1.0 - np.array(new_betas, dtype=np.float64))
        ac_prev = np.append(1.0, ac[:-1])
        object.__setattr__(self, "_kept", kept)
        object.__setattr__(self, "_ac", ac[::-1].copy())
        object.__setattr__(self, "_ac_prev", ac_prev[::-1].copy())

    name = "ddim"

    @property
    def timesteps(self) -> np.ndarray:
        """Original timesteps in sampling order (noisiest first)."""
        return self._kept[::-1].copy()

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return self._ac.copy()

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return self._ac_prev.copy()

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 (a, b) per sampling step with x_prev = a·x + b·eps (DDIM, eta = 0)."""
        ac, ac_prev = self._ac, self._ac_prev
        # x0 = √(1/ᾱ)·x − √(1/ᾱ−1)·eps ;  x_prev = √ᾱ_prev·x0 + √(1−ᾱ_prev)·eps
        a = np.sqrt(ac_prev) * np.sqrt(1.0 / ac)
        b = np.sqrt(1.0 - ac_prev) - np.sqrt(ac_prev) * np.sqrt(1.0 / ac - 1.0)
        return a, b

    def carry_coefficients(self) -> np.ndarray:
        return np.zeros(self.num_steps)

    @property
    def carry_source(self) -> np.ndarray:
        return np.arange(self.num_steps)

    def step(self, eps, s: int, x, x_carry=None):
        """One DDIM update at sampling step s. Works on numpy arrays and torch tensors alike."""
        a, b = self.coefficients()
        return float(a[s]) * x + float(b[s]) * eps

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": self.num_steps, "spacing": self.spacing}


def default_spacing(name: str) -> str:
    if name not in SAMPLER_SPACINGS:
        raise BlockcacheError(f"unknown sampler {name!r} (expected one of {', '.join(SAMPLERS)})")
    return SAMPLER_SPACINGS[name][0]


def make_sampler(name: str, steps: int, spacing: str | None = None):
    """The sampler `name` with `steps` model evaluations (DDIM, DPM-Solver++ 2M: steps; DPM-Solver-2: twice
    its solver steps)."""
    default = default_spacing(name)  # refuses an unknown name
    spacing = spacing or default
    if spacing not in SAMPLER_SPACINGS[name]:
        raise BlockcacheError(f"sampler {name} has no spacing {spacing!r} (its spacings: "
                              f"{', '.join(SAMPLER_SPACINGS[name])})")
    if name == "dpm-solver-2":
        from .dpm_solver import DPMSolver2Sampler

        return DPMSolver2Sampler(steps)
    if name == "dpm-solver++-2m":
        from .dpm_solver_multistep import DPMSolverPP2MSampler

        return DPMSolverPP2MSampler(steps, spacing)
    return DDIMSampler(int(steps), spacing)


def carry_term(sampler) -> str | None:
    """What the sampler's carry term c·x_carry carries: None where c = 0 at every evaluation (DDIM);
    "input" for the input latent of evaluation `carry_source[s]` (DPM-Solver-2); "output" for the carry
    the previous evaluation hands on, p·x + q·eps (DPM-Solver++ 2M's data prediction)."""
    if not np.any(sampler.carry_coefficients()):
        return None
    return "output" if hasattr(sampler, "carry_output_coefficients") else "input"


def guided_eps(eps_cond, eps_uncond, scale: float, channels: str = "first3"):
    """Classifier-free guidance on the predicted noise (numpy or torch).

    `first3` is the official DiT convention: only the first three channels are guided and the rest
    keep the conditional prediction (DiT's 4-channel latents: channel 3 is not guided). `all` guides
    every channel, as diffusers' DiTPipeline does. `uvit` is U-ViT's form, `cond + s·(cond − uncond)`
    on every channel (its s = 0.4 is s = 1.4 in the other form).
    """
    if channels == "uvit":
        return eps_cond + scale * (eps_cond - eps_uncond)
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if channels == "all":
        return guided
    if channels != "first3":
        raise BlockcacheError(f"unknown guidance channels {channels!r} (expected {', '.join(GUIDANCE_CHANNELS)})")
    k = min(3, eps_cond.shape[1])
    if k == eps_cond.shape[1]:
        return guided
    cat = np.concatenate if isinstance(eps_cond, np.ndarray) else _torch_cat
    return cat([guided[:, :k], eps_cond[:, k:]], 1)


def neutral_guidance_scale(channels: str) -> float:
    """The scale at which guidance returns the conditional prediction: 1 in DiT's form, 0 in U-ViT's."""
    return 0.0 if channels == "uvit" else 1.0


def guidance_needed(scale: float, channels: str) -> bool:
    """Whether the doubled batch must run: in DiT's form a scale <= 1 means no guidance (blockcache's
    convention, the conditional prediction); in U-ViT's any scale but 0 guides."""
    return scale != 0 if channels == "uvit" else scale > 1


def _torch_cat(parts, dim):
    import torch

    return torch.cat(parts, dim)


def initial_noise(shape, seed: int) -> np.ndarray:
    """The starting latent for `seed`: the same array whichever backend or the eager reference runs."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise BlockcacheError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def check_labels(labels, num_classes: int) -> np.ndarray:
    """Class labels of a sampling call as int64, each in 0…num_classes − 1 (one-line errors)."""
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError):  # ragged or unconvertible
        raise BlockcacheError("class labels must be a non-empty list of integers") from None
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise BlockcacheError("class labels must be a non-empty list of integers")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise BlockcacheError(f"class label {int(bad[0])} is out of range 0…{num_classes - 1}")
    return labels.astype(np.int64)


def check_seeds(seeds) -> list[int]:
    """The noise seeds of calibration runs (`analyze`, `calibrate`) as ints: a non-empty list of
    non-negative integers."""
    seeds = [int(s) for s in seeds]
    if not seeds or any(s < 0 for s in seeds):
        raise BlockcacheError("seeds must be a non-empty list of non-negative integers")
    return seeds


def check_noise(noise, shape) -> np.ndarray:
    """Starting noise of a sampling call as float32 of exactly `shape` (N, C, H, W), finite in float32."""
    if isinstance(noise, np.ma.MaskedArray):  # its data under the mask is not what the caller sees
        raise BlockcacheError("noise must be a plain array, not a masked one")
    try:
        noise = np.asarray(noise)
    except (ValueError, TypeError):
        raise BlockcacheError("noise must be finite floating-point values") from None
    if noise.shape != tuple(shape):
        raise BlockcacheError(f"noise has shape {noise.shape} but {tuple(shape)} is needed (N, C, H, W) for N labels")
    if not np.issubdtype(noise.dtype, np.floating):
        raise BlockcacheError("noise must be finite floating-point values")
    with np.errstate(over="ignore"):
        noise = noise.astype(np.float32)
    if not np.isfinite(noise).all():
        raise BlockcacheError("noise must be finite floating-point values (in float32: |x| < 3.4e38)")
    return noise


# A guidance scale beyond this is no setting anyone samples with; it would overflow to inf.
MAX_GUIDANCE_SCALE = 1e4


def check_guidance_scale(scale) -> float:
    """A guidance scale given by a user: a finite real number of magnitude at most MAX_GUIDANCE_SCALE."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise ParameterError("guidance_scale", f"{{name}} must be a number, not {scale!r}")
    if abs(scale) > MAX_GUIDANCE_SCALE or not math.isfinite(scale):  # compared first: 10**400 has no float
        raise ParameterError("guidance_scale", f"{{name}} must be a finite number within ±{MAX_GUIDANCE_SCALE:g}, "
                             f"got {str(scale)[:40]}")
    return float(scale)


def check_finite_result(latents: np.ndarray, guidance_scale: float) -> np.ndarray:
    """Refuse, in one line, final latents with NaN or inf: never passed off as a result."""
    if not np.isfinite(latents).all():
        raise BlockcacheError(f"sampling produced non-finite values (NaN or inf) at guidance scale {guidance_scale:g}: "
                              "the model's outputs overflowed")
    return latents


def model_timesteps(sampler) -> np.ndarray:
    """What the model is called with at each evaluation: DDIM's integer timesteps as int64, a
    continuous-time solver's fractional ones (t·1000) as float32."""
    t = np.asarray(sampler.timesteps)
    return t.astype(np.float32) if np.issubdtype(t.dtype, np.floating) else t.astype(np.int64)
