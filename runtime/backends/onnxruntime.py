"""ONNX Runtime backend: one session per variant, weights loaded once and shared, every tensor the
loop touches resident on the device, one graph execution per step.

- Weights: `weights.bin` is read once; each tensor becomes one OrtValue on the device, handed to every
  session with `SessionOptions.add_initializer`, which ORT uses in place when it lives on the device
  the session plans it on. On CPU, pre-packing is disabled: it would keep a re-laid-out copy of every
  weight per session, so memory would grow with the number of variants.
- Buffers: two latents (ping-pong, input and output of a step; three for DPM-Solver-2, whose
  intermediate evaluation also reads its solver step's starting latent), labels, the guidance scale, the
  per-step constants (with Block Caching scale/shift vectors where the plan has them) and one cache
  buffer per reused unit are allocated at load. Every step's
  IOBinding is built at load too; a call copies noise and labels in, runs the bindings in order and
  copies the final latent out: no host round trip between steps.
"""

from __future__ import annotations

import os

import numpy as np

from schedules.errors import BlockcacheError, one_line

from ..manifest import step_adjustments, step_latents


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BlockcacheError("the onnxruntime backend needs onnxruntime: pip install onnxruntime-gpu") from None
    return onnxruntime


def cuda_available() -> bool:
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    # The GPU build lists CUDA even on machines without a GPU or CUDA libraries: try an allocation,
    # with ORT's own error log silenced for the probe.
    ort.set_default_logger_severity(4)
    try:
        ort.OrtValue.ortvalue_from_shape_and_type([1], np.float32, "cuda", 0)
        return True
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(2)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, plan_dir: str, manifest: dict, device: str = "auto", threads: int | None = None):
        ort = _ort()
        if device == "auto":
            device = "cuda" if cuda_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise BlockcacheError(f"unknown device {device!r} (expected auto, cpu or cuda)")
        if device == "cuda" and not cuda_available():
            raise BlockcacheError("device cuda requested but ONNX Runtime sees no usable CUDA GPU")
        self.device = device
        self.manifest = manifest
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]

        def on_device(array):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)

        def empty(spec):
            return ort.OrtValue.ortvalue_from_shape_and_type(spec["shape"], np.dtype(spec["dtype"]), device, 0)

        # Weights: read once, one OrtValue each, shared by every session.
        blob = np.fromfile(os.path.join(plan_dir, manifest["weights"]["file"]), dtype=np.uint8)
        self._host_weights = blob  # on CPU the OrtValues alias this memory: keep it alive
        self.weights = {}
        for name, t in manifest["weights"]["tensors"].items():
            array = blob[t["offset"]: t["offset"] + t["length"]].view(np.dtype(t["dtype"])).reshape(t["shape"])
            self.weights[name] = on_device(array)

        self.sessions = []
        for v in manifest["variants"]:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.add_session_config_entry("session.disable_prepacking", "1")
            if device == "cpu":
                # A per-session arena keeps each session's peak activations reserved: with 11 variants
                # that was 1.73x the memory of a 1-variant plan; without it, activations are freed per run.
                options.enable_cpu_mem_arena = False
                options.enable_mem_pattern = False
            if threads:
                options.intra_op_num_threads = threads
            for name in v["weights"]:
                options.add_initializer(name, self.weights[name])
            try:
                self.sessions.append(ort.InferenceSession(os.path.join(plan_dir, v["file"]), options, providers=providers))
            except Exception as e:  # ORT raises its own exception types; report them in one line
                raise BlockcacheError(f"ONNX Runtime cannot load {v['file']}: {one_line(e)[:300]}") from None

        inputs = manifest["inputs"]
        self.latents = step_latents(manifest)
        self.x = [empty(inputs["x"]) for _ in range(1 + max(max(slot) for slot in self.latents))]
        self.y = empty(inputs["y"])
        self.guidance_scale = empty(inputs["guidance_scale"])
        self.cache = {name: empty(spec) for name, spec in manifest["buffers"].items()}
        solver = [name for name in ("timestep", "a", "b", "c") if name in inputs]  # c: solvers with a carry
        self.constants = [{name: on_device(np.array([s[name]], np.dtype(inputs[name]["dtype"]))) for name in solver}
                          for s in manifest["steps"]]
        # Block Caching scale/shift vectors, per step and corrected unit, in the cache's dtype.
        for constants, adjust in zip(self.constants, step_adjustments(plan_dir, manifest)):
            for unit, (scale, shift) in adjust.items():
                dtype = np.dtype(manifest["buffers"]["cache." + unit]["dtype"])
                constants["scale." + unit] = on_device(scale.astype(dtype))
                constants["shift." + unit] = on_device(shift.astype(dtype))
        self.bindings = [self._bind(s, step) for s, step in enumerate(manifest["steps"])]

    def _bind(self, s: int, step: dict):
        variant = self.manifest["variants"][step["variant"]]
        binding = self.sessions[step["variant"]].io_binding()
        latent, carry, out = self.latents[s]
        binding.bind_ortvalue_input("x", self.x[latent])
        if "x_carry" in self.manifest["inputs"]:
            binding.bind_ortvalue_input("x_carry", self.x[carry])
        binding.bind_ortvalue_input("y", self.y)
        binding.bind_ortvalue_input("guidance_scale", self.guidance_scale)
        for name, value in self.constants[s].items():
            binding.bind_ortvalue_input(name, value)
        for unit in variant["reads"]:
            binding.bind_ortvalue_input("cache." + unit, self.cache["cache." + unit])
        binding.bind_ortvalue_output("x_next", self.x[out])
        for unit in variant["writes"]:
            binding.bind_ortvalue_output("unit." + unit, self.cache["cache." + unit])
        return binding

    def run(self, x: np.ndarray, y: np.ndarray, guidance_scale: float) -> np.ndarray:
        self.x[self.latents[0][0]].update_inplace(np.ascontiguousarray(x, dtype=np.float32))
        self.y.update_inplace(np.ascontiguousarray(y, dtype=np.int64))
        self.guidance_scale.update_inplace(np.array([guidance_scale], np.float32))
        for s, binding in enumerate(self.bindings):
            self.sessions[self.manifest["steps"][s]["variant"]].run_with_iobinding(binding)
        # On CPU numpy() aliases the resident buffer, which the next call overwrites: copy it out.
        return self.x[self.latents[-1][2]].numpy().copy()
