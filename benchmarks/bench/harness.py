"""The benchmark harness: every (precision, method, case) of a `BenchConfig` measured, with fidelity
against eager fp32 full compute and speedups derived (see the package docstring)."""

from __future__ import annotations

import copy
import os
import platform
import time

import numpy as np

from schedules.errors import BlockcacheError, one_line
from schedules.sampling import initial_noise
from schedules.schedule import Schedule

from .cases import build_cases
from .config import FIDELITY_REFERENCE, PLAN_METHODS, BenchConfig
from .measure import Skip, fidelity, is_digits, latency_summary, time_calls
from .memory import MemoryMonitor
from .plans import PlanStore
from .report import method_label
from .runners import BackendRunner, EagerRunner, block_compile_mode, compiled_step, plan_precision
from .side_by_side import matched_schedules, run_peers, summary


def torch_device(device: str) -> str:
    """`device` resolved for PyTorch (auto: cuda where PyTorch sees a GPU)."""
    import torch

    from runtime.backends.base import resolve_device

    return resolve_device(device, torch.cuda.is_available)


def default_labels(num_classes: int, n: int) -> list[int]:
    if num_classes <= 10:
        return [i % num_classes for i in range(n)]
    demo = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py classes
    return [(demo[i % len(demo)] + 7 * (i // len(demo))) % num_classes for i in range(n)]


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
    from runtime.nn.precision import exact_fp32

    with exact_fp32():
        return EagerRunner(copy.deepcopy(model).to(device), schedule, cfg, device)(noise, labels)


def _run(cfg: BenchConfig, model, on_row=None) -> dict:
    import torch
    from tqdm.auto import tqdm

    from exporter.models import load_model
    from schedules.cost import schedule_macs

    device = torch_device(cfg.device)
    if model is None:
        model = load_model(cfg.model, cfg.checkpoint, random_init=cfg.random_init, seed=cfg.init_seed,
                           **cfg.overrides)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()  # the fp32 master copy; the caller's model is not touched
    model.eval()
    units, config = model.unit_names, model.config
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
    cases = build_cases(cfg, units, config) if cfg.schedules else []  # unknown specs fail before the peers run
    matched_to = {}
    if cfg.peers:
        peer_rows = run_peers(cfg, model, device, noise, labels, digits, results,
                              None if on_row is None else lambda row: on_row(results))
        matched = matched_schedules(cfg, model, peer_rows, labels)
        cases = build_cases(cfg, units, config, [(name, schedule) for name, schedule, _ in matched])
        matched_to = {name: peers for name, _, peers in matched}
    for c in cases:
        full, scheduled = schedule_macs(config, c.schedule)
        group = next(g for g in cases if g.name == c.group)
        group_full = schedule_macs(config, group.schedule)[0]
        results["schedules"][c.name] = {
            "role": c.role, "compared_with": c.group, "steps": c.schedule.num_steps,
            "spacing": c.schedule.sampler["spacing"], "source": c.schedule.source,
            "macs_per_image": scheduled, "ideal_speedup": group_full / scheduled,
            "distinct_variants": len({row.tobytes() for row in c.schedule.compute}),
            "compute_share": float(c.schedule.compute.mean()),
        }
        if c.name in matched_to:
            results["schedules"][c.name]["matched_to"] = matched_to[c.name]

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
            row = {"precision": precision, "method": method, "label": method_label(method, case.role),
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
    results["summary"] = summary(results)
    return results


def plan_backend(method: str, precision: str, cfg: BenchConfig, device: str, plan):
    """The runtime backend that plan method `method` measures, made by `make_backend`."""
    from runtime.backends import make_backend

    plan_device = "cuda" if device.startswith("cuda") else "cpu"
    if method in ("torch", "torch-inductor"):
        mode = block_compile_mode(cfg.compile_mode) if method == "torch-inductor" else None
        return make_backend("torch", plan, device, dtype=precision, compile=mode, compile_backend=cfg.compile_backend)
    if method == "onnxruntime":
        from runtime.backends.onnxruntime import cuda_available

        if plan_device == "cuda" and not cuda_available():
            raise Skip("ONNX Runtime has no usable CUDA execution provider here")
        return make_backend("onnxruntime", plan, plan_device, threads=cfg.threads)
    return make_backend(method, plan, plan_device)


def _measure(method, precision, case, cfg, model, device, store, compiled, noise, labels) -> dict:
    from runtime.nn.precision import torch_dtype

    info, monitor = {}, MemoryMonitor(device)
    start = time.perf_counter()
    if method in ("eager", "compile"):
        with monitor:
            key = (method, precision)
            if key not in compiled:  # one device copy (and one compilation) per method and precision
                dev_model = copy.deepcopy(model).to(device=device, dtype=torch_dtype(precision))
                compiled[key] = (dev_model, compiled_step(dev_model, cfg) if method == "compile" else None)
            dev_model, step_fn = compiled[key]
            runner = EagerRunner(dev_model, case.schedule, cfg, device, step_fn)
    else:
        stored, reason = plan_precision(method, precision, cfg)
        if reason:
            raise Skip(reason)
        path = store.get(case, stored)
        start = time.perf_counter()  # load time, not export time
        with monitor:
            backend = plan_backend(method, precision, cfg, device, store.plan(path))
            if method.startswith("torch"):
                info.update(cuda_graph=backend.cuda_graph, graph_error=backend.graph_error, plan_precision=stored)
            runner = BackendRunner(backend, cfg.guidance_scale)
    setup = time.perf_counter() - start
    output, first, times = time_calls(runner, noise, labels, cfg.warmup, cfg.repeats, monitor)
    info.update(monitor.report())
    if method in PLAN_METHODS and device.startswith("cuda") and not method.startswith("torch"):
        info["peak_device_mb"] = info["device_increase_mb"] = None  # not PyTorch's memory
    info.update(setup_s=setup, first_call_s=first, output=output, latency_s=latency_summary(times))
    if isinstance(runner, BackendRunner):
        runner.backend.close()
    del runner
    return info


def derive(results: dict) -> None:
    """Speedup over the same method and precision's full run of the same sampler, and efficiency."""
    rows = results["rows"]
    index = {(r["precision"], r["method"], r["schedule"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        info = results["schedules"][r["schedule"]]
        # a peer's compute is what its run counted; a plan's is its schedule's
        r["ideal_speedup"] = r.get("counted_ideal_speedup", info["ideal_speedup"])
        r.setdefault("compute_share", info.get("compute_share"))
        r["speedup"] = r["efficiency"] = None
        if r["status"] != "ok":
            continue
        base = index.get((r["precision"], r["method"], info["compared_with"]))
        if base is not None:
            r["speedup"] = base["latency_s"]["median"] / r["latency_s"]["median"]
            r["efficiency"] = r["speedup"] / r["ideal_speedup"] if r["ideal_speedup"] else None


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

