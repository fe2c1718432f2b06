"""`blockcache-schedule`: schedules' own commands (schedules/cli.py, torch-free) plus the ones that run
a model, which live here so that `schedules` never imports the network code:

    blockcache-schedule analyze --model dit-digits --steps 50 [--labels 0,1,…] [--seeds 0,1] -o stats.npz [--png P]
    blockcache-schedule analyze --model pixart-alpha-512 --checkpoint transformer/ --prompt-embeds calib.npz …
    blockcache-schedule learn-l2c --model dit-digits --steps 20 [--lambda L] [--threshold θ] -o l2c.yaml
    blockcache-schedule learn-l2c --model pixart-alpha-512 … --sampler dpm-solver++-2m --prompt-embeds calib.npz -o l2c.yaml
    blockcache-schedule scale-shift --model dit-digits --schedule bc.yaml -o bc-ss.yaml
    blockcache-schedule calibrate --model dit-digits --steps 50 --method first-block --threshold 0.1 -o fbc.yaml
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from schedules import cli as schedule_cli
from schedules.errors import BlockcacheError, cli_main
from schedules.files import atomic_output, check_output
from schedules.options import add_model_args, add_weights_args, config_from_args, model_overrides, parse_labels
from schedules.sampling import GUIDANCE_CHANNELS, SAMPLERS, SPACINGS
from schedules.zoo import check_sampler, family_of, num_labels, takes_prompt


def build_parser():
    return schedule_cli.build_parser(add_model_commands)


def add_model_commands(sub) -> None:
    """The subcommands that run a model, added to `blockcache-schedule`'s subparsers."""

    def runs_model(name, help, what, sampler=True, seeds="0,1", channels=False):
        """A subcommand that samples the model: weights, sampler, the conditions it samples."""
        p = sub.add_parser(name, help=help)
        add_model_args(p)
        add_weights_args(p)
        if sampler:
            p.add_argument("--steps", type=int, required=True,
                           help="model evaluations (DDIM steps; twice the solver steps for dpm-solver-2)")
            p.add_argument("--spacing", choices=SPACINGS, help="DDIM timestep respacing (default linspace)")
        p.add_argument("--labels", help=f"comma-separated class labels {what} (default: 10 spread over the classes)")
        p.add_argument("--prompt-embeds", metavar="FILE",
                       help=f"text-to-image models (PixArt): the prompt embeddings {what} (.npz of "
                       "blockcache-encode-prompts), every prompt with every seed; its negative prompt guides")
        p.add_argument("--seeds", default=seeds, help=f"comma-separated noise seeds {what} (default {seeds})")
        p.add_argument("--guidance-scale", type=float, help="CFG scale (default: the family's, 4 for DiT, 0.4 "
                       "for U-ViT in its form, 4.5 for PixArt)")
        if channels:
            p.add_argument("--guidance-channels", choices=GUIDANCE_CHANNELS,
                           help="guidance form, as the plan will use it (default: the model family's)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        return p

    p = runs_model("analyze", "Block Caching's change analysis of a model (runs it eagerly)", "to sample",
                   channels=True)
    p.add_argument("-o", "--output", required=True, help="change statistics to write (.npz)")
    p.add_argument("--png", metavar="P", help="also draw a step × unit heatmap")

    p = runs_model("learn-l2c", "learn a Learning-to-Cache router (runs the model; only the router trains)",
                   "for trajectories")
    # = makers.learn_l2c.DEFAULT_LAMBDA, written out so that building the parser does not import torch
    p.add_argument("--lambda", dest="lam", type=float, default=1e-6,
                   help="weight of Σ scores per step: larger reuses more (default 1e-6)")
    p.add_argument("--threshold", type=float, default=0.5, help="compute a unit iff its score > θ (default 0.5)")
    p.add_argument("--data", choices=("trajectories", "digits"), default="trajectories",
                   help="training inputs: the model's own sampling trajectories (no data set needed, default) or "
                        "noised real digits (dit-digits only)")
    p.add_argument("--epochs", type=int, default=20, help="passes over all steps (default 20)")
    p.add_argument("--lr", type=float, default=0.05, help="router learning rate (default 0.05)")
    p.add_argument("-o", "--output", required=True, help="schedule YAML to write")
    p.add_argument("--router", help="raw router file (default: the output with .pt; a DDIM one imports with "
                   "import-l2c --every-step)")
    p.add_argument("--forecast-order", type=int, default=0, choices=range(3), metavar="K",
                   help="learn for reuse by TaylorSeer forecasts of order K (0-2; default 0: the last value)")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="the solver the schedule samples with (default: ddim where the family samples it, "
                        "else its own: dpm-solver-2 for U-ViT; dpm-solver++-2m for PixArt and DiT)")

    p = runs_model("scale-shift", "learn Block Caching's scale-shift for a schedule's reused units (distillation)",
                   "to train on", sampler=False, seeds="0,1,2,3")
    p.add_argument("--schedule", required=True, help="the schedule to correct (YAML)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the sampling run (default 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 0.001)")
    p.add_argument("--held-out-seed", type=int, default=1000, help="seed for the reported held-out error (default 1000)")
    p.add_argument("-o", "--output", required=True, help="corrected schedule YAML (tensors beside it)")

    p = runs_model("calibrate", "freeze a run-time cache's decisions (FirstBlockCache, MagCache, TeaCache) into "
                   "a span schedule by running its rule on calibration inputs", "to calibrate on", channels=True)
    p.add_argument("--method", required=True, choices=("first-block", "magcache", "teacache"),
                   help="whose decision rule runs (exporter/makers/calibrate.py cites each reference)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--threshold", type=float, help="the method's threshold")
    budget.add_argument("--target-speedup", type=float, metavar="X",
                        help="the smallest threshold whose schedule reaches this ideal (MAC) speedup")
    p.add_argument("--aggregate", choices=("any", "most"), default="any",
                   help="a step computes if any (default) or most calibration runs (one per seed) computed it")
    p.add_argument("-o", "--output", required=True, help="schedule YAML to write")

    p = runs_model("choose", "choose a schedule's reuse mode (unit or span) and forecast order (0-2): the one "
                   "closest to full compute on calibration inputs, at the schedule's MACs", "to calibrate on",
                   sampler=False, seeds="1,2", channels=True)
    p.add_argument("--schedule", required=True, help="the schedule whose compute pattern is kept (YAML)")
    p.add_argument("-o", "--output", required=True, help="schedule YAML to write")


