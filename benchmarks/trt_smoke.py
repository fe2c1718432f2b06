"""TensorRT backend smoke test for a GPU machine with TensorRT 10+ (not runnable elsewhere).

    python -m benchmarks.trt_smoke [--precision fp16] [--depth 28] [--hidden-size 384] [--out benchmarks/results]

Builds an 11-variant plan and a full plan (random DiT, DiT-S/2 widths by default, 1 image with CFG)
with --backend tensorrt, then checks and measures what the backend claims:
  1. samples match ONNX Runtime (CPU) on the same plan, and graph replay matches eager enqueues;
  2. weights are held once: device memory taken by loading the 11-variant plan vs its weights arena and
     vs what 11 engines with baked weights would hold;
  3. latency: whole-loop CUDA graph vs one execute_async_v3 per step; 11-variant vs full plan;
  4. build time per engine (the shared timing cache makes later engines faster), engine sizes, and
     Reformat layers that read weight inputs (run-time cost of weights as inputs), from the engine
     inspector.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def device_used() -> int:
    from polygraphy import cuda

    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    cuda.wrapper().handle.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))  # (size_t*, size_t*)
    return total.value - free.value


def timed(fn, repeats: int) -> dict:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}


def weight_reformats(trt, engine, weight_inputs: set[str]) -> int:
    """Layers of the built engine that reformat a weight input (IEngineInspector, JSON per layer)."""
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    count = 0
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict) or "Reformat" not in str(layer.get("LayerType", layer.get("Name", ""))):
            continue
        names = {str(i.get("Name")) for i in layer.get("Inputs", []) if isinstance(i, dict)}
        count += bool(names & weight_inputs)
    return count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--num-heads", type=int, default=6)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)

    from runtime.backends.tensorrt import import_tensorrt
    from schedules.errors import BlockcacheError

    try:
        trt = import_tensorrt()
    except BlockcacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from benchmarks.ort_cpu import eleven_variant_schedule
    from exporter.engines import EngineSettings, export_with_engines
    from exporter.models import load_model
    from runtime import Sampler
    from schedules import Schedule

    model = load_model("dit-s2", random_init=True, depth=args.depth, hidden_size=args.hidden_size,
                       num_heads=args.num_heads, input_size=args.input_size)
    units = model.unit_names
    results = {"tensorrt": trt.__version__, "precision": args.precision, "model": dict(model.config)}
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "timing.cache")
        plans = {}
        for name, schedule in (("eleven", eleven_variant_schedule(units)), ("full", Schedule.full(units, 20))):
            start = time.perf_counter()
            manifest = export_with_engines(model, schedule, os.path.join(tmp, name),
                                           EngineSettings(precision=args.precision, timing_cache=cache),
                                           batch_size=1, guidance_scale=4.0)
            plans[name] = os.path.join(tmp, name)
            engines = manifest["tensorrt"]["engines"]
            results[name] = {"variants": len(engines), "export_s": time.perf_counter() - start,
                             "build_s": [e["build_seconds"] for e in engines],
                             "engine_mb": [manifest["files"][e["file"]]["size"] / 1e6 for e in engines],
                             "baked_mb": [e["baked_bytes"] / 1e6 for e in engines],
                             "weights_mb": manifest["tensorrt"]["weights_bytes"] / 1e6,
                             "ideal_speedup": manifest["macs_per_image"]["ideal_speedup"]}

        labels, seed = [207], 0
        reference = Sampler(plans["eleven"], backend="onnxruntime", device="cpu")(labels, seed=seed)
        before = device_used()
        sampler = Sampler(plans["eleven"], backend="tensorrt")
        backend = sampler.backend
        results["eleven"]["device_mb_after_load"] = (device_used() - before) / 1e6
        results["eleven"]["backend_memory_mb"] = {k: v / 1e6 for k, v in backend.memory.items()}
        got = sampler(labels, seed=seed)
        results["rel_error_vs_ort"] = float(np.abs(got - reference).max() / np.abs(reference).max())
        results["cuda_graph"] = backend.cuda_graph
        weights = {w for e in sampler.manifest["tensorrt"]["engines"] for w in e["weight_inputs"]}
        results["weight_reformat_layers"] = sum(weight_reformats(trt, e, weights) for e in backend.engines)

        latency = {"eleven_graph": timed(lambda: sampler(labels, seed=seed), args.repeats)}
        backend.cuda_graph = False
        eager = sampler(labels, seed=seed)
        results["graph_equals_eager"] = bool(np.array_equal(eager, got))
        latency["eleven_eager"] = timed(lambda: sampler(labels, seed=seed), args.repeats)
        backend.close()
        full = Sampler(plans["full"], backend="tensorrt")
        latency["full_graph"] = timed(lambda: full(labels, seed=seed), args.repeats)
        full.backend.close()
        results["latency"] = latency
        results["speedup_eleven_vs_full"] = latency["full_graph"]["median_ms"] / latency["eleven_graph"]["median_ms"]
        results["graph_vs_eager"] = latency["eleven_eager"]["median_ms"] / latency["eleven_graph"]["median_ms"]

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{time.strftime('%Y-%m-%d')}-trt-smoke-{args.precision}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    e = results["eleven"]
    print(f"TensorRT {results['tensorrt']} {args.precision}: rel. error vs ORT {results['rel_error_vs_ort']:.2e}, "
          f"graph == eager: {results['graph_equals_eager']}, CUDA graph: {results['cuda_graph']}")
    print(f"11 variants: weights {e['weights_mb']:.0f} MB held once; device memory after load "
          f"{e['device_mb_after_load']:.0f} MB (11 baked engines would hold {11 * e['weights_mb']:.0f} MB of "
          f"weights); baked per engine ≤ {max(e['baked_mb']):.2f} MB; "
          f"weight reformat layers: {results['weight_reformat_layers']}")
    print(f"build s per engine: {', '.join(f'{t:.1f}' for t in e['build_s'])} (shared timing cache)")
    print(f"latency ms: graph {latency['eleven_graph']['median_ms']:.2f}, "
          f"eager {latency['eleven_eager']['median_ms']:.2f}, "
          f"full plan {latency['full_graph']['median_ms']:.2f}; speedup vs full "
          f"{results['speedup_eleven_vs_full']:.2f}x (ideal {e['ideal_speedup']:.2f}x)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
