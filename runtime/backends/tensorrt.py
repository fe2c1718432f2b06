"""TensorRT backend: one engine per variant, weights held once, the whole sampling loop one CUDA graph.

Everything that can be decided without TensorRT (which buffer each tensor is bound to at each step,
how weights are packed and converted, checks of the engines against the manifest) is plain code in
`runtime/bindings.py`, tested on any machine. This module holds only the calls into TensorRT and the
CUDA runtime, and imports neither until a backend is made.

- Weights: the engines take their large weights as *inputs* (exporter/engines.py says why), so the
  device holds one packed copy (`weights` arena, over every program's engines) that every TensorRT
  execution context binds.
- Per blockcache execution context (one call at a time; contexts run concurrently on their own
  streams): one scratch allocation for activations, the largest `device_memory_size_v2` over the
  engines, shared by the context's TensorRT contexts (created USER_MANAGED, run one after another on
  the context's stream); per program an `io` arena and one TensorRT execution context per *step*,
  its addresses set once: nothing changes between calls, so after one eager warm-up each program's
  loop is captured once as a CUDA graph and each call is copy-in → graph launch → copy-out.
- A plan with a decoder: one decoder engine per batch size (fp32), its TensorRT context bound to the
  program's final latent slot and `image` slot; `decode` enqueues it after the loop (outside the loop's
  graph, so a call for latents does not pay for it) and copies the uint8 images out.
- A text model's plan: one prologue engine per batch size, at the plan's precision; it reads the call's
  prompt slots and writes the keys, values and bias slots every step binds, and is enqueued first in the
  loop (inside its graph).
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np

from schedules.errors import BlockcacheError, ParameterError, one_line

from ..bindings import check_engine_io, host_dtype, pack_weights, plan_bindings, weights_arena
from ..plan import Plan, names
from ..plan.manifest import Program
from ..plan.files import plan_corrections, read_weights
from .base import Backend, ExecutionContext

log = logging.getLogger("blockcache")

INSTALL_HINT = "pip install tensorrt from NVIDIA's index"
MIN_MAJOR = 10
# trt.DataType member names → the dtype names the manifest uses.
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
              "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def import_tensorrt():
    """The tensorrt module, or one BlockcacheError line saying what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BlockcacheError(f"the tensorrt backend needs TensorRT {MIN_MAJOR}+ ({INSTALL_HINT}) "
                              "— not installed here") from None
    except Exception as e:  # e.g. the registry's stub package, or missing CUDA libraries
        raise BlockcacheError(f"the tensorrt backend needs TensorRT {MIN_MAJOR}+, but `import tensorrt` fails "
                              f"here: {one_line(e)[:200]}") from None
    version = getattr(trt, "__version__", "0")
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < MIN_MAJOR:
        raise BlockcacheError(f"the tensorrt backend needs TensorRT {MIN_MAJOR}+ ({INSTALL_HINT}); "
                              f"this is TensorRT {version}")
    return trt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
        return True
    except BlockcacheError:
        return False


