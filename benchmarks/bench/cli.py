"""`blockcache-bench`'s command line: flags → `BenchConfig` → run → JSON, markdown and PNG."""

from __future__ import annotations

import os
import time

from schedules.errors import BlockcacheError, cli_main
from schedules.options import ArgumentParser, add_model_args, add_weights_args, model_overrides, parse_labels
from schedules.sampling import SPACINGS

from .config import METHODS, RESULTS, BenchConfig
from .harness import run_benchmark
from .report import markdown, write_results


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="blockcache-bench", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    add_weights_args(p)
    p.add_argument("--schedule", action="append", metavar="SPEC",
                   help="cached schedule (repeatable): l2c20, l2c50, uniform:K, FILE.yaml or ROUTER.pt (default l2c20)")
    p.add_argument("--steps", type=int, default=20, help="steps of uniform:K schedules (default 20)")
    p.add_argument("--spacing", choices=SPACINGS, default="linspace", help="spacing of uniform:K schedules")
    p.add_argument("--backends", default="eager,torch,onnxruntime", metavar="LIST",
                   help=f"comma-separated methods: {', '.join(METHODS)} (default eager,torch,onnxruntime)")
    p.add_argument("--precision", default="fp32", metavar="LIST", help="comma-separated: fp32, fp16, bf16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch-size", type=int, default=2, metavar="B", help="images per batch (default 2)")
    p.add_argument("--labels", help="comma-separated class labels, one per image (default: fixed classes)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--guidance-scale", type=float, default=4.0, metavar="G", help="CFG scale; <= 1: none")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    p.add_argument("--no-fewer-steps", action="store_true", help="skip the equal-MACs fewer-steps DDIM baseline")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode (default max-autotune)")
    p.add_argument("--bf16-plan", choices=("fp32", "fp16"), default="fp32",
                   help="stored plan precision that bf16 torch-backend runs cast from (default fp32)")
    p.add_argument("--plans", metavar="DIR", help="keep exported plans in DIR and reuse matching ones")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime")
    p.add_argument("--out", default=RESULTS, metavar="DIR", help="results folder (default benchmarks/results)")
    p.add_argument("--tag", help="file name stem (default <date>-bench-<model>-<device>)")
    p.add_argument("--peers", metavar="LIST",
                   help="comma-separated peer settings run on the same weights in diffusers' DiT (bench/peers.py): "
                        "compile, fbc:T, taylorseer:INTERVAL:ORDER, magcache:T, pab, fastercache, dbcache:PRESET, or all; "
                        "diffusers' own full compute is always added")
    p.add_argument("--matched", default="uniform,block-caching,l2c", metavar="LIST",
                   help="with --peers: blockcache schedules made to each peer's measured compute, by these makers "
                        "(uniform, block-caching, l2c, first-block, magcache, teacache: the last three calibrated "
                        "static versions of the run-time caches; each optionally with +span, +f1, +f2 or +auto, e.g. "
                        "l2c+f1: reuse options, bench/matched.py; default uniform,block-caching,l2c; none for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_results_folder(out: str, tag: str | None) -> None:
    """`out` is (or can become) a folder, and `tag` a plain file name stem inside it."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise BlockcacheError(f"--out {out} exists and is not a folder")
    if tag is not None and (not tag or os.path.basename(tag) != tag or tag in (".", "..")):
        raise BlockcacheError(f"--tag must be a plain file name stem, got {tag!r}")


def split_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def config_from_args(args) -> BenchConfig:
    return BenchConfig(
        model=args.model, overrides=model_overrides(args), checkpoint=args.checkpoint, random_init=args.random_init,
        init_seed=args.init_seed, schedules=args.schedule or ([] if args.peers else ["l2c20"]), steps=args.steps, spacing=args.spacing,
        methods=split_list(args.backends), precisions=split_list(args.precision), device=args.device,
        batch_size=args.batch_size, labels=parse_labels(args.labels) if args.labels else None, seed=args.seed,
        guidance_scale=args.guidance_scale, repeats=args.repeats, warmup=args.warmup,
        fewer_steps=not args.no_fewer_steps, compile_mode=args.compile_mode, bf16_plan=args.bf16_plan,
        plans_dir=args.plans, threads=args.threads, progress=not args.quiet,
        peers=split_list(args.peers) if args.peers else [],
        matched=[] if args.matched.strip() == "none" else split_list(args.matched))


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    cfg.check()
    check_results_folder(args.out, args.tag)  # before the benchmark runs, not after
    results = run_benchmark(cfg)
    tag = args.tag or f"{time.strftime('%Y-%m-%d')}-bench-{results['model']['name']}-{results['device']}"
    paths = write_results(results, args.out, tag)
    print(markdown(results), end="")
    print("wrote " + ", ".join(paths.values()))
    errors = [r for r in results["rows"] if r["status"] == "error"]
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
