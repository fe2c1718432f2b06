"""`blockcache-bench`: how fast and how faithful caching schedules are, per backend and precision.

    blockcache-bench --model dit-s2 --depth 28 --random-init --schedule l2c20 --schedule uniform:3 \\
        --backends eager,torch,onnxruntime --precision fp32 --out benchmarks/results

For every precision, method and schedule it measures warm latency (median, min, max and standard
deviation over `--repeats` timed calls after `--warmup` untimed ones, one batch of `--batch-size`
images, guidance doubling the network batch), the speedup over the same method's full-compute run with
the same sampler, the ideal speedup from MACs (schedules/cost.py) and efficiency = speedup / ideal,
peak host memory (process RSS, polled during load and warm-up) and peak device memory (PyTorch's
allocator; ONNX Runtime's CUDA memory is not visible to it), and fidelity to full compute.

Methods:
- `eager`: PyTorch, the official forward for full compute, and for a cached schedule the schedule
  applied by one Python branch per unit (exporter/reference.py's policy, as the papers' code runs).
- `compile`: `torch.compile` of the full denoising step (`--compile-mode`, default max-autotune);
  full-compute schedules only.
- `torch`, `onnxruntime`, `tensorrt`: an exported plan replayed by that runtime backend.
- `torch-inductor`: the torch backend with each DiT block compiled by inductor (`--compile-mode`,
  without inductor's CUDA graphs: the backend captures the whole loop itself).

Schedules: for each cached schedule the harness adds its sampler's full-compute run (`full<N>`) and a
fewer-steps DDIM run with about the same MACs (`ddim<M>`, M = round(N / ideal speedup)). Specs:
`l2c20` / `l2c50` (committed L2C imports for 28-block DiTs), `uniform:K` (every K-th step, `--steps`),
a schedule YAML path, or an L2C router file (`.pt`/`.pth`).

Fidelity: each run's final latents against eager PyTorch fp32 full compute with the same sampler,
noise and labels: PSNR (data range = the reference's max − min; for `dit-digits` images, 2 as in
benchmarks/digits_metric.py) and relative error ‖run − ref‖₂ / ‖ref‖₂. For `dit-digits` also class
accuracy and digits-FD (benchmarks/digits_metric.py; FD is biased at small N: compare equal N).

Output: `<out>/<tag>.json`, `<out>/<tag>.md` (table) and `<out>/<tag>.png` (latency vs fidelity).
Timings on a shared machine are noisy; no test asserts one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from schedules.errors import BlockcacheError, cli_main, one_line
from schedules.options import ArgumentParser, add_model_args, add_weights_args, model_overrides, parse_labels
from schedules.sampling import SPACINGS, initial_noise
from schedules.schedule import Schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PRESETS = {"l2c20": os.path.join(ROOT, "schedules", "presets", "dit-xl2-l2c-ddim20.yaml"),
           "l2c50": os.path.join(ROOT, "schedules", "presets", "dit-xl2-l2c-ddim50.yaml")}
METHODS = ("eager", "compile", "torch", "torch-inductor", "onnxruntime", "tensorrt")
PLAN_METHODS = ("torch", "torch-inductor", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")
ROLES = ("full", "cached", "fewer-steps")
FIDELITY_REFERENCE = "eager PyTorch fp32 full compute, same sampler, noise and labels"


@dataclass
class BenchConfig:
    model: str
    overrides: dict = field(default_factory=dict)
    checkpoint: str | None = None
    random_init: bool = False
    init_seed: int = 0
    schedules: list = field(default_factory=lambda: ["l2c20"])
    steps: int = 20  # for uniform:K specs
    spacing: str = "linspace"
    methods: list = field(default_factory=lambda: ["eager", "torch", "onnxruntime"])
    precisions: list = field(default_factory=lambda: ["fp32"])
    device: str = "auto"
    batch_size: int = 2
    labels: list | None = None
    seed: int = 0
    guidance_scale: float = 4.0
    repeats: int = 5
    warmup: int = 1
    fewer_steps: bool = True
    compile_mode: str = "max-autotune"
    compile_backend: str = "inductor"
    bf16_plan: str = "fp32"  # the stored precision a bf16 torch-backend run casts from
    plans_dir: str | None = None  # keep exported plans there and reuse them; default: a temporary folder
    threads: int | None = None
    progress: bool = True

    def check(self) -> None:
        if not self.schedules:
            raise BlockcacheError("give at least one schedule")
        for m in self.methods:
            if m not in METHODS:
                raise BlockcacheError(f"unknown method {m!r} (expected some of {', '.join(METHODS)})")
        if not self.methods:
            raise BlockcacheError("give at least one method (--backends)")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise BlockcacheError(f"unknown precision {p!r} (expected some of {', '.join(PRECISIONS)})")
        if not self.precisions:
            raise BlockcacheError("give at least one precision")
        if self.bf16_plan not in ("fp32", "fp16"):
            raise BlockcacheError(f"bf16 plans cast from fp32 or fp16 plans, not {self.bf16_plan!r}")
        for name, value, low in (("batch size", self.batch_size, 1), ("repeats", self.repeats, 1),
                                 ("warm-up", self.warmup, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BlockcacheError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise BlockcacheError(f"threads must be a positive integer, got {self.threads!r}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise BlockcacheError(f"guidance scale must be a finite non-negative number, got {self.guidance_scale}")
        if self.spacing not in SPACINGS:
            raise BlockcacheError(f"unknown spacing {self.spacing!r} (expected one of {', '.join(SPACINGS)})")
        if self.labels is not None and len(self.labels) != self.batch_size:
            raise BlockcacheError(f"{len(self.labels)} labels given for a batch of {self.batch_size}")


@dataclass
class Case:
    name: str
    schedule: Schedule
    role: str  # full | cached | fewer-steps
    group: str  # the full-compute case whose latency and latents this case is compared with


# -- schedules ----------------------------------------------------------------------------------------

def resolve_schedule(spec: str, units, steps: int, spacing: str) -> tuple[str, Schedule]:
    """(case name, Schedule) for a schedule spec (see the module docstring)."""
    if spec in PRESETS:
        schedule = Schedule.load(PRESETS[spec])
        schedule.check_units(units, "the benchmark model (the L2C presets need 28 blocks)")
        return spec, schedule
    if spec.startswith("uniform:"):
        try:
            interval = int(spec.split(":", 1)[1])
        except ValueError:
            raise BlockcacheError(f"schedule {spec!r}: uniform:K needs an integer K") from None
        return f"uniform{interval}@{steps}", Schedule.uniform(units, steps, interval, spacing)
    if spec in ("full",) or spec.startswith("full:"):
        raise BlockcacheError("full compute is always measured; give cached schedules only")
    if spec.endswith((".pt", ".pth")):
        from schedules.l2c import import_l2c, read_router_logits

        n = len(read_router_logits(spec))
        name = os.path.splitext(os.path.basename(spec))[0]
        return name, import_l2c(spec, units, n, spacing=spacing)
    if spec.endswith((".yaml", ".yml")):
        schedule = Schedule.load(spec)
        schedule.check_units(units, "the benchmark model")
        return os.path.splitext(os.path.basename(spec))[0], schedule
    raise BlockcacheError(f"unknown schedule {spec!r} (expected l2c20, l2c50, uniform:K, a .yaml file or an "
                          "L2C router .pt)")


def build_cases(cfg: BenchConfig, units, config: dict) -> list[Case]:
    """Full-compute cases first (one per sampler), then each cached schedule and its fewer-steps run."""
    from schedules.cost import schedule_macs

    fulls, pairs = {}, []
    for spec in cfg.schedules:
        name, schedule = resolve_schedule(spec, units, cfg.steps, cfg.spacing)
        if schedule.sampler["name"] != "ddim":  # its eager and compiled loops and fewer-steps runs are DDIM's
            raise BlockcacheError(f"schedule {spec!r} is a {schedule.sampler['name']} schedule: blockcache-bench "
                                  "compares DDIM schedules only (sample and time other plans with runtime.Sampler)")
        if schedule.compute.all():
            raise BlockcacheError(f"schedule {spec!r} computes every unit at every step: nothing to compare")
        if any(c.name == name for c, _ in pairs):
            raise BlockcacheError(f"schedule {spec!r} is given twice")
        n, spacing = schedule.num_steps, schedule.sampler["spacing"]
        suffix = "" if spacing == "linspace" else f"-{spacing}"
        group = f"full{n}{suffix}"
        fulls.setdefault(group, Schedule.full(units, n, spacing))
        fewer = None
        if cfg.fewer_steps:
            full_macs, macs = schedule_macs(config, schedule)
            m = max(1, min(n - 1, round(n * macs / full_macs)))
            seen = {f.name: f.group for _, f in pairs if f is not None}
            fname = f"ddim{m}{suffix}"
            if seen.get(fname, group) != group:  # the same run compared with another sampler's full one
                fname = f"ddim{m}of{n}{suffix}"
            if fname not in seen:
                fewer = Case(fname, Schedule.full(units, m, spacing), "fewer-steps", group)
        pairs.append((Case(name, schedule, "cached", group), fewer))
    cases = [Case(g, s, "full", g) for g, s in fulls.items()]
    for cached, fewer in pairs:
        cases += [cached] + ([fewer] if fewer is not None else [])
    return cases


# -- plans ------------------------------------------------------------------------------------------

def _model_digest(model) -> str:
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.config, sort_keys=True).encode())
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(str(value.dtype).encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def shared_trace(cache: dict):
    """Export several plans of one model with one trace per (weights, batch, guidance).

    `export_plan` traces the model for every plan; the master graph depends only on the model's
    weights and those arguments, so a copy of the first trace (kept in `cache` across exports) serves
    the others; the exporter then moves weights out of its copy. Tracing is what makes exports of
    large models slow."""
    import onnx

    import exporter.export as ex

    original = ex.trace_master

    def traced(model, batch_size, guidance, guidance_channels="first3", **options):
        key = (_model_digest(model), batch_size, bool(guidance), guidance_channels, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = original(model, batch_size, guidance, guidance_channels, **options)
        proto = onnx.ModelProto()
        proto.CopyFrom(cache[key])
        return proto

    ex.trace_master = traced
    try:
        yield
    finally:
        ex.trace_master = original


class PlanStore:
    """Exports plans on demand into a folder, reusing one whose key (model weights, schedule, batch,
    guidance, precision) matches a previous export there."""

    def __init__(self, folder: str | None, model, cfg: BenchConfig):
        self.temporary = folder is None
        self.folder = tempfile.mkdtemp(prefix="blockcache-bench-") if folder is None else folder
        os.makedirs(self.folder, exist_ok=True)
        self.model, self.cfg = model, cfg
        self._digest = None
        self._traces = {}
        self._manifests = {}
        self.export_seconds = {}

    def key(self, case: Case, precision: str) -> str:
        if self._digest is None:
            self._digest = _model_digest(self.model)
        from runtime.manifest import VERSION

        text = json.dumps([VERSION, self._digest, case.schedule.to_yaml(), self.cfg.batch_size,
                           self.cfg.guidance_scale, precision])
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, case: Case, precision: str) -> str:
        from exporter.export import export_plan
        from runtime.manifest import MANIFEST

        path = os.path.join(self.folder, f"{case.name}-{precision}")
        key_file = path + ".key"
        key = self.key(case, precision)
        if os.path.exists(os.path.join(path, MANIFEST)) and os.path.exists(key_file):
            with open(key_file) as f:
                if f.read().strip() == key:
                    return path
        self._manifests.pop(path, None)
        start = time.perf_counter()
        with shared_trace(self._traces):
            export_plan(self.model, case.schedule, path, batch_size=self.cfg.batch_size,
                        guidance_scale=self.cfg.guidance_scale, precision=precision)
        self.export_seconds[f"{case.name}-{precision}"] = time.perf_counter() - start
        with open(key_file, "w") as f:
            f.write(key + "\n")
        return path

    def manifest(self, path: str) -> dict:
        """The plan's manifest; files are checksummed on the first load in this run only."""
        from runtime.manifest import load_manifest

        if path not in self._manifests:
            self._manifests[path] = load_manifest(path)
        return self._manifests[path]

    def close(self):
        self._traces.clear()
        if self.temporary:
            shutil.rmtree(self.folder, ignore_errors=True)


