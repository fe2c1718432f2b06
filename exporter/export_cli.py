"""`blockcache-export`: model + schedule → plan folder (trace once, derive variants, write atomically)."""

from __future__ import annotations

import math
import sys
import time

from runtime.plan import names
from schedules.errors import CLI_FLAGS, BlockcacheError, ParameterError, cli_main
from schedules.options import ArgumentParser, add_model_args, add_weights_args, model_overrides, parse_numbers
from schedules.sampling import GUIDANCE_CHANNELS
from schedules.schedule import Schedule
from schedules.zoo import takes_prompt


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="blockcache-export", description=__doc__)
    add_model_args(p)
    add_weights_args(p, seed_flag="--seed")
    p.add_argument("--schedule", required=True, action="append", metavar="F",
                   help="caching schedule YAML; repeat for a plan with several (one per step count)")
    p.add_argument("--out", required=True, metavar="DIR", help="plan folder (replaced atomically if it is a plan)")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--batch-size", type=int, metavar="B", help="images per run (default 1)")
    sizes.add_argument("--batch-sizes", metavar="LIST", help="comma-separated batch sizes, e.g. 1,2,4,8: a program "
                       "for each (and each schedule), the model traced once per batch size, the weights stored once")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--guidance-scale", type=float, metavar="G",
                   help="default classifier-free guidance scale stored in the plan (default: the family's, "
                        "4.0 for DiT, 0.4 for U-ViT in its form)")
    g.add_argument("--no-guidance", action="store_true", help="no doubled CFG batch in the graphs")
    p.add_argument("--guidance-channels", choices=GUIDANCE_CHANNELS,
                   help="guidance form (default: the family's, first3 for DiT, uvit for U-ViT)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                   help="onnxruntime (default: ONNX graphs only) or tensorrt (also one engine per variant)")
    p.add_argument("--precision", default="fp32", help="fp32 (default) or fp16 (norms and the update stay fp32); "
                   "bf16 too with --backend tensorrt")
    trt = p.add_argument_group("tensorrt (with --backend tensorrt)")
    trt.add_argument("--workspace", metavar="SIZE", help="builder workspace limit, e.g. 4G (default: TensorRT's)")
    trt.add_argument("--timing-cache", metavar="P", help="tactic timing cache file, read if present and updated")
    trt.add_argument("--opt-level", type=int, metavar="N",
                     help="builder optimisation level 0…5 (TensorRT's default 3)")
    p.add_argument("--vae", metavar="PATH", help="the autoencoder (a diffusers AutoencoderKL folder, or one file in "
                   "latent diffusion's layout, e.g. U-ViT's autoencoder_kl.pth): its decoder joins the plan, which "
                   "then yields uint8 images (fp32 at every precision)")
    p.add_argument("--no-prologue", action="store_true", help="text-to-image models: encode the prompt in every "
                   "step graph instead of once per call in a prologue graph (the same result, more work: for "
                   "comparison)")
    p.add_argument("--verify", action="store_true", help="check every variant against the eager model")
    p.add_argument("--tolerance", type=float, help="--verify tolerance, relative to the max abs value "
                   "(default 1e-4 fp32, 2e-2 fp16 against the fp32 model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_main(flags={**CLI_FLAGS, "seed": "--seed"})  # this CLI names the random weights' seed --seed
def main(argv=None):
    args = build_parser().parse_args(argv)
    settings = engine_settings(args)  # fails at once, in one line, where TensorRT is missing
    from runtime.plan import load_plan
    from runtime.plan.staging import check_destination

    from .export import export_plans
    from .models import load_model

    if settings is None and args.precision not in names.STORED_PRECISIONS:
        raise ParameterError("precision", f"{{name}} {args.precision!r} is not supported (available: "
                             f"{', '.join(names.STORED_PRECISIONS)})")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise BlockcacheError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise BlockcacheError(f"--tolerance must be a positive number, got {args.tolerance}")
    if args.tolerance is not None and not args.verify:
        raise BlockcacheError("--tolerance is the tolerance of --verify: add --verify")
    check_destination(args.out)  # before loading and tracing the model
    schedules = [Schedule.load(path) for path in args.schedule]
    batch_sizes = parse_numbers(args.batch_sizes, "--batch-sizes") if args.batch_sizes else [args.batch_size or 1]
    model = load_model(args.model, args.checkpoint, random_init=args.random_init, seed=args.init_seed,
                       **model_overrides(args))
    if args.no_prologue and not takes_prompt(model.config):
        raise BlockcacheError(f"--no-prologue is for text-to-image models; {args.model} takes class labels")
    decoder = None
    if args.vae:
        from .vae import load_decoder

        decoder = load_decoder(args.vae)
    start = time.perf_counter()
    report = []

    def verify(folder: str, manifest: dict) -> dict:
        """--verify, run on the finished plan before it replaces --out: a failure leaves --out as it was."""
        from .verify import DEFAULT_TOLERANCE, verify_plan

        tolerance = args.tolerance or DEFAULT_TOLERANCE[manifest["precision"]]
        report.extend(verify_plan(model, load_plan(folder), tolerance, decoder=decoder))
        return manifest

    finish = verify if args.verify else None
    precision = args.precision
    if settings is not None:
        from .engines import engine_stage

        finish, precision = engine_stage(settings, progress=not args.quiet, then=finish), settings.onnx_precision
    manifest = export_plans(model, schedules, args.out, batch_sizes=batch_sizes, guidance_scale=args.guidance_scale,
                            guidance=False if args.no_guidance else None, guidance_channels=args.guidance_channels,
                            precision=precision, progress=not args.quiet, finish=finish, decoder=decoder,
                            prologue=not args.no_prologue)
    elapsed = time.perf_counter() - start
    print(summary(args.out, manifest, elapsed))
    if report:
        from .verify import verify_summary

        print(verify_summary(report))
    return 0


def engine_settings(args):
    """EngineSettings for --backend tensorrt (after checking that TensorRT imports), else None; the
    TensorRT-only options are refused without it."""
    if args.backend != "tensorrt":
        for flag, value in (("--workspace", args.workspace), ("--timing-cache", args.timing_cache),
                            ("--opt-level", args.opt_level)):
            if value is not None:
                raise BlockcacheError(f"{flag} is a TensorRT build option: add --backend tensorrt")
        if args.precision == "bf16":
            raise BlockcacheError("precision bf16 needs --backend tensorrt (ONNX Runtime plans are fp32 or fp16)")
        return None
    from runtime.backends.tensorrt import import_tensorrt

    from .engines import EngineSettings, parse_size

    import_tensorrt()
    return EngineSettings(precision=args.precision, workspace=parse_size(args.workspace),
                          timing_cache=args.timing_cache, opt_level=args.opt_level)


def summary(out: str, manifest: dict, seconds: float) -> str:
    from runtime.plan.manifest import program_entries

    files = manifest["files"]
    programs = [entry for _, entry in program_entries(manifest)]
    graphs = sum(v["graph_bytes"] for p in programs for v in p["variants"])
    each = "; ".join(f"batch {p['batch_size']} × {len(p['steps'])} steps: {len(p['variants'])} variants, MACs/image "
                     f"{p['macs_per_image']['scheduled'] / 1e9:.3g} G of {p['macs_per_image']['full'] / 1e9:.3g} G "
                     f"full, ideal speedup {p['macs_per_image']['ideal_speedup']:.2f}x" for p in programs)
    text = (f"wrote {out} in {seconds:.1f} s: {each} (graphs {graphs / 1e6:.2f} MB, weights "
            f"{files[names.WEIGHTS]['size'] / 1e6:.1f} MB stored once)")
    if "prologue" in programs[0]["macs_per_image"]:
        text += (f"; the prompt encoded once per call in a prologue graph "
                 f"({programs[0]['macs_per_image']['prologue'] / 1e9:.3g} GMACs/image)")
    if manifest.get("decoder"):
        text += f"; images decoded in the plan (scaling factor {manifest['decoder']['scaling_factor']:g})"
    trt = manifest.get("tensorrt")
    if trt:
        engines = [e for p in programs for e in p.get("engines") or []]
        size = sum(files[e["file"]]["size"] for e in engines)
        baked = max(e["baked_bytes"] for e in engines)
        text += (f"; {len(engines)} TensorRT {trt['precision']} engines ({size / 1e6:.1f} MB; "
                 f"weights bound as inputs, {trt['weights_bytes'] / 1e6:.1f} MB held once, "
                 f"≤ {baked / 1e6:.2f} MB baked per engine)")
    return text


if __name__ == "__main__":
    sys.exit(main())
