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
from schedules.sampling import guided_eps

DEFAULT_GUIDANCE_SCALE = 4.0  # DiT's demo setting; 1.5 is the paper's FID setting


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
    """The `unit(name, fn)` policy for one step: compute and remember, or return the remembered value."""

    def __init__(self, unit_names):
        self.index = {u: j for j, u in enumerate(unit_names)}
        self.values: dict[str, torch.Tensor] = {}
        self.compute_row = None

    def __call__(self, name, fn):
        if self.compute_row[self.index[name]]:
            self.values[name] = fn()
        return self.values[name]


@torch.no_grad()
def sample(model, schedule: Schedule, labels, noise, *, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
           guidance_channels: str = "first3", progress: bool = False) -> np.ndarray:
    """Final latents (N, C, H, W) for `labels` from `noise`, following `schedule` step by step."""
    schedule.check_units(model.unit_names, getattr(model, "name", "the model"))
    labels = check_labels(labels, model.num_classes)
    c, size = model.in_channels, model.config["input_size"]
    x = torch.from_numpy(check_noise(noise, (len(labels), c, size, size)))
    y = torch.from_numpy(labels)
    use_cfg = guidance_scale > 1
    if use_cfg:
        y = torch.cat([y, torch.full_like(y, model.num_classes)])
    sampler = schedule.make_sampler()
    a, b = (torch.from_numpy(v.astype(np.float32)) for v in sampler.coefficients())
    cache = UnitCache(schedule.unit_names)
    for s, t in enumerate(tqdm(sampler.timesteps, desc="sampling", disable=not progress, leave=False)):
        cache.compute_row = schedule.compute[s]
        x_in = torch.cat([x, x]) if use_cfg else x
        out = model(x_in, torch.full((len(x_in),), int(t), dtype=torch.int64), y, unit=cache)
        eps = out[:, :c]
        if use_cfg:
            eps = guided_eps(eps[: len(x)], eps[len(x):], guidance_scale, guidance_channels)
        x = a[s] * x + b[s] * eps
    return x.numpy()