# -- memory -----------------------------------------------------------------------------------------

def current_rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryMonitor:
    """Peak process RSS (polled every few ms) and peak PyTorch device memory over a span."""

    def __init__(self, device: str, interval: float = 0.003):
        self.device, self.interval = device, interval
        self.base_rss = self.peak_rss = None
        self.base_device = self.peak_device = None

    def __enter__(self):
        self.base_rss = self.peak_rss = current_rss()
        self._stop = threading.Event()
        if self.base_rss is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_device = torch.cuda.memory_allocated(self.device)
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            rss = current_rss()
            if rss is not None and rss > self.peak_rss:
                self.peak_rss = rss

    def __exit__(self, *exc):
        self._stop.set()
        if self.base_rss is not None:
            self._thread.join()
            rss = current_rss()
            if rss is not None:
                self.peak_rss = max(self.peak_rss, rss)
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            self.peak_device = torch.cuda.max_memory_allocated(self.device)
        return False

    def report(self) -> dict:
        mb = 1 << 20
        out = {"peak_host_mb": None, "host_increase_mb": None, "peak_device_mb": None, "device_increase_mb": None}
        if self.peak_rss is not None:
            out["peak_host_mb"] = self.peak_rss / mb
            out["host_increase_mb"] = (self.peak_rss - self.base_rss) / mb
        if self.peak_device is not None:
            out["peak_device_mb"] = self.peak_device / mb
            out["device_increase_mb"] = (self.peak_device - self.base_device) / mb
        return out