class _Cuda:
    """The few CUDA runtime calls the backend makes, through polygraphy's ctypes binding of libcudart
    (`polygraphy.cuda.wrapper()`: malloc, memcpy, streams; its `.handle` is the loaded library). Owns
    a stream, the allocations and the graphs it made, all freed by `close`."""

    def __init__(self):
        from polygraphy import cuda

        self._rt = cuda.wrapper()
        self._lib = self._rt.handle
        self._kind = cuda.MemcpyKind
        self._owned: list[int] = []
        self._graphs: list[tuple] = []
        self.stream = self._rt.create_stream()

    def alloc(self, nbytes: int) -> int:
        ptr = self._rt.malloc(max(int(nbytes), 1))  # cudaMalloc: 256-byte aligned
        self._owned.append(ptr)
        return ptr

    def upload(self, dst: int, host: np.ndarray) -> None:
        self._rt.memcpy(dst, host.ctypes.data, host.nbytes, self._kind.HostToDevice, self.stream)

    def download(self, host: np.ndarray, src: int) -> None:
        self._rt.memcpy(host.ctypes.data, src, host.nbytes, self._kind.DeviceToHost, self.stream)

    def sync(self) -> None:
        self._rt.stream_synchronize(self.stream)

    def _check(self, status, what):
        if status != 0:
            raise BlockcacheError(f"CUDA {what} failed with error {status}")

    def capture(self, enqueue):
        """Record everything `enqueue()` issues on the stream as one CUDA graph; returns its executable.
        CUDA runtime API: cudaStreamBeginCapture(stream, mode) with cudaStreamCaptureModeGlobal = 0;
        cudaStreamEndCapture(stream, cudaGraph_t*); cudaGraphInstantiateWithFlags(cudaGraphExec_t*,
        graph, unsigned long long flags) — the same signature in CUDA 11.4+ and 12/13, unlike
        cudaGraphInstantiate, whose signature changed in 12."""
        stream = ctypes.c_void_p(self.stream)
        self._check(self._lib.cudaStreamBeginCapture(stream, ctypes.c_int(0)), "stream capture")
        try:
            enqueue()
        finally:
            graph = ctypes.c_void_p()
            status = self._lib.cudaStreamEndCapture(stream, ctypes.byref(graph))
        self._check(status, "end of stream capture")
        exec_ = ctypes.c_void_p()
        status = self._lib.cudaGraphInstantiateWithFlags(ctypes.byref(exec_), graph, ctypes.c_ulonglong(0))
        self._graphs.append((graph, exec_ if status == 0 else None))
        self._check(status, "graph instantiation")
        return exec_

    def launch(self, graph_exec) -> None:
        self._check(self._lib.cudaGraphLaunch(graph_exec, ctypes.c_void_p(self.stream)), "graph launch")

    def close(self) -> None:
        for graph, graph_exec in self._graphs:
            if graph_exec is not None:
                self._lib.cudaGraphExecDestroy(graph_exec)
            self._lib.cudaGraphDestroy(graph)
        self._graphs.clear()
        for ptr in self._owned:
            self._rt.free(ptr)
        self._owned.clear()
        self._rt.destroy_stream(self.stream)


