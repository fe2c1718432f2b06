"""PyTorch backend: the plan's variants replayed on the network in PyTorch (DiT or U-ViT), weights
shared, cache resident.

    backend = TorchBackend(plan_dir, manifest, device="cuda", dtype="bf16")
    x_final = backend.run(x, y, guidance_scale)        # one batch of the plan's batch size

The one runtime module that needs the network code: it builds the plan's network with
`exporter.models.build_model` (imported lazily)
from the plan's config on the meta device, so no weight is ever allocated by the constructor, and then
makes every parameter a view of the plan's single weights copy:

- Weights: `weights.bin` is read once into one buffer (on CUDA uploaded once, as one allocation);
  each PyTorch parameter is a view of its stored tensor (`weights.parameters` in the manifest names
  it). Linear weights that the ONNX exporter stored transposed are transposed back in place inside
  that buffer, so every kernel sees PyTorch's usual layout (CPU fp16 GEMMs on transposed views are
  several times slower) and no second copy exists. A dtype other than the stored one (e.g. bf16 from
  an fp32 plan) casts each weight once at load into a tensor of its own and the buffer is freed. All
  variants run the same module, so the weights exist once whatever the number of variants.
- Steps: each step runs `DenoisingStep.denoise` (CFG, network, solver update with DPM-Solver-2's
  carry term, as the eager reference and the traced graphs do) with a unit policy built at load for
  its variant: units in `computes` run (and those in `writes` are copied into their cache buffer),
  units in `reads` return their cache buffer (corrected by the step's Block Caching scale/shift
  where the plan has one). Cache buffers, the latent, labels, guidance scale and every step's
  timestep, a, b (and c) are device tensors allocated once at load; the latents follow the
  manifest's per-step (input, carry, output) buffers.
- Optionally (`compile=`, DiT plans only), each DiT block runs through one `torch.compile`d function shared by all
  blocks and variants (at most four graphs: attention and MLP each computed or read).
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
import math
import os
import warnings

import numpy as np

from schedules.errors import BlockcacheError, one_line

from ..manifest import step_adjustments, step_latents

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Documented bound on max abs error / max abs value of the fp32 eager reference for a full sampling
# run (measured on CPU, depth-28 random DiT, DDIM-20: fp16 1.4e-3, bf16 1.0e-2).
TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2}
CACHE_PREFIX = "cache."


def _torch():
    try:
        import torch
    except ImportError:
        raise BlockcacheError("the torch backend needs PyTorch: pip install torch") from None
    return torch


def precision_name(dtype) -> str:
    """'fp32' / 'fp16' / 'bf16' for a name, an alias or a torch dtype (BlockcacheError otherwise)."""
    torch = _torch()
    aliases = {"fp32": "fp32", "float32": "fp32", "float": "fp32", torch.float32: "fp32",
               "fp16": "fp16", "float16": "fp16", "half": "fp16", torch.float16: "fp16",
               "bf16": "bf16", "bfloat16": "bf16", torch.bfloat16: "bf16"}
    try:
        return aliases[dtype]
    except (KeyError, TypeError):
        raise BlockcacheError(f"unknown precision {dtype!r} (expected fp32, fp16 or bf16)") from None


def resolve_device(device: str) -> str:
    torch = _torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str) or not (device == "cpu" or device == "cuda" or
                                           (device.startswith("cuda:") and device[5:].isdigit())):
        raise BlockcacheError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BlockcacheError(f"device {device} requested but PyTorch sees no CUDA GPU")
    return device


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for cuBLAS matmuls and cuDNN convolutions inside the block, restored afterwards, so
    fp32 work on a GPU is IEEE fp32 like the eager reference and ONNX Runtime (cuDNN convolutions
    default to TF32). Kernels captured in a CUDA graph keep the setting they were captured with."""
    torch = _torch()
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