# -- runners ----------------------------------------------------------------------------------------

def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class EagerRunner:
    """Eager PyTorch sampling on the device, how the papers' code runs: a Python loop over steps; for
    full compute the official forward, for a cached schedule one Python branch per unit (the eager
    reference's `UnitCache`). With `step_fn` (a compiled full step) that function runs each step."""

    def __init__(self, model, schedule: Schedule, cfg: BenchConfig, device: str, step_fn=None):
        import torch

        from exporter.reference import UnitCache, step_adjustments
        from exporter.trace import DenoisingStep

        self.device = device
        self.step = DenoisingStep(model, guidance=cfg.guidance_scale > 1)
        self.rows = schedule.compute
        self.full = bool(schedule.compute.all())
        self.cache = None if self.full else UnitCache(schedule.unit_names)
        param = next(model.parameters())
        self.adjust = step_adjustments(schedule, param.device, param.dtype)
        sampler = schedule.make_sampler()
        a, b = sampler.coefficients()
        self.constants = [(torch.tensor([int(t)], device=device),
                           torch.tensor([a[s]], dtype=torch.float32, device=device),
                           torch.tensor([b[s]], dtype=torch.float32, device=device))
                          for s, t in enumerate(sampler.timesteps)]
        self.scale = torch.tensor([cfg.guidance_scale], dtype=torch.float32, device=device)
        self.step_fn = step_fn

    def __call__(self, noise: np.ndarray, labels: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.from_numpy(noise).to(self.device)
            y = torch.from_numpy(labels).to(self.device)
            for s, (t, a, b) in enumerate(self.constants):
                if self.step_fn is not None:
                    if self.device.startswith("cuda"):
                        torch.compiler.cudagraph_mark_step_begin()
                    x = self.step_fn(x, y, t, a, b, self.scale).clone()
                elif self.full:
                    x = self.step.denoise(x, y, t, a, b, self.scale)
                else:
                    self.cache.compute_row, self.cache.adjust = self.rows[s], self.adjust[s]
                    x = self.step.denoise(x, y, t, a, b, self.scale, self.cache)
            if self.cache is not None:
                self.cache.values.clear()
            return x.cpu().numpy()


class BackendRunner:
    def __init__(self, backend, guidance_scale: float):
        self.backend, self.scale = backend, guidance_scale

    def __call__(self, noise, labels):
        return self.backend.run(noise, labels, self.scale)


def block_compile_mode(mode: str) -> str:
    """The torch.compile mode for the torch backend's blocks: never inductor's own CUDA graphs."""
    return {"max-autotune": "max-autotune-no-cudagraphs", "reduce-overhead": "default"}.get(mode, mode)


def plan_precision(method: str, precision: str, cfg: BenchConfig) -> tuple[str | None, str | None]:
    """(stored plan precision, reason it cannot run) for a plan method at a precision."""
    if precision in ("fp32", "fp16"):
        return precision, None
    if method in ("torch", "torch-inductor"):
        return cfg.bf16_plan, None
    return None, f"{method} plans are fp32 or fp16 (no bf16)"


# -- the harness ------------------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise BlockcacheError(f"device {device} requested but PyTorch sees no CUDA GPU")
        return device
    raise BlockcacheError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N)")


