"""Import Learning-to-Cache routers (Ma et al., NeurIPS 2024) with the published code's semantics.

DiT router file: {"routers": {"{i}.prob": logits (2·depth,)}, "opt": …, "args": Namespace}, with i the
*respaced index* 0…N−1 (sampling runs from N−1 down to 0). Entry 2j is block j's attention, 2j+1 its
MLP; score = sigmoid(logit). At odd i every unit is computed; at even i unit j is computed iff
score > θ (θ = 0.1 for DiT), else reused from the previous step. Sampling step s is index N−1−s.
`every_step=True` applies the threshold at every index instead (routers learned by `learn-l2c`,
which may reuse on consecutive steps).

U-ViT router files (`dpm20_router.pth`, `dpm50_router.pth`): a bare {"{i}.prob": 58 logits} dict for
DPM-Solver-2, whose schedule rows are model evaluations (two per solver step). Only routers 1 …
NFE/2 − 1 are used: router k decides the *outer* evaluation of solver step k (row 2k), which reuses
each unit with score ≤ θ (θ = 0.9) from the evaluation just before it (step k−1's intermediate
one); every intermediate evaluation and step 0 compute everything.
"""

from __future__ import annotations

import os
import re

import numpy as np

from .errors import BlockcacheError, ParameterError
from .safeload import safe_torch_load
from .schedule import Schedule


def read_router_logits(path) -> dict[int, np.ndarray]:
    """{respaced index: float64 logits} from an L2C router file, read without running pickled code."""
    import torch

    path = os.fspath(path)
    obj = safe_torch_load(path, "router file")
    routers = obj.get("routers", obj) if isinstance(obj, dict) else None
    if not isinstance(routers, dict) or not routers:
        raise BlockcacheError(f"{path}: no router state dict ('{{i}}.prob' entries) found")
    logits = {}
    for key, value in routers.items():
        index = re.fullmatch(r"([0-9]{1,6})\.prob", str(key))
        if index is None or not isinstance(value, torch.Tensor):
            raise BlockcacheError(f"{path}: unexpected router entry {key!r} (expected '{{i}}.prob' tensors)")
        if value.layout != torch.strided or value.is_meta or not value.is_floating_point():
            raise BlockcacheError(f"{path}: router {key!r} is not a dense floating-point tensor")
        values = value.detach().cpu().double().reshape(-1).numpy()
        if not np.isfinite(values).all():
            raise BlockcacheError(f"{path}: router {key!r} holds NaN or infinite logits")
        logits[int(index.group(1))] = values
    sizes = {v.size for v in logits.values()}
    if len(sizes) != 1:
        raise BlockcacheError(f"{path}: routers have different sizes {sorted(sizes)}")
    if sorted(logits) != list(range(len(logits))):
        raise BlockcacheError(f"{path}: router indices are not 0…{len(logits) - 1}")
    return logits


DEFAULT_THRESHOLD = {"ddim": 0.1, "dpm-solver-2": 0.9}  # the published θ for DiT (DDIM) and U-ViT (DPM)


def _check(logits: dict, unit_names, threshold: float) -> None:
    n_units = len(unit_names)
    size = next(iter(logits.values())).size
    if size != n_units:
        raise BlockcacheError(f"router has {size} logits per step but the model has {n_units} units "
                              f"({size // 2} vs {n_units // 2} blocks): wrong model?")
    if not 0.0 < threshold < 1.0:
        raise BlockcacheError(f"threshold must be in (0, 1), got {threshold}")


def _score(logit: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logit))


def schedule_from_l2c(logits: dict[int, np.ndarray], unit_names, steps: int, *, threshold: float = 0.1,
                      spacing: str = "linspace", model: str | None = None, source: str | None = None,
                      every_step: bool = False) -> Schedule:
    _check(logits, unit_names, threshold)
    n_units = len(unit_names)
    if len(logits) != steps:
        raise BlockcacheError(f"router was trained for {len(logits)} steps, not {steps}")
    compute = np.ones((steps, n_units), dtype=bool)
    for s in range(steps):
        i = steps - 1 - s
        if (i % 2 == 1 and not every_step) or s == 0:  # odd index: full step; step 0 has nothing cached yet
            continue
        compute[s] = _score(logits[i]) > threshold
    return Schedule(unit_names, compute, {"name": "ddim", "steps": steps, "spacing": spacing}, model,
                    source=source or f"l2c threshold={threshold}")


def schedule_from_uvit_l2c(logits: dict[int, np.ndarray], unit_names, evaluations: int, *, threshold: float = 0.9,
                           model: str | None = None, source: str | None = None) -> Schedule:
    """The published U-ViT semantics (module docstring) for DPM-Solver-2 with `evaluations` rows."""
    _check(logits, unit_names, threshold)
    if evaluations % 2 or evaluations < 2:
        raise BlockcacheError(f"DPM-Solver-2 makes two evaluations per step: {evaluations} is not an even count")
    solver_steps = evaluations // 2
    if len(logits) < solver_steps:
        raise BlockcacheError(f"router file has {len(logits)} routers, too few for {evaluations} evaluations "
                              f"({solver_steps} solver steps): made for fewer steps?")
    compute = np.ones((evaluations, len(unit_names)), dtype=bool)
    for k in range(1, solver_steps):
        compute[2 * k] = _score(logits[k]) > threshold
    return Schedule(unit_names, compute, {"name": "dpm-solver-2", "steps": evaluations, "spacing": "time-uniform"},
                    model, source=source or f"l2c threshold={threshold}")


def import_l2c(path, unit_names, steps: int, *, threshold: float | None = None, spacing: str | None = None,
               model: str | None = None, every_step: bool = False, sampler: str = "ddim") -> Schedule:
    """A schedule from the router file `path` for `steps` model evaluations of `sampler` (ddim: DiT's
    router files; dpm-solver-2: U-ViT's). `threshold` defaults to the published θ for the sampler."""
    if sampler not in DEFAULT_THRESHOLD:
        raise BlockcacheError(f"L2C routers exist for ddim and dpm-solver-2 schedules, not {sampler!r}")
    threshold = DEFAULT_THRESHOLD[sampler] if threshold is None else threshold
    logits = read_router_logits(path)
    source = f"import-l2c {os.path.basename(os.fspath(path))} threshold={threshold}"
    if sampler == "dpm-solver-2":
        if every_step:
            raise ParameterError("every_step", "{name} is for DDIM routers made by learn-l2c")
        if spacing not in (None, "time-uniform"):
            raise BlockcacheError(f"sampler dpm-solver-2 has no spacing {spacing!r} (its spacings: time-uniform)")
        return schedule_from_uvit_l2c(logits, unit_names, steps, threshold=threshold, model=model, source=source)
    return schedule_from_l2c(logits, unit_names, steps, threshold=threshold, spacing=spacing or "linspace",
                             model=model, every_step=every_step, source=source + (" every-step" if every_step else ""))
