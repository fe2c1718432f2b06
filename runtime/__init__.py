"""blockcache runtime: load a plan and replay its per-step graphs with device-resident buffers.

Needs no torch for the ONNX Runtime and TensorRT backends.
"""

from .sampler import Sampler

__all__ = ["Sampler"]