class TensorRTBackend(Backend):
    name = "tensorrt"
    OPTIONS = ("cuda_graph",)

    def __init__(self, plan: Plan, device: str = "auto", cuda_graph: bool = True):
        if device not in ("auto", "cuda", "cuda:0"):
            raise ParameterError("device", f"the tensorrt backend runs on a CUDA GPU, the current one (cuda; choose "
                                 f"it with CUDA_VISIBLE_DEVICES), not on {{name}} {device!r} (the onnxruntime "
                                 "backend runs on the CPU)")
        if not plan.tensorrt or not all(p.engines for p in plan.programs):
            raise BlockcacheError(f"plan {plan.directory} has no TensorRT engines: export it with the tensorrt "
                                  "backend (blockcache-export --backend tensorrt)")
        trt = import_tensorrt()
        built_with = plan.tensorrt.get("built_with")
        if built_with != trt.__version__:
            raise BlockcacheError(f"the plan's engines were built with TensorRT {built_with}, this is "
                                  f"{trt.__version__}: re-export the plan with the tensorrt backend")
        self._cuda = None
        super().__init__(plan, "cuda")
        self.use_cuda_graph = cuda_graph
        self.weights_arena = weights_arena(plan)
        self.bindings = [plan_bindings(p, corrections=plan_corrections(plan, p), weights=self.weights_arena)
                         for p in plan.programs]
        host_weights = pack_weights(read_weights(plan), plan, self.weights_arena)
        try:
            self._setup(trt, host_weights)
            self.new_context()  # at load: the first context's graphs are captured now, not in the first call
        except BaseException as e:
            self.close()
            if isinstance(e, BlockcacheError) or not isinstance(e, Exception):
                raise
            # polygraphy / TensorRT / CUDA errors (no GPU, out of memory, …): one line
            raise BlockcacheError(f"TensorRT backend could not start: {one_line(e)[:300]}") from None

    def _setup(self, trt, host_weights):
        self.trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = self._runtime = trt.Runtime(self._logger)  # kept alive as long as its engines
        self.engines, self.engine_tensors = [], []  # per program, per variant
        for program in self.plan.programs:
            loaded = [self._load_engine(trt, runtime, entry) for entry in program.engines]
            self.engines.append([engine for engine, _ in loaded])
            self.engine_tensors.append([tensors for _, tensors in loaded])
        # the decoder and prologue engines (one per batch size, shared by that batch size's programs)
        self.decoders, self.prologues = {}, {}  # file → (engine, its tensor names)
        for program in self.plan.programs:
            for entry, loaded in ((program.decoder_engine, self.decoders), (program.prologue_engine, self.prologues)):
                if entry is not None and entry.file not in loaded:
                    loaded[entry.file] = self._load_engine(trt, runtime, entry)
        cuda = self._cuda = _Cuda()
        self.weights_base = cuda.alloc(self.weights_arena.nbytes)
        cuda.upload(self.weights_base, host_weights)
        cuda.sync()
        # ICudaEngine.device_memory_size_v2 (TensorRT 10.1+): scratch an execution context needs.
        self.scratch = max(int(e.device_memory_size_v2) for e in [e for engines in self.engines for e in engines]
                           + [engine for engine, _ in [*self.decoders.values(), *self.prologues.values()]])
        self.memory = {"weights": self.weights_arena.nbytes, "io": sum(b.io.nbytes for b in self.bindings),
                       "scratch": self.scratch,
                       "engine_files": sum(self.plan.files[e.file].size for p in self.plan.programs for e in p.engines)}

    @property
    def cuda_graph(self) -> bool:
        """Whether every context replays captured CUDA graphs."""
        return bool(self.contexts) and all(c.graphs is not None for c in self.contexts)

    def _load_engine(self, trt, runtime, entry) -> tuple:
        """(the deserialized engine of manifest entry `entry`, its tensor names), checked against the entry."""
        with open(self.plan.path(entry.file), "rb") as f:
            engine = runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            raise BlockcacheError(f"TensorRT cannot load {entry.file} (built for another GPU?): re-export "
                                  "the plan with the tensorrt backend on this machine")
        io = self._engine_io(trt, engine)
        check_engine_io(entry, io, entry.file)
        return engine, set(io)

    @staticmethod
    def _engine_io(trt, engine) -> dict:
        out = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            dtype = engine.get_tensor_dtype(name)
            out[name] = {"mode": mode, "shape": list(engine.get_tensor_shape(name)),
                         "dtype": TRT_DTYPES.get(dtype.name, dtype.name)}
        return out

    def _make_context(self) -> "TensorRTContext":
        return TensorRTContext(self)

    def close(self) -> None:
        """Free the device memory now (contexts and engines first, then the buffers they used)."""
        super().close()
        if getattr(self, "_cuda", None) is not None:
            try:
                self._cuda.sync()
            except Exception:  # a failed start: free what there is
                pass
            self.engines, self.decoders, self.prologues = [], {}, {}
            self._cuda.close()
            self._cuda = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


