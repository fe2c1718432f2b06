"""`blockcache-schedule`: make, import, inspect and draw caching schedules."""

from __future__ import annotations

import json

from .cost import stats
from .errors import BlockcacheError, cli_main
from .files import check_output
from .options import ArgumentParser, add_model_args, config_from_args
from .plot import heatmap, text_view
from .sampling import SAMPLERS, SPACINGS
from .forecast import MAX_ORDER
from .schedule import REUSE_MODES, Schedule
from .zoo import CONFIGS, check_sampler, family_of, model_config, unit_names


def build_parser(add_commands=None) -> ArgumentParser:
    """The parser of `blockcache-schedule`; `add_commands(subparsers)` adds more subcommands (the
    exporter adds those that run a model)."""
    parser = ArgumentParser(prog="blockcache-schedule", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    def maker(name, help):
        p = sub.add_parser(name, help=help)
        add_model_args(p)
        p.add_argument("--steps", type=int, required=True,
                       help="model evaluations (DDIM: sampling steps; dpm-solver-2: twice its solver steps)")
        p.add_argument("--sampler", choices=SAMPLERS, help="solver (default: the model family's: ddim for DiT, "
                       "dpm-solver-2 for U-ViT, dpm-solver++-2m for PixArt)")
        p.add_argument("--spacing", choices=SPACINGS + ("time-uniform",),
                       help="timestep spacing (default: linspace for ddim and dpm-solver++-2m, time-uniform for "
                       "dpm-solver-2)")
        p.add_argument("-o", "--output", required=True, help="schedule YAML to write")
        return p

    def reuse_args(p):
        p.add_argument("--reuse", choices=REUSE_MODES, default="unit",
                       help="what a reuse takes: each unit's output (unit, default) or, for DiT, the total "
                       "residual of every run of wholly reused blocks (span)")
        p.add_argument("--forecast-order", type=int, choices=range(MAX_ORDER + 1), metavar="K",
                       help=f"TaylorSeer forecast of order K (0…{MAX_ORDER}) from the last K + 1 computed values "
                       "instead of the last value (default 0)")

    maker("full", "compute every unit at every step")
    p = maker("uniform", "DeepCache/FORA: recompute all units every K-th step")
    p.add_argument("--interval", type=int, required=True, metavar="K")
    p.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="compute the first N steps, then step N + 1 and every K-th after it (diffusers' "
                   "TaylorSeer rule; default 0: steps 0, K, 2K, …)")
    reuse_args(p)
    p = maker("import-l2c", "import a Learning-to-Cache router file")
    p.add_argument("router", help="L2C router checkpoint (DDIM20_router.pt, …)")
    p.add_argument("--threshold", type=float, help="compute a unit iff sigmoid(logit) > θ (default: the published "
                   "0.1 for DDIM/DiT, 0.9 for DPM/U-ViT)")
    p.add_argument("--every-step", action="store_true",
                   help="threshold every step (learn-l2c routers) instead of the published odd-full/even-cached")

    p = sub.add_parser("derive", help="Block Caching: a schedule from `analyze` change statistics")
    p.add_argument("stats", help="change statistics (.npz written by `analyze`)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--delta", type=float, help="recompute a unit once its accumulated change exceeds δ")
    target.add_argument("--target-speedup", type=float, metavar="X", help="smallest δ with ideal speedup >= X")
    target.add_argument("--target-macs", type=float, metavar="F", help="smallest δ with MACs <= F of full compute")
    reuse_args(p)
    p.add_argument("-o", "--output", required=True, help="schedule YAML to write")

    p = sub.add_parser("stats", help="share of skipped units, MACs and ideal speedup")
    p.add_argument("schedule")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_args(p, required=False)
    p = sub.add_parser("show", help="text view and optional heatmap PNG")
    p.add_argument("schedule")
    p.add_argument("--png", metavar="P", help="write a step × unit heatmap")
    if add_commands is not None:
        add_commands(sub)
    return parser


def _config_for(schedule: Schedule, args) -> dict | None:
    """The model config for MACs: --model if given, else the schedule's own model if it is in the zoo."""
    if args.model:
        config = config_from_args(args)
    elif schedule.model in CONFIGS:
        config = model_config(schedule.model)
    else:
        return None
    schedule.check_units(unit_names(config), args.model or schedule.model)
    check_sampler(config, schedule.sampler["name"], args.model or schedule.model)
    return config


@cli_main
def main(argv=None):
    return run(build_parser().parse_args(argv))


