"""The one backend interface, and device names.

A backend replays a validated plan (`runtime.plan.Plan`), one batch of one of its programs at a time
per execution context:

    with make_backend("onnxruntime", plan, device="cpu", threads=2) as backend:
        x_final = backend.run(x, y, guidance_scale)     # (B, C, H, W) float32 noise, (B,) int64 labels
        context = backend.new_context()                 # one per concurrent caller (runtime.Sampler's pool)
        x_final = context.run(plan.programs[1], x, y, guidance_scale)
        images = context.decode(plan.programs[1])       # a plan with a decoder: uint8 (B, H, W, 3)

Every backend is built as `Backend(plan, device="auto", **options)` (each declares its keyword options
in `OPTIONS`), reports `name` and the resolved `device`, and frees what it and its contexts hold in
`close()` (also on leaving a `with` block). The heavy state (weights, sessions or engines, the
network) exists once per backend; a context holds only what a call writes (latents, labels, caches,
bindings, a captured graph), so memory grows by those per context, never by the weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from schedules.errors import BlockcacheError, ParameterError

from ..plan import Plan, names
from ..plan.manifest import Program


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
    """The state every call shares: the weights, and the sessions, engines or network of every program.
    What a call writes lives in an `ExecutionContext` (`new_context`); `run` uses one the backend keeps
    for single-threaded use."""

    name = "backend"
    OPTIONS: tuple[str, ...] = ()  # keyword options of the constructor
    closed = False

    def __init__(self, plan: Plan, device: str):
        self.plan = plan
        self.device = device
        self.contexts: list[ExecutionContext] = []  # every context made, the first the one `run` uses

    def new_context(self) -> "ExecutionContext":
        """A new execution context: the buffers (latents, labels, caches, bindings, graphs) of one call
        at a time, for every program of the plan. Contexts run concurrently with each other."""
        if self.closed:
            raise BlockcacheError(f"the {self.name} backend was closed: make a new one to sample")
        context = self._make_context()
        self.contexts.append(context)
        return context

    def _make_context(self) -> "ExecutionContext":
        raise NotImplementedError

    def run(self, x: np.ndarray, y, guidance_scale: float, program: Program | None = None) -> np.ndarray:
        """The final latents (B, C, H, W) float32 of one batch of `program` (default: the plan's only
        one): `x` the starting noise, `y` the labels (a text model's prompt inputs: `ExecutionContext.run`).
        One call at a time; use contexts for more."""
        context = self.contexts[0] if self.contexts else self.new_context()
        return context.run(self.plan.program if program is None else program, x, y, guidance_scale)

    def close(self) -> None:
        """Release what the backend and its contexts hold (device memory first); neither is usable
        afterwards. Subclasses release their own shared state after calling this."""
        for context in self.contexts:
            context.close()
        self.contexts = []
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class ExecutionContext:
    """The per-call state of a backend: what one sampling call writes. A context runs one batch at a
    time; several contexts of one backend run at the same time, sharing everything else."""

    closed = False

    def __init__(self, backend: Backend):
        self.backend = backend

    def run(self, program: Program, x: np.ndarray, y, guidance_scale: float) -> np.ndarray:
        """The final latents of one batch of `program`, a program of the backend's plan. `y`: the labels,
        or for a text model {prompt_embeds, prompt_mask} of the network batch (`Program.call_inputs`)."""
        if self.closed or self.backend.closed:
            raise BlockcacheError(f"the {self.backend.name} backend was closed: make a new one to sample")
        if self.backend.plan.programs[program.index] is not program:
            raise BlockcacheError("that program is not one of this backend's plan")
        specs = program.call_inputs
        given = y if program.takes_prompt else {names.Y: y}
        if not isinstance(given, dict) or set(given) != set(specs):
            raise BlockcacheError(f"this program of the {self.backend.name} backend is conditioned on "
                                  f"{', '.join(specs)}, got {type(y).__name__}")
        x_shape = program.inputs[names.X].shape
        wrong = [n for n, spec in specs.items() if np.shape(given[n]) != spec.shape]
        if np.shape(x) != x_shape or wrong:
            shapes = ", ".join(f"{n} {specs[n].shape}" for n in specs)
            raise BlockcacheError(f"this program of the {self.backend.name} backend runs batches of exactly "
                                  f"{x_shape} latents and {shapes}, got {np.shape(x)} and "
                                  + ", ".join(f"{n} {np.shape(given[n])}" for n in specs))
        cond = {n: np.ascontiguousarray(given[n], dtype=np.dtype(spec.dtype)) for n, spec in specs.items()}
        return self._run(program, np.ascontiguousarray(x, dtype=np.float32), cond, float(guidance_scale))

    def _run(self, program: Program, x: np.ndarray, cond: dict, guidance_scale: float) -> np.ndarray:
        """`cond`: name → array of `program.call_inputs`, checked."""
        raise NotImplementedError

    def decode(self, program: Program) -> np.ndarray:
        """uint8 images (B, H, W, 3) of the final latents that this context's last `run` of `program`
        left on the device, by the plan's decoder graph (no host round trip before this copy)."""
        if self.closed or self.backend.closed:
            raise BlockcacheError(f"the {self.backend.name} backend was closed: make a new one to sample")
        if program.decoder is None:
            raise BlockcacheError("this plan has no decoder: it yields latents (export it with --vae for images)")
        return self._decode(program)

    def _decode(self, program: Program) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the context's buffers (subclasses release theirs, then call this)."""
        self.closed = True
