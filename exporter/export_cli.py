"""`blockcache-export`: model + schedule → plan folder (trace once, derive variants, write atomically)."""

from __future__ import annotations

import math
import sys
import time

from schedules.errors import BlockcacheError, cli_main
from schedules.options import ArgumentParser, add_model_args, add_weights_args, model_overrides
from schedules.sampling import GUIDANCE_CHANNELS
from schedules.schedule import Schedule


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="blockcache-export", description=__doc__)
    add_model_args(p)
    add_weights_args(p, seed_flag="--seed")
    p.add_argument("--schedule", required=True, metavar="F", help="caching schedule YAML")
    p.add_argument("--out", required=True, metavar="DIR", help="plan folder (replaced atomically if it is a plan)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="images per run (default 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--guidance-scale", type=float, default=4.0, metavar="G",
                   help="default classifier-free guidance scale stored in the plan (default 4.0)")
    g.add_argument("--no-guidance", action="store_true", help="no doubled CFG batch in the graphs")
    p.add_argument("--guidance-channels", choices=GUIDANCE_CHANNELS, default="first3")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime (default)")
    p.add_argument("--precision", default="fp32", help="fp32 (default) or fp16 (norms and the update stay fp32)")
    p.add_argument("--verify", action="store_true", help="check every variant against the eager model")
    p.add_argument("--tolerance", type=float, help="--verify tolerance, relative to the max abs value "
                   "(default 1e-4 fp32, 2e-2 fp16 against the fp32 model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.backend != "onnxruntime":
        raise BlockcacheError(f"backend {args.backend!r} is not available for export (use onnxruntime)")
    from .export import PRECISIONS, export_plan
    from .models import load_model

    if args.precision not in PRECISIONS:
        raise BlockcacheError(f"precision {args.precision!r} is not supported (available: {', '.join(PRECISIONS)})")
    if not math.isfinite(args.guidance_scale):
        raise BlockcacheError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    schedule = Schedule.load(args.schedule)
    model = load_model(args.model, args.checkpoint, random_init=args.random_init, seed=args.init_seed,
                       **model_overrides(args))
    start = time.perf_counter()
    manifest = export_plan(model, schedule, args.out, batch_size=args.batch_size,
                           guidance_scale=1.0 if args.no_guidance else args.guidance_scale,
                           guidance_channels=args.guidance_channels, precision=args.precision,
                           progress=not args.quiet)
    elapsed = time.perf_counter() - start
    print(summary(args.out, manifest, elapsed))
    if args.verify:
        from .verify import DEFAULT_TOLERANCE, verify_plan, verify_summary

        tolerance = args.tolerance or DEFAULT_TOLERANCE[args.precision]
        print(verify_summary(verify_plan(model, args.out, manifest, tolerance)))
    return 0


def summary(out: str, manifest: dict, seconds: float) -> str:
    files = manifest["files"]
    graphs = sum(v["graph_bytes"] for v in manifest["variants"])
    macs = manifest["macs_per_image"]
    return (f"wrote {out} in {seconds:.1f} s: {len(manifest['steps'])} steps, {len(manifest['variants'])} variants "
            f"(graphs {graphs / 1e6:.2f} MB, weights {files['weights.bin']['size'] / 1e6:.1f} MB stored once), "
            f"MACs/image {macs['scheduled'] / 1e9:.3g} G of {macs['full'] / 1e9:.3g} G full, "
            f"ideal speedup {macs['ideal_speedup']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
