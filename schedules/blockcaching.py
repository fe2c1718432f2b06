"""Block Caching schedules (Wimbauer et al., CVPR 2024) from measured per-unit change.

`change[s, u]` is unit u's relative L1 change between steps s−1 and s (step 0 has none: NaN), as
`exporter.makers.analyze` measures it. The rule: after computing a unit at step a, keep reusing it while
the change accumulated since a stays ≤ δ; at the step where it would exceed δ, recompute and restart
the sum. A larger δ never recomputes more often (the greedy rule makes the fewest recomputations
that keep every gap's sum ≤ δ), so MACs fall monotonically with δ and a budget is met by bisection.
"""

from __future__ import annotations

import numpy as np

from .cost import search_speedup
from .errors import BlockcacheError
from .schedule import Schedule


def check_change(change, num_units: int | None = None) -> np.ndarray:
    change = np.asarray(change, dtype=np.float64)
    if change.ndim != 2 or change.shape[0] < 1:
        raise BlockcacheError(f"change must be a (steps, units) array, got shape {change.shape}")
    if num_units is not None and change.shape[1] != num_units:
        raise BlockcacheError(f"change has {change.shape[1]} units, the model has {num_units}")
    rest = change[1:]
    if not np.isfinite(rest).all() or (rest < 0).any():
        raise BlockcacheError("change values after step 0 must be finite and non-negative")
    return change


def delta_rows(change, delta: float) -> np.ndarray:
    """(steps, units) bool compute mask by the accumulate-until-δ rule; step 0 computes all."""
    change = check_change(change)
    if not np.isfinite(delta) or delta < 0:
        raise BlockcacheError(f"delta must be a finite non-negative number, got {delta}")
    compute = np.zeros(change.shape, dtype=bool)
    compute[0] = True
    accumulated = np.zeros(change.shape[1])
    for s in range(1, change.shape[0]):
        accumulated += change[s]
        compute[s] = accumulated > delta
        accumulated[compute[s]] = 0.0
    return compute


def delta_schedule(change, delta: float, unit_names, sampler: dict, model: str | None = None) -> Schedule:
    return Schedule(unit_names=tuple(unit_names), compute=delta_rows(change, delta), sampler=dict(sampler),
                    model=model, source=f"block-caching delta={delta:.6g}")


def search_delta(change, config: dict, unit_names, sampler: dict, *, target_speedup: float | None = None,
                 target_macs: float | None = None, model: str | None = None) -> Schedule:
    """The schedule of the smallest δ whose ideal speedup reaches `target_speedup` (or whose MACs
    per image fall to `target_macs` of full compute, a fraction in (0, 1]). BlockcacheError when no δ
    can: even reusing everything after step 0 is not enough."""
    if (target_speedup is None) == (target_macs is None):
        raise BlockcacheError("give exactly one of a target speedup or a target MAC fraction")
    if target_macs is not None:
        if not 0 < target_macs <= 1:
            raise BlockcacheError(f"target MAC fraction must be in (0, 1], got {target_macs}")
        target_speedup = 1 / target_macs
    change = check_change(change, len(unit_names))
    high = float(np.nansum(change[1:])) + 1.0  # nothing after step 0 is recomputed
    return search_speedup(lambda delta: delta_schedule(change, delta, unit_names, sampler, model), 0.0, high,
                          target_speedup, config, what="delta")
