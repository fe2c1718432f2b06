"""ONNX Runtime backend: one session per variant of every program, weights loaded once and shared,
every tensor the loop touches resident on the device, one graph execution per step.

- Weights: `weights.bin` is read once; each tensor becomes one OrtValue on the device, handed to every
  session with `SessionOptions.add_initializer`, which ORT uses in place when it lives on the device
  the session plans it on. On CPU, pre-packing is disabled: it would keep a re-laid-out copy of every
  weight per session, so memory would grow with the number of variants.
- Shared by every call: the sessions, and the per-step constants (timestep, a, b, c and Block Caching
  scale/shift vectors, forecast weights), which the graphs only read.
- Per execution context (one call at a time): for each batch size, the latents (two, ping-pong; three
  for DPM-Solver-2, whose intermediate evaluation also reads its solver step's starting latent; four
  for DPM-Solver++ 2M, whose steps also write the next step's carry to a latent buffer), the
  labels (a text model: the prompt embeddings and mask, and the prologue's outputs), the guidance scale
  and one cache buffer per reused unit (m + 1 for a forecast over m + 1
  values, rotated by binding: `Program.cache_slots`), shared by that batch size's
  programs (a context runs one program at a time); and every step's IOBinding, built when the context
  is made. A call copies noise and labels in, runs the bindings in order and copies the final latent
  out: no host round trip between steps. A text model's plan runs its batch size's prologue graph first,
  writing every block's prompt keys and values into buffers that all steps bind. A plan with a decoder: one decoder session per batch size;
  `decode` runs it on the final latent buffer in place and copies the uint8 images out. ONNX Runtime sessions run concurrently from several threads,
  each with its own bindings.
"""

from __future__ import annotations

import numpy as np

from schedules.errors import BlockcacheError, ParameterError, one_line

from ..plan import Plan, names
from ..plan.manifest import Program
from ..plan.files import plan_corrections, read_weights, stored_array
from .base import Backend, ExecutionContext, device_index, resolve_device


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
        self.kind, self.index = ("cuda" if self.device.startswith("cuda") else "cpu"), device_index(self.device)
        providers = ([("CUDAExecutionProvider", {"device_id": self.index}), "CPUExecutionProvider"]
                     if self.kind == "cuda" else ["CPUExecutionProvider"])

        # Weights: read once, one OrtValue each, shared by every session of every program.
        blob = read_weights(plan)
        self._host_weights = blob  # on CPU the OrtValues alias this memory: keep it alive
        self.weights = {name: self.on_device(stored_array(blob, plan, name)) for name in plan.weights.tensors}
        self.sessions = [[self._session(ort, v, providers, threads) for v in p.variants] for p in plan.programs]
        self.constants = [self._constants(p) for p in plan.programs]
        # The decoder graphs, one per batch size (shared by that batch size's programs).
        self.decoders = {p.batch_size: self._session(ort, p.decoder, providers, threads)
                         for p in plan.programs if p.decoder is not None}
        # A text model's prologue graphs, one per batch size (shared by that batch size's programs).
        self.prologues = {p.batch_size: self._session(ort, p.prologue, providers, threads)
                          for p in plan.programs if p.prologue is not None}

    def on_device(self, array):
        return _ort().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.kind, self.index)

    def empty(self, spec):
        return _ort().OrtValue.ortvalue_from_shape_and_type(list(spec.shape), np.dtype(spec.dtype), self.kind,
                                                            self.index)

    def _session(self, ort, graph, providers, threads):
        """An inference session of `graph` (a variant, decoder or prologue graph: its file and the weights it
        reads)."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
        if self.kind == "cpu":
            # A per-session arena keeps each session's peak activations reserved: with 11 variants that
            # was 1.73x the memory of a 1-variant plan; without it, activations are freed per run.
            options.enable_cpu_mem_arena = False
            options.enable_mem_pattern = False
        if threads:
            options.intra_op_num_threads = threads
        for name in graph.weights:
            options.add_initializer(name, self.weights[name])
        try:
            return ort.InferenceSession(self.plan.path(graph.file), options, providers=providers)
        except Exception as e:  # ORT raises its own exception types; report them in one line
            raise BlockcacheError(f"ONNX Runtime cannot load {graph.file}: {one_line(e)[:300]}") from None

    def _constants(self, program: Program) -> list[dict]:
        """Per step, its constant inputs as device values, read by every context's bindings."""
        inputs = program.inputs
        names_here = [name for name in names.STEP_CONSTANTS if name in inputs]
        constants = [{name: self.on_device(np.array([getattr(step, name)], np.dtype(inputs[name].dtype)))
                      for name in names_here} for step in program.steps]
        # Block Caching scale/shift vectors, per step and corrected unit, in the cache's dtype.
        for step_constants, corrections in zip(constants, plan_corrections(self.plan, program)):
            for unit, pair in corrections.items():
                dtype = np.dtype(program.cache[unit].dtype)
                for name, value in zip(names.correction_inputs(unit), pair):
                    step_constants[name] = self.on_device(value.astype(dtype))
        # Forecast weights, per step and forecast read, in the cache's dtype.
        for step_constants, step in zip(constants, program.steps):
            for name, weights in step.forecast.items():
                step_constants[names.forecast_input(name)] = self.on_device(
                    np.array(weights, np.dtype(program.cache[name].dtype)))
        return constants

    def _make_context(self) -> "OnnxRuntimeContext":
        return OnnxRuntimeContext(self)

    def close(self) -> None:
        super().close()
        self.sessions, self.weights, self.constants, self._host_weights = [], {}, [], None
        self.decoders, self.prologues = {}, {}


