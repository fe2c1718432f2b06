"""Choosing how a schedule reuses: for a fixed compute pattern (so at its MACs), the reuse mode (each
unit's raw output, or spans' total residuals) and TaylorSeer forecast order (0–2) whose run on
calibration inputs is closest to full compute.

    chosen, table = choose_reuse(model, schedule, labels=[0, …, 9], seeds=[1, 2])

Candidates are `Schedule.with_reuse(mode, order)` for every mode the model's family takes (spans need
blocks in one chain: DiT) and every order; each runs with the eager reference on noise of every seed
for every label, scored by the mean squared error of its final latents against full compute with the
same sampler and noise. Neither mode nor order changes which units are computed, so all candidates
cost the same MACs. Candidates that turn out equal (a schedule with no wholly reused block has no span
to make) are run once.
"""

from __future__ import annotations

import numpy as np

from schedules import Schedule
from schedules.forecast import MAX_ORDER
from schedules.schedule import REUSE_MODES
from schedules.zoo import family_of

from ..reference import sample, seeded_batch


def choose_reuse(model, schedule: Schedule, labels, seeds, guidance_scale: float | None = None,
                 guidance_channels: str | None = None) -> tuple[Schedule, list[dict]]:
    """(the candidate closest to full compute, [{"reuse", "forecast", "mse"}] for every candidate run)."""
    x, y = seeded_batch(model, labels, seeds)
    x, y = x.numpy(), y.numpy()
    options = dict(guidance_scale=guidance_scale, guidance_channels=guidance_channels)
    full = Schedule.full(schedule.unit_names, schedule.num_steps, schedule.sampler["spacing"], schedule.model,
                         schedule.sampler["name"])
    reference = sample(model, full, y, x, **options)
    modes = REUSE_MODES if family_of(model.config).spans else ("unit",)
    table, seen, best = [], set(), None
    for mode in modes:
        for order in range(MAX_ORDER + 1):
            candidate = schedule.with_reuse(mode, order)
            key = (candidate.span.tobytes(), order)
            if key in seen:
                continue
            seen.add(key)
            mse = float(np.mean((sample(model, candidate, y, x, **options) - reference) ** 2))
            table.append({"reuse": mode, "forecast": order, "mse": mse})
            if best is None or mse < best[0]:
                best = (mse, candidate)
    return best[1], table
