"""ONNX Runtime CPU benchmark of the exporter and runtime (issue targets, reported whether met or not).

    python -m benchmarks.ort_cpu [--out benchmarks/results] [--repeats 5]

Model: DiT-S/2 widths with DiT-XL/2's depth (28 blocks, hidden 384, 6 heads, 256 px latent 32×32),
random weights (speed does not depend on them), 1 image with CFG (batch 2 in the graphs).
Measures: (1) L2C DDIM-20 plan vs full plan: warm latency, speedup, MAC-ideal speedup, efficiency;
(2) export time of an 11-variant schedule vs a 1-variant one; (3) plan folder size vs fp32 weights;
(4) peak resident memory of a process that loads and runs an 11-variant plan vs a 1-variant plan.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from schedules import Schedule
from schedules.l2c import import_l2c

MODEL = dict(name="dit-s2", depth=28, input_size=32)
ROUTER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "l2c", "DDIM20_router.pt")
COMMITTED_L2C = os.path.join(os.path.dirname(__file__), "..", "schedules", "presets", "dit-xl2-l2c-ddim20.yaml")


def eleven_variant_schedule(units, steps: int = 20) -> Schedule:
    """Full even steps; odd step 2k+1 reuses the units of blocks ≥ 28−2(k+1): 10 cached rows + full = 11."""
    compute = np.ones((steps, len(units)), bool)
    depth = len(units) // 2
    for k in range(10):
        compute[2 * k + 1, 2 * (depth - 2 * (k + 1)):] = False
    return Schedule(units, compute, {"name": "ddim", "steps": steps, "spacing": "linspace"}, source="11 variants")


def l2c_schedule(units) -> Schedule:
    if os.path.exists(ROUTER):
        return import_l2c(ROUTER, units, 20)
    schedule = Schedule.load(COMMITTED_L2C)  # the committed import of the same router
    return Schedule(units, schedule.compute, schedule.sampler, source=schedule.source)


def latency(plan: str, repeats: int, threads: int | None = None, clock=time.perf_counter) -> list[float]:
    from runtime import Sampler

    sampler = Sampler(plan, device="cpu", threads=threads)
    sampler([1], seed=0)  # warm-up
    times = []
    for r in range(repeats):
        start = clock()
        sampler([1], seed=r)
        times.append(clock() - start)
    return times


def peak_rss_mb(plan: str) -> float:
    """Peak RSS of a fresh process (runtime only, no torch) that loads `plan` and samples once."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking (torch-laden) parent.
    code = ("import sys; from runtime import Sampler; s = Sampler(sys.argv[1], device='cpu'); s([1], seed=0);"
            "print([int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code, plan], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    from exporter.export import export_plan
    from exporter.models import load_model

    model = load_model(MODEL["name"], random_init=True, depth=MODEL["depth"], input_size=MODEL["input_size"])
    units = model.unit_names
    fp32_weight_bytes = 4 * sum(t.numel() for t in model.state_dict().values())
    schedules = {"full": Schedule.full(units, 20), "l2c": l2c_schedule(units), "eleven": eleven_variant_schedule(units)}
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d"), "model": MODEL, "batch": "1 image with CFG (graph batch 2)"}
    with tempfile.TemporaryDirectory() as tmp:
        plans, export_s = {}, {}
        for name, schedule in schedules.items():
            plans[name] = os.path.join(tmp, name)
            start = time.perf_counter()
            manifest = export_plan(model, schedule, plans[name], batch_size=1, guidance_scale=4.0)
            export_s[name] = time.perf_counter() - start
            results[f"{name}_variants"] = len(manifest["variants"])
            results[f"{name}_ideal_speedup"] = manifest["macs_per_image"]["ideal_speedup"]
        plan_bytes = sum(os.path.getsize(os.path.join(plans["eleven"], f)) for f in os.listdir(plans["eleven"]))
        results["export_seconds"] = export_s
        results["export_ratio_11_vs_1"] = export_s["eleven"] / export_s["full"]
        results["plan_size_ratio_11_variants"] = plan_bytes / fp32_weight_bytes
        results["peak_rss_mb"] = {"full": peak_rss_mb(plans["full"]), "eleven": peak_rss_mb(plans["eleven"])}
        results["peak_rss_ratio_11_vs_1"] = results["peak_rss_mb"]["eleven"] / results["peak_rss_mb"]["full"]
        lat = {name: latency(plans[name], args.repeats) for name in ("full", "l2c")}
        # One thread, process CPU time: insensitive to other load on the machine (no spinning pool).
        cpu = {name: latency(plans[name], args.repeats, threads=1, clock=time.process_time) for name in ("full", "l2c")}
    results["latency_s"] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in lat.items()}
    results["cpu_time_1_thread_s"] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                                      for k, v in cpu.items()}
    speedup = results["latency_s"]["full"]["median"] / results["latency_s"]["l2c"]["median"]
    results["l2c_speedup"] = speedup
    results["l2c_efficiency"] = speedup / results["l2c_ideal_speedup"]
    cpu_speedup = results["cpu_time_1_thread_s"]["full"]["median"] / results["cpu_time_1_thread_s"]["l2c"]["median"]
    results["l2c_speedup_cpu_time_1_thread"] = cpu_speedup
    results["l2c_efficiency_cpu_time_1_thread"] = cpu_speedup / results["l2c_ideal_speedup"]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{results['date']}-ort-cpu.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(report(results))
    print(f"wrote {path}")


def report(r: dict) -> str:
    lat = r["latency_s"]
    rows = [
        ("L2C DDIM-20 speedup over full plan, wall clock (2 threads)", f"{r['l2c_speedup']:.3f}x (ideal "
         f"{r['l2c_ideal_speedup']:.3f}x, efficiency {r['l2c_efficiency']:.2f})", ">= 0.90 efficiency",
         r["l2c_efficiency"] >= 0.9),
        ("L2C DDIM-20 speedup, process CPU time (1 thread)", f"{r['l2c_speedup_cpu_time_1_thread']:.3f}x "
         f"(efficiency {r['l2c_efficiency_cpu_time_1_thread']:.2f})", ">= 0.90 efficiency",
         r["l2c_efficiency_cpu_time_1_thread"] >= 0.9),
        ("export time, 11 variants vs 1", f"{r['export_ratio_11_vs_1']:.2f}x ({r['export_seconds']['eleven']:.1f} s vs "
         f"{r['export_seconds']['full']:.1f} s)", "< 2x", r["export_ratio_11_vs_1"] < 2),
        ("plan folder size vs fp32 weights (11 variants)", f"{r['plan_size_ratio_11_variants']:.3f}x", "< 1.25x",
         r["plan_size_ratio_11_variants"] < 1.25),
        ("peak RSS, 11-variant vs 1-variant plan", f"{r['peak_rss_ratio_11_vs_1']:.3f}x ({r['peak_rss_mb']['eleven']:.0f} "
         f"MB vs {r['peak_rss_mb']['full']:.0f} MB)", "<= 1.3x", r["peak_rss_ratio_11_vs_1"] <= 1.3),
    ]
    lines = [f"ORT CPU benchmark, {r['machine']}, {r['date']}; model {r['model']}, {r['batch']}",
             f"latency (median of repeats, min–max): full {lat['full']['median']:.2f} s "
             f"({lat['full']['min']:.2f}–{lat['full']['max']:.2f}), L2C {lat['l2c']['median']:.2f} s "
             f"({lat['l2c']['min']:.2f}–{lat['l2c']['max']:.2f})",
             "", "| measure | result | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {'yes' if d else 'no'} |" for a, b, c, d in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
