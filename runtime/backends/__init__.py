"""Backends replay a plan's steps: ONNX Runtime (CPU or CUDA), PyTorch, TensorRT. All share the
interface of `base.Backend`; `make_backend` picks and builds one."""

from __future__ import annotations

import logging

from schedules.errors import BlockcacheError, ParameterError, one_line

from ..plan import Plan
from .base import Backend

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def backend_class(name: str) -> type[Backend]:
    """The backend class called `name`, imported only when asked for (torch and TensorRT are heavy)."""
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend
    raise ParameterError("backend", f"unknown {{name}} {name!r} (expected auto or one of {', '.join(BACKENDS)})")


def make_backend(name: str, plan: Plan, device: str = "auto", **options) -> Backend:
    """Backend `name` (or `auto`) for `plan` on `device`, with the backend's keyword `options`.

    `auto`: a plan with TensorRT engines runs on TensorRT where it can; otherwise, and for every other
    plan, on ONNX Runtime (falling back from engines says why, in one line). Options the chosen backend
    does not take are dropped for `auto` and refused for a named backend."""
    if name != "auto":
        cls = backend_class(name)
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise ParameterError(unknown[0], f"the {name} backend has no option {{name}} "
                                 f"(its options: {', '.join(cls.OPTIONS) or 'none'})")
        return cls(plan, device, **options)
    if plan.tensorrt is not None and (device == "auto" or device.startswith("cuda")):
        try:
            return make_backend("tensorrt", plan, device, **_taken("tensorrt", options))
        except BlockcacheError as e:
            logging.getLogger("blockcache").warning("blockcache: using ONNX Runtime for this plan's ONNX graphs: %s",
                                                    one_line(e))
    return make_backend("onnxruntime", plan, device, **_taken("onnxruntime", options))


def _taken(name: str, options: dict) -> dict:
    return {k: v for k, v in options.items() if k in backend_class(name).OPTIONS}
