"""What a forecast costs at run time: the same compute pattern with and without TaylorSeer forecasts,
timed interleaved on ONNX Runtime (CPU, one thread), so that the machine's drift hits both alike.

    python -m benchmarks.forecast_overhead [--out benchmarks/results] [--rounds 8]

Model: DiT-XL/2's depth at width 256 (4 heads), 16×16 latents, random weights, 2 images with CFG,
DDIM-20, as in the peers comparison; schedule: every unit recomputed every 2nd step (uniform), with
forecast order 0, 1 and 2. Reports per order the median process CPU time and wall time of a call.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

from benchmarks import write_json

MODEL = dict(name="dit-xl2", hidden_size=256, num_heads=4, input_size=16)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args(argv)

    from exporter.export import export_plan
    from exporter.models import load_model
    from runtime import Sampler
    from schedules import Schedule

    model = load_model(MODEL["name"], random_init=True, hidden_size=MODEL["hidden_size"], num_heads=MODEL["num_heads"],
                       input_size=MODEL["input_size"])
    base = Schedule.uniform(model.unit_names, 20, 2)
    times = {k: {"cpu": [], "wall": []} for k in (0, 1, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        samplers = {}
        for order in times:
            path = os.path.join(tmp, f"f{order}")
            manifest = export_plan(model, base.with_reuse("unit", order), path, batch_size=2, guidance_scale=4.0)
            samplers[order] = (Sampler(path, backend="onnxruntime", device="cpu", threads=1), len(manifest["variants"]))
            samplers[order][0]([1, 2], seed=0)  # warm-up
        for r in range(args.rounds):
            for order, (sampler, _) in samplers.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                sampler([1, 2], seed=r)
                times[order]["wall"].append(time.perf_counter() - start)
                times[order]["cpu"].append(time.process_time() - start_cpu)
        for sampler, _ in samplers.values():
            sampler.close()
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d %H:%M"), "model": MODEL, "schedule": "uniform interval 2, DDIM-20",
               "batch": "2 images with CFG 4 (graph batch 4)", "threads": 1, "rounds": args.rounds, "rows": []}
    for order, t in times.items():
        row = {"forecast": order, "variants": samplers[order][1], "cpu_s": statistics.median(t["cpu"]),
               "wall_s": statistics.median(t["wall"]), "cpu_min_max": [min(t["cpu"]), max(t["cpu"])]}
        results["rows"].append(row)
        print(f"forecast {order}: {row['variants']} variants, {row['cpu_s']:.3f} s CPU (min {row['cpu_min_max'][0]:.3f}, "
              f"max {row['cpu_min_max'][1]:.3f}), {row['wall_s']:.3f} s wall", flush=True)
    print("wrote", write_json(args.out, time.strftime("%Y-%m-%d") + "-forecast-overhead-cpu", results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
