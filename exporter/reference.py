"""The eager cached reference: any schedule run on the PyTorch model with blockcache's caching
semantics (DESIGN.md), one Python branch per unit, as the papers' code runs. Every compiled backend
is checked against it.

Semantics: a reused unit returns the raw branch output (before gate and residual) from the last step
that computed it; everything else runs with the current step's inputs. With guidance the network
runs on [x; x] with labels [y; null] and the cache holds the doubled batch.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from schedules import BlockcacheError, Schedule
from schedules.sampling import guidance_needed, initial_noise
from schedules.zoo import DIT, check_sampler, family_of

from .trace import DenoisingStep

DEFAULT_GUIDANCE_SCALE = DIT.guidance_scale  # DiT's demo setting, 4; 1.5 is the paper's FID setting


def check_labels(labels, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise BlockcacheError("class labels must be a non-empty list of integers")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise BlockcacheError(f"class label {int(bad[0])} is out of range 0…{num_classes - 1}")
    return labels.astype(np.int64)


def check_noise(noise, shape) -> np.ndarray:
    noise = np.asarray(noise)
    if noise.shape != tuple(shape):
        raise BlockcacheError(f"noise has shape {noise.shape} but {tuple(shape)} is needed (N, C, H, W) for N labels")
    if not np.issubdtype(noise.dtype, np.floating) or not np.isfinite(noise).all():
        raise BlockcacheError("noise must be finite floating-point values")
    return noise.astype(np.float32)


class UnitCache:
    """The `unit(name, fn)` policy for one step: compute and remember, or return the remembered value,
    corrected by the step's Block Caching scale-shift where the schedule has one."""

    def __init__(self, unit_names):
        self.index = {u: j for j, u in enumerate(unit_names)}
        self.values: dict[str, torch.Tensor] = {}
        self.compute_row = None
        self.adjust: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, name, fn):
        if self.compute_row[self.index[name]]:
            self.values[name] = fn()
        value = self.values[name]
        if name in self.adjust:
            scale, shift = self.adjust[name]
            return value * (1 + scale) + shift
        return value


def step_adjustments(schedule: Schedule, device="cpu", dtype=torch.float32) -> list[dict]:
    """Per step, {unit: (scale, shift)}: the schedule's scale-shift as tensors made once on the model's
    device and dtype, so that sampling moves nothing per step."""
    out = [{} for _ in range(schedule.num_steps)]
    for (step, unit), pair in schedule.scale_shift.items():
        out[step][unit] = tuple(torch.from_numpy(a).to(device=device, dtype=dtype) for a in pair)
    return out


def model_timesteps(sampler) -> np.ndarray:
    """What the model is called with at each evaluation: DDIM's integer timesteps as int64, a
    continuous-time solver's fractional ones (t·1000) as float32."""
    t = np.asarray(sampler.timesteps)
    return t.astype(np.float32) if np.issubdtype(t.dtype, np.floating) else t.astype(np.int64)


class Denoiser:
    """Evaluation s of a schedule's sampler as one call: `x_next = denoiser(s, x, y, unit, x_carry)`
    (CFG, network with the `unit` policy, solver update), with the per-step constants made once.
    `x_carry` is the input of evaluation `carry_source[s]` (needed where `has_carry`: DPM-Solver-2's
    intermediate evaluations); `sample` shows the bookkeeping. `guidance_channels` defaults to the
    model family's guidance form, `guidance_scale` to its published setting."""

    def __init__(self, model, schedule: Schedule, guidance_scale: float | None = None,
                 guidance_channels: str | None = None):
        guidance_scale, channels = family_of(model.config).guidance_settings(guidance_scale, guidance_channels)
        self.step = DenoisingStep(model, guidance=guidance_needed(guidance_scale, channels), guidance_channels=channels)
        self.scale = torch.tensor([guidance_scale], dtype=torch.float32)
        sampler = schedule.make_sampler()
        self.timesteps = [torch.from_numpy(t.reshape(1)) for t in model_timesteps(sampler)]
        self.a, self.b, self.c = (torch.from_numpy(v.astype(np.float32)).reshape(-1, 1)
                                  for v in (*sampler.coefficients(), sampler.carry_coefficients()))
        self.carry_source = [int(k) for k in sampler.carry_source]
        self.has_carry = bool(np.any(sampler.carry_coefficients()))

    def __len__(self):
        return len(self.timesteps)

    def __call__(self, s: int, x, y, unit=None, x_carry=None):
        if self.has_carry and self.carry_source[s] != s and x_carry is None:
            raise BlockcacheError(f"evaluation {s} needs the latent of evaluation {self.carry_source[s]}")
        c = self.c[s] if x_carry is not None else None
        return self.step.denoise(x, y, self.timesteps[s], self.a[s], self.b[s], self.scale, unit, c, x_carry)

    def carry(self, inputs: dict, s: int, x):
        """Record `x` as evaluation s's input in `inputs` and return s's carried latent (None without a
        carry term); inputs no later evaluation carries are dropped."""
        inputs[s] = x
        for k in [k for k in inputs if k < self.carry_source[s]]:
            del inputs[k]
        return inputs[self.carry_source[s]] if self.has_carry else None

    def run(self, x, y, policy=lambda s: None, progress: bool = False, desc: str = "sampling"):
        """All evaluations from `x`; `policy(s)` gives evaluation s's unit policy (None: compute)."""
        inputs = {}
        for s in tqdm(range(len(self)), desc=desc, disable=not progress, leave=False):
            x = self(s, x, y, policy(s), self.carry(inputs, s, x))
        return x


def seeded_batch(model, labels, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, labels) for every (seed, label) pair, seed-major: seed k's noise for all labels is
    `initial_noise((len(labels), C, H, W), k)`."""
    c, size = model.in_channels, model.config["input_size"]
    x = np.concatenate([initial_noise((len(labels), c, size, size), int(seed)) for seed in seeds])
    return torch.from_numpy(x), torch.from_numpy(np.tile(np.asarray(labels, dtype=np.int64), len(seeds)))


def check_schedule(model, schedule: Schedule) -> None:
    """Refuse, in one line, a schedule made for other units, another solver or (scale-shift) another
    width than `model` has."""
    name = getattr(model, "name", None) or "the model"
    schedule.check_units(model.unit_names, name)
    check_sampler(model.config, schedule.sampler["name"], name)
    width = model.config["hidden_size"]  # every unit's output has the model's width
    for (step, unit), (scale, _) in schedule.scale_shift.items():
        if scale.shape != (width,):
            raise BlockcacheError(f"scale-shift vectors have {scale.shape[0]} channels but {name}'s units have "
                                  f"{width} (learned for another model?)")


@torch.no_grad()
def sample(model, schedule: Schedule, labels, noise, *, guidance_scale: float | None = None,
           guidance_channels: str | None = None, progress: bool = False) -> np.ndarray:
    """Final latents (N, C, H, W) for `labels` from `noise`, following `schedule` evaluation by evaluation."""
    check_schedule(model, schedule)
    labels = check_labels(labels, model.num_classes)
    c, size = model.in_channels, model.config["input_size"]
    x = torch.from_numpy(check_noise(noise, (len(labels), c, size, size)))
    y = torch.from_numpy(labels)
    denoiser = Denoiser(model, schedule, guidance_scale, guidance_channels)
    cache = UnitCache(schedule.unit_names)
    adjustments = step_adjustments(schedule)

    def policy(s):
        cache.compute_row, cache.adjust = schedule.compute[s], adjustments[s]
        return cache

    return denoiser.run(x, y, policy, progress).numpy()
