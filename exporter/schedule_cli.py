"""`blockcache-schedule`: schedules' own commands (schedules/cli.py, torch-free) plus the ones that run
a model, which live here so that `schedules` never imports the network code:

    blockcache-schedule analyze --model dit-digits --steps 50 [--labels 0,1,…] [--seeds 0,1] -o stats.npz [--png P]
"""

from __future__ import annotations

import math
import os

from schedules import cli as schedule_cli
from schedules.errors import BlockcacheError, cli_main
from schedules.options import add_model_args, add_weights_args, model_overrides, parse_labels
from schedules.sampling import SPACINGS


def build_parser():
    parser = schedule_cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # argparse keeps subparsers here
    p = sub.add_parser("analyze", help="Block Caching's change analysis of a model (runs it eagerly)")
    add_model_args(p)
    add_weights_args(p)
    p.add_argument("--steps", type=int, required=True, help="sampling steps")
    p.add_argument("--spacing", choices=SPACINGS, default="linspace", help="timestep respacing (default linspace)")
    p.add_argument("--labels", help="comma-separated class labels (default: 10 spread over the classes)")
    p.add_argument("--seeds", default="0,1", help="comma-separated noise seeds (default 0,1)")
    p.add_argument("--guidance-scale", type=float, default=4.0, help="CFG scale; <= 1 means none (default 4)")
    p.add_argument("-o", "--output", required=True, help="change statistics to write (.npz)")
    p.add_argument("--png", metavar="P", help="also draw a step × unit heatmap")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _analyze(args) -> int:
    from schedules.change import save_change
    from schedules.plot import change_heatmap
    from schedules.schedule import Schedule

    from .analyze import measure_change
    from .models import load_model

    if not args.output.endswith(".npz"):
        raise BlockcacheError(f"-o must end in .npz, got {args.output!r}")
    if args.png and not args.png.lower().endswith(".png"):
        raise BlockcacheError(f"--png must end in .png, got {args.png!r}")
    for path in filter(None, (args.output, args.png)):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise BlockcacheError(f"cannot write {path}: folder {folder} does not exist")
    if not math.isfinite(args.guidance_scale) or args.guidance_scale < 0:
        raise BlockcacheError(f"--guidance-scale must be a finite non-negative number, got {args.guidance_scale}")
    seeds = parse_labels(args.seeds, "--seeds")
    model = load_model(args.model, args.checkpoint, random_init=args.random_init, seed=args.init_seed,
                       **model_overrides(args))
    if args.labels:
        labels = parse_labels(args.labels)
    else:
        n = min(10, model.num_classes)
        labels = [round(i * (model.num_classes - 1) / max(1, n - 1)) for i in range(n)]
    schedule = Schedule.full(model.unit_names, args.steps, args.spacing, model=args.model)
    change = measure_change(model, schedule, labels, seeds, guidance_scale=args.guidance_scale,
                            progress=not args.quiet)
    save_change(args.output, change=change, unit_names=model.unit_names,
                timesteps=schedule.make_sampler().timesteps, sampler=schedule.sampler, config=model.config,
                model=args.model, labels=labels, seeds=seeds, guidance_scale=args.guidance_scale)
    if args.png:
        change_heatmap(change, args.png, title=f"{args.model}, {args.steps} steps: relative L1 change per unit")
    print(f"wrote {args.output}: {len(labels)} labels × {len(seeds)} seeds, {args.steps} steps; mean change "
          f"{float(change[1:].mean()):.4f}" + (f"; heatmap {args.png}" if args.png else ""))
    return 0


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "analyze":
        return _analyze(args)
    return schedule_cli.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
