"""The GPU suite: one command that a GPU machine runs end to end with nothing but the repository.

    python -m benchmarks.gpu_suite --out results/h100              # DiT-XL/2, on the GPU
    python -m benchmarks.gpu_suite --out /tmp/suite --small --device cpu   # the same suite, shrunk, on CPU

DiT-XL/2 at 256 px (latent 32×32) with seeded random weights (speed does not depend on them), 8 images
with classifier-free guidance (network batch 16), DDIM-50 and DDIM-20 with the committed L2C schedules
(schedules/presets/dit-xl2-l2c-ddim50.yaml and -ddim20.yaml, imported from ../shared/data/l2c/), in
bf16 and fp16. Compared, through benchmarks/bench: eager PyTorch full compute, eager PyTorch with
the schedule applied by Python branches per unit, torch.compile (max-autotune) of the full model, the
torch backend's full and cached plans (one CUDA graph per sampling loop), the same with each DiT block
compiled by inductor (`torch-inductor`), a fewer-steps DDIM run with about the cached schedule's MACs,
and ONNX Runtime's CUDA provider where it is installed. Fidelity is
measured against eager fp32 full compute (TF32 off).

Plans are fp16 (a bf16 run casts the fp16 plan's weights once at load): an fp32 DiT-XL/2 plan cannot
be exported, its ONNX master graph exceeds protobuf's 2 GB limit. `--small` shrinks the model to
28 blocks of width 64 (4 heads) on 8×8 latents and 2 images, so that the same schedules apply and the
whole suite runs on a CPU in minutes.

Writes `<out>/<tag>.json`, `.md` (table and targets) and `.png` (latency vs fidelity). The run can be
split (`--steps 50`, `--precision bf16`, `--no-compile`), e.g. to fit a per-command time limit;
`--plans DIR` keeps exported plans for the next part. `--peers all` adds the run-time caches users pick
instead (diffusers' hooks, cache-dit, torch.compile; blockcache-bench --peers) on the same weights, with
blockcache schedules matched to each; `--batch-size 1` measures the launch-bound case.
"""

from __future__ import annotations

import json
import os
import time

from runtime.plan.names import PRECISIONS
from schedules.errors import BlockcacheError, cli_main, one_line
from schedules.options import ArgumentParser, parse_numbers

from .bench import BenchConfig, derive, json_default, markdown, run_benchmark, torch_device, write_results
from .bench.cli import split_list

XL = dict(model="dit-xl2", overrides={}, batch_size=8)
SMALL = dict(model="dit-s2", overrides=dict(depth=28, hidden_size=64, num_heads=4, input_size=8), batch_size=2)
LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py classes
SCHEDULES = {50: "l2c50", 20: "l2c20"}
SUITE_PRECISIONS = ("bf16", "fp16")  # what the suite measures by default
TARGETS = {"efficiency_gpu": 0.95, "efficiency_cpu": 0.9, "vs_eager_branches": 3.0, "xl_l2c50_h100_s": 0.25}


def suite_config(*, small: bool, device: str = "auto", steps=(50, 20), precisions=SUITE_PRECISIONS, repeats=None,
                 warmup=None, compile_full: bool = True, compile_mode: str = "max-autotune", plans_dir=None,
                 threads=None, progress: bool = True, methods=None, fewer_steps: bool = True, peers=(),
                 batch_size=None) -> BenchConfig:
    size = SMALL if small else XL
    batch = batch_size or size["batch_size"]
    bad = [s for s in steps if s not in SCHEDULES]
    if bad or not steps:
        raise BlockcacheError(f"--steps must be some of {', '.join(map(str, SCHEDULES))}, got {bad or 'nothing'}")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise BlockcacheError(f"--precision must be some of fp32, bf16, fp16, got {bad or 'nothing'}")
    if methods is None:
        methods = ["eager"] + (["compile"] if compile_full else []) + ["torch"] + \
            (["torch-inductor"] if compile_full else []) + ["onnxruntime"]
    return BenchConfig(
        model=size["model"], overrides=dict(size["overrides"]), random_init=True, init_seed=0,
        schedules=[SCHEDULES[s] for s in steps], methods=methods, precisions=list(precisions), device=device,
        batch_size=batch, labels=[LABELS[i % len(LABELS)] for i in range(batch)], seed=0, guidance_scale=4.0,
        repeats=repeats or (3 if small else 5), warmup=warmup or (1 if small else 2), fewer_steps=fewer_steps,
        compile_mode=compile_mode, bf16_plan="fp16", plans_dir=plans_dir, threads=threads, progress=progress,
        peers=list(peers), steps=steps[0])  # peers run DDIM-<first of steps>


def _rows(results, **match):
    return [r for r in results["rows"] if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())]