def run(args) -> int:
    """Carry out parsed arguments (exporter.schedule_cli adds the commands that run a model)."""
    if args.command == "derive":
        return _derive(args)
    if args.command in ("full", "uniform", "import-l2c"):
        config = config_from_args(args)
        units = unit_names(config)
        sampler = args.sampler or family_of(config).samplers[0]
        check_sampler(config, sampler, args.model)
        if args.command == "full":
            schedule = Schedule.full(units, args.steps, args.spacing, model=args.model, sampler=sampler)
        elif args.command == "uniform":
            schedule = Schedule.uniform(units, args.steps, args.interval, args.spacing, model=args.model,
                                        sampler=sampler, warmup=args.warmup).with_reuse(args.reuse,
                                                                                         args.forecast_order)
        else:
            from .l2c import import_l2c

            schedule = import_l2c(args.router, units, args.steps, threshold=args.threshold, spacing=args.spacing,
                                  model=args.model, every_step=args.every_step, sampler=sampler)
        write_schedule(schedule, args.output)
        s = stats(config, schedule)
        print(f"wrote {args.output}: {s['steps']} {row_word(schedule.sampler)}s, {s['distinct_rows']} distinct rows, "
              f"{s['skipped_share']:.1%} of units reused, ideal speedup {s['ideal_speedup']:.2f}x")
        return 0
    if getattr(args, "png", None):
        check_output(args.png, (".png",), "--png")
    schedule = Schedule.load(args.schedule)
    if args.command == "stats":
        s = stats(_config_for(schedule, args), schedule)
        if args.json:
            print(json.dumps(s, indent=2))
        else:
            print(format_stats(s))
        return 0
    print(text_view(schedule))
    if args.png:
        heatmap(schedule, args.png)
        print(f"wrote {args.png}")
    return 0


def _derive(args) -> int:
    from .blockcaching import delta_schedule, search_delta
    from .change import load_change

    data = load_change(args.stats)
    config, units = data["config"], data["unit_names"]
    if args.delta is not None:
        schedule = delta_schedule(data["change"], args.delta, units, data["sampler"], data["model"])
    else:
        schedule = search_delta(data["change"], config, units, data["sampler"], target_speedup=args.target_speedup,
                                target_macs=args.target_macs, model=data["model"])
    write_schedule(schedule, args.output)
    s = stats(config, schedule)
    print(f"wrote {args.output} ({schedule.source}): {s['skipped_share']:.1%} of units reused, "
          f"ideal speedup {s['ideal_speedup']:.3f}x")
    return 0


def write_schedule(schedule: Schedule, path: str) -> None:
    try:
        schedule.save(path)
    except OSError as e:
        raise BlockcacheError(f"cannot write {path}: {e.strerror}") from None


def row_word(sampler: dict) -> str:
    """What a schedule row is called: a DDIM step, or a model evaluation (DPM-Solver-2 makes two per step)."""
    return "step" if sampler["name"] == "ddim" else "evaluation"


def format_stats(s: dict) -> str:
    step = row_word(s["sampler"])
    lines = [f"{step}s {s['steps']} ({s['sampler']['name']}, {s['sampler']['spacing']}), units {s['units']}, "
             f"distinct rows {s['distinct_rows']}",
             f"units reused: {s['skipped_share']:.1%} overall, {s['skipped_share_in_cached_steps']:.1%} in the "
             f"{s['cached_steps']} cached {step}s",
             "by kind: " + ", ".join(f"{k} {v:.1%}" for k, v in s["skipped_share_by_kind"].items())]
    if s.get("spans"):
        lines.append(f"spans: {s['spans']} skipped (their residual reused), {s['span_share']:.1%} of all units")
    if s.get("forecast_order"):
        lines.append(f"forecasts: TaylorSeer order {s['forecast_order']}, {s['forecast_reads']} reuses extrapolated "
                     f"from up to {s['forecast_order'] + 1} computed values (as many cache buffers per reused value)")
    if "ideal_speedup" in s:
        lines.append(f"MACs per image: full {s['macs_per_image_full'] / 1e9:.2f} G, scheduled "
                     f"{s['macs_per_image_scheduled'] / 1e9:.2f} G, ideal speedup {s['ideal_speedup']:.3f}x")
    if "prologue_saving" in s:
        lines.append(f"prologue (prompt work once per call, {s['prologue_macs_per_image'] / 1e9:.2f} G): scheduled "
                     f"{s['macs_per_image_scheduled_with_prologue'] / 1e9:.2f} G, {s['prologue_saving']:.3f}x fewer "
                     f"MACs, ideal speedup {s['ideal_speedup_with_prologue']:.3f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