class TensorRTContext(ExecutionContext):
    """A call's device state: a stream, one scratch, and per program an io arena, one TensorRT execution
    context per step and the captured graph of its loop."""

    def __init__(self, backend: TensorRTBackend):
        super().__init__(backend)
        self._cuda = _Cuda()
        try:
            self._setup(backend)
        except BaseException:
            self.close()  # what was allocated before the failure
            raise

    def _setup(self, backend: TensorRTBackend) -> None:
        trt, cuda = backend.trt, self._cuda
        scratch = cuda.alloc(backend.scratch)
        self.io_bases, self.io_host, self.steps, self.graphs = [], [], [], None
        self.decoders = {}  # program index → the decoder's TensorRT context (after the loop, outside its graph)
        self.prologues = {}  # program index → the prologue's TensorRT context (before the steps, in the graph)
        for program, bindings in zip(backend.plan.programs, backend.bindings):
            bases = {"io": cuda.alloc(bindings.io.nbytes), "weights": backend.weights_base}
            host = bindings.initial_io()  # step constants, uploaded once
            cuda.upload(bases["io"], host)
            contexts = []
            for s, k in enumerate(bindings.step_engine):
                # USER_MANAGED: the TensorRT context allocates no activation memory; set_device_memory
                # (TensorRT 10.1+) points it at this context's scratch, which only its steps use, in order.
                ctx = backend.engines[program.index][k].create_execution_context(
                    trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                ctx.set_device_memory(scratch, backend.scratch)
                for name, address in bindings.addresses(s, bases).items():
                    if name in backend.engine_tensors[program.index][k] and not ctx.set_tensor_address(name, address):
                        raise BlockcacheError(f"step {s}: TensorRT refused the address of {name!r}")
                contexts.append(ctx)
            for entry, loaded, made, step in ((program.decoder_engine, backend.decoders, self.decoders, None),
                                              (program.prologue_engine, backend.prologues, self.prologues, "prologue")):
                if entry is None:
                    continue
                engine, tensors = loaded[entry.file]
                ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                ctx.set_device_memory(scratch, backend.scratch)
                for name, address in bindings.addresses(step, bases).items():
                    if name in tensors and not ctx.set_tensor_address(name, address):
                        raise BlockcacheError(f"{step or 'decoder'}: TensorRT refused the address of {name!r}")
                made[program.index] = ctx
            self.io_bases.append(bases["io"])
            self.io_host.append(host)
            self.steps.append(contexts)
        cuda.sync()
        # Warm-up: every TensorRT context enqueues once outside capture (TensorRT does one-time work on
        # the first enqueue); then each program's loop is recorded as one graph.
        for program in backend.plan.programs:
            self._enqueue(program)
        cuda.sync()
        if backend.use_cuda_graph:
            try:
                self.graphs = [cuda.capture(lambda p=program: self._enqueue(p)) for program in backend.plan.programs]
            except BlockcacheError as e:
                log.warning("blockcache: TensorRT loops run without CUDA graphs: %s", one_line(e))

    def _enqueue(self, program: Program):
        prologue = self.prologues.get(program.index)  # the prompt's keys and values, once for all steps
        if prologue is not None and not prologue.execute_async_v3(self._cuda.stream):
            raise BlockcacheError("TensorRT failed to enqueue the prologue")
        for s, ctx in enumerate(self.steps[program.index]):
            if not ctx.execute_async_v3(self._cuda.stream):
                raise BlockcacheError(f"TensorRT failed to enqueue step {s}")

    def _write(self, program: Program, slot: str, value: np.ndarray) -> None:
        bindings = self.backend.bindings[program.index]
        view = bindings.io.view(self.io_host[program.index], slot)
        view[...] = value.reshape(view.shape)
        self._cuda.upload(self.io_bases[program.index] + bindings.io.slots[slot].offset, np.ascontiguousarray(view))

    def _run(self, program: Program, x: np.ndarray, cond: dict, guidance_scale: float) -> np.ndarray:
        bindings = self.backend.bindings[program.index]
        self._write(program, bindings.input, x)
        for name, value in cond.items():  # the labels, or a text model's prompt inputs
            self._write(program, name, value)
        if names.GUIDANCE_SCALE in bindings.io.slots:
            self._write(program, names.GUIDANCE_SCALE, np.array([guidance_scale], np.float32))
        if self.graphs is not None:
            self._cuda.launch(self.graphs[program.index])
        else:
            self._enqueue(program)
        slot = bindings.io.slots[bindings.output]
        out = np.empty(slot.shape, host_dtype(slot.dtype))
        self._cuda.download(out, self.io_bases[program.index] + slot.offset)
        self._cuda.sync()
        return out.astype(np.float32)

    def _decode(self, program: Program) -> np.ndarray:
        bindings = self.backend.bindings[program.index]
        if not self.decoders[program.index].execute_async_v3(self._cuda.stream):
            raise BlockcacheError("TensorRT failed to enqueue the decoder")
        slot = bindings.io.slots[names.DECODER_OUTPUT]
        out = np.empty(slot.shape, np.uint8)
        self._cuda.download(out, self.io_bases[program.index] + slot.offset)
        self._cuda.sync()
        return out

    def close(self) -> None:
        if getattr(self, "_cuda", None) is not None:
            try:
                self._cuda.sync()
            except Exception:
                pass
            self.steps, self.graphs, self.decoders, self.prologues = [], None, {}, {}
            self._cuda.close()
            self._cuda = None
        super().close()
