"""Precision names ↔ torch dtypes, and IEEE fp32 on GPUs (TF32 off) for the comparisons that need it."""

from __future__ import annotations

import contextlib

import torch

from schedules.errors import ParameterError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", torch.float32: "fp32",
           "fp16": "fp16", "float16": "fp16", "half": "fp16", torch.float16: "fp16",
           "bf16": "bf16", "bfloat16": "bf16", torch.bfloat16: "bf16"}


def precision_name(dtype) -> str:
    """'fp32' / 'fp16' / 'bf16' for a name, an alias or a torch dtype (ParameterError otherwise)."""
    try:
        return ALIASES[dtype]
    except (KeyError, TypeError):
        raise ParameterError("dtype", f"unknown precision {dtype!r} for {{name}} (expected fp32, fp16 or bf16)") \
            from None


def torch_dtype(precision) -> torch.dtype:
    return DTYPES[precision_name(precision)]


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for cuBLAS matmuls and cuDNN convolutions inside the block, restored afterwards, so
    fp32 work on a GPU is IEEE fp32 like the eager reference and ONNX Runtime (cuDNN convolutions
    default to TF32). Kernels captured in a CUDA graph keep the setting they were captured with."""
    new = [(torch.backends.cuda.matmul, "fp32_precision", "ieee"), (torch.backends.cudnn.conv, "fp32_precision", "ieee")]
    old = [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]
    settings = new if all(hasattr(obj, attr) for obj, attr, _ in new) else old  # torch >= 2.9 / older
    applied = []
    try:
        for obj, attr, value in settings:
            before = getattr(obj, attr)
            setattr(obj, attr, value)
            applied.append((obj, attr, before))
    except (RuntimeError, AttributeError):  # mixed legacy/new TF32 settings elsewhere: leave the rest
        pass
    try:
        yield
    finally:
        for obj, attr, before in reversed(applied):
            setattr(obj, attr, before)
