"""`blockcache-serve PLAN [PLAN…]`: serve plans over HTTP with Ray Serve (serve/app.py).

    blockcache-serve plans/l2c plans/fast=plans/l2c-fp16 --port 8000 --replicas 2
    blockcache-serve plans/l2c --address 10.0.0.1:6379      # join a cluster (`ray start --head` there)

Without `--address` it starts a local Ray instance and stops it on exit; with one it joins the
cluster and on exit deletes only its own application. SIGINT or SIGTERM shuts the application down
(replicas finish the batches they run, at most 10 s) and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from runtime.plan import load_plan
from schedules.errors import BlockcacheError, cli_main

from .api import describe
from .app import APP_NAME, Options, build_app, parse_plans, replica_resources


class Stop(BaseException):
    """SIGINT or SIGTERM while serving: unwinds to the shutdown."""


def _stop(signum, frame):
    raise Stop()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="blockcache-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("plans", nargs="+", metavar="PLAN", help="a plan folder, or NAME=FOLDER (default name: the folder's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", default="1", help="replicas per plan, or auto (Ray Serve autoscaling; README)")
    p.add_argument("--max-replicas", type=int, help="autoscaling's ceiling (default: the cluster's GPUs or CPUs)")
    p.add_argument("--max-batch-wait-ms", type=float, default=Options.max_batch_wait_ms,
                   help="how long a batch waits for more requests after its first (default %(default)s)")
    p.add_argument("--contexts", type=int, default=1, help="batches one replica runs at once (default 1)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per context on CPU (default 1)")
    p.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "torch", "tensorrt"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: one GPU per replica where the cluster has GPUs, else CPU")
    p.add_argument("--address", help="join this Ray cluster (host:port of `ray start --head`) instead of starting one")
    p.add_argument("--metrics-port", type=int, help="the local Ray instance's Prometheus port (Ray's and ours)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="replica log level; debug logs one line per batch and each request")
    args = p.parse_args(argv)
    if args.replicas != "auto":
        if not args.replicas.isdigit():
            p.error(f"--replicas must be a number or auto, got {args.replicas!r}")
        args.replicas = int(args.replicas)
    for flag in ("port", "metrics_port"):
        value = getattr(args, flag)
        if value is not None and not 1 <= value <= 65535:
            p.error(f"--{flag.replace('_', '-')} must be a port number 1…65535, got {value}")
    return args


def start_ray(args, options: Options, plans: int) -> bool:
    """Connect to `--address`, or start a local instance; whether this process started it."""
    import ray

    quiet = dict(logging_level=logging.WARNING, include_dashboard=False)
    if args.address:
        try:
            ray.init(address=args.address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:  # Ray's errors of a join, incl. authentication
            raise BlockcacheError(f"cannot join the Ray cluster at {args.address} ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0][:160]}); a cluster started with token "
                                  "authentication also needs RAY_AUTH_MODE=token and its token here") from None
        return False
    cores = os.cpu_count() or 1
    actor, _ = replica_resources(options, gpus=0)
    wanted = plans * (1 if options.replicas == "auto" else options.replicas) * actor.get("num_cpus", 1)
    if wanted > cores:
        print(f"warning: {wanted} replica CPUs asked on {cores} cores: replicas will share cores", file=sys.stderr)
    extra = {} if args.metrics_port is None else {"_metrics_export_port": args.metrics_port}
    ray.init(address="local", num_cpus=max(cores, wanted), **quiet, **extra)
    print(f"started a local Ray instance at {ray.get_runtime_context().gcs_address}", file=sys.stderr, flush=True)
    return True


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    options = Options(replicas=args.replicas, max_replicas=args.max_replicas, contexts=args.contexts,
                      threads=args.threads, max_batch_wait_ms=args.max_batch_wait_ms, backend=args.backend,
                      device=args.device, log_level=args.log_level)
    plans = parse_plans(args.plans)
    for name, path in plans.items():  # refused in one line before Ray starts
        describe(name, load_plan(path, verify=False))

    import ray
    from ray import serve

    started = start_ray(args, options, len(plans))
    signal.signal(signal.SIGTERM, _stop)  # ray.init installed its own; ours shuts down first
    signal.signal(signal.SIGINT, _stop)
    deploying = False  # from the moment serve.run is asked: a signal during it must still remove the app
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        application = build_app({"plans": plans, **vars(options)})
        deploying = True
        try:
            serve.run(application, name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # a replica failed to start: Ray's message, first line
            raise BlockcacheError(f"the application did not start: {str(e).strip().splitlines()[0][:300]}") from None
        print(f"serving {', '.join(plans)} at http://{args.host}:{args.port} (Ctrl-C or SIGTERM stops)",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except Stop:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one shutdown, however many signals follow
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        begun = time.monotonic()
        if started:
            serve.shutdown()
            ray.shutdown()
        else:
            if deploying:
                serve.delete(APP_NAME)
            ray.shutdown()
        print(f"stopped in {time.monotonic() - begun:.1f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
