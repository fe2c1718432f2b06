"""PyTorch backend: the plan's variants replayed on the plan's network in PyTorch (DiT or U-ViT),
weights shared, cache resident.

    backend = TorchBackend(load_plan("plans/l2c20"), device="cuda", dtype="bf16")
    x_final = backend.run(x, y, guidance_scale)        # one batch of the plan's batch size

The one runtime backend that needs torch and the networks (runtime/nn):

- Weights: every parameter is a view of the plan's single weights copy (torch_weights.py), so the
  weights exist once whatever the number of variants: all variants run the same module.
- Steps: each step runs `DenoisingStep.denoise` (CFG, network, solver update with DPM-Solver-2's
  carry term, as the eager reference and the traced graphs do) with a `ResidentCache` unit policy made
  at load for its step: units its variant reads return their cache buffer (corrected by the step's
  Block Caching scale/shift where the plan has one), units it writes are copied into theirs. Cache
  buffers, the latents, labels, guidance scale and every step's timestep, a, b (and c) are device
  tensors allocated once at load; the latents follow the manifest's per-step (input, carry, output)
  buffers.
- Optionally (`compile=`, DiT plans only), each DiT block runs through one `torch.compile`d function
  shared by all blocks and variants (at most four graphs: attention and MLP each computed or read).
- CUDA: the whole sampling loop (every step of the schedule) is captured as one CUDA graph at load,
  after a warm-up run on a side stream (shapes and the schedule are static); a call copies noise,
  labels and the guidance scale into the static inputs, replays the graph and copies the static
  output to the host. Capture runs with TF32 off (`exact_fp32`), so fp32 plans replay IEEE fp32
  kernels. If capture fails the backend runs the same loop eagerly and says why in `graph_error`
  (with a warning).

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
import warnings

import numpy as np

from schedules.errors import BlockcacheError, one_line

from ..nn.units import CachePolicy  # plain Python: importing it needs no torch
from ..plan import Plan, names
from .base import Backend, resolve_device

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
        loop on CUDA (default). `compile`: a `torch.compile` mode (e.g. "max-autotune-no-cudagraphs";
        inductor's own CUDA graphs would nest in ours) applied per DiT block, see `_block_step`;
        compiled at load. `warmup`: loop runs before capture."""
        torch = _torch()
        from ..nn.precision import precision_name, torch_dtype
        from ..nn.step import DenoisingStep
        from .torch_weights import model_from_plan

        super().__init__(plan, resolve_device(device, torch.cuda.is_available))
        self.precision = precision_name(dtype) if dtype is not None else plan.precision
        self.dtype = torch_dtype(self.precision)
        self.model = model_from_plan(plan, self.dtype, self.device)
        self.step = DenoisingStep(self.model, plan.guidance.enabled, plan.guidance.channels)
        self._allocate()
        self.compile = compile
        self._uncompile = None
        if compile is not None:
            self._compile_blocks(compile, compile_backend)
        self.cuda_graph = False
        self.graph_error = None
        self._graph = self._graph_out = None
        with self._compile_limits():
            if self.device.startswith("cuda") and cuda_graph:
                self._capture(warmup)
            elif compile is not None:  # compile now, not in the first timed call
                with torch.no_grad():
                    self._loop()

    # -- load -----------------------------------------------------------------------------------
    def _allocate(self) -> None:
        torch = _torch()
        from ..plan.files import plan_corrections

        plan, dev = self.plan, self.device
        self.x = torch.zeros(plan.inputs[names.X].shape, dtype=torch.float32, device=dev)
        self.y = torch.zeros(plan.inputs[names.Y].shape, dtype=torch.int64, device=dev)
        self.guidance_scale = torch.ones(1, dtype=torch.float32, device=dev)
        self.cache = {unit: torch.zeros(spec.shape, dtype=self.dtype, device=dev) for unit, spec in plan.cache.items()}
        time_dtype = getattr(torch, plan.inputs[names.TIMESTEP].dtype)  # int64 (DDIM) or float32 (DPM-Solver)

        def scalar(value, dtype=torch.float32):
            return torch.tensor([value], dtype=dtype, device=dev)

        self.steps = []
        for step, corrections in zip(plan.steps, plan_corrections(plan)):
            variant = plan.variants[step.variant]
            # the step's scale/shift, made on the device once
            corrections = {u: tuple(torch.from_numpy(v).to(device=dev, dtype=self.dtype) for v in pair)
                           for u, pair in corrections.items()}
            policy = ResidentCache(self.cache, variant.reads, variant.writes, corrections)
            c = scalar(step.c) if plan.has_carry else None
            self.steps.append((scalar(step.timestep, time_dtype), scalar(step.a), scalar(step.b), c, policy,
                               step.latents))

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

    def _compile_limits(self):
        """Enough dynamo cache entries for 4 read patterns × the precisions a process may load."""
        if self.compile is None:
            return contextlib.nullcontext()
        import torch._dynamo

        return torch._dynamo.config.patch(recompile_limit=64)

    # -- run ------------------------------------------------------------------------------------
    def _loop(self):
        """Every step of the plan on the resident tensors; returns the final latent (a new tensor)."""
        buffers = [None] * self.plan.num_latents  # the latents by the manifest's buffer numbers
        buffers[self.steps[0][5][0]] = self.x
        for timestep, a, b, c, policy, (latent, carry, out) in self.steps:
            x_carry = buffers[carry] if c is not None else None
            buffers[out] = self.step.denoise(buffers[latent], self.y, timestep, a, b, self.guidance_scale, policy,
                                             c, x_carry)
        return buffers[out]

    def _capture(self, warmup: int) -> None:
        """Capture `_loop` as one CUDA graph: warm-up on a side stream (lazy initialisation, kernel
        selection, workspaces), then capture; the graph's output tensor is the static output."""
        torch = _torch()
        from ..nn.precision import exact_fp32

        try:
            with torch.no_grad(), exact_fp32():
                side = torch.cuda.Stream(device=self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(max(1, warmup)):
                        self._loop()
                torch.cuda.current_stream(self.device).wait_stream(side)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = self._loop()
            self._graph, self._graph_out, self.cuda_graph = graph, out, True
        except Exception as e:  # run eagerly rather than not at all; say why
            self._graph = self._graph_out = None
            self.graph_error = one_line(e)[:300]
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            warnings.warn(f"torch backend: CUDA graph capture failed, running eagerly: {self.graph_error}")

    def _run(self, x: np.ndarray, y: np.ndarray, guidance_scale: float) -> np.ndarray:
        torch = _torch()
        from ..nn.precision import exact_fp32

        with torch.no_grad():
            self.x.copy_(torch.from_numpy(x))
            self.y.copy_(torch.from_numpy(y))
            self.guidance_scale.fill_(guidance_scale)
            if self._graph is not None:
                self._graph.replay()
                out = self._graph_out
            elif self.device.startswith("cuda"):
                with exact_fp32():
                    out = self._loop()
            else:
                out = self._loop()
            return out.cpu().numpy().copy()

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
        if self._uncompile is not None:
            self._uncompile()
            self._uncompile = None
        self._graph = self._graph_out = None
        self.steps, self.cache = [], {}
        self.model = self.step = self.x = self.y = None
        if self.device.startswith("cuda"):
            _torch().cuda.empty_cache()
        super().close()