class _UnitPolicy:
    """`unit(name, fn)` for one step: compute (and store if a later step reads it) or read the cache,
    corrected by the step's Block Caching scale/shift (`adjust`: unit → (scale, shift)) where given."""

    __slots__ = ("reads", "writes", "computes", "adjust")

    def __init__(self, computes, reads: dict, writes: dict, adjust: dict | None = None):
        self.computes = frozenset(computes)
        self.reads = reads
        self.writes = writes
        self.adjust = adjust or {}

    def read(self, name):
        """The cached value of `name` as this step uses it, or None if the step computes it."""
        buffer = self.reads.get(name)
        if buffer is None or name not in self.adjust:
            return buffer
        scale, shift = self.adjust[name]
        return buffer * (1 + scale) + shift

    def __call__(self, name, fn):
        buffer = self.read(name)
        if buffer is not None:
            return buffer
        if name not in self.computes:  # the manifest was validated at load: a programming error
            raise RuntimeError(f"unit {name} is neither computed nor read by this variant")
        value = fn()
        out = self.writes.get(name)
        if out is not None:
            out.copy_(value)
        return value

    def block(self, block_fn, block, x, c, prefix):
        """A whole DiT block through `block_fn` (compiled `_block_step`): cache tensors in for the units
        this variant reads, fresh unit outputs back for the ones it writes."""
        attn, mlp = prefix + ".attn", prefix + ".mlp"
        x, attn_out, mlp_out = block_fn(block, x, c, self.read(attn), self.read(mlp))
        for name, value in ((attn, attn_out), (mlp, mlp_out)):
            out = self.writes.get(name)
            if out is not None:
                out.copy_(value)
        return x


def _block_step(block, x, c, attn_cache, mlp_cache):
    """`DiTBlock.forward` with each unit read from its cache tensor when one is given, else computed.
    Compiled once per (attention read?, MLP read?) pattern and shared by all blocks (their parameters
    are graph inputs), so compilation cost does not grow with depth or the number of variants."""
    from exporter.models import DiTBlock

    fresh = {}

    def unit(name, fn):
        cached = attn_cache if name.endswith(".attn") else mlp_cache
        if cached is not None:
            return cached
        fresh[name] = fn()
        return fresh[name]

    x = DiTBlock.forward(block, x, c, unit, prefix="block")
    return x, fresh.get("block.attn"), fresh.get("block.mlp")


