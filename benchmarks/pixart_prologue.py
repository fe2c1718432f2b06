"""What the prologue saves: PixArt plans with the prompt's work once per call (a prologue graph) against
the same plans with it in every step (`--no-prologue`), on ONNX Runtime on this CPU.

    python -m benchmarks.pixart_prologue [--out benchmarks/results] [--repeats 3]

Model: PixArt-Σ's depth (28 blocks, 84 units), prompt length (300 T5 tokens, 4096 wide) and patch 2 at
a narrow width (hidden 256, 4 heads) and 256 px (32×32 latents), random weights (speed does not depend
on them); DPM-Solver++ 2M, 20 steps, 1 image with guidance 4.5 (network batch 2). Schedules: full
compute and uniform reuse (every unit recomputed every 3rd step, DeepCache/FORA style), where the
per-step work shrinks and the prompt's share grows. Reports MACs per image (the cost model), the
latency (wall clock, the machine's threads) and the process CPU time on one thread (insensitive to
other load), medians of `--repeats` warm calls, and that both layouts sample the same latents.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np

from benchmarks import write_report
from schedules import Schedule
from schedules.errors import BlockcacheError

MODEL = dict(name="pixart-sigma-512", input_size=32, hidden_size=256, num_heads=4)
STEPS = 20


def prompts(config: dict, seed: int = 0) -> dict:
    """One random prompt of the model's shape with 40 tokens counted, and an empty-prompt-like negative."""
    rng = np.random.default_rng(seed)
    length, width = config["max_text_tokens"], config["caption_channels"]
    mask = (np.arange(length)[None] < 40).astype(np.int64)
    return dict(prompt_embeds=rng.standard_normal((1, length, width)).astype(np.float32), prompt_mask=mask,
                negative_embeds=rng.standard_normal((1, length, width)).astype(np.float32),
                negative_mask=(np.arange(length)[None] < 1).astype(np.int64))


def timed(plan: str, request: dict, repeats: int, threads: int | None = None, clock=time.perf_counter):
    """(call times after a warm-up, the last call's latents)."""
    from runtime import Sampler

    with Sampler(plan, device="cpu", threads=threads) as sampler:
        out = sampler(**request, seed=0)
        times = []
        for r in range(repeats):
            start = clock()
            out = sampler(**request, seed=0)
            times.append(clock() - start)
    return times, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from exporter.export import export_plan
    from exporter.models import load_model
    from schedules.cost import stats

    model = load_model(MODEL["name"], random_init=True, **{k: v for k, v in MODEL.items() if k != "name"})
    units = model.unit_names
    schedules = {"full": Schedule.full(units, STEPS, sampler="dpm-solver++-2m"),
                 "uniform-3": Schedule.uniform(units, STEPS, 3, sampler="dpm-solver++-2m")}
    request = prompts(model.config)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d"), "model": MODEL, "sampler": f"dpm-solver++-2m, {STEPS} steps",
               "batch": "1 image with guidance 4.5 (network batch 2)", "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, schedule in schedules.items():
            s = stats(model.config, schedule)
            row = {"gmacs_per_image": {"every step": s["macs_per_image_scheduled"] / 1e9,
                                       "prologue": s["macs_per_image_scheduled_with_prologue"] / 1e9},
                   "mac_saving": s["prologue_saving"]}
            outs = {}
            for layout, prologue in (("every step", False), ("prologue", True)):
                plan = os.path.join(tmp, f"{name}-{layout.replace(' ', '-')}")
                export_plan(model, schedule, plan, batch_size=1, prologue=prologue)
                wall, outs[layout] = timed(plan, request, args.repeats)
                cpu, _ = timed(plan, request, args.repeats, threads=1, clock=time.process_time)
                row.setdefault("latency_s", {})[layout] = statistics.median(wall)
                row.setdefault("cpu_time_1_thread_s", {})[layout] = statistics.median(cpu)
            scale = float(np.abs(outs["prologue"]).max())
            row["max_rel_difference"] = float(np.abs(outs["prologue"] - outs["every step"]).max() / scale)
            for key in ("latency_s", "cpu_time_1_thread_s"):
                row[f"saving_{key}"] = row[key]["every step"] / row[key]["prologue"]
            results["rows"][name] = row
    write_report(args.out, f"{results['date']}-pixart-prologue-cpu", results, report(results))


def report(r: dict) -> str:
    lines = [f"PixArt prologue, ONNX Runtime CPU, {r['machine']}, {r['date']}; model {r['model']}, {r['sampler']}, "
             f"{r['batch']}", "",
             "| schedule | GMACs/image every step → prologue | MACs saved | CPU time 1 thread every step → prologue "
             "| saved | wall clock every step → prologue | saved | latents differ by |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        g, c, w = row["gmacs_per_image"], row["cpu_time_1_thread_s"], row["latency_s"]
        lines.append(f"| {name} | {g['every step']:.1f} → {g['prologue']:.1f} | {row['mac_saving']:.3f}x | "
                     f"{c['every step']:.2f} s → {c['prologue']:.2f} s | {row['saving_cpu_time_1_thread_s']:.3f}x | "
                     f"{w['every step']:.2f} s → {w['prologue']:.2f} s | {row['saving_latency_s']:.3f}x | "
                     f"{row['max_rel_difference']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except BlockcacheError as e:
        raise SystemExit(f"error: {e}") from None
