"""The one backend interface, and device names.

A backend replays a validated plan (`runtime.plan.Plan`) for one batch of the plan's batch size:

    with make_backend("onnxruntime", plan, device="cpu", threads=2) as backend:
        x_final = backend.run(x, y, guidance_scale)     # (B, C, H, W) float32 noise, (B,) int64 labels

Every backend is built as `Backend(plan, device="auto", **options)` (each declares its keyword options
in `OPTIONS`), reports `name` and the resolved `device`, and frees what it holds in `close()` (also on
leaving a `with` block).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from schedules.errors import BlockcacheError, ParameterError

from ..plan import Plan, names


def resolve_device(device, cuda_available: Callable[[], bool]) -> str:
    """`auto` → `cuda` where `cuda_available()`, else `cpu`; `cpu`, `cuda` and `cuda:N` are checked
    (a GPU asked for where there is none is refused)."""
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or re.fullmatch("cuda:[0-9]{1,3}", device)):
        raise ParameterError("device", f"unknown {{name}} {device!r} (expected auto, cpu, cuda or cuda:N)")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda") and not cuda_available():
        raise ParameterError("device", f"{{name}} {device} requested but no CUDA GPU is usable here")
    return device


def device_index(device: str) -> int:
    """The GPU number of `cuda:N` (0 for `cuda` and `cpu`)."""
    return int(device[5:]) if device.startswith("cuda:") else 0


class Backend:
    name = "backend"
    OPTIONS: tuple[str, ...] = ()  # keyword options of the constructor
    closed = False

    def __init__(self, plan: Plan, device: str):
        self.plan = plan
        self.device = device
        self._x_shape = plan.inputs[names.X].shape
        self._y_shape = plan.inputs[names.Y].shape

    def run(self, x: np.ndarray, y: np.ndarray, guidance_scale: float) -> np.ndarray:
        """The final latents (B, C, H, W) float32 of one batch: `x` the starting noise, `y` the labels."""
        if self.closed:
            raise BlockcacheError(f"the {self.name} backend was closed: make a new one to sample")
        if np.shape(x) != self._x_shape or np.shape(y) != self._y_shape:
            raise BlockcacheError(f"the {self.name} backend runs batches of exactly {self._x_shape} latents and "
                                  f"{self._y_shape} labels, got {np.shape(x)} and {np.shape(y)}")
        return self._run(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64),
                         float(guidance_scale))

    def _run(self, x: np.ndarray, y: np.ndarray, guidance_scale: float) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (device memory first); the backend is not usable afterwards.
        Subclasses release their own state, then call this."""
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