def evaluate_targets(results: dict, small: bool) -> list[dict]:
    """The issue's targets for each of our plan methods (`torch`, `torch-inductor`), each with the
    measured value and whether it is met (None: not applicable to this machine or run size; the value
    is still reported)."""
    on_gpu = results["device"].startswith("cuda")
    gpu_name = results["machine"].get("gpu") or ""
    threshold = TARGETS["efficiency_gpu"] if on_gpu else TARGETS["efficiency_cpu"]
    out = []

    def add(target, method, r, value, met):
        out.append({"target": target, "method": method, "case": f"{r['precision']} {r['schedule']}",
                    "value": value, "met": met})

    for method in ("torch", "torch-inductor"):
        for r in _rows(results, method=method, role="cached"):
            eff = r["efficiency"]
            add(f"cached plan efficiency >= {threshold} of ideal ({'GPU' if on_gpu else 'CPU'})", method, r, eff,
                None if eff is None else eff >= threshold)
        for r in _rows(results, method=method, role="cached"):
            eager = _rows(results, method="eager", role="cached", precision=r["precision"], schedule=r["schedule"])
            if eager:
                ratio = eager[0]["latency_s"]["median"] / r["latency_s"]["median"]
                add(f"GPU: cached plan >= {TARGETS['vs_eager_branches']:g}x faster than eager Python-branch "
                    "caching", method, r, ratio, ratio >= TARGETS["vs_eager_branches"] if on_gpu else None)
        for r in _rows(results, method=method, role="full"):
            comp = _rows(results, method="compile", role="full", precision=r["precision"], schedule=r["schedule"])
            if comp:
                ratio = r["latency_s"]["median"] / comp[0]["latency_s"]["median"]
                add("GPU: full plan no slower than torch.compile max-autotune (latency ratio <= 1)", method, r,
                    ratio, ratio <= 1.0 if on_gpu else None)
        for r in _rows(results, method=method, role="cached", schedule="l2c50"):
            applicable = on_gpu and not small and "H100" in gpu_name and results["batch_size"] == 8
            seconds = r["latency_s"]["median"]
            add(f"DiT-XL/2, 8 images with CFG, DDIM-50 L2C <= {TARGETS['xl_l2c50_h100_s']} s on an H100", method, r,
                seconds, seconds <= TARGETS["xl_l2c50_h100_s"] if applicable else None)
    return out


def targets_markdown(targets: list[dict]) -> str:
    lines = ["## Targets", "", "| target | method | case | measured | met |", "|---|---|---|---|---|"]
    for t in targets:
        value = "–" if t["value"] is None else f"{t['value']:.3f}"
        met = "n/a (not this machine)" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['target']} | {t['method']} | {t['case']} | {value} | {met} |")
    return "\n".join(lines) + "\n"


SUITE_NOTES = [
    "Random weights: latency does not depend on them; fidelity numbers only show numerical agreement "
    "with full compute, not image quality.",
    "Plans are fp16; bf16 plan runs cast the fp16 plan's weights once at load (an fp32 DiT-XL/2 plan "
    "cannot be exported: its ONNX graph exceeds protobuf's 2 GB limit).",
    "Speedup and efficiency compare each method with its own full-compute run of the same sampler; "
    "ideal speedup is the MAC ratio (schedules/cost.py).",
]


def finish(results: dict, out: str, tag: str, small: bool) -> dict:
    """Notes, target verdicts, and the JSON / markdown / PNG files; prints the table."""
    results["notes"] += [n for n in SUITE_NOTES if n not in results["notes"]]
    if small:
        results["notes"].append("--small proves the suite runs end to end; its 2 M-parameter model is dominated by "
                                "per-operator overhead, so its speedups say little about DiT-XL/2 on a GPU.")
    if not results["device"].startswith("cuda"):
        results["notes"].append("Run on CPU: GPU targets are reported as measured but not applicable. Timings on a "
                                "shared machine with other jobs running are noisy.")
    results["targets"] = evaluate_targets(results, small)
    title = f"GPU suite ({'small, ' if small else ''}{results['device']})"
    paths = write_results(results, out, tag, title=title)
    with open(paths["md"], "a", encoding="utf-8") as f:
        f.write("\n" + targets_markdown(results["targets"]))
    print(markdown(results, title) + "\n" + targets_markdown(results["targets"]), end="")
    print("wrote " + ", ".join(paths.values()))
    return paths


def merge_parts(parts: list[dict], names: list[str]) -> dict:
    """One result from runs of the same suite split across calls (e.g. a per-command time limit).
    Each (precision, method) keeps the rows of the one part that measured most of its cases, so a
    method's speedups never mix runs; comparisons *between* methods may span parts (noted)."""
    first = parts[0]
    same = ("model", "batch_size", "labels", "noise_seed", "guidance_scale", "device", "repeats")
    for name, part in zip(names[1:], parts[1:]):
        for key in same:
            if part.get(key) != first.get(key):
                raise BlockcacheError(f"cannot merge {name}: its {key} differs from {names[0]}'s")
        if part["machine"].get("gpu") != first["machine"].get("gpu"):
            raise BlockcacheError(f"cannot merge {name}: measured on {part['machine'].get('gpu')}, "
                                  f"not {first['machine'].get('gpu')}")
    owner = {}
    for i, part in enumerate(parts):
        counts = {}
        for r in part["rows"]:
            if r["status"] == "ok":
                key = (r["precision"], r["method"])
                counts[key] = counts.get(key, 0) + 1
        for key, n in counts.items():
            if key not in owner or n > owner[key][1]:
                owner[key] = (i, n)
    merged = dict(first, rows=[], schedules={}, notes=[], export_seconds={})
    for i, part in enumerate(parts):
        merged["schedules"].update(part["schedules"])
        merged["export_seconds"].update(part.get("export_seconds", {}))
        for r in part["rows"]:
            if owner.get((r["precision"], r["method"]), (None,))[0] == i:
                merged["rows"].append(dict(r, part=names[i]))
    merged["suite"] = {"merged": [{"file": n, "date": p["date"], "methods": sorted(
        {m for (prec, m), (i, _) in owner.items() if i == k})} for k, (n, p) in enumerate(zip(names, parts))]}
    merged["notes"].append("Merged from " + "; ".join(
        f"{m['file']} ({m['date']}: {', '.join(m['methods']) or 'nothing kept'})" for m in merged["suite"]["merged"])
        + ". Each method's rows come from one run; comparisons between methods may span runs.")
    derive(merged)
    return merged


