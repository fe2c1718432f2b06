"""runtime.Sampler in a service, on CPU (issue 15's measurements; numbers, never timed tests).

    python -m benchmarks.runtime_cpu [--out benchmarks/results] [--calls 1000] [--backends onnxruntime,torch]

Model: the embedded, trained `dit-digits` (12 blocks, hidden 128, 8×8×1 latents), CFG at the plan's
scale. One plan with batch sizes 1, 2, 4 and 8 × DDIM-20 and DDIM-50 (both uniform caching, every
2nd step), and the single plan of batch 8 × DDIM-20 a deployer had before. Each backend runs one
intra-op thread per call, so contexts (not a thread pool inside a call) use the cores.

Measures: (1) throughput, images/s, of 1, 2 and 4 contexts with 1, 2, 4 and 8 threads calling at once
(1 image per call, DDIM-20); (2) for requests of 1–9 images, the images computed (padded work) and
the latency on the multi-batch plan against the batch-8 plan; (3) resident memory of a process that
loads each plan (and of 4 contexts), and the plan folders' sizes; (4) resident memory every 100 calls
over `--calls` calls; (5) how far an image sampled alone is from the same (label, seed) inside
larger batches (max |a − b| / max |b| per image).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BATCH_SIZES = [1, 2, 4, 8]
STEPS = [20, 50]
CONTEXTS = [1, 2, 4]
CALLERS = [1, 2, 4, 8]
CALLS_PER_CALLER = 8


def rss_mb() -> float:
    return [int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmRSS")][0]


def export(out: str) -> dict:
    from exporter.export import export_plans
    from exporter.models import load_model
    from schedules import Schedule

    model = load_model("dit-digits")
    plans = {"multi": os.path.join(out, "multi"), "single": os.path.join(out, "single")}
    start = time.perf_counter()
    export_plans(model, [Schedule.uniform(model.unit_names, s, 2, model="dit-digits") for s in STEPS],
                 plans["multi"], batch_sizes=BATCH_SIZES)
    multi_seconds = time.perf_counter() - start
    start = time.perf_counter()
    export_plans(model, [Schedule.uniform(model.unit_names, 20, 2, model="dit-digits")], plans["single"],
                 batch_sizes=[8])
    return {"plans": plans, "export_seconds": {"multi": multi_seconds, "single": time.perf_counter() - start}}


def sampler(plan: str, backend: str, contexts: int = 1, batch_costs=None):
    from runtime import Sampler

    return Sampler(plan, backend=backend, device="cpu", contexts=contexts, batch_costs=batch_costs,
                   **({"threads": 1} if backend == "onnxruntime" else {}))


def best_latency(s, n: int, repeats: int) -> float:
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        s([i % 10 for i in range(n)], seed=r, steps=20)
        best = min(best, time.perf_counter() - start)
    return best


def throughput(plan: str, backend: str) -> list[dict]:
    rows = []
    for contexts in CONTEXTS:
        with sampler(plan, backend, contexts) as s:
            for _ in range(2):
                s([1], seed=0, steps=20)  # warm-up
            for callers in CALLERS:
                start_line = threading.Barrier(callers)

                def caller(t):
                    start_line.wait()
                    for i in range(CALLS_PER_CALLER):
                        s([i % 10], seeds=[1000 * t + i], steps=20)

                wall, cpu = time.perf_counter(), time.process_time()
                with ThreadPoolExecutor(callers) as pool:
                    list(pool.map(caller, range(callers)))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                images = callers * CALLS_PER_CALLER
                rows.append({"backend": backend, "contexts": contexts, "callers": callers, "images": images,
                             "wall_s": wall, "cpu_s": cpu, "images_per_s": images / wall})
                print(f"{backend} contexts {contexts} callers {callers}: {images / wall:.1f} images/s "
                      f"(wall {wall:.2f} s, CPU {cpu:.2f} s)", flush=True)
    return rows


def padding(plans: dict, backend: str, repeats: int = 3) -> list[dict]:
    """Requests of 1–9 images: the default split (least padded work) and the batch-8 plan; then the
    split by the measured latency of each batch size (`batch_costs`)."""
    from runtime.sampler import split_batches

    rows = []
    with sampler(plans["multi"], backend) as multi, sampler(plans["single"], backend) as single:
        for s in (multi, single):
            s(list(range(8)), seed=0, steps=20)
        for n in range(1, 10):
            rows.append({"backend": backend, "images": n, "batches": split_batches(n, BATCH_SIZES),
                         "work_multi": sum(split_batches(n, BATCH_SIZES)), "work_single": 8 * -(-n // 8),
                         "latency_multi_s": best_latency(multi, n, repeats),
                         "latency_single_s": best_latency(single, n, repeats)})
    costs = {r["images"]: r["latency_multi_s"] for r in rows if r["images"] in BATCH_SIZES}
    with sampler(plans["multi"], backend, batch_costs=costs) as timed:
        timed(list(range(8)), seed=0, steps=20)
        for r in rows:
            r["batches_by_cost"] = split_batches(r["images"], BATCH_SIZES, costs)
            r["work_by_cost"] = sum(r["batches_by_cost"])
            r["latency_by_cost_s"] = best_latency(timed, r["images"], repeats)
            print(f"{backend} {r['images']} images: {r['batches']} {r['latency_multi_s'] * 1e3:.0f} ms, by cost "
                  f"{r['batches_by_cost']} {r['latency_by_cost_s'] * 1e3:.0f} ms, batch-8 plan "
                  f"{r['latency_single_s'] * 1e3:.0f} ms", flush=True)
    return rows


MEMORY_CODE = """
import sys
from runtime import Sampler
s = Sampler(sys.argv[1], backend=sys.argv[2], device='cpu', contexts=int(sys.argv[3]))
for steps in s.step_counts:
    for b in s.plan.batch_sizes(steps):
        s([1] * b, seed=0, steps=steps)