def _check_scale(value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise BlockcacheError(f"--guidance-scale must be a finite non-negative number, got {value}")


def _load(args):
    """The model, its default sampler and the guidance scale (--guidance-scale or the family's)."""
    from .models import load_model

    model = load_model(args.model, args.checkpoint, random_init=args.random_init, seed=args.init_seed,
                       **model_overrides(args))
    family = family_of(model.config)
    return model, family.samplers[0], family.guidance_settings(args.guidance_scale)[0]


def _conditions(args, command: str):
    """(labels, prompts) to calibrate on, checked against the model's kind before any weights load:
    class labels (--labels or 10 spread over the classes) for a class model, the --prompt-embeds
    file's prompts (schedules.prompts.PromptInputs) for a text-to-image model."""
    config = config_from_args(args)
    if not takes_prompt(config):
        if args.prompt_embeds is not None:
            raise BlockcacheError(f"--prompt-embeds: {args.model} is class-conditional: it calibrates on --labels, "
                                  "not on prompts")
        return (parse_labels(args.labels) if args.labels else _default_labels(num_labels(config))), None
    if command in ("calibrate", "choose"):
        raise BlockcacheError(f"{command} does not run text-to-image models yet ({args.model} is one): make the "
                              "schedule with analyze and derive, learn-l2c or uniform")
    if args.labels:
        raise BlockcacheError(f"--labels: {args.model} is a text-to-image model: it calibrates on prompts "
                              "(--prompt-embeds FILE), not class labels")
    if args.prompt_embeds is None:
        raise BlockcacheError(f"{args.model} is a text-to-image model: give its calibration prompts with "
                              "--prompt-embeds FILE (written by blockcache-encode-prompts)")
    from schedules.prompts import NEGATIVE_EMBEDS, NEGATIVE_MASK, PROMPT_EMBEDS, PROMPT_MASK, PromptInputs, \
        load_prompt_embeds

    data = load_prompt_embeds(args.prompt_embeds)
    return None, PromptInputs(data[PROMPT_EMBEDS], data[PROMPT_MASK], data[NEGATIVE_EMBEDS], data[NEGATIVE_MASK])


def _default_labels(num_classes: int) -> list[int]:
    """10 labels spread over 0…num_classes − 1 (the labels a user may pass: U-ViT's null class is not one)."""
    n = min(10, num_classes)
    return [round(i * (num_classes - 1) / max(1, n - 1)) for i in range(n)]


def _learn_l2c(args) -> int:
    import torch

    from schedules.l2c import schedule_from_l2c
    from schedules.schedule import Schedule

    from .makers.learn_l2c import image_inputs, learn_router, router_logits, router_state, trajectory

    out = check_output(args.output, (".yaml", ".yml"), "-o")
    router = check_output(args.router or os.path.splitext(out)[0] + ".pt", (".pt", ".pth"), "--router")
    _check_scale(args.guidance_scale)
    if not 0 < args.threshold < 1:
        raise BlockcacheError(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.epochs < 1:
        raise BlockcacheError(f"--epochs must be positive, got {args.epochs}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise BlockcacheError(f"--lr must be a positive number, got {args.lr}")
    if not math.isfinite(args.lam) or args.lam < 0:
        raise BlockcacheError(f"--lambda must be a finite non-negative number, got {args.lam}")
    seeds = parse_labels(args.seeds, "--seeds")
    labels, prompts = _conditions(args, "learn-l2c")
    if prompts is not None and args.data == "digits":
        raise BlockcacheError("--data digits needs a 1-channel, 10-class model such as dit-digits")
    config = config_from_args(args)
    samplers = family_of(config).samplers
    sampler = args.sampler or ("ddim" if "ddim" in samplers else samplers[0])  # DDIM: what L2C published for DiT
    check_sampler(config, sampler, args.model)
    if args.data == "digits" and sampler != "ddim":
        raise BlockcacheError(f"--data digits noises real images to each step's timestep, which gives no {sampler} "
                              "carry: it learns DDIM routers only (use --data trajectories)")
    model, _, args.guidance_scale = _load(args)
    schedule = Schedule.full(model.unit_names, args.steps, args.spacing, model=args.model, sampler=sampler)
    if args.data == "digits":
        from .digits import load_digits_images

        if model.in_channels != 1 or model.num_classes != 10:
            raise BlockcacheError("--data digits needs a 1-channel, 10-class model such as dit-digits")
        images, labels = load_digits_images(model.config["input_size"])
        picked = np.random.default_rng(seeds[0]).choice(len(images), size=min(200, len(images)), replace=False)
        xs, y = image_inputs(schedule, images[picked], labels[picked], seeds[0])
        carries = None
    else:
        xs, carries, y = trajectory(model, schedule, labels, seeds, args.guidance_scale, prompts=prompts)
    logits, history = learn_router(model, schedule, xs, y, lam=args.lam, guidance_scale=args.guidance_scale,
                                   epochs=args.epochs, lr=args.lr, progress=not args.quiet, forecast=args.forecast_order,
                                   carries=carries)
    # schedule_from_l2c writes DDIM rows (import-l2c's files); the rows are the schedule's evaluations
    learned = schedule_from_l2c(router_logits(logits), model.unit_names, args.steps, threshold=args.threshold,
                                spacing=schedule.sampler["spacing"] if sampler == "ddim" else "linspace",
                                model=args.model, every_step=True,
                                source=f"learn-l2c lambda={args.lam:g} threshold={args.threshold:g} data={args.data}")
    learned = dataclasses.replace(learned, sampler=dict(schedule.sampler), forecast=args.forecast_order)
    with atomic_output(router, ".pt") as tmp:
        torch.save(router_state(logits), tmp)
    schedule_cli.write_schedule(learned, out)
    s = schedule_cli.stats(model.config, learned)
    print(f"wrote {out} and {router}: loss {history['loss'][0]:.3e} → {history['loss'][-1]:.3e} (MSE "
          f"{history['mse'][-1]:.3e}) over {args.epochs} epochs; "
          f"{s['skipped_share']:.1%} of units reused, ideal speedup {s['ideal_speedup']:.3f}x")
    return 0


def _scale_shift(args) -> int:
    from schedules.schedule import Schedule

    from .makers.scale_shift import distillation_error, learn_scale_shift
    from .reference import check_schedule

    out = check_output(args.output, (".yaml", ".yml"), "-o")
    _check_scale(args.guidance_scale)
    if args.epochs < 1:
        raise BlockcacheError(f"--epochs must be positive, got {args.epochs}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise BlockcacheError(f"--lr must be a positive number, got {args.lr}")
    if args.held_out_seed < 0:
        raise BlockcacheError(f"--held-out-seed must be non-negative, got {args.held_out_seed}")
    seeds = parse_labels(args.seeds, "--seeds")
    schedule = Schedule.load(args.schedule)
    labels, prompts = _conditions(args, "scale-shift")
    if args.held_out_seed in seeds:
        raise BlockcacheError(f"--held-out-seed {args.held_out_seed} is one of the training seeds")
    model, _, args.guidance_scale = _load(args)
    check_schedule(model, schedule)
    corrected, history = learn_scale_shift(model, schedule, labels, seeds, prompts=prompts,
                                           guidance_scale=args.guidance_scale, epochs=args.epochs, lr=args.lr,
                                           progress=not args.quiet)
    plain = dataclasses.replace(schedule, scale_shift={})
    before = distillation_error(model, plain, labels, [args.held_out_seed], args.guidance_scale, prompts=prompts)
    after = distillation_error(model, corrected, labels, [args.held_out_seed], args.guidance_scale, prompts=prompts)
    schedule_cli.write_schedule(corrected, out)
    print(f"wrote {out}: training error {history[0]:.3e} → {history[-1]:.3e}; held-out seed "
          f"{args.held_out_seed}: {before:.3e} without scale-shift, {after:.3e} with")
    return 0


def _calibrate(args) -> int:
    from schedules.schedule import Schedule

    from .makers.calibrate import calibrated_schedule, search_threshold

    out = check_output(args.output, (".yaml", ".yml"), "-o")
    _check_scale(args.guidance_scale)
    for name, value, low in (("--threshold", args.threshold, 0), ("--target-speedup", args.target_speedup, 1)):
        if value is not None and (not math.isfinite(value) or value < low):
            raise BlockcacheError(f"{name} must be a finite number >= {low}, got {value}")
    seeds = parse_labels(args.seeds, "--seeds")
    labels, _ = _conditions(args, "calibrate")
    model, sampler, args.guidance_scale = _load(args)
    if sampler != "ddim":
        raise BlockcacheError(f"calibrate freezes DDIM schedules; {args.model} samples with {sampler}")
    full = Schedule.full(model.unit_names, args.steps, args.spacing, model=args.model)
    options = dict(guidance_scale=args.guidance_scale, guidance_channels=args.guidance_channels,
                   aggregate=args.aggregate)
    if args.target_speedup is not None:
        schedule = search_threshold(model, full, args.method, args.target_speedup, labels, seeds, **options)
    else:
        schedule, _ = calibrated_schedule(model, full, args.method, args.threshold, labels, seeds, **options)
    schedule_cli.write_schedule(schedule, out)
    s = schedule_cli.stats(model.config, schedule)
    print(f"wrote {out}: {schedule.source}; {s['cached_steps']} of {s['steps']} steps reuse a span, ideal "
          f"speedup {s['ideal_speedup']:.3f}x")
    return 0


def _choose(args) -> int:
    from schedules.schedule import Schedule

    from .makers.choose import choose_reuse
    from .reference import check_schedule

    out = check_output(args.output, (".yaml", ".yml"), "-o")
    _check_scale(args.guidance_scale)
    seeds = parse_labels(args.seeds, "--seeds")
    schedule = Schedule.load(args.schedule)
    labels, _ = _conditions(args, "choose")
    model, _, args.guidance_scale = _load(args)
    check_schedule(model, schedule)
    chosen, table = choose_reuse(model, schedule, labels, seeds, args.guidance_scale, args.guidance_channels)
    for row in table:
        print(f"reuse {row['reuse']:>4}, forecast order {row['forecast']}: MSE {row['mse']:.4g} against full compute")
    schedule_cli.write_schedule(chosen, out)
    print(f"wrote {out}: {chosen.source}")
    return 0


def _analyze(args) -> int:
    from schedules.change import save_change
    from schedules.plot import change_heatmap
    from schedules.schedule import Schedule

    from .makers.analyze import measure_change

    check_output(args.output, (".npz",), "-o")
    if args.png:
        check_output(args.png, (".png",), "--png")
    _check_scale(args.guidance_scale)
    seeds = parse_labels(args.seeds, "--seeds")
    labels, prompts = _conditions(args, "analyze")
    model, sampler, args.guidance_scale = _load(args)
    schedule = Schedule.full(model.unit_names, args.steps, args.spacing, model=args.model, sampler=sampler)
    change = measure_change(model, schedule, labels, seeds, prompts=prompts, guidance_scale=args.guidance_scale,
                            guidance_channels=args.guidance_channels, progress=not args.quiet)
    save_change(args.output, change=change, unit_names=model.unit_names,
                timesteps=schedule.make_sampler().timesteps, sampler=schedule.sampler, config=model.config,
                model=args.model, labels=labels or [], seeds=seeds, guidance_scale=args.guidance_scale)
    if args.png:
        change_heatmap(change, args.png, title=f"{args.model}, {args.steps} steps: relative L1 change per unit")
    conditions = f"{len(labels)} labels" if prompts is None else f"{len(prompts)} prompts"
    print(f"wrote {args.output}: {conditions} × {len(seeds)} seeds, {args.steps} steps; mean change "
          f"{float(change[1:].mean()):.4f}" + (f"; heatmap {args.png}" if args.png else ""))
    return 0


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "analyze":
        return _analyze(args)
    if args.command == "learn-l2c":
        return _learn_l2c(args)
    if args.command == "scale-shift":
        return _scale_shift(args)
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "choose":
        return _choose(args)
    return schedule_cli.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
