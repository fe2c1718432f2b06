"""Backends replay a plan's variants. Each takes (plan_dir, manifest, device) and offers
`run(x, y, guidance_scale) -> x_final` for exactly one batch of the plan's batch size."""

from __future__ import annotations

import logging

from schedules.errors import BlockcacheError, one_line

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def make_backend(name: str, plan_dir: str, manifest: dict, device: str, threads: int | None = None):
    if name == "auto":
        return _auto(plan_dir, manifest, device, threads)
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(plan_dir, manifest, device, threads)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(plan_dir, manifest, device)
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend(plan_dir, manifest, device)
    raise BlockcacheError(f"unknown backend {name!r} (expected auto or one of {', '.join(BACKENDS)})")


def _auto(plan_dir: str, manifest: dict, device: str, threads: int | None = None):
    """A plan with TensorRT engines runs on TensorRT where it can; otherwise, and for every other
    plan, on ONNX Runtime. Falling back from engines says why, in one line."""
    from .onnxruntime import OnnxRuntimeBackend

    if manifest.get("tensorrt") and device in ("auto", "cuda"):
        from .tensorrt import TensorRTBackend

        try:
            return TensorRTBackend(plan_dir, manifest, device)
        except BlockcacheError as e:
            logging.getLogger("blockcache").warning("blockcache: using ONNX Runtime for this plan's ONNX graphs: %s",
                                                    one_line(e))
    return OnnxRuntimeBackend(plan_dir, manifest, device, threads)