class OnnxRuntimeContext(ExecutionContext):
    """A call's buffers (per batch size, shared by that batch size's programs) and every step's binding."""

    def __init__(self, backend: OnnxRuntimeBackend):
        super().__init__(backend)
        plan = backend.plan
        # batch size → {"x": [latents], "cond": {the call's conditioning and the prologue's outputs},
        # "guidance_scale", "cache": {unit: value}}
        self.buffers = {}
        for program in plan.programs:
            held = self.buffers.setdefault(program.batch_size, {"x": [], "cache": {}, "cond": {}})
            while len(held["x"]) < program.num_latents:
                held["x"].append(backend.empty(program.inputs[names.X]))
            outputs = program.prologue.outputs if program.prologue is not None else {}
            for name, spec in {**program.call_inputs, **outputs}.items():
                if name not in held["cond"]:
                    held["cond"][name] = backend.empty(spec)
            held.setdefault("guidance_scale", backend.empty(program.inputs[names.GUIDANCE_SCALE]))
            for unit, spec in program.cache.items():
                if unit not in held["cache"]:
                    held["cache"][unit] = backend.empty(spec)
            if program.decoder is not None:
                held.setdefault("image", backend.empty(program.decoder.output))
        try:
            self.bindings = [[self._bind(program, s, step) for s, step in enumerate(program.steps)]
                             for program in plan.programs]
            self.decode_bindings = {program.index: self._bind_decoder(program) for program in plan.programs
                                    if program.decoder is not None}
            self.prologue_bindings = {b: self._bind_prologue(b) for b in backend.prologues}
        except Exception as e:  # ORT's own exception types: a graph whose I/O the plan does not match
            raise BlockcacheError(f"ONNX Runtime cannot bind the plan's buffers: {one_line(e)[:300]}") from None

    def _bind(self, program: Program, s: int, step):
        backend = self.backend
        held = self.buffers[program.batch_size]
        binding = backend.sessions[program.index][step.variant].io_binding()
        latent, carry, out, *carry_out = step.latents  # (a carry output where the carry is a step's output)
        binding.bind_ortvalue_input(names.X, held["x"][latent])
        if program.has_carry:
            binding.bind_ortvalue_input(names.X_CARRY, held["x"][carry])
        for name, value in held["cond"].items():  # labels, prompt inputs or the prologue's keys and values
            if name in program.inputs:
                binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_input(names.GUIDANCE_SCALE, held["guidance_scale"])
        for name, value in backend.constants[program.index][s].items():
            binding.bind_ortvalue_input(name, value)
        reads, writes = program.cache_slots[s]  # a forecast's history rotates by binding
        for key, buffer in reads.items():
            binding.bind_ortvalue_input(names.cache_input(key), held["cache"][buffer])
        binding.bind_ortvalue_output(names.X_NEXT, held["x"][out])
        if carry_out:
            binding.bind_ortvalue_output(names.CARRY_NEXT, held["x"][carry_out[0]])
        for name, buffer in writes.items():
            binding.bind_ortvalue_output(names.unit_output(name), held["cache"][buffer])
        return binding

    def _bind_prologue(self, batch_size: int):
        """The prologue run of a batch size: the call's prompt inputs in, the resident keys, values and
        bias every step reads out."""
        held = self.buffers[batch_size]["cond"]
        session = self.backend.prologues[batch_size]
        binding = session.io_binding()
        for name in names.PROMPT_INPUTS:
            binding.bind_ortvalue_input(name, held[name])
        for output in session.get_outputs():
            binding.bind_ortvalue_output(output.name, held[output.name])
        return binding

    def _bind_decoder(self, program: Program):
        """The decoder run of `program`: its final latent buffer in, the batch size's image buffer out."""
        held = self.buffers[program.batch_size]
        binding = self.backend.decoders[program.batch_size].io_binding()
        binding.bind_ortvalue_input(names.DECODER_INPUT, held["x"][program.steps[-1].latents[2]])
        binding.bind_ortvalue_output(names.DECODER_OUTPUT, held["image"])
        return binding

    def _decode(self, program: Program) -> np.ndarray:
        try:
            self.backend.decoders[program.batch_size].run_with_iobinding(self.decode_bindings[program.index])
        except Exception as e:  # ORT's own exception types: one line
            raise BlockcacheError(f"ONNX Runtime failed while decoding: {one_line(e)[:300]}") from None
        return self.buffers[program.batch_size]["image"].numpy().copy()

    def _run(self, program: Program, x: np.ndarray, cond: dict, guidance_scale: float) -> np.ndarray:
        held, steps = self.buffers[program.batch_size], program.steps
        sessions = self.backend.sessions[program.index]
        held["x"][steps[0].latents[0]].update_inplace(x)
        for name, value in cond.items():
            held["cond"][name].update_inplace(value)
        held["guidance_scale"].update_inplace(np.array([guidance_scale], np.float32))
        try:
            if program.prologue is not None:  # the prompt's keys and values, once for all steps
                self.backend.prologues[program.batch_size].run_with_iobinding(
                    self.prologue_bindings[program.batch_size])
            for step, binding in zip(steps, self.bindings[program.index]):
                sessions[step.variant].run_with_iobinding(binding)
        except Exception as e:  # ORT's own exception types (e.g. out of memory): one line
            raise BlockcacheError(f"ONNX Runtime failed while sampling: {one_line(e)[:300]}") from None
        # On CPU numpy() aliases the resident buffer, which the next call overwrites: copy it out.
        return held["x"][steps[-1].latents[2]].numpy().copy()

    def close(self) -> None:
        self.bindings, self.buffers, self.decode_bindings, self.prologue_bindings = [], {}, {}, {}
        super().close()
