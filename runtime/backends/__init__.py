"""Backends replay a plan's variants. Each takes (plan_dir, manifest, device) and offers
`run(x, y, guidance_scale) -> x_final` for exactly one batch of the plan's batch size."""

from __future__ import annotations

from schedules.errors import BlockcacheError

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def make_backend(name: str, plan_dir: str, manifest: dict, device: str):
    if name == "auto":
        name = "onnxruntime"
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(plan_dir, manifest, device)
    if name in BACKENDS:
        raise BlockcacheError(f"backend {name!r} is not available in this version (use onnxruntime)")
    raise BlockcacheError(f"unknown backend {name!r} (expected auto or one of {', '.join(BACKENDS)})")
