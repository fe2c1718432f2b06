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

import numpy as np

from schedules.errors import BlockcacheError, ParameterError, one_line

from ..plan import Plan, names
from ..plan.files import plan_corrections, read_weights, stored_array
from .base import Backend, device_index, resolve_device


# Intra-op threads per session: far above any core count, far below what makes thread creation fail
# (ONNX Runtime crashed at 100,000).
MAX_THREADS = 1024


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


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    OPTIONS = ("threads",)

    def __init__(self, plan: Plan, device: str = "auto", threads: int | None = None):
        """`threads`: intra-op threads per session (default: ONNX Runtime's choice)."""
        ort = _ort()
        super().__init__(plan, resolve_device(device, cuda_available))
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or not 1 <= threads <= MAX_THREADS):
            raise ParameterError("threads", f"{{name}} must be an integer in 1…{MAX_THREADS}, got {threads!r}")
        kind, index = ("cuda" if self.device.startswith("cuda") else "cpu"), device_index(self.device)
        providers = ([("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"] if kind == "cuda"
                     else ["CPUExecutionProvider"])

        def on_device(array):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), kind, index)

        def empty(spec):
            return ort.OrtValue.ortvalue_from_shape_and_type(list(spec.shape), np.dtype(spec.dtype), kind, index)

        # Weights: read once, one OrtValue each, shared by every session.
        blob = read_weights(plan)
        self._host_weights = blob  # on CPU the OrtValues alias this memory: keep it alive
        self.weights = {name: on_device(stored_array(blob, plan, name)) for name in plan.weights.tensors}

        self.sessions = []
        for v in plan.variants:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.add_session_config_entry("session.disable_prepacking", "1")
            if kind == "cpu":
                # A per-session arena keeps each session's peak activations reserved: with 11 variants
                # that was 1.73x the memory of a 1-variant plan; without it, activations are freed per run.
                options.enable_cpu_mem_arena = False
                options.enable_mem_pattern = False
            if threads:
                options.intra_op_num_threads = threads
            for name in v.weights:
                options.add_initializer(name, self.weights[name])
            try:
                self.sessions.append(ort.InferenceSession(plan.path(v.file), options, providers=providers))
            except Exception as e:  # ORT raises its own exception types; report them in one line
                raise BlockcacheError(f"ONNX Runtime cannot load {v.file}: {one_line(e)[:300]}") from None

        inputs = plan.inputs
        self.x = [empty(inputs[names.X]) for _ in range(plan.num_latents)]
        self.y = empty(inputs[names.Y])
        self.guidance_scale = empty(inputs[names.GUIDANCE_SCALE])
        self.cache = {unit: empty(spec) for unit, spec in plan.cache.items()}
        constants = [name for name in names.STEP_CONSTANTS if name in inputs]
        self.constants = [{name: on_device(np.array([getattr(step, name)], np.dtype(inputs[name].dtype)))
                           for name in constants} for step in plan.steps]
        # Block Caching scale/shift vectors, per step and corrected unit, in the cache's dtype.
        for step_constants, corrections in zip(self.constants, plan_corrections(plan)):
            for unit, pair in corrections.items():
                dtype = np.dtype(plan.cache[unit].dtype)
                for name, value in zip(names.correction_inputs(unit), pair):
                    step_constants[name] = on_device(value.astype(dtype))
        try:
            self.bindings = [self._bind(s, step) for s, step in enumerate(plan.steps)]
        except Exception as e:  # ORT's own exception types: a graph whose I/O the plan does not match
            raise BlockcacheError(f"ONNX Runtime cannot bind the plan's buffers: {one_line(e)[:300]}") from None

    def _bind(self, s: int, step):
        variant = self.plan.variants[step.variant]
        binding = self.sessions[step.variant].io_binding()
        latent, carry, out = step.latents
        binding.bind_ortvalue_input(names.X, self.x[latent])
        if self.plan.has_carry:
            binding.bind_ortvalue_input(names.X_CARRY, self.x[carry])
        binding.bind_ortvalue_input(names.Y, self.y)
        binding.bind_ortvalue_input(names.GUIDANCE_SCALE, self.guidance_scale)
        for name, value in self.constants[s].items():
            binding.bind_ortvalue_input(name, value)
        for unit in variant.reads:
            binding.bind_ortvalue_input(names.cache_input(unit), self.cache[unit])
        binding.bind_ortvalue_output(names.X_NEXT, self.x[out])
        for unit in variant.writes:
            binding.bind_ortvalue_output(names.unit_output(unit), self.cache[unit])
        return binding

    def _run(self, x: np.ndarray, y: np.ndarray, guidance_scale: float) -> np.ndarray:
        steps = self.plan.steps
        self.x[steps[0].latents[0]].update_inplace(x)
        self.y.update_inplace(y)
        self.guidance_scale.update_inplace(np.array([guidance_scale], np.float32))
        try:
            for step, binding in zip(steps, self.bindings):
                self.sessions[step.variant].run_with_iobinding(binding)
        except Exception as e:  # ORT's own exception types (e.g. out of memory): one line
            raise BlockcacheError(f"ONNX Runtime failed while sampling: {one_line(e)[:300]}") from None
        # On CPU numpy() aliases the resident buffer, which the next call overwrites: copy it out.
        return self.x[steps[-1].latents[2]].numpy().copy()

    def close(self) -> None:
        self.bindings, self.sessions, self.weights, self.cache, self.x, self.constants = [], [], {}, {}, [], []
        self.y = self.guidance_scale = self._host_weights = None
        super().close()
