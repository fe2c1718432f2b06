"""ONNX Runtime CPU benchmark of a U-ViT plan: the published L2C U-ViT router for DPM-Solver-2 with
20 model evaluations, against the full plan of the same solver.

    python -m benchmarks.uvit_cpu [--out benchmarks/results] [--repeats 3]

Model: U-ViT-H/2's depth (29 blocks, 58 units) and token count (32×32 latents, patch 2, plus the
label and time tokens) at DiT-S width (hidden 384, 6 heads), random weights (speed does not depend
on them), 1 image with U-ViT guidance (graph batch 2). Needs `../shared/data/l2c/dpm20_router.pth`.
Reports the warm latency (wall clock, the machine's threads) and the process CPU time on one thread
(insensitive to other load), the speedup over the full plan and its efficiency against the
MAC-ideal speedup.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

from benchmarks import write_report
from benchmarks.ort_cpu import latency
from schedules import Schedule
from schedules.errors import BlockcacheError
from schedules.l2c import import_l2c

MODEL = dict(name="uvit-h2", hidden_size=384, num_heads=6)
ROUTER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "l2c", "dpm20_router.pth")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if not os.path.exists(ROUTER):
        raise SystemExit(f"error: {ROUTER} not found (the shared data folder is absent)")

    from exporter.export import export_plan
    from exporter.models import load_model

    model = load_model(MODEL["name"], random_init=True, hidden_size=MODEL["hidden_size"], num_heads=MODEL["num_heads"])
    units = model.unit_names
    schedules = {"full": Schedule.full(units, 20, sampler="dpm-solver-2"),
                 "l2c": import_l2c(ROUTER, units, 20, sampler="dpm-solver-2")}
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d"), "model": MODEL, "sampler": "dpm-solver-2, 20 evaluations",
               "batch": "1 image with guidance 0.4 (U-ViT form; graph batch 2)"}
    with tempfile.TemporaryDirectory() as tmp:
        plans = {}
        for name, schedule in schedules.items():
            plans[name] = os.path.join(tmp, name)
            manifest = export_plan(model, schedule, plans[name], batch_size=1, guidance_scale=0.4)
            results[f"{name}_variants"] = len(manifest["variants"])
            macs = manifest["macs_per_image"]
            if name == "full":
                results["full_gmacs_per_image_all_evaluations"] = macs["full"] / 1e9
            else:
                results["ideal_speedup"] = macs["ideal_speedup"]
        wall = {name: latency(plans[name], args.repeats) for name in plans}
        cpu = {name: latency(plans[name], args.repeats, threads=1, clock=time.process_time) for name in plans}
    for key, runs in (("latency_s", wall), ("cpu_time_1_thread_s", cpu)):
        results[key] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in runs.items()}
        speedup = results[key]["full"]["median"] / results[key]["l2c"]["median"]
        results[f"speedup_{key}"] = speedup
        results[f"efficiency_{key}"] = speedup / results["ideal_speedup"]
    write_report(args.out, f"{results['date']}-ort-cpu-uvit-dpm20", results, report(results))


def report(r: dict) -> str:
    lines = [f"U-ViT ORT CPU benchmark, {r['machine']}, {r['date']}; model {r['model']}, {r['sampler']}, {r['batch']}",
             f"variants: full {r['full_variants']}, L2C {r['l2c_variants']}; ideal speedup {r['ideal_speedup']:.3f}x",
             "", "| clock | full plan | L2C plan | speedup | efficiency |", "|---|---|---|---|---|"]
    for key, label in (("latency_s", "wall clock"), ("cpu_time_1_thread_s", "CPU time, 1 thread")):
        t = r[key]
        lines.append(f"| {label} | {t['full']['median']:.2f} s | {t['l2c']['median']:.2f} s | "
                     f"{r['speedup_' + key]:.3f}x | {r['efficiency_' + key]:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except BlockcacheError as e:
        raise SystemExit(f"error: {e}") from None