class TorchBackend:
    name = "torch"

    def __init__(self, plan_dir: str, manifest: dict, device: str = "auto", dtype=None, cuda_graph: bool = True,
                 compile: str | None = None, compile_backend: str = "inductor", warmup: int = 2):
        """`dtype`: fp32, fp16 or bf16 instead of the plan's stored precision. `cuda_graph`: capture the
        loop on CUDA (default). `compile`: a `torch.compile` mode (e.g. "max-autotune-no-cudagraphs";
        inductor's own CUDA graphs would nest in ours) applied per DiT block, see `_block_step`;
        compiled at load. `warmup`: loop runs before capture."""
        torch = _torch()
        self.device = resolve_device(device)
        self.plan_dir = plan_dir
        self.manifest = manifest
        stored = manifest.get("precision", "fp32")
        if stored not in ("fp32", "fp16"):
            raise BlockcacheError(f"plan precision {stored!r} is not supported by the torch backend")
        self.precision = precision_name(dtype) if dtype is not None else stored
        self.dtype = getattr(torch, DTYPES[self.precision])
        self.model = self._build_model(plan_dir, manifest)

        from exporter.trace import DenoisingStep

        guidance = manifest["guidance"]
        self.step = DenoisingStep(self.model, guidance["enabled"], guidance["channels"])
        self._allocate(manifest)
        self.compile = compile
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
    def _build_model(self, plan_dir: str, manifest: dict):
        torch = _torch()
        from exporter.models import build_model

        model_info = manifest["model"]
        weights = manifest.get("weights", {})
        params, tensors = weights.get("parameters"), weights.get("tensors")
        if not params or not tensors:
            raise BlockcacheError("plan has no PyTorch parameter map (weights.parameters): re-export it for "
                                  "the torch backend")
        config = {"family": model_info.get("family", "dit"), **model_info["config"]}  # older plans: DiT
        with torch.device("meta"):
            model = build_model(config)
        if tuple(model.unit_names) != tuple(model_info.get("unit_names", model.unit_names)):
            raise BlockcacheError("plan unit names do not match its model config")

        path = os.path.join(plan_dir, weights.get("file", "weights.bin"))
        try:
            blob = np.fromfile(path, dtype=np.uint8)
        except OSError as e:
            raise BlockcacheError(f"cannot read plan weights {path}: {e.strerror}") from None
        storage = torch.from_numpy(blob)
        if self.device.startswith("cuda"):  # one upload of the whole buffer, one device allocation
            storage = storage.to(self.device)
        del blob

        expected = dict(model.named_parameters())
        missing = sorted(set(expected) - set(params))
        if missing:
            raise BlockcacheError(f"plan weights lack parameter {missing[0]!r}: re-export the plan")
        # A stored tensor that every user reads transposed is transposed back in place, once, so that
        # all kernels see PyTorch's usual layout (CPU fp16 GEMMs on transposed views are several
        # times slower) without a second copy of the weights.
        uses = {}
        for name in expected:
            uses.setdefault(params[name].get("tensor"), set()).add(bool(params[name].get("transposed")))
        views = {}
        for name, meta in expected.items():
            source = params[name]
            stored = source.get("tensor")
            t = tensors.get(stored)
            if t is None:
                raise BlockcacheError(f"plan parameter {name!r} points to a missing stored tensor")
            if t["offset"] < 0 or t["offset"] + t["length"] > storage.numel():
                raise BlockcacheError(f"plan weights.bin is too short for {name!r} (truncated plan?)")
            try:
                stored_dtype = getattr(torch, np.dtype(t["dtype"]).name)
            except (TypeError, AttributeError):
                raise BlockcacheError(f"plan tensor for {name!r} has unsupported dtype {t['dtype']!r}") from None
            transposed = bool(source.get("transposed"))
            shape = tuple(reversed(t["shape"])) if transposed else tuple(t["shape"])
            if (transposed and len(t["shape"]) != 2) or shape != tuple(meta.shape):
                raise BlockcacheError(f"plan tensor for {name!r} has shape {tuple(t['shape'])}"
                                      f"{' (transposed)' if transposed else ''}, the model needs {tuple(meta.shape)}")
            if (stored, transposed) not in views:
                flat = storage[t["offset"]: t["offset"] + t["length"]].view(stored_dtype)
                if flat.numel() * flat.element_size() != t["length"] or flat.numel() != math.prod(t["shape"]):
                    raise BlockcacheError(f"plan tensor for {name!r} has {t['length']} bytes, not a "
                                          f"{tuple(t['shape'])} {t['dtype']} tensor")
                value = flat.view(t["shape"])
                if transposed and uses[stored] == {True} and stored_dtype == self.dtype:
                    flat.copy_(value.t().contiguous().view(-1))  # in place: PyTorch's layout
                    value = flat.view(shape)
                elif transposed:
                    value = value.t()
                if value.dtype != self.dtype or not value.is_contiguous():
                    # one cast (or re-layout) per weight into a tensor of its own, PyTorch's layout
                    value = torch.empty(shape, dtype=self.dtype, device=storage.device).copy_(value)
                views[(stored, transposed)] = value
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            module._parameters[attr] = torch.nn.Parameter(views[(stored, transposed)], requires_grad=False)
        del views
        buffers = [name for name, _ in model.named_buffers()]  # none in DiT or U-ViT; never leave meta tensors
        if buffers:
            raise BlockcacheError(f"the torch backend cannot load buffer {buffers[0]!r} from a plan")
        # Parameters at the stored precision are views that keep the shared storage alive by
        # themselves; after a cast nothing refers to it any more and it is freed here.
        del storage
        model.name = model_info.get("name")
        return model.eval().requires_grad_(False)

    def _allocate(self, manifest: dict) -> None:
        torch = _torch()
        dev = self.device
        units = tuple(self.model.unit_names)
        inputs = manifest["inputs"]
        self.batch_size = manifest["batch_size"]
        self.x = torch.zeros(inputs["x"]["shape"], dtype=torch.float32, device=dev)
        self.y = torch.zeros(inputs["y"]["shape"], dtype=torch.int64, device=dev)
        self.guidance_scale = torch.ones(1, dtype=torch.float32, device=dev)
        self.cache = {}
        for name, spec in manifest["buffers"].items():
            unit = name.removeprefix(CACHE_PREFIX)
            if not name.startswith(CACHE_PREFIX) or unit not in units:
                raise BlockcacheError(f"plan buffer {name!r} is not a cache buffer of a model unit")
            self.cache[unit] = torch.zeros(spec["shape"], dtype=self.dtype, device=dev)
        self.policies = []
        for k, v in enumerate(manifest["variants"]):
            computes, reads, writes = set(v["computes"]), set(v["reads"]), set(v["writes"])
            if computes & reads or (computes | reads) != set(units):
                raise BlockcacheError(f"plan variant {k} does not split the model's units into computed and read")
            if not writes <= computes:
                raise BlockcacheError(f"plan variant {k} writes a unit it does not compute")
            for u in reads | writes:
                if u not in self.cache:
                    raise BlockcacheError(f"plan variant {k} uses unit {u} but the plan has no cache buffer for it")
            self.policies.append(_UnitPolicy(computes, {u: self.cache[u] for u in reads},
                                             {u: self.cache[u] for u in writes}))
        self.steps = []
        for s, step in enumerate(manifest["steps"]):
            if not 0 <= step["variant"] < len(self.policies):
                raise BlockcacheError(f"plan step {s} names variant {step['variant']}, which does not exist")
        adjustments = step_adjustments(self.plan_dir, manifest)
        latents = step_latents(manifest)
        time_dtype = getattr(torch, inputs["timestep"]["dtype"])  # int64 (DDIM) or float32 (DPM-Solver)
        for s, step in enumerate(manifest["steps"]):
            policy = self.policies[step["variant"]]
            if adjustments[s]:  # a policy of its own: the step's scale/shift, made on the device once
                adjust = {u: tuple(torch.from_numpy(v).to(device=dev, dtype=self.dtype) for v in pair)
                          for u, pair in adjustments[s].items()}
                policy = _UnitPolicy(policy.computes, policy.reads, policy.writes, adjust)
            c = torch.tensor([step["c"]], dtype=torch.float32, device=dev) if "x_carry" in inputs else None
            self.steps.append((torch.tensor([step["timestep"]], dtype=time_dtype, device=dev),
                               torch.tensor([step["a"]], dtype=torch.float32, device=dev),
                               torch.tensor([step["b"]], dtype=torch.float32, device=dev),
                               c, policy, latents[s]))
        # A step that reads a unit must come after one that writes it: the first step computes all.
        if self.steps and manifest["variants"][manifest["steps"][0]["variant"]]["reads"]:
            raise BlockcacheError("plan step 0 reads the cache (nothing is cached yet)")

    def _compile_blocks(self, mode: str, backend: str) -> None:
        """Route every block through one compiled `_block_step` (the unit policy decides what it reads)."""
        import functools

        torch = _torch()
        if self.manifest["model"].get("family", "dit") != "dit":
            raise BlockcacheError("compiled blocks (compile=) are implemented for DiT plans only; run this plan "
                                  "without compile")
        block_fn = torch.compile(_block_step, mode=mode if backend == "inductor" else None, backend=backend,
                                 dynamic=False)

        def forward(block, x, c, unit=None, prefix="block"):
            return unit.block(block_fn, block, x, c, prefix)

        for block in self.model.blocks:
            block.forward = functools.partial(forward, block)

    def _compile_limits(self):
        """Enough dynamo cache entries for 4 read patterns × the precisions a process may load."""
        import contextlib

        if self.compile is None:
            return contextlib.nullcontext()
        import torch._dynamo

        return torch._dynamo.config.patch(recompile_limit=64)

    # -- run ------------------------------------------------------------------------------------
    def _loop(self):
        """Every step of the plan on the resident tensors; returns the final latent (a new tensor)."""
        buffers = [None, None, None]  # the latents by the manifest's buffer numbers (input, carry, output)
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

    def run(self, x: np.ndarray, y: np.ndarray, guidance_scale: float) -> np.ndarray:
        """Final latents for one batch: x (B, C, H, W) float32 noise, y (B,) int64 labels."""
        torch = _torch()
        if np.shape(x) != tuple(self.x.shape) or np.shape(y) != tuple(self.y.shape):
            raise BlockcacheError(f"the torch backend runs batches of exactly {tuple(self.x.shape)} latents and "
                                  f"{tuple(self.y.shape)} labels, got {np.shape(x)} and {np.shape(y)}")
        with torch.no_grad():
            self.x.copy_(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            self.y.copy_(torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))
            self.guidance_scale.fill_(float(guidance_scale))
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
