"""Import Learning-to-Cache routers (Ma et al., NeurIPS 2024) with the published code's semantics.

DiT router file: {"routers": {"{i}.prob": logits (2·depth,)}, "opt": …, "args": Namespace}, with i the
*respaced index* 0…N−1 (sampling runs from N−1 down to 0). Entry 2j is block j's attention, 2j+1 its
MLP; score = sigmoid(logit). At odd i every unit is computed; at even i unit j is computed iff
score > θ (θ = 0.1 for DiT), else reused from the previous step. Sampling step s is index N−1−s.
`every_step=True` applies the threshold at every index instead (routers learned by `learn-l2c`,
which may reuse on consecutive steps).
"""

from __future__ import annotations

import os

import numpy as np

from .errors import BlockcacheError
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
        index = str(key).removesuffix(".prob")
        if not str(key).endswith(".prob") or not index.isdigit() or not isinstance(value, torch.Tensor):
            raise BlockcacheError(f"{path}: unexpected router entry {key!r} (expected '{{i}}.prob' tensors)")
        logits[int(index)] = value.detach().double().reshape(-1).numpy()
    sizes = {v.size for v in logits.values()}
    if len(sizes) != 1:
        raise BlockcacheError(f"{path}: routers have different sizes {sorted(sizes)}")
    if sorted(logits) != list(range(len(logits))):
        raise BlockcacheError(f"{path}: router indices are not 0…{len(logits) - 1}")
    return logits


def schedule_from_l2c(logits: dict[int, np.ndarray], unit_names, steps: int, *, threshold: float = 0.1,
                      spacing: str = "linspace", model: str | None = None, source: str | None = None,
                      every_step: bool = False) -> Schedule:
    n_units = len(unit_names)
    size = next(iter(logits.values())).size
    if size != n_units:
        raise BlockcacheError(f"router has {size} logits per step but the model has {n_units} units "
                              f"({size // 2} vs {n_units // 2} blocks): wrong model?")
    if len(logits) != steps:
        raise BlockcacheError(f"router was trained for {len(logits)} steps, not {steps}")
    if not 0.0 < threshold < 1.0:
        raise BlockcacheError(f"threshold must be in (0, 1), got {threshold}")
    compute = np.ones((steps, n_units), dtype=bool)
    for s in range(steps):
        i = steps - 1 - s
        if (i % 2 == 1 and not every_step) or s == 0:  # odd index: full step; step 0 has nothing cached yet
            continue
        score = 1.0 / (1.0 + np.exp(-logits[i]))
        compute[s] = score > threshold
    return Schedule(unit_names, compute, {"name": "ddim", "steps": steps, "spacing": spacing}, model,
                    source=source or f"l2c threshold={threshold}")


def import_l2c(path, unit_names, steps: int, *, threshold: float = 0.1, spacing: str = "linspace",
               model: str | None = None, every_step: bool = False) -> Schedule:
    logits = read_router_logits(path)
    return schedule_from_l2c(logits, unit_names, steps, threshold=threshold, spacing=spacing, model=model,
                             every_step=every_step,
                             source=f"import-l2c {os.path.basename(os.fspath(path))} threshold={threshold}"
                             + (" every-step" if every_step else ""))