def _merge(files: list[str], out: str, tag: str | None, small: bool) -> int:
    parts = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                parts.append(json.load(f))
        except (OSError, ValueError) as e:
            raise BlockcacheError(f"cannot read results {path}: {one_line(e)}") from None
        if not isinstance(parts[-1], dict) or "rows" not in parts[-1]:
            raise BlockcacheError(f"{path} is not a benchmark result")
    results = merge_parts(parts, [os.path.basename(f) for f in files])
    finish(results, out, tag or "suite-merged", small)
    return 0


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the results (created)")
    p.add_argument("--tag", help="file name stem (default suite-<xl|small>-<device>[-parts])")
    p.add_argument("--small", action="store_true", help="shrink the model (28 blocks, width 64, 8×8 latents, 2 images)")
    p.add_argument("--device", default="auto", help="auto (default), cuda or cpu")
    p.add_argument("--steps", default="50,20", help="DDIM step counts to run: 50, 20 or both (default)")
    p.add_argument("--precision", default="bf16,fp16", help="bf16, fp16 or both (default); fp32 also accepted")
    p.add_argument("--repeats", type=int, help="timed calls per configuration (default 5; 3 with --small)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 2; 1 with --small)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave out torch.compile (the compiled baseline and the torch-inductor plans)")
    p.add_argument("--methods", metavar="LIST",
                   help="comma-separated subset of the methods (default: all; see blockcache-bench)")
    p.add_argument("--no-fewer-steps", action="store_true", help="leave out the equal-MACs fewer-steps DDIM runs")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode (default max-autotune)")
    p.add_argument("--plans", metavar="DIR", help="keep exported plans in DIR and reuse them in later runs")
    p.add_argument("--peers", metavar="LIST", help="peer settings side by side (blockcache-bench --peers; e.g. all), "
                   "at DDIM-<first of --steps>, with blockcache schedules matched to each")
    p.add_argument("--batch-size", type=int, metavar="B", help="images per batch (default 8; 2 with --small)")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's; 1 with --small on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="run nothing: merge the results (or .partial.json) of a suite split across runs")
    return p


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.merge:
        return _merge(args.merge, args.out, args.tag, args.small)
    steps = tuple(parse_numbers(args.steps, "--steps", int))
    precisions = tuple(split_list(args.precision))
    threads = args.threads
    if threads is None and args.small and args.device == "cpu":
        threads = 1  # tiny shapes: one thread is faster than a thrashing pool on a shared machine
    cfg = suite_config(small=args.small, device=args.device, steps=steps, precisions=precisions,
                       repeats=args.repeats, warmup=args.warmup, compile_full=not args.no_compile,
                       compile_mode=args.compile_mode, plans_dir=args.plans, threads=threads,
                       progress=not args.quiet, fewer_steps=not args.no_fewer_steps,
                       methods=split_list(args.methods) if args.methods else None,
                       peers=split_list(args.peers) if args.peers else (), batch_size=args.batch_size)
    cfg.check()
    device = torch_device(args.device)
    size = "small" if args.small else "xl"
    parts = "" if (set(steps), set(precisions)) == ({50, 20}, set(SUITE_PRECISIONS)) else \
        "-" + "-".join([f"ddim{s}" for s in steps] + list(precisions))
    parts += (f"-b{args.batch_size}" if args.batch_size else "") + ("-peers" if args.peers else "")
    tag = args.tag or f"suite-{size}-{device.replace(':', '')}{parts}"
    os.makedirs(args.out, exist_ok=True)
    partial = os.path.join(args.out, f"{tag}.partial.json")

    def save_partial(results):  # a run cut short (a time limit) still leaves every finished row
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=json_default)

    start = time.perf_counter()
    results = run_benchmark(cfg, on_row=save_partial)
    results["suite"] = {"small": args.small, "steps": list(steps), "precisions": list(precisions),
                        "wall_s": time.perf_counter() - start}
    finish(results, args.out, tag, args.small)
    if os.path.exists(partial):
        os.unlink(partial)
    return 1 if any(r["status"] == "error" for r in results["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
