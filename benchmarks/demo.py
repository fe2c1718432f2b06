"""`make demo`: export the embedded digits model twice (full compute and a cached schedule), sample
a grid of all ten digits through the runtime, and print a one-line summary.

    python -m benchmarks.demo [--out out/demo] [--steps 50] [--interval 2] [--guidance-scale 4]
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from schedules import Schedule
from schedules.errors import BlockcacheError, cli_main
from schedules.images import save_samples
from schedules.options import ArgumentParser

PER_CLASS = 10


def timed(sampler, labels, seed) -> tuple[np.ndarray, float]:
    """One call, both plans alike (the plan's batch is the whole grid, so a warm-up would double
    the demo's run time; the benchmarks measure warm latency)."""
    start = time.perf_counter()
    out = sampler(labels, seed=seed)
    return out, time.perf_counter() - start


@cli_main
def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("out", "demo"), help="folder for the plans and the grid")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--interval", type=int, default=2, help="cached schedule: recompute every K-th step (default 2)")
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not np.isfinite(args.guidance_scale):
        raise BlockcacheError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")

    from benchmarks.digits_metric import class_accuracy
    from exporter.export import export_plan
    from exporter.models import load_model
    from runtime import Sampler

    model = load_model("dit-digits")  # the embedded, trained weights
    units = model.unit_names
    schedules = {"full": Schedule.full(units, args.steps, model="dit-digits"),
                 "cached": Schedule.uniform(units, args.steps, args.interval, model="dit-digits")}
    labels = np.repeat(np.arange(model.num_classes), PER_CLASS)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise BlockcacheError(f"cannot create {args.out}: {e.strerror}") from None
    results = {}
    for name, schedule in schedules.items():
        print(f"exporting the {name} plan ({schedule.source})…", file=sys.stderr)
        manifest = export_plan(model, schedule, os.path.join(args.out, f"plan-{name}"), batch_size=len(labels),
                               guidance_scale=args.guidance_scale)
        sampler = Sampler(os.path.join(args.out, f"plan-{name}"))
        images, seconds = timed(sampler, labels, args.seed)
        results[name] = dict(images=images, seconds=seconds, accuracy=class_accuracy(images, labels),
                             ideal=manifest["macs_per_image"]["ideal_speedup"], backend=sampler.backend_name)
    grid = os.path.join(args.out, "digits.png")
    save_samples(results["cached"]["images"], grid, rows=model.num_classes)
    full, cached = results["full"], results["cached"]
    print(f"demo: {len(labels)} digits (10 per class), DDIM-{args.steps}, guidance {args.guidance_scale:g}, "
          f"on {cached['backend']}: cached plan (recompute every {args.interval}) {cached['seconds']:.2f} s vs full "
          f"{full['seconds']:.2f} s = {full['seconds'] / cached['seconds']:.2f}x (ideal {cached['ideal']:.2f}x); "
          f"class accuracy {cached['accuracy']:.0%} (full {full['accuracy']:.0%}); grid {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
