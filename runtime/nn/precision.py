"""Precision names ↔ torch dtypes, and IEEE fp32 on GPUs (TF32 off) for the comparisons that need it."""

from __future__ import annotations

import contextlib
import threading

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


def model_dtype(model) -> torch.dtype:
    """The dtype a network computes in: its position table's (DiT, U-ViT) or patch embedding's (PixArt,
    whose table is a fixed fp32 buffer)."""
    table = model.pos_embed
    return table.dtype if isinstance(table, torch.Tensor) else table.proj.weight.dtype


_fp32_lock = threading.Lock()
_fp32_users = 0  # threads inside exact_fp32(); the settings are restored when the last one leaves
_fp32_saved: list = []


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for cuBLAS matmuls and cuDNN convolutions inside the block, restored afterwards, so
    fp32 work on a GPU is IEEE fp32 like the eager reference and ONNX Runtime (cuDNN convolutions
    default to TF32). Kernels captured in a CUDA graph keep the setting they were captured with.
    The settings are process-wide, so concurrent blocks (a Sampler's contexts in several threads)
    count their users: the first to enter turns TF32 off, the last to leave restores it; one thread
    leaving never turns TF32 back on under another."""
    global _fp32_users
    with _fp32_lock:
        if _fp32_users == 0:
            _fp32_saved[:] = _set_ieee()
        _fp32_users += 1
    try:
        yield
    finally:
        with _fp32_lock:
            _fp32_users -= 1
            if _fp32_users == 0:
                for obj, attr, before in reversed(_fp32_saved):
                    setattr(obj, attr, before)
                _fp32_saved.clear()


def _set_ieee() -> list:
    """Turn TF32 off; the (object, attribute, previous value) of each setting changed."""
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
    return applied
