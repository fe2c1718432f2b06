"""Block Caching's scale-shift (Wimbauer et al., CVPR 2024), learned by distillation.

    corrected = learn_scale_shift(model, schedule, labels=[0, …, 9], seeds=[0, 1, 2, 3])

For every (step, unit) that the schedule reuses, a per-channel `scale` and `shift` (zeros at first)
turn the cached value v into v·(1 + scale) + shift. The student is the cached model unrolled from
noise with these corrections; the teacher is the uncached model evaluated on the *student's own*
x_t at each step (so the corrections learn to undo the drift the student actually has). The loss
is the MSE between their step outputs; the model is frozen. The student's latent is detached between
steps, so each step's loss trains that step's corrections only: cheap, and one Adam step per
sampling step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tqdm.auto import tqdm

from runtime.nn.units import CachePolicy
from schedules import BlockcacheError, Schedule

from ..reference import Denoiser, TaylorSeerCache, check_schedule, guided_step, schedule_policy
from .conditioning import calibration_batch, network_conditioning


class _Student(CachePolicy):
    """One step of the cached run with the corrections being learned: fresh values are kept detached
    (the model is frozen; each step's loss trains that step's corrections)."""

    def computed(self, name, value):
        return super().computed(name, value.detach())

    def store(self, name, value):  # span residuals too
        super().store(name, value.detach())


class _ForecastStudent(_Student, TaylorSeerCache):
    """`_Student` of a forecasting schedule: corrections apply to the forecasts."""


def _unroll(model, schedule: Schedule, params, x, y, guidance_scale: float, optimizer=None) -> list[float]:
    """Run the student from x; per step the distillation MSE (an Adam step per step when training)."""
    denoiser = Denoiser(model, schedule, guidance_scale)
    y = network_conditioning(denoiser.step, y)
    errors, inputs = [], {}
    policy = schedule_policy(schedule, [params.get(s, {}) for s in range(schedule.num_steps)],
                             (_Student, _ForecastStudent))
    for s in range(len(denoiser)):
        student = policy(s)
        carry = denoiser.carry(inputs, s, x)  # DPM-Solver-2's intermediate evaluations, DPM-Solver++ 2M
        with torch.no_grad():
            teacher = denoiser(s, x, y, None, carry)
        trains = optimizer is not None and bool(student.corrections)
        with torch.set_grad_enabled(trains):
            out = denoiser(s, x, y, student, carry, inputs)  # the run's carry, where a step hands one on
            loss = torch.mean((out - teacher) ** 2)
        if trains:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        errors.append(loss.item())
        x = out.detach()
    return errors


def distillation_error(model, schedule: Schedule, labels, seeds, guidance_scale: float | None = None, *,
                       prompts=None) -> float:
    """Mean per-step MSE between the schedule's run (with its scale-shift) and the uncached model on
    the run's own latents, over the (label or prompt, seed) pairs."""
    params = {}
    for (step, unit), (scale, shift) in schedule.scale_shift.items():
        params.setdefault(step, {})[unit] = (torch.from_numpy(scale), torch.from_numpy(shift))
    x, y = calibration_batch(model, guided_step(model, guidance_scale)[0], labels, seeds, prompts)
    return float(np.mean(_unroll(model.eval(), schedule, params, x, y, guidance_scale)))


def learn_scale_shift(model, schedule: Schedule, labels, seeds, *, prompts=None, guidance_scale: float | None = None,
                      epochs: int = 10, lr: float = 1e-3, progress: bool = False) -> tuple[Schedule, list[float]]:
    """(the schedule with learned scale-shift for every reused (step, unit), mean error per epoch). A
    text-to-image model takes `prompts` (PromptInputs) and labels None."""
    check_schedule(model, schedule)
    if epochs < 1 or not np.isfinite(lr) or lr <= 0:
        raise BlockcacheError("epochs must be positive and the learning rate a positive number")
    if schedule.compute.all():
        raise BlockcacheError("the schedule reuses nothing: there is nothing to correct")
    model = model.eval().requires_grad_(False)
    width = model.config["hidden_size"]
    params = {}
    for s, row in enumerate(schedule.compute):
        for unit, computed in zip(schedule.unit_names, row):
            if not computed:
                params.setdefault(s, {})[unit] = (torch.zeros(width, requires_grad=True),
                                                  torch.zeros(width, requires_grad=True))
    optimizer = torch.optim.Adam([t for step in params.values() for pair in step.values() for t in pair], lr=lr)
    x, y = calibration_batch(model, guided_step(model, guidance_scale)[0], labels, seeds, prompts)
    history = []
    for _ in tqdm(range(epochs), desc="scale-shift", disable=not progress):
        history.append(float(np.mean(_unroll(model, schedule, params, x, y, guidance_scale, optimizer))))
    learned = {(s, unit): (scale.detach().numpy().copy(), shift.detach().numpy().copy())
               for s, step in params.items() for unit, (scale, shift) in step.items()}
    corrected = dataclasses.replace(schedule, source=f"{schedule.source or 'schedule'} + scale-shift",
                                    scale_shift=learned)
    return corrected, history