def default_labels(num_classes: int, n: int) -> list[int]:
    if num_classes <= 10:
        return [i % num_classes for i in range(n)]
    demo = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py classes
    return [(demo[i % len(demo)] + 7 * (i // len(demo))) % num_classes for i in range(n)]


def is_digits(model) -> bool:
    return getattr(model, "name", None) == "dit-digits" and model.in_channels == 1 and \
        model.config["input_size"] % 8 == 0


def fidelity(run: np.ndarray, ref: np.ndarray, digits: bool, labels) -> dict:
    run64, ref64 = run.astype(np.float64), ref.astype(np.float64)
    if digits:
        from benchmarks import digits_metric as dm

        out = {"psnr_db": dm.psnr(run, ref), "relative_error": dm.relative_error(run, ref)}
        out["class_accuracy"] = dm.class_accuracy(run, labels)
        out["digits_fd"] = dm.frechet_distance(run) if len(run) >= 2 else None
        return out
    mse = float(np.mean((run64 - ref64) ** 2))
    data_range = float(ref64.max() - ref64.min())
    psnr = float("inf") if mse == 0 else 10 * math.log10(data_range ** 2 / mse)
    rel = float(np.linalg.norm(run64 - ref64) / np.linalg.norm(ref64))
    return {"psnr_db": psnr, "relative_error": rel}


def _method_label(method: str, role: str) -> str:
    if method == "eager":
        return {"full": "eager PyTorch", "cached": "eager PyTorch, Python-branch caching",
                "fewer-steps": "eager PyTorch"}[role]
    if method == "compile":
        return "torch.compile"
    if method == "torch-inductor":
        return "torch plan, inductor blocks"
    return f"{method} plan"


def _time_calls(runner, noise, labels, cfg: BenchConfig, monitor: MemoryMonitor):
    """(latents of the first call, its seconds, timed seconds); memory is watched during warm-up only
    (the timed calls repeat the same work, and a polling thread would disturb them)."""
    with monitor:
        start = time.perf_counter()
        output = runner(noise, labels)  # first (warm-up) call: its latents are the ones compared
        first = time.perf_counter() - start
        for _ in range(cfg.warmup - 1):
            runner(noise, labels)
    times = []
    for _ in range(cfg.repeats):
        start = time.perf_counter()
        runner(noise, labels)
        times.append(time.perf_counter() - start)
    return output, first, times


def run_benchmark(cfg: BenchConfig, model=None, on_row=None) -> dict:
    """Run the benchmark described by `cfg` and return the results dict (see `write_results`).
    `on_row(results)` is called after every measured row, e.g. to save partial results of a long run."""
    cfg.check()
    import torch

    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, model, on_row)
    finally:
        torch.set_num_threads(threads_before)


def reference_latents(model, schedule: Schedule, cfg: BenchConfig, device: str, noise, labels) -> np.ndarray:
    """Eager fp32 full compute on the device, with TF32 off (a true fp32 reference on GPUs)."""
    if device == "cpu":
        return EagerRunner(model, schedule, cfg, device)(noise, labels)
    from runtime.backends.torch import exact_fp32

    with exact_fp32():
        return EagerRunner(copy.deepcopy(model).to(device), schedule, cfg, device)(noise, labels)


def _run(cfg: BenchConfig, model, on_row=None) -> dict:
    import torch
    from tqdm.auto import tqdm

    from exporter.models import load_model
    from schedules.cost import schedule_macs

    device = resolve_device(cfg.device)
    if model is None:
        model = load_model(cfg.model, cfg.checkpoint, random_init=cfg.random_init, seed=cfg.init_seed,
                           **cfg.overrides)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()  # the fp32 master copy; the caller's model is not touched
    model.eval()
    units, config = model.unit_names, model.config
    cases = build_cases(cfg, units, config)
    labels_list = cfg.labels if cfg.labels is not None else default_labels(model.num_classes, cfg.batch_size)
    if any(not 0 <= int(v) < model.num_classes for v in labels_list):
        raise BlockcacheError(f"labels must be in 0…{model.num_classes - 1}")
    labels = np.asarray(labels_list, dtype=np.int64)
    noise = initial_noise((cfg.batch_size, model.in_channels, config["input_size"], config["input_size"]), cfg.seed)
    digits = is_digits(model)

    results = {
        "benchmark": "blockcache-bench", "version": 1, "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(device), "device": device,
        "model": {"name": getattr(model, "name", cfg.model), "config": dict(config),
                  "weights": cfg.checkpoint or ("random" if cfg.random_init else "embedded"),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "batch_size": cfg.batch_size, "labels": labels.tolist(), "noise_seed": cfg.seed,
        "guidance_scale": cfg.guidance_scale, "guidance": cfg.guidance_scale > 1,
        "repeats": cfg.repeats, "warmup": cfg.warmup, "threads": torch.get_num_threads() if device == "cpu" else None,
        "compile_mode": cfg.compile_mode if "compile" in cfg.methods else None,
        "fidelity_reference": FIDELITY_REFERENCE,
        "psnr_data_range": "2 (digit images in [-1, 1])" if digits else "max - min of the reference latents",
        "schedules": {}, "rows": [], "notes": [],
    }
    for c in cases:
        full, scheduled = schedule_macs(config, c.schedule)
        group = next(g for g in cases if g.name == c.group)
        group_full = schedule_macs(config, group.schedule)[0]
        results["schedules"][c.name] = {
            "role": c.role, "compared_with": c.group, "steps": c.schedule.num_steps,
            "spacing": c.schedule.sampler["spacing"], "source": c.schedule.source,
            "macs_per_image": scheduled, "ideal_speedup": group_full / scheduled,
            "distinct_variants": len({row.tobytes() for row in c.schedule.compute}),
        }

    work = [(p, m, c) for p in cfg.precisions for m in cfg.methods for c in cases
            if not (m == "compile" and c.role == "cached")]
    bar = tqdm(total=len(work) + len([c for c in cases if c.role == "full"]), desc="bench",
               disable=not cfg.progress)
    store = PlanStore(cfg.plans_dir, model, cfg)
    start = time.perf_counter()
    try:
        references = {}
        for c in cases:
            if c.role == "full":
                bar.set_postfix_str(f"reference {c.name}")
                references[c.name] = reference_latents(model, c.schedule, cfg, device, noise, labels)
                bar.update()
        compiled = {}
        for precision, method, case in work:
            bar.set_postfix_str(f"{precision} {method} {case.name}")
            row = {"precision": precision, "method": method, "label": _method_label(method, case.role),
                   "schedule": case.name, "role": case.role, "status": "ok"}
            for key in [k for k in compiled if k != (method, precision)]:
                del compiled[key]  # only the current method's model stays resident: fair memory figures
            try:
                row.update(_measure(method, precision, case, cfg, model, device, store, compiled, noise, labels))
            except Skip as e:
                row.update(status="skipped", reason=str(e))
            except Exception as e:  # one failing configuration must not lose the others: record it
                row.update(status="error", reason=f"{type(e).__name__}: {one_line(e)[:300]}")
            if row["status"] == "ok":
                row.update(fidelity(row.pop("output"), references[case.group], digits, labels))
            row.pop("output", None)
            row["elapsed_s"] = time.perf_counter() - start  # since the harness started: where a run spends its time
            results["rows"].append(row)
            bar.update()
            if on_row is not None:
                results["export_seconds"] = dict(store.export_seconds)
                on_row(results)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    finally:
        bar.close()
        store.close()
    results["export_seconds"] = store.export_seconds
    derive(results)
    return results


class Skip(Exception):
    """A method that does not apply to this precision or machine (recorded, not an error)."""


def _measure(method, precision, case, cfg, model, device, store, compiled, noise, labels) -> dict:
    import torch

    info, monitor = {}, MemoryMonitor(device)
    start = time.perf_counter()
    if method in ("eager", "compile"):
        with monitor:
            key = (method, precision)
            if key in compiled:  # one device copy (and one compilation) per method and precision
                dev_model, step_fn = compiled[key]
            else:
                dev_model = copy.deepcopy(model).to(device=device, dtype=torch_dtype(precision))
                step_fn = None
                if method == "compile":
                    from exporter.trace import DenoisingStep

                    step = DenoisingStep(dev_model, guidance=cfg.guidance_scale > 1)

                    def full_step(x, y, t, a, b, scale):
                        return step.denoise(x, y, t, a, b, scale)

                    step_fn = torch.compile(full_step, mode=cfg.compile_mode if cfg.compile_backend == "inductor"
                                            else None, backend=cfg.compile_backend)
                compiled[key] = (dev_model, step_fn)
            runner = EagerRunner(dev_model, case.schedule, cfg, device, step_fn)
    else:
        stored, reason = plan_precision(method, precision, cfg)
        if reason:
            raise Skip(reason)
        plan = store.get(case, stored)
        start = time.perf_counter()  # load time, not export time
        with monitor:
            manifest = store.manifest(plan)
            if method in ("torch", "torch-inductor"):
                from runtime.backends.torch import TorchBackend

                mode = block_compile_mode(cfg.compile_mode) if method == "torch-inductor" else None
                backend = TorchBackend(plan, manifest, device, dtype=precision, compile=mode,
                                       compile_backend=cfg.compile_backend)
                info.update(cuda_graph=backend.cuda_graph, graph_error=backend.graph_error,
                            plan_precision=stored)
            elif method == "onnxruntime":
                from runtime.backends.onnxruntime import OnnxRuntimeBackend, cuda_available

                if device.startswith("cuda") and not cuda_available():
                    raise Skip("ONNX Runtime has no usable CUDA execution provider here")
                backend = OnnxRuntimeBackend(plan, manifest, "cuda" if device.startswith("cuda") else "cpu",
                                             threads=cfg.threads)
            else:
                from runtime.backends import make_backend

                backend = make_backend(method, plan, manifest, "cuda" if device.startswith("cuda") else "cpu")
            runner = BackendRunner(backend, cfg.guidance_scale)
    setup = time.perf_counter() - start
    output, first, times = _time_calls(runner, noise, labels, cfg, monitor)
    info.update(monitor.report())
    if method in PLAN_METHODS and device.startswith("cuda") and not method.startswith("torch"):
        info["peak_device_mb"] = info["device_increase_mb"] = None  # not PyTorch's memory
    info.update(setup_s=setup, first_call_s=first, output=output, latency_s={
        "median": statistics.median(times), "min": min(times), "max": max(times),
        "std": statistics.stdev(times) if len(times) > 1 else 0.0, "all": times})
    del runner
    return info


def derive(results: dict) -> None:
    """Speedup over the same method and precision's full run of the same sampler, and efficiency."""
    rows = results["rows"]
    index = {(r["precision"], r["method"], r["schedule"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        info = results["schedules"][r["schedule"]]
        r["ideal_speedup"] = info["ideal_speedup"]
        r["speedup"] = r["efficiency"] = None
        if r["status"] != "ok":
            continue
        base = index.get((r["precision"], r["method"], info["compared_with"]))
        if base is not None:
            r["speedup"] = base["latency_s"]["median"] / r["latency_s"]["median"]
            r["efficiency"] = r["speedup"] / r["ideal_speedup"]


def machine_info(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


# -- output -----------------------------------------------------------------------------------------

def _fmt(value, spec: str, none: str = "–") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "exact"
    return format(value, spec)


def _memory(peak, increase) -> str:
    """Process peak and, in brackets, what loading and running this configuration added to it."""
    if peak is None:
        return "–"
    return f"{peak:.0f} (+{max(increase, 0):.0f})" if increase is not None else f"{peak:.0f}"


def markdown(results: dict, title: str | None = None) -> str:
    m = results["model"]
    cfg = m["config"]
    head = title or "blockcache-bench"
    lines = [f"# {head}", "",
             f"{results['date']}, device `{results['device']}` ({results['machine'].get('gpu') or results['machine']['processor']}, "
             f"{results['machine']['cpu_count']} CPUs, torch {results['machine']['torch']}). Model `{m['name']}` "
             f"(depth {cfg['depth']}, hidden {cfg['hidden_size']}, {cfg['num_heads']} heads, latent "
             f"{cfg['input_size']}×{cfg['input_size']}, patch {cfg['patch_size']}, {m['parameters'] / 1e6:.1f} M "
             f"parameters, weights {m['weights']}); batch {results['batch_size']} images"
             + (f" with CFG (scale {results['guidance_scale']:g}, network batch {2 * results['batch_size']})"
                if results["guidance"] else " without guidance")
             + f"; latency = median of {results['repeats']} warm calls (min–max)"
             + (f"; load average at start {results['machine']['load_average'][0]:.1f} on "
                f"{results['machine']['cpu_count']} CPUs" if results["machine"].get("load_average") else "")
             + ".", "",
             f"Fidelity against {results['fidelity_reference']}; PSNR data range: {results['psnr_data_range']}.",
             ""]
    digits = any("class_accuracy" in r for r in results["rows"])
    header = ["precision", "method", "schedule", "steps", "latency s (min–max)", "speedup", "ideal", "efficiency",
              "PSNR dB", "rel. error"]
    if digits:
        header += ["class acc.", "digits-FD"]
    header += ["peak host MB (+load/run)", "peak device MB (+load/run)", "notes"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results["rows"]:
        s = results["schedules"][r["schedule"]]
        sched = f"{r['schedule']} ({r['role']})"
        if r["status"] != "ok":
            cells = [r["precision"], r["label"], sched, str(s["steps"]), r["status"]] + ["–"] * (len(header) - 6) \
                + [r.get("reason", "")]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        lat = r["latency_s"]
        notes = []
        if r.get("cuda_graph"):
            notes.append("CUDA graph")
        if r.get("graph_error"):
            notes.append(f"no CUDA graph: {r['graph_error'][:80]}")
        if r.get("plan_precision") and r["plan_precision"] != r["precision"]:
            notes.append(f"cast from {r['plan_precision']} plan")
        cells = [r["precision"], r["label"], sched, str(s["steps"]),
                 f"{lat['median']:.4g} ({lat['min']:.4g}–{lat['max']:.4g})", _fmt(r["speedup"], ".3f"),
                 _fmt(r["ideal_speedup"], ".3f"), _fmt(r["efficiency"], ".2f"), _fmt(r.get("psnr_db"), ".1f"),
                 _fmt(r.get("relative_error"), ".2e")]
        if digits:
            cells += [_fmt(r.get("class_accuracy"), ".3f"), _fmt(r.get("digits_fd"), ".2f")]
        cells += [_memory(r.get("peak_host_mb"), r.get("host_increase_mb")),
                  _memory(r.get("peak_device_mb"), r.get("device_increase_mb")), "; ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("notes"):
        lines += [""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    """Latency (x, log) against fidelity (PSNR, y); exact matches are drawn at the top edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results["rows"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(10.5, 5.5))
    finite = [r["psnr_db"] for r in ok if math.isfinite(r["psnr_db"])]
    top = (max(finite) + 10) if finite else 100.0
    markers = {"fp32": "o", "fp16": "s", "bf16": "^"}
    colours = {}
    for r in ok:
        key = r["label"]
        colour = colours.setdefault(key, f"C{len(colours) % 10}")
        y = r["psnr_db"] if math.isfinite(r["psnr_db"]) else top
        ax.scatter(r["latency_s"]["median"], y, marker=markers.get(r["precision"], "o"), color=colour,
                   label=f"{key}, {r['precision']}")
        ax.annotate(r["schedule"], (r["latency_s"]["median"], y), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    if ok:
        ax.set_xscale("log")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("warm latency per batch, s (median)")
    ax.set_ylabel("PSNR vs full compute, dB (top edge = exact)")
    ax.set_title(f"{results['model']['name']} on {results['device']}: latency vs fidelity", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict, out_dir: str, tag: str, title: str | None = None) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{tag}.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=json_default)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(results, title))
    plot(results, paths["png"])
    return paths


def json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# -- CLI --------------------------------------------------------------------------------------------

def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="blockcache-bench", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    add_weights_args(p)
    p.add_argument("--schedule", action="append", metavar="SPEC",
                   help="cached schedule (repeatable): l2c20, l2c50, uniform:K, FILE.yaml or ROUTER.pt (default l2c20)")
    p.add_argument("--steps", type=int, default=20, help="steps of uniform:K schedules (default 20)")
    p.add_argument("--spacing", choices=SPACINGS, default="linspace", help="spacing of uniform:K schedules")
    p.add_argument("--backends", default="eager,torch,onnxruntime", metavar="LIST",
                   help=f"comma-separated methods: {', '.join(METHODS)} (default eager,torch,onnxruntime)")
    p.add_argument("--precision", default="fp32", metavar="LIST", help="comma-separated: fp32, fp16, bf16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch-size", type=int, default=2, metavar="B", help="images per batch (default 2)")
    p.add_argument("--labels", help="comma-separated class labels, one per image (default: fixed classes)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--guidance-scale", type=float, default=4.0, metavar="G", help="CFG scale; <= 1: none")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    p.add_argument("--no-fewer-steps", action="store_true", help="skip the equal-MACs fewer-steps DDIM baseline")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode (default max-autotune)")
    p.add_argument("--bf16-plan", choices=("fp32", "fp16"), default="fp32",
                   help="stored plan precision that bf16 torch-backend runs cast from (default fp32)")
    p.add_argument("--plans", metavar="DIR", help="keep exported plans in DIR and reuse matching ones")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime")
    p.add_argument("--out", default=RESULTS, metavar="DIR", help="results folder (default benchmarks/results)")
    p.add_argument("--tag", help="file name stem (default <date>-bench-<model>-<device>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def split_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def config_from_args(args) -> BenchConfig:
    return BenchConfig(
        model=args.model, overrides=model_overrides(args), checkpoint=args.checkpoint, random_init=args.random_init,
        init_seed=args.init_seed, schedules=args.schedule or ["l2c20"], steps=args.steps, spacing=args.spacing,
        methods=split_list(args.backends), precisions=split_list(args.precision), device=args.device,
        batch_size=args.batch_size, labels=parse_labels(args.labels) if args.labels else None, seed=args.seed,
        guidance_scale=args.guidance_scale, repeats=args.repeats, warmup=args.warmup,
        fewer_steps=not args.no_fewer_steps, compile_mode=args.compile_mode, bf16_plan=args.bf16_plan,
        plans_dir=args.plans, threads=args.threads, progress=not args.quiet)


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    cfg.check()
    results = run_benchmark(cfg)
    tag = args.tag or f"{time.strftime('%Y-%m-%d')}-bench-{results['model']['name']}-{results['device']}"
    paths = write_results(results, args.out, tag)
    print(markdown(results), end="")
    print("wrote " + ", ".join(paths.values()))
    errors = [r for r in results["rows"] if r["status"] == "error"]
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