status = dict(line.split(':', 1) for line in open('/proc/self/status'))
print(int(status['VmRSS'].split()[0]) / 1024, int(status['VmHWM'].split()[0]) / 1024)
"""


def memory(plans: dict, backend: str) -> list[dict]:
    """RSS and peak RSS of a fresh process that loads the plan and runs every program once."""
    rows = []
    for name, contexts in (("single", 1), ("multi", 1), ("multi", 4)):
        out = subprocess.run([sys.executable, "-c", MEMORY_CODE, plans[name], backend, str(contexts)],
                             capture_output=True, text=True, check=True)
        rss, peak = map(float, out.stdout.split()[-2:])
        size = sum(os.path.getsize(os.path.join(plans[name], f)) for f in os.listdir(plans[name]))
        rows.append({"backend": backend, "plan": name, "contexts": contexts, "rss_mb": rss, "peak_rss_mb": peak,
                     "plan_mb": size / 1e6})
        print(f"{backend} {name} plan, {contexts} contexts: RSS {rss:.0f} MB (peak {peak:.0f} MB), "
              f"folder {size / 1e6:.1f} MB", flush=True)
    return rows


def steady_memory(plan: str, backend: str, calls: int) -> dict:
    with sampler(plan, backend) as s:
        trace = []
        for i in range(calls):
            s([i % 10, (i + 3) % 10], seeds=[i, i + 1], steps=20)
            if i % 100 == 0 or i == calls - 1:
                trace.append((i + 1, rss_mb()))
    growth = trace[-1][1] - trace[1][1] if len(trace) > 2 else 0.0
    print(f"{backend} RSS over {calls} calls: {trace[0][1]:.0f} → {trace[-1][1]:.0f} MB "
          f"(after call 101: {trace[1][1] if len(trace) > 1 else trace[0][1]:.0f} MB)", flush=True)
    return {"backend": backend, "calls": calls, "rss_mb": trace, "growth_after_warmup_mb": growth}


def batch_invariance(plan: str, backend: str, threads: int | None, trials: int = 10) -> dict:
    from runtime import Sampler

    options = {"threads": threads} if backend == "onnxruntime" else {}
    worst, equal, count = 0.0, 0, 0
    with Sampler(plan, backend=backend, device="cpu", **options) as s:
        for trial in range(trials):
            seeds = [1000 * trial + j for j in range(8)]
            labels = [(7 * trial + j) % 10 for j in range(8)]
            inside = s(labels, seeds=seeds, steps=20)
            for n in (1, 2, 4):
                smaller = s(labels[:n], seeds=seeds[:n], steps=20)
                for i in range(n):
                    e = float(np.abs(smaller[i] - inside[i]).max() / np.abs(inside[i]).max())
                    worst, equal, count = max(worst, e), equal + (e == 0), count + 1
    print(f"{backend} (threads {threads}): alone or in batches of 2/4 vs in a batch of 8: worst {worst:.2e}, "
          f"{equal}/{count} bit-identical", flush=True)
    return {"backend": backend, "threads": threads, "worst_relative": worst, "bit_identical": equal,
            "images": count}


def table(title: str, header: list[str], rows, note: str = "") -> list[str]:
    """A markdown section: `## title`, an optional note, the table."""
    lines = ["", f"## {title}", ""] + ([note, ""] if note else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def markdown(result: dict) -> str:
    ms = lambda seconds: f"{seconds * 1e3:.0f} ms"  # noqa: E731
    split = lambda batches: "+".join(map(str, batches))  # noqa: E731
    lines = [f"# runtime.Sampler on CPU, {result['date']}", "", f"Machine: {result['machine']}."]
    lines += table("Throughput (images/s, 1 image per call, DDIM-20)",
                   ["backend", "contexts"] + [f"{c} caller{'s' * (c > 1)}" for c in CALLERS],
                   [[b, c] + [f"{r['images_per_s']:.1f}" for r in result["throughput"]
                              if r["backend"] == b and r["contexts"] == c]
                    for b in result["backends"] for c in CONTEXTS])
    lines += table("Requests of 1–9 images: multi-batch plan (1, 2, 4, 8) vs batch-8 plan",
                   ["backend", "images", "split", "images computed", "latency", "split by cost", "images computed",
                    "latency", "batch-8 plan: images computed", "latency"],
                   [[r["backend"], r["images"], split(r["batches"]), r["work_multi"], ms(r["latency_multi_s"]),
                     split(r["batches_by_cost"]), r["work_by_cost"], ms(r["latency_by_cost_s"]), r["work_single"],
                     ms(r["latency_single_s"])] for r in result["padding"]],
                   "Default split: least padded work. By cost: `batch_costs` = the measured latency of each batch size.")
    lines += table("Memory of a loaded plan (every program run once)",
                   ["backend", "plan", "contexts", "RSS", "peak RSS", "plan folder"],
                   [[r["backend"], r["plan"], r["contexts"], f"{r['rss_mb']:.0f} MB", f"{r['peak_rss_mb']:.0f} MB",
                     f"{r['plan_mb']:.1f} MB"] for r in result["memory"]])
    lines += table("Resident memory over many calls (2 images per call)",
                   ["backend", "calls", "RSS after call 1", "after call 101", "after the last", "growth after call 101"],
                   [[r["backend"], r["calls"], f"{r['rss_mb'][0][1]:.0f} MB",
                     f"{r['rss_mb'][min(1, len(r['rss_mb']) - 1)][1]:.0f} MB", f"{r['rss_mb'][-1][1]:.0f} MB",
                     f"{r['growth_after_warmup_mb']:+.1f} MB"] for r in result["steady_memory"]])
    lines += table("An image alone or in a batch of 2 or 4 vs the same (label, seed) in a batch of 8",
                   ["backend", "intra-op threads", "worst max-abs relative difference", "bit-identical"],
                   [[r["backend"], r["threads"] or "torch's (1)", f"{r['worst_relative']:.1e}",
                     f"{r['bit_identical']}/{r['images']}"] for r in result["batch_invariance"]])
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--calls", type=int, default=1000, help="calls for the resident-memory trace")
    p.add_argument("--backends", default="onnxruntime,torch")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    backends = args.backends.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        exported = export(tmp)
        plans = exported["plans"]
        result = {"date": time.strftime("%Y-%m-%d"), "backends": backends,
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                             f"{platform.system()}, Python {platform.python_version()}",
                  "export_seconds": exported["export_seconds"], "throughput": [], "padding": [], "memory": [],
                  "steady_memory": [], "batch_invariance": []}
        for backend in backends:
            result["throughput"] += throughput(plans["multi"], backend)
            result["padding"] += padding(plans, backend)
            result["memory"] += memory(plans, backend)
            result["steady_memory"].append(steady_memory(plans["multi"], backend, args.calls))
        for backend, threads in (("onnxruntime", 1), ("onnxruntime", 2), ("torch", None)):
            if backend in backends:
                result["batch_invariance"].append(batch_invariance(plans["multi"], backend, threads))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{result['date']}-runtime-cpu")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
