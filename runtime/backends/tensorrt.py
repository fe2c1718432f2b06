"""TensorRT backend: one engine per variant, weights held once, the whole sampling loop one CUDA graph.

Everything that can be decided without TensorRT (which buffer each tensor is bound to at each step,
how weights are packed and converted, checks of the engines against the manifest) is plain code in
`runtime/bindings.py`, tested on any machine. This module holds only the calls into TensorRT and the
CUDA runtime, and imports neither until a backend is made.

- Weights: the engines take their large weights as *inputs* (exporter/engines.py says why), so the
  device holds one packed copy (`weights` arena) that every execution context binds.
- Activations: one scratch allocation, the largest `device_memory_size_v2` over the engines, shared by
  every context (contexts are created USER_MANAGED and run one after another on one stream).
- One execution context per *step*, its addresses set once at load: nothing changes between calls, so
  after one eager warm-up the loop is captured once as a CUDA graph and each call is
  copy-in → graph launch → copy-out.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np

from schedules.errors import BlockcacheError, ParameterError, one_line

from ..bindings import check_engine_io, host_dtype, pack_weights, plan_bindings
from ..plan import Plan, names
from ..plan.files import plan_corrections, read_weights
from .base import Backend

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
    (`polygraphy.cuda.wrapper()`: malloc, memcpy, streams; its `.handle` is the loaded library)."""

    def __init__(self):
        from polygraphy import cuda

        self._rt = cuda.wrapper()
        self._lib = self._rt.handle
        self._kind = cuda.MemcpyKind
        self._owned: list[int] = []
        self.graph = self.graph_exec = None
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

    def capture(self, enqueue) -> None:
        """Record everything `enqueue()` issues on the stream as one CUDA graph.
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
        self.graph = graph
        exec_ = ctypes.c_void_p()
        self._check(self._lib.cudaGraphInstantiateWithFlags(ctypes.byref(exec_), graph, ctypes.c_ulonglong(0)),
                    "graph instantiation")
        self.graph_exec = exec_

    def launch(self) -> None:
        self._check(self._lib.cudaGraphLaunch(self.graph_exec, ctypes.c_void_p(self.stream)), "graph launch")

    def close(self) -> None:
        if self.graph_exec is not None:
            self._lib.cudaGraphExecDestroy(self.graph_exec)
        if self.graph is not None:
            self._lib.cudaGraphDestroy(self.graph)
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
        if not plan.engines:
            raise BlockcacheError(f"plan {plan.directory} has no TensorRT engines: export it with the tensorrt "
                                  "backend (blockcache-export --backend tensorrt)")
        trt = import_tensorrt()
        built_with = (plan.tensorrt or {}).get("built_with")
        if built_with != trt.__version__:
            raise BlockcacheError(f"the plan's engines were built with TensorRT {built_with}, this is "
                                  f"{trt.__version__}: re-export the plan with the tensorrt backend")
        self._cuda = None
        super().__init__(plan, "cuda")
        self.bindings = plan_bindings(plan, corrections=plan_corrections(plan))
        host_weights = pack_weights(read_weights(plan), plan, self.bindings.weights)
        try:
            self._setup(trt, host_weights, cuda_graph)
        except BaseException as e:
            self.close()
            if isinstance(e, BlockcacheError) or not isinstance(e, Exception):
                raise
            # polygraphy / TensorRT / CUDA errors (no GPU, out of memory, …): one line
            raise BlockcacheError(f"TensorRT backend could not start: {one_line(e)[:300]}") from None

    def _setup(self, trt, host_weights, cuda_graph):
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = self._runtime = trt.Runtime(self._logger)  # kept alive as long as its engines
        self.engines, self._tensors = [], []
        for entry in self.plan.engines:
            with open(self.plan.path(entry.file), "rb") as f:
                engine = runtime.deserialize_cuda_engine(f.read())
            if engine is None:
                raise BlockcacheError(f"TensorRT cannot load {entry.file} (built for another GPU?): re-export "
                                      "the plan with the tensorrt backend on this machine")
            io = self._engine_io(trt, engine)
            check_engine_io(entry, io, entry.file)
            self.engines.append(engine)
            self._tensors.append(set(io))

        cuda = self._cuda = _Cuda()
        plan = self.bindings
        self._base = {"io": cuda.alloc(plan.io.nbytes), "weights": cuda.alloc(plan.weights.nbytes)}
        cuda.upload(self._base["weights"], host_weights)
        self._io_host = plan.initial_io()  # step constants, uploaded once
        cuda.upload(self._base["io"], self._io_host)
        # ICudaEngine.device_memory_size_v2 (TensorRT 10.1+): scratch an execution context needs.
        scratch = max(int(e.device_memory_size_v2) for e in self.engines)
        scratch_ptr = cuda.alloc(scratch)
        self.contexts = []
        for s, k in enumerate(plan.step_engine):
            # USER_MANAGED: the context allocates no activation memory; set_device_memory(ptr, size)
            # (TensorRT 10.1+) points it at the shared scratch. Contexts that never run concurrently
            # may share it.
            ctx = self.engines[k].create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            ctx.set_device_memory(scratch_ptr, scratch)
            for name, address in plan.addresses(s, self._base).items():
                if name in self._tensors[k] and not ctx.set_tensor_address(name, address):
                    raise BlockcacheError(f"step {s}: TensorRT refused the address of {name!r}")
            self.contexts.append(ctx)
        cuda.sync()
        self.memory = {"weights": plan.weights.nbytes, "io": plan.io.nbytes, "scratch": scratch,
                       "engine_files": sum(self.plan.files[e.file].size for e in self.plan.engines)}

        # Warm-up: every context enqueues once outside capture (TensorRT does one-time work on the
        # first enqueue); then the whole loop is recorded as one graph.
        self._enqueue_all()
        cuda.sync()
        self.cuda_graph = False
        if cuda_graph:
            try:
                cuda.capture(self._enqueue_all)
                self.cuda_graph = True
            except BlockcacheError as e:
                log.warning("blockcache: TensorRT loop runs without a CUDA graph: %s", one_line(e))

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

    def _enqueue_all(self):
        for s, ctx in enumerate(self.contexts):
            if not ctx.execute_async_v3(self._cuda.stream):
                raise BlockcacheError(f"TensorRT failed to enqueue step {s}")

    def _write(self, slot: str, value: np.ndarray) -> None:
        view = self.bindings.io.view(self._io_host, slot)
        view[...] = value.reshape(view.shape)
        self._cuda.upload(self._base["io"] + self.bindings.io.slots[slot].offset, np.ascontiguousarray(view))

    def _run(self, x: np.ndarray, y: np.ndarray, guidance_scale: float) -> np.ndarray:
        self._write(self.bindings.input, x)
        self._write(names.Y, y)
        if names.GUIDANCE_SCALE in self.bindings.io.slots:
            self._write(names.GUIDANCE_SCALE, np.array([guidance_scale], np.float32))
        if self.cuda_graph:
            self._cuda.launch()
        else:
            self._enqueue_all()
        slot = self.bindings.io.slots[self.bindings.output]
        out = np.empty(slot.shape, host_dtype(slot.dtype))
        self._cuda.download(out, self._base["io"] + slot.offset)
        self._cuda.sync()
        return out.astype(np.float32)

    def close(self) -> None:
        """Free the device memory now (contexts and engines first, then the buffers they used)."""
        if getattr(self, "_cuda", None) is not None:
            try:
                self._cuda.sync()
            except Exception:  # a failed start: free what there is
                pass
            self.contexts = []
            self.engines = []
            self._cuda.close()
            self._cuda = None
        super().close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass
