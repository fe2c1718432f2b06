"""PyTorch backend: the plan's variants replayed on the plan's network in PyTorch (DiT or U-ViT),
weights shared, cache resident.

    backend = TorchBackend(load_plan("plans/l2c20"), device="cuda", dtype="bf16")
    x_final = backend.run(x, y, guidance_scale)        # one batch of the plan's batch size

The one runtime backend that needs torch and the networks (runtime/nn):

- Weights: every parameter is a view of the plan's single weights copy (torch_weights.py), so the
  weights exist once whatever the number of variants: all variants run the same module.
- Steps: each step runs `DenoisingStep.denoise` (CFG, network, solver update with its carry term, and
  DPM-Solver++ 2M's carry for the next step, as the eager reference and the traced graphs do) with a
  `ResidentCache` unit policy: units its variant reads return their cache buffer (corrected by the
  step's Block Caching scale/shift where the plan has one), units it writes are copied into theirs.
  Every step's timestep, a, b (c, p, q) and scale/shift vectors are device tensors made once per
  program and shared by every execution context.
- Per execution context (one call at a time; contexts run concurrently): for each batch size, the
  latents, labels, guidance scale and cache buffers, shared by that batch size's programs (a context
  runs one program at a time); each program's steps with their policies over those buffers; and on
  CUDA a stream of its own and each program's captured graph (a context's graphs share one memory
  pool).
- Optionally (`compile=`, DiT plans only), each DiT block runs through one `torch.compile`d function
  shared by all blocks and variants (at most four graphs: attention and MLP each computed or read).
- CUDA: each program's whole sampling loop is captured as one CUDA graph when a context is made (the
  backend makes its first at load), after a warm-up run on a side stream (shapes and the schedule are
  static); a call copies noise, labels and the guidance scale into the static inputs, replays the graph
  and copies the static output to the host. Compiled blocks without CUDA graphs run one call at a time
  (a lock): torch.compile's generated code is not made to be entered by several threads. Capture runs with TF32 off (`exact_fp32`), so fp32 plans replay IEEE fp32
  kernels. If capture fails the backend runs the same loop eagerly and says why in `graph_error`
  (with a warning).

Images: a plan with a decoder also holds diffusers' AutoencoderKL decoder, its parameters views of the
same weights copy, in fp32 at every precision; `decode` runs it on the final latents the context's last
run left on the device (after the captured loop on CUDA, eagerly) and copies the uint8 images out.

Precision: the plan's stored precision by default (fp32 or fp16; fp16 keeps norms, guidance and the
DDIM update in fp32, as the fp16 ONNX graphs do). `dtype` overrides it: casting an fp32 plan to fp16
or bf16 rounds each weight once; casting an fp16 plan to bf16 rounds twice (tiny next to bf16's own
rounding). Agreement with the eager reference (tests/test_torch_backend.py; max abs error / max abs
reference, over 20 DDIM steps of a depth-28 random DiT on CPU): fp32 within 1e-5 (measured 0 against
the eager model, ~1e-6 against ONNX Runtime); fp16 and bf16 equal the eager model run at the same
precision on CPU (measured 0); against the fp32 reference they stay within `TOLERANCE` (measured
about 1.4e-3 fp16 and 1e-2 bf16; the bounds leave 5× headroom for other kernels, e.g. on GPUs).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings

import numpy as np

from schedules.errors import BlockcacheError, one_line

from ..nn.units import CachePolicy  # plain Python: importing it needs no torch
from ..plan import Plan, names
from ..plan.manifest import Program
from .base import Backend, ExecutionContext, resolve_device

# Documented bound on max abs error / max abs value of the fp32 eager reference for a full sampling
# run (measured on CPU, depth-28 random DiT, DDIM-20: fp16 1.4e-3, bf16 1.0e-2).
TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2}


def _torch():
    try:
        import torch
    except ImportError:
        raise BlockcacheError("the torch backend needs PyTorch: pip install torch") from None
    return torch


class ResidentCache(CachePolicy):
    """`CachePolicy` whose cache is the backend's preallocated buffers: a fresh value is copied into its
    buffer (fixed addresses, as a captured CUDA graph needs), never rebinds it."""

    def store(self, name, value):
        self.cache[name].copy_(value)


def _block_step(block, x, c, attn_cache, mlp_cache):
    """`DiTBlock.forward` with each unit read from its cache tensor when one is given, else computed.
    Compiled once per (attention read?, MLP read?) pattern and shared by all blocks (their parameters
    are graph inputs), so compilation cost does not grow with depth or the number of variants."""
    from ..nn.dit import DiTBlock

    cache = {"block.attn": attn_cache, "block.mlp": mlp_cache}
    policy = CachePolicy(cache, reads=[name for name, value in cache.items() if value is not None])
    x = DiTBlock.forward(block, x, c, policy, prefix="block")
    return x, cache["block.attn"], cache["block.mlp"]


def _compiled_block_forward(block_fn, block, x, c, policy, prefix="block"):
    """A DiT block's forward through `block_fn` (compiled `_block_step`): the policy's cached values in
    (None for units it computes), the fresh unit values back to the policy."""
    attn, mlp = prefix + ".attn", prefix + ".mlp"
    x, attn_out, mlp_out = block_fn(block, x, c, policy.reuse(attn), policy.reuse(mlp))
    for name, value in ((attn, attn_out), (mlp, mlp_out)):
        if name not in policy.reads:
            policy.computed(name, value)
    return x


class TorchBackend(Backend):
    name = "torch"
    OPTIONS = ("dtype", "cuda_graph", "compile", "compile_backend", "warmup")

    def __init__(self, plan: Plan, device: str = "auto", dtype=None, cuda_graph: bool = True,
                 compile: str | None = None, compile_backend: str = "inductor", warmup: int = 2):
        """`dtype`: fp32, fp16 or bf16 instead of the plan's stored precision. `cuda_graph`: capture the
        loops on CUDA (default). `compile`: a `torch.compile` mode (e.g. "max-autotune-no-cudagraphs";
        inductor's own CUDA graphs would nest in ours) applied per DiT block, see `_block_step`;
        compiled at load. `warmup`: loop runs before capture."""
        torch = _torch()
        from ..nn.precision import precision_name, torch_dtype
        from ..nn.step import DenoisingStep
        from .torch_weights import decoder_from_plan, model_from_plan, plan_storage

        super().__init__(plan, resolve_device(device, torch.cuda.is_available))
        self.precision = precision_name(dtype) if dtype is not None else plan.precision
        self.dtype = torch_dtype(self.precision)
        storage = plan_storage(plan, self.device)  # read once for the network and the decoder
        self.model = model_from_plan(plan, self.dtype, storage)
        # the image decoder, fp32 at every precision (an autoencoder's activations overflow fp16)
        self.decoder = decoder_from_plan(plan, storage) if plan.decoder is not None else None
        del storage
        self.step = DenoisingStep(self.model, plan.guidance.enabled, plan.guidance.channels)
        self.constants = [self._constants(program) for program in plan.programs]
        self.compile = compile
        self._uncompile = None
        self.compiled_calls = threading.Lock()  # compiled blocks without CUDA graphs: one call at a time
        if compile is not None:
            self._compile_blocks(compile, compile_backend)
        self.use_cuda_graph = self.device.startswith("cuda") and cuda_graph
        self.warmup = warmup
        self.graph_error = None
        self.new_context()  # at load: compiles the blocks and captures the graphs, not in the first call

    @property
    def cuda_graph(self) -> bool:
        """Whether every context replays captured CUDA graphs."""
        return bool(self.contexts) and all(c.graphs is not None for c in self.contexts)

    # -- load -----------------------------------------------------------------------------------
    def _constants(self, program: Program) -> list[tuple]:
        """Per step: timestep, a, b, c (None without a carry term), (p, q) where the step hands on a carry
        (else ()), scale/shift tensors and forecast weights, on the device once."""
        torch = _torch()
        from ..plan.files import plan_corrections

        dev = self.device
        time_dtype = getattr(torch, program.inputs[names.TIMESTEP].dtype)  # int64 (DDIM) or float32 (DPM-Solver)

        def scalar(value, dtype=torch.float32):
            return torch.tensor([value], dtype=dtype, device=dev)

        out = []
        for step, corrections in zip(program.steps, plan_corrections(self.plan, program)):
            corrections = {u: tuple(torch.from_numpy(v).to(device=dev, dtype=self.dtype) for v in pair)
                           for u, pair in corrections.items()}
            forecasts = {name: [torch.tensor(w, dtype=self.dtype, device=dev) for w in weights]
                         for name, weights in step.forecast.items()}
            c = scalar(step.c) if program.has_carry else None
            p_q = (scalar(step.p), scalar(step.q)) if program.carry_output else ()
            out.append((scalar(step.timestep, time_dtype), scalar(step.a), scalar(step.b), c, p_q, corrections,
                        forecasts))
        return out

    def _compile_blocks(self, mode: str, backend: str) -> None:
        """Route every block through one compiled `_block_step` (the unit policy decides what it reads);
        `close()` puts the blocks' own forward back."""
        torch = _torch()
        if self.plan.family != "dit":
            raise BlockcacheError("compiled blocks (compile=) are implemented for DiT plans only; run this plan "
                                  "without compile")
        block_fn = torch.compile(_block_step, mode=mode if backend == "inductor" else None, backend=backend,
                                 dynamic=False)
        blocks = list(self.model.blocks)
        for block in blocks:
            block.forward = functools.partial(_compiled_block_forward, block_fn, block)

        def uncompile():
            for block in blocks:
                del block.forward  # the instance attribute goes; the class's forward is back

        self._uncompile = uncompile

    def compile_limits(self):
        """Enough dynamo cache entries for 4 read patterns × the precisions a process may load."""
        if self.compile is None:
            return contextlib.nullcontext()
        import torch._dynamo

        return torch._dynamo.config.patch(recompile_limit=64)

    def _make_context(self) -> "TorchContext":
        return TorchContext(self)

    def weight_bytes(self) -> int:
        """Bytes held by the model's parameters (views of one storage are counted once)."""
        seen, total = set(), 0
        for p in self.model.parameters():
            storage = p.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    def close(self) -> None:
        super().close()
        if self._uncompile is not None:
            self._uncompile()
            self._uncompile = None
        self.constants, self.model, self.step, self.decoder = [], None, None, None
        if self.device.startswith("cuda"):
            _torch().cuda.empty_cache()


class TorchContext(ExecutionContext):
    """A call's tensors (per batch size, shared by that batch size's programs), each program's steps
    over them, and on CUDA each program's captured graph."""

    def __init__(self, backend: TorchBackend):
        super().__init__(backend)
        torch = _torch()
        dev, plan = backend.device, backend.plan
        # batch size → {"x", "cond": {labels, or a text model's prompt embeddings and mask}, "guidance_scale",
        # "cache": {unit: tensor}}
        self.buffers = {}
        for program in plan.programs:
            held = self.buffers.setdefault(program.batch_size, {
                "x": torch.zeros(program.inputs[names.X].shape, dtype=torch.float32, device=dev),
                "cond": {n: torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype), device=dev)
                         for n, spec in program.call_inputs.items()},
                "guidance_scale": torch.ones(1, dtype=torch.float32, device=dev), "cache": {}})
            for unit, spec in program.cache.items():
                if unit not in held["cache"]:
                    held["cache"][unit] = torch.zeros(spec.shape, dtype=backend.dtype, device=dev)
        self.steps = [self._program_steps(program) for program in plan.programs]
        self.graphs = None  # per program: (graph, static output)
        self.final = {}  # program index → the final latents its last run left on the device
        # On CUDA a context's work runs on its own stream, so contexts in several threads overlap.
        self.stream = torch.cuda.Stream(device=dev) if dev.startswith("cuda") else None
        with backend.compile_limits():
            if backend.use_cuda_graph:
                self._capture()
            elif backend.compile is not None:  # compile now, not in the first timed call
                with torch.no_grad():
                    for program in plan.programs:
                        self._loop(program)

    def _program_steps(self, program: Program) -> list[tuple]:
        """Per step: its shared constants, and a unit policy over the cache buffers bound to the step
        (a forecast's history rotates by binding: `Program.cache_slots`)."""
        cache = self.buffers[program.batch_size]["cache"]
        out = []
        for step, (timestep, a, b, c, p_q, corrections, forecasts), (reads, writes) in zip(
                program.steps, self.backend.constants[program.index], program.cache_slots):
            variant = program.variants[step.variant]
            bound = {key: cache[buffer] for key, buffer in {**reads, **writes}.items()}
            policy = ResidentCache(bound, variant.reads, variant.writes, corrections, spans=variant.spans,
                                   span_writes=variant.span_records, forecasts=forecasts)
            out.append((timestep, a, b, c, p_q, policy, step.latents))
        return out

    def _loop(self, program: Program):
        """Every step of `program` on the resident tensors; returns the final latent (a new tensor)."""
        held, steps = self.buffers[program.batch_size], self.steps[program.index]
        latents = [None] * program.num_latents  # the latents by the manifest's buffer numbers
        latents[steps[0][-1][0]] = held["x"]
        cond = held["cond"]  # a text model's prompt is encoded once, for all steps (the prologue)
        y = self.backend.step.encode(*(cond[n] for n in names.PROMPT_INPUTS)) if program.takes_prompt else cond[names.Y]
        for timestep, a, b, c, p_q, policy, (latent, carry, *written) in steps:
            x_carry = latents[carry] if c is not None else None
            out = self.backend.step.denoise(latents[latent], y, timestep, a, b, held["guidance_scale"],
                                            policy, c, x_carry, *p_q)
            for buffer, value in zip(written, out if p_q else (out,)):  # x_next (and carry_next)
                latents[buffer] = value
        return latents[written[0]]

    def _capture(self) -> None:
        """Capture each program's `_loop` as one CUDA graph: warm-up on a side stream (lazy initialisation,
        kernel selection, workspaces), then capture; the graph's output tensor is the static output. The
        context's graphs share one memory pool: a context runs one of them at a time."""
        torch = _torch()
        from ..nn.precision import exact_fp32

        backend, device = self.backend, self.backend.device
        try:
            graphs, pool = [], torch.cuda.graph_pool_handle()
            with torch.no_grad(), exact_fp32():
                for program in backend.plan.programs:
                    side = torch.cuda.Stream(device=device)
                    side.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(side):
                        for _ in range(max(1, backend.warmup)):
                            self._loop(program)
                    torch.cuda.current_stream(device).wait_stream(side)
                    torch.cuda.synchronize(device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        out = self._loop(program)
                    graphs.append((graph, out))
            self.graphs = graphs
        except Exception as e:  # run eagerly rather than not at all; say why
            self.graphs = None
            backend.graph_error = one_line(e)[:300]
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(device)
            warnings.warn(f"torch backend: CUDA graph capture failed, running eagerly: {backend.graph_error}")

    def _run(self, program: Program, x: np.ndarray, cond: dict, guidance_scale: float) -> np.ndarray:
        torch = _torch()
        from ..nn.precision import exact_fp32

        backend, held = self.backend, self.buffers[program.batch_size]
        on_stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with torch.no_grad(), on_stream:
            held["x"].copy_(torch.from_numpy(x))
            for name, value in cond.items():
                held["cond"][name].copy_(torch.from_numpy(value))
            held["guidance_scale"].fill_(guidance_scale)
            if self.graphs is not None:
                graph, out = self.graphs[program.index]
                graph.replay()
            elif backend.device.startswith("cuda"):
                with exact_fp32():
                    out = self._loop(program)
            elif backend.compile is not None:
                with backend.compiled_calls:
                    out = self._loop(program)
            else:
                out = self._loop(program)
            self.final[program.index] = out
            return out.cpu().numpy().copy()

    def _decode(self, program: Program) -> np.ndarray:
        torch = _torch()
        from ..nn.precision import exact_fp32

        on_stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with torch.no_grad(), on_stream, exact_fp32():
            return self.backend.decoder(self.final[program.index]).cpu().numpy()

    def close(self) -> None:
        self.graphs, self.steps, self.buffers, self.stream, self.final = None, [], {}, None, {}
        super().close()
