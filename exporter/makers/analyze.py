"""Block Caching's change analysis: how much each unit's raw output moves from one step to the next.

    change = measure_change(model, Schedule.full(model.unit_names, 50), labels=[0, 1, …], seeds=[0, 1])

Runs the eager model with full compute over every (label, seed) pair as one batch, or for a
text-to-image model every (prompt, seed) pair (makers/conditioning.py; with guidance, the network
batch is [cond; uncond] and both halves count) and records, per step s ≥ 1 and unit u, the
relative L1 change ‖o_s − o_{s−1}‖₁ / ‖o_s‖₁ of the unit's raw branch output (before gate and
residual: the value a cache would hold), per image, then averaged over the images. Step 0 is NaN.
"""

from __future__ import annotations

import numpy as np
import torch

from runtime.nn.units import UnitPolicy
from schedules import Schedule

from ..reference import Denoiser, check_schedule
from .conditioning import calibration_batch, network_conditioning


class ChangeRecorder(UnitPolicy):
    """The unit policy that computes every unit and accumulates its per-image change (set `step` to
    the evaluation being run)."""

    def __init__(self, unit_names, num_steps: int):
        self.index = {u: j for j, u in enumerate(unit_names)}
        self.change = np.full((num_steps, len(unit_names)), np.nan)
        self.previous: dict[str, torch.Tensor] = {}
        self.step = 0

    def computed(self, name, value):
        current = value.detach().float().flatten(1)
        before = self.previous.get(name)
        if before is not None:
            moved = (current - before).abs().sum(1) / current.abs().sum(1).clamp_min(1e-30)
            self.change[self.step, self.index[name]] = float(moved.mean())
        self.previous[name] = current
        return value


@torch.no_grad()
def measure_change(model, schedule: Schedule, labels, seeds, *, prompts=None, guidance_scale: float | None = None,
                   guidance_channels: str | None = None, progress: bool = False) -> np.ndarray:
    """(steps, units) float64 change statistics for `schedule`'s sampler (its compute rows are ignored:
    the analysis always computes everything). A text-to-image model takes `prompts` (PromptInputs)
    and labels None."""
    check_schedule(model, schedule)
    denoiser = Denoiser(model, schedule, guidance_scale, guidance_channels)
    x, y = calibration_batch(model, denoiser.step, labels, seeds, prompts)
    y = network_conditioning(denoiser.step, y)
    recorder = ChangeRecorder(model.unit_names, schedule.num_steps)

    def policy(s):
        recorder.step = s
        return recorder

    denoiser.run(x, y, policy, progress, desc="analyze")
    return recorder.change
