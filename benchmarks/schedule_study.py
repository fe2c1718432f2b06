"""Quality at matched compute on `dit-digits`: does caching beat simply taking fewer steps?

    python -m benchmarks.schedule_study [--steps 20,50] [--targets 1.3,1.5,2] [--out benchmarks/results]

For each sampler (DDIM-N, linspace) and each target ideal speedup X (MACs of full compute / MACs of the
schedule), four ways to spend about 1/X of the compute:

- `fewer-steps`: full compute with M = round(N / X) DDIM steps.
- `uniform`: all-or-nothing steps (FORA/DeepCache generalised): the most evenly spread full steps
  whose speedup still reaches X, every unit reused in between.
- `block-caching`: Block Caching's δ rule on `analyze` statistics (seeds 1, 2; 10 classes), the
  smallest δ that reaches X.
- `block-caching+scale-shift`: the same schedule with Block Caching's scale-shift learned by
  distillation (seeds 1–4, 10 classes, `blockcache-schedule scale-shift` defaults).
- `learn-l2c`: one router per sampler learned on the model's own trajectories (seeds 1, 2; λ 1e-5 unless
  `--lambda`),
  thresholded at the θ that reaches X (consecutive reuse allowed).
- `first-block`, `magcache`, `teacache`: the run-time caches' rules frozen into span schedules on the
  analysis inputs (exporter/makers/calibrate.py), at the smallest threshold that reaches X.
- `<method>+<options>` for any of the cached methods but scale-shift: the same compute pattern with
  other reuse (`+span`, `+f1`, `+f2`, combinable, or `+auto`: the mode and order closest to full
  compute on the analysis inputs; benchmarks/bench/matched.py).

Each run samples 100 digits (10 per class) from seed-0 noise, which neither the analysis nor the
learner saw, and is scored against full compute with the same sampler and noise: PSNR (range 2),
class accuracy and digits-FD (benchmarks/digits_metric.py; all at N = 100, so comparable with each other).
Writes JSON, markdown, PNG.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from schedules.errors import BlockcacheError, cli_main
from schedules.options import ArgumentParser, parse_numbers

from .bench import RESULTS, json_default

METHODS = ("fewer-steps", "uniform", "block-caching", "block-caching+scale-shift", "learn-l2c", "first-block",
           "magcache", "teacache")
CALIBRATED = ("first-block", "magcache", "teacache")
MAKER_OF = {"uniform": "uniform", "block-caching": "block-caching", "learn-l2c": "l2c", "first-block": "first-block",
            "magcache": "magcache", "teacache": "teacache"}  # methods that take reuse options → matched maker
LAMBDA = 1e-5
ANALYSIS_SEEDS = (1, 2)
SCALE_SHIFT_SEEDS = (1, 2, 3, 4)
PER_CLASS = 10


def run_study(steps_list=(20, 50), targets=(1.3, 1.5, 2.0), lam: float = LAMBDA, progress: bool = True,
              methods=METHODS) -> dict:
    import torch

    from benchmarks import digits_metric as dm
    from exporter.makers.scale_shift import learn_scale_shift
    from exporter.models import load_model
    from exporter.reference import DEFAULT_GUIDANCE_SCALE, sample
    from schedules import Schedule
    from schedules.cost import ideal_speedup
    from schedules.sampling import initial_noise

    from .bench.matched import MatchedMaker

    torch.manual_seed(0)
    model = load_model("dit-digits")
    units, config = model.unit_names, model.config
    labels = np.repeat(np.arange(model.num_classes), PER_CLASS)
    noise = initial_noise((len(labels), 1, config["input_size"], config["input_size"]), 0)
    conditions = np.arange(model.num_classes)
    results = {"study": "matched-MACs schedule quality", "date": time.strftime("%Y-%m-%d %H:%M"), "model": "dit-digits",
               "guidance_scale": DEFAULT_GUIDANCE_SCALE, "samples": len(labels), "lambda": lam, "rows": []}

    def evaluate(method, steps, target, schedule, reference, seconds=None):
        start = time.perf_counter()
        images = sample(model, schedule, labels, noise)
        row = {"method": method, "steps": steps, "target": target, "schedule_steps": schedule.num_steps,
               "ideal_speedup": ideal_speedup(config, schedule) * steps / schedule.num_steps,
               "source": f"full compute, {schedule.num_steps} steps" if schedule.source == "full" else schedule.source,
               "psnr_db": float("inf") if reference is None else dm.psnr(images, reference),
               "class_accuracy": dm.class_accuracy(images, labels), "digits_fd": dm.frechet_distance(images),
               "sample_s": time.perf_counter() - start, "make_s": seconds}
        results["rows"].append(row)
        if progress:
            print(f"DDIM-{steps} {method:>13} target {target or 1:.2f}: ideal {row['ideal_speedup']:.3f}x, PSNR "
                  f"{row['psnr_db']:.1f} dB, acc {row['class_accuracy']:.2f}, FD {row['digits_fd']:.2f}", flush=True)
        return images

    for steps in steps_list:
        full = Schedule.full(units, steps, model="dit-digits")
        reference = evaluate("full", steps, None, full, None)
        makers = MatchedMaker(model, full, DEFAULT_GUIDANCE_SCALE, conditions, seeds=ANALYSIS_SEEDS, lam=lam)
        for target in targets:
            if "fewer-steps" in methods:
                fewer = Schedule.full(units, max(1, round(steps / target)), model="dit-digits")
                evaluate("fewer-steps", steps, target, fewer, reference)
            if "uniform" in methods:
                evaluate("uniform", steps, target, makers.make("uniform", target), reference)
            if {"block-caching", "block-caching+scale-shift"} & set(methods):
                bc = makers.make("block-caching", target)
                if "block-caching" in methods:
                    evaluate("block-caching", steps, target, bc, reference, makers.seconds["analyze"])
                if "block-caching+scale-shift" in methods:
                    start = time.perf_counter()
                    corrected, _ = learn_scale_shift(model, bc, conditions, SCALE_SHIFT_SEEDS)
                    evaluate("block-caching+scale-shift", steps, target, corrected, reference,
                             time.perf_counter() - start)
            if "learn-l2c" in methods:
                l2c = makers.make("l2c", target)
                evaluate("learn-l2c", steps, target, l2c, reference, makers.seconds["learn-l2c"])
            for method in [m for m in methods if m in CALIBRATED or "+" in m]:
                base, _, options = method.partition("+")
                start = time.perf_counter()
                try:
                    frozen = makers.make(MAKER_OF[base] + (f"+{options}" if options else ""), target)
                except BlockcacheError as e:  # e.g. first-block cannot skip its first block: a ceiling
                    results.setdefault("unreached", []).append(f"DDIM-{steps} {method} {target:g}x: {e}")
                    continue
                evaluate(method, steps, target, frozen, reference, time.perf_counter() - start)
    return results


def markdown(results: dict) -> str:
    lines = [f"# Schedule quality at matched compute (dit-digits), {results['date']}", "",
             f"{results['samples']} digits (10 per class, seed-0 noise), guidance {results['guidance_scale']:g}; "
             "PSNR against full compute with the same sampler and noise (range 2); digits-FD at N = 100 "
             "(biased upwards at this N: compare within the table). Ideal speedup = full-compute MACs of the "
             "sampler / the run's MACs.", "",
             "| sampler | target | method | ideal speedup | PSNR dB | class acc. | digits-FD | schedule |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        target = "–" if r["target"] is None else f"{r['target']:g}x"
        psnr = "exact" if not np.isfinite(r["psnr_db"]) else f"{r['psnr_db']:.1f}"
        lines.append(f"| DDIM-{r['steps']} | {target} | {r['method']} | {r['ideal_speedup']:.3f}x | {psnr} | "
                     f"{r['class_accuracy']:.2f} | {r['digits_fd']:.2f} | {r['source']} |")
    lines += [f"- not reached: {u}" for u in results.get("unreached", [])]
    lines += ["", "Which to pick: at each budget, the cached schedule closest to full compute beside fewer steps.", "",
              "| sampler | target | fewer steps PSNR dB | best schedule | its PSNR dB | margin dB |", "|---|---|---|---|---|---|"]
    for (steps, target), rows in _budgets(results).items():
        fewer = next((r for r in rows if r["method"] == "fewer-steps"), None)
        cached = [r for r in rows if r["method"] not in ("fewer-steps", "full")]
        if not cached:
            continue
        best = max(cached, key=lambda r: r["psnr_db"])
        f = f"{fewer['psnr_db']:.1f}" if fewer else "–"
        margin = f"{best['psnr_db'] - fewer['psnr_db']:+.1f}" if fewer else "–"
        lines.append(f"| DDIM-{steps} | {target:g}x | {f} | {best['method']} | {best['psnr_db']:.1f} | {margin} |")
    return "\n".join(lines) + "\n"


def _budgets(results: dict) -> dict:
    """{(steps, target): rows} of the rows with a target, in order."""
    out = {}
    for r in results["rows"]:
        if r["target"] is not None:
            out.setdefault((r["steps"], r["target"]), []).append(r)
    return out


def check_methods(methods) -> list[str]:
    """The study's methods, each known (a cached one may carry matched reuse options); one line otherwise."""
    from .bench.matched import OPTIONS

    def known(m):
        base, _, options = m.partition("+")
        return m in METHODS or (base in MAKER_OF and set(options.split("+")) <= set(OPTIONS))

    unknown = [m for m in methods if not known(m)]
    if unknown or not methods:
        raise BlockcacheError(f"--methods must be some of {', '.join(METHODS)} (cached ones optionally with "
                              f"+{', +'.join(OPTIONS)}), got {unknown or 'nothing'}")
    return list(methods)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_list = sorted({r["steps"] for r in results["rows"]})
    fig, axes = plt.subplots(2, len(steps_list), figsize=(5.5 * len(steps_list), 7), squeeze=False)
    for col, steps in enumerate(steps_list):
        for method in dict.fromkeys(r["method"] for r in results["rows"] if r["method"] != "full"):
            rows = [r for r in results["rows"] if r["steps"] == steps and r["method"] == method]
            x = [r["ideal_speedup"] for r in rows]
            style = "o--" if "+" in method else "o-"  # reuse options dashed beside their method
            axes[0][col].plot(x, [r["psnr_db"] for r in rows], style, label=method)
            axes[1][col].plot(x, [r["digits_fd"] for r in rows], style, label=method)
        full = next(r for r in results["rows"] if r["steps"] == steps and r["method"] == "full")
        axes[1][col].axhline(full["digits_fd"], color="grey", ls="--", lw=1, label="full compute")
        axes[0][col].set_title(f"DDIM-{steps}")
        axes[0][col].set_ylabel("PSNR vs full compute, dB")
        axes[1][col].set_ylabel("digits-FD (lower is better)")
        axes[1][col].set_xlabel("ideal speedup (MACs)")
        for ax in axes[:, col]:
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@cli_main
def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.schedule_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="20,50", help="DDIM step counts (default 20,50)")
    p.add_argument("--targets", default="1.3,1.5,2", help="target ideal speedups (default 1.3,1.5,2)")
    p.add_argument("--lambda", dest="lam", type=float, default=LAMBDA, help=f"learn-l2c λ (default {LAMBDA:g})")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, of {', '.join(METHODS)}; a cached one may carry reuse options, e.g. "
                   "block-caching+f1, uniform+span+f2, learn-l2c+auto")
    p.add_argument("--out", default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--tag", help="file name stem (default <date>-dit-digits-schedule-study)")
    args = p.parse_args(argv)
    steps = parse_numbers(args.steps, "--steps", int)
    if any(s < 2 or s > 1000 for s in steps):
        raise BlockcacheError(f"--steps must be between 2 and 1000, got {steps}")
    targets = parse_numbers(args.targets, "--targets", float)
    if any(not np.isfinite(t) or t <= 1 for t in targets):
        raise BlockcacheError(f"--targets must be speedups above 1, got {targets}")
    if not os.path.isdir(args.out):
        raise BlockcacheError(f"--out {args.out} is not a folder")
    if not np.isfinite(args.lam) or args.lam < 0:
        raise BlockcacheError(f"--lambda must be a finite non-negative number, got {args.lam}")
    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    results = run_study(steps, targets, args.lam, methods=methods)
    tag = args.tag or f"{time.strftime('%Y-%m-%d')}-dit-digits-schedule-study"
    base = os.path.join(args.out, tag)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=json_default)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(results))
    plot(results, base + ".png")
    print(markdown(results) + f"wrote {base}.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
