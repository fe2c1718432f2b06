"""The Ray Serve application of `blockcache-serve`: one deployment per plan behind one ingress.

    ingress (HTTP: /v1/samples, /v1/plans, /healthz) ──handle──► plan deployment "plan-<name>"
                                                                  (replicas, each one runtime.Sampler)

A replica checks each request alone with its Sampler (so a bad one never joins a batch), cuts it into
chunks of at most the plan's largest batch size, and hands the chunks to Ray's `@serve.batch`, which
gathers chunks of concurrent requests up to that many images (`batch_size_fn` counts images, not
requests) or until the batch wait ends. A gathered batch runs as one Sampler call per (steps,
guidance) it holds, each on its own execution context; the Sampler splits it over the compiled batch
sizes and pads the rest. Every image comes from its own seed, so it is the same whatever it was batched
with (bit-identical at the same compiled batch size; the README gives the bound across sizes).

This module and serve/cli.py are the only ones that import Ray (an import-linter contract).
`build_app(args)` is also Ray Serve's application builder for `serve run` and `serve deploy`
(docs/serve.yaml).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response

from runtime import Sampler
from runtime.plan import load_plan
from schedules.errors import BlockcacheError, one_line

from . import api

APP_NAME = "blockcache"
logger = logging.getLogger("ray.serve.blockcache")  # under Ray Serve's logger: its files and levels
MS_BUCKETS = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


@dataclass(frozen=True)
class Options:
    """How every plan of the app is served (the CLI's flags; serve.yaml's `args`)."""
    replicas: int | str = 1  # a count, or "auto": Ray Serve's autoscaling
    max_replicas: int | None = None  # autoscaling's ceiling (default: the cluster's GPUs, or CPUs / replica)
    contexts: int = 1  # Sampler execution contexts per replica: batches that run at once
    threads: int = 1  # ONNX Runtime intra-op threads per context (1: images do not depend on the batch)
    max_batch_wait_ms: float = 10.0  # how long a batch waits for more requests after its first
    backend: str = "auto"
    device: str = "auto"  # auto: a GPU per replica where the cluster has GPUs, else CPU
    log_level: str = "INFO"

    def __post_init__(self):
        if self.replicas != "auto" and (isinstance(self.replicas, bool) or not isinstance(self.replicas, int)
                                        or not 1 <= self.replicas <= 1024):
            raise BlockcacheError(f"replicas must be 1…1024 or 'auto', got {self.replicas!r}")
        for name, value in (("max_replicas", self.max_replicas), ("contexts", self.contexts),
                            ("threads", self.threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024):
                raise BlockcacheError(f"{name} must be an integer in 1…1024, got {value!r}")
        wait = self.max_batch_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 60_000:
            raise BlockcacheError(f"max_batch_wait_ms must be a number of milliseconds in 0…60000, got {wait!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise BlockcacheError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not isinstance(self.log_level, str) or self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise BlockcacheError(f"log level must be debug, info, warning or error, got {self.log_level!r}")


@dataclass(frozen=True)
class Chunk:
    """Part of one request that fits one compiled batch: what `@serve.batch` gathers."""
    labels: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int | None
    guidance_scale: float | None
    arrived: float  # time.monotonic() when the replica queued it


@dataclass
class Result:
    """A replica's answer to one request: the array, or the one-line reason it was refused."""
    array: np.ndarray | None = None
    error: str | None = None
    run_sizes: tuple[int, ...] = ()  # per image: the compiled batch size it ran at
    batch_images: tuple[int, ...] = ()  # per image: images its Serve batch gathered
    replica: str = ""


def images_in(chunks) -> int:
    return sum(len(c.labels) for c in chunks)


class PlanReplica:
    """One replica of a plan's deployment: a Sampler, and Ray's batching in front of it."""

    def __init__(self, name: str, path: str, options: Options, device: str):
        self.name = name
        self.sampler = Sampler(path, backend=options.backend, device=device, threads=options.threads,
                               contexts=options.contexts)
        self.replica = serve.get_replica_context().replica_id.unique_id
        costs = self.sampler.measure_batch_costs()  # 7 gathered images: one run of 8 where that is faster
        logger.info("plan %s: batch costs (ms per evaluation) %s", name,
                    {b: round(c * 1000, 2) for b, c in costs.items()})
        # Ray's batching, sized to this plan: up to its largest compiled batch, one batch per context
        self.wait_s = options.max_batch_wait_ms / 1000
        self.batched = serve.batch(max_batch_size=self.sampler.batch_size, batch_wait_timeout_s=self.wait_s,
                                   max_concurrent_batches=options.contexts, batch_size_fn=images_in)(self.run_batch)
        self.running: list[float] = []  # start times of the batches on the contexts now
        self.batch_s = None  # the last batch's duration
        tags = {"plan": name}
        self.images = Counter("blockcache_images", "images sampled", tag_keys=("plan",))
        self.padded = Counter("blockcache_padded_images", "padding rows run beside the images", tag_keys=("plan",))
        self.fill = Histogram("blockcache_batch_fill_ratio", "images a Serve batch gathered / the largest batch size",
                              boundaries=[0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0], tag_keys=("plan",))
        self.queue_wait = Histogram("blockcache_queue_wait_ms", "from a request's arrival at the replica to its "
                                    "batch's start", boundaries=MS_BUCKETS, tag_keys=("plan",))
        self.sampling = Histogram("blockcache_sampling_ms", "one batch's Sampler calls", boundaries=MS_BUCKETS,
                                  tag_keys=("plan",))
        for metric in (self.images, self.padded, self.fill, self.queue_wait, self.sampling):
            metric.set_default_tags(dict(tags))  # Ray adds its own tags to the dict it is given

    async def sample(self, request: api.SampleRequest) -> Result:
        try:  # alone first: a request the Sampler would refuse must not fail the batch it joins
            self.sampler.check(request.labels, seeds=request.seeds, guidance_scale=request.guidance_scale,
                               steps=request.steps)
        except BlockcacheError as e:
            return Result(error=one_line(e))
        size, now = self.sampler.batch_size, time.monotonic()
        self.batched.set_batch_wait_timeout_s(self.gather_s(now))
        chunks = [Chunk(request.labels[i: i + size], request.seeds[i: i + size], request.steps,
                        request.guidance_scale, now) for i in range(0, len(request.labels), size)]
        parts = await asyncio.gather(*(self.batched(c) for c in chunks))
        return Result(np.concatenate([p.array for p in parts]),
                      run_sizes=sum((p.run_sizes for p in parts), ()),
                      batch_images=sum((p.batch_images for p in parts), ()), replica=self.replica)

    def gather_s(self, now: float) -> float:
        """How long a batch begun now gathers requests. Ray forms the next batch while the contexts are
        still busy and then holds it until one is free, so a fixed short wait would cut it short: while
        every context runs, it gathers until the earliest is expected to end (from the last batch's
        time), never less than --max-batch-wait-ms."""
        if len(self.running) < self.sampler.contexts or self.batch_s is None:
            return self.wait_s
        return max(self.wait_s, min(self.running) + self.batch_s - now)

    async def run_batch(self, chunks: list[Chunk]) -> list[Result]:
        """One Serve batch: a Sampler call per (steps, guidance) it holds, run at once on the contexts."""
        start = time.monotonic()
        self.running.append(start)
        try:
            return await self.run_gathered(chunks, start)
        finally:
            self.running.remove(start)
            self.batch_s = time.monotonic() - start

    async def run_gathered(self, chunks: list[Chunk], start: float) -> list[Result]:
        total = images_in(chunks)
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(chunks):
            groups.setdefault((c.steps, c.guidance_scale), []).append(i)
        results: list[Result | None] = [None] * len(chunks)

        async def run(indices):
            first = chunks[indices[0]]
            labels = [v for i in indices for v in chunks[i].labels]
            seeds = [v for i in indices for v in chunks[i].seeds]
            out = await asyncio.to_thread(self.sampler, labels, seeds=seeds, steps=first.steps,
                                          guidance_scale=first.guidance_scale)
            runs = self.sampler.split(len(labels), first.steps)
            sizes = [b for b in runs for _ in range(b)][:len(labels)]  # only the last run is padded
            if sum(runs) > len(labels):  # a Ray counter takes positive steps only
                self.padded.inc(sum(runs) - len(labels))
            start_row = 0
            for i in indices:
                n = len(chunks[i].labels)
                results[i] = Result(out[start_row: start_row + n], run_sizes=tuple(sizes[start_row: start_row + n]),
                                    batch_images=(total,) * n)
                start_row += n
            return runs

        runs = await asyncio.gather(*(run(ix) for ix in groups.values()))
        took = (time.monotonic() - start) * 1000
        waits = [(start - c.arrived) * 1000 for c in chunks]
        self.images.inc(total)
        self.fill.observe(total / self.sampler.batch_size)
        self.sampling.observe(took)
        for wait in waits:
            self.queue_wait.observe(wait)
        logger.debug("plan %s: batch of %d images from %d chunks (fill %.2f), runs %s, queue wait up to %.1f ms, "
                     "sampled in %.1f ms", self.name, total, len(chunks), total / self.sampler.batch_size, runs,
                     max(waits), took)
        return results

    def check_health(self):  # Ray Serve's periodic replica check: a closed Sampler is a dead replica
        if self.sampler.closed:
            raise RuntimeError("the Sampler was closed")

    def __del__(self):
        sampler = getattr(self, "sampler", None)
        if sampler is not None:
            sampler.close()


class Ingress:
    """The HTTP front: parses and checks requests, routes them to their plan's deployment."""

    def __init__(self, plans: dict, handles: dict):
        self.plans, self.handles = plans, handles  # name → api.describe(…), name → DeploymentHandle
        self.requests = Counter("blockcache_requests", "HTTP requests answered", tag_keys=("route", "status"))

    async def __call__(self, request: Request) -> Response:
        route = request.url.path.rstrip("/") or "/"
        try:
            if route == "/v1/samples":
                response = await self.samples(request) if request.method == "POST" else self.refuse(405, "POST")
            elif route == "/v1/plans":
                response = self.json({"plans": list(self.plans.values())}) if request.method == "GET" else \
                    self.refuse(405, "GET")
            elif route == "/healthz":
                response = await self.health() if request.method == "GET" else self.refuse(405, "GET")
            else:
                response = Response(api.error_body(f"no route {route[:80]!r} (routes: POST /v1/samples, "
                                                   "GET /v1/plans, GET /healthz)"), 404, media_type="application/json")
        except api.RequestError as e:
            response = Response(e.body(), e.status, media_type="application/json")
        except Exception as e:  # a bug or a lost replica: one line to the client, the traceback to the log
            logger.exception("request to %s failed", route)
            response = Response(api.error_body(f"internal error ({type(e).__name__}): the service's log has the "
                                               "details"), 500, media_type="application/json")
        self.requests.inc(tags={"route": route if route in ("/v1/samples", "/v1/plans", "/healthz") else "other",
                                "status": str(response.status_code)})
        return response

    @staticmethod
    def json(document: dict, status: int = 200) -> Response:
        return Response(json.dumps(document).encode(), status, media_type="application/json")

    @staticmethod
    def refuse(status: int, method: str) -> Response:
        return Response(api.error_body(f"method not allowed: use {method}"), status, media_type="application/json",
                        headers={"Allow": method})

    async def samples(self, request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > api.MAX_BODY_BYTES):
            raise api.RequestError(413, f"the body may have at most {api.MAX_BODY_BYTES} bytes")
        body = b""
        async for part in request.stream():  # bounded as it arrives, whatever the header said
            body += part
            if len(body) > api.MAX_BODY_BYTES:
                raise api.RequestError(413, f"the body may have at most {api.MAX_BODY_BYTES} bytes")
        parsed = api.parse_sample_request(body, self.plans)
        result = await self.handles[parsed.plan].sample.remote(parsed)
        if result.error is not None:
            raise api.RequestError(400, result.error)
        content = await asyncio.to_thread(api.encode, result.array, parsed.format, parsed.labels, parsed.seeds)
        return Response(content, 200, media_type=api.FORMATS[parsed.format], headers={
            api.HEADER_SEEDS: api.header_list(parsed.seeds), api.HEADER_RUN_SIZES: api.header_list(result.run_sizes),
            api.HEADER_BATCH_IMAGES: api.header_list(result.batch_images), api.HEADER_REPLICA: result.replica})

    async def health(self) -> Response:
        """Ready when every plan deployment has replicas and all of them are running (loaded)."""
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(serve.get_replica_context().app_name)
        deployments = app.deployments if app else {}
        states = {name: {getattr(k, "value", str(k)): v for k, v in deployments[deployment_name(name)].replica_states.items()}
                  if deployment_name(name) in deployments else {} for name in self.plans}
        waiting = [name for name, s in states.items() if not s or set(s) != {"RUNNING"}]
        replicas = {name: s.get("RUNNING", 0) for name, s in states.items()}
        if waiting:
            return self.json({"error": f"not ready: plan {waiting[0]!r} has replicas {states[waiting[0]]}",
                              "replicas": replicas}, 503)
        return self.json({"status": "ready", "replicas": replicas})


def deployment_name(plan: str) -> str:
    return f"plan-{plan}"


def parse_plans(plans) -> dict[str, str]:
    """`NAME=PATH` or `PATH` (named by its folder) entries (a list, or one comma-separated string as
    `serve run serve.app:build_app plans=a=/p,b=/q` passes it), or a {name: path} mapping → {name: path}."""
    if isinstance(plans, str):
        plans = [p for p in plans.split(",") if p]
    if isinstance(plans, dict):
        pairs = list(plans.items())
    elif isinstance(plans, (list, tuple)) and plans:
        pairs = [p.split("=", 1) if "=" in p else (os.path.basename(os.path.normpath(p)), p) for p in plans]
    else:
        raise BlockcacheError("give at least one plan: PATH or NAME=PATH")
    out = {}
    for name, path in pairs:
        try:
            api.check_plan_name(name)
        except ValueError as e:
            raise BlockcacheError(str(e)) from None
        if name in out:
            raise BlockcacheError(f"two plans are named {name!r}: name them with NAME=PATH")
        out[name] = os.path.abspath(path)
    return out


def replica_resources(options: Options, gpus: float) -> tuple[dict, str]:
    """(Ray actor options, Sampler device) of a replica: a GPU each where asked for or the cluster has
    GPUs, else the CPUs its contexts' threads use."""
    if options.device == "cuda" or (options.device == "auto" and gpus > 0):
        return {"num_gpus": 1, "num_cpus": 1}, "cuda"
    return {"num_cpus": options.contexts * options.threads}, "cpu"


def scaling(options: Options, plan_batch: int, cluster: dict, actor: dict) -> dict:
    """num_replicas, or Ray Serve's autoscaling for `replicas="auto"`: 1 to max_replicas replicas
    (default: as many as the cluster's GPUs, or its CPUs, hold), aiming at one full batch per
    context in flight per replica; Ray's delays (upscale 30 s, downscale 600 s)."""
    if options.replicas != "auto":
        return {"num_replicas": options.replicas}
    if options.max_replicas is not None:
        ceiling = options.max_replicas
    elif "num_gpus" in actor:
        ceiling = max(1, int(cluster.get("GPU", 0)))
    else:
        ceiling = max(1, int(cluster.get("CPU", 1) // actor["num_cpus"]))
    return {"autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": ceiling,
                                   "target_ongoing_requests": plan_batch * options.contexts}}


def build_app(args: dict):
    """The application: {"plans": {name: path} or ["NAME=PATH" | "PATH", …], and any `Options` field}.
    Plans are described from their manifests here; each replica loads (and verifies) its plan."""
    import ray

    args = dict(args)
    plans = parse_plans(args.pop("plans", None))
    unknown = set(args) - set(Options.__dataclass_fields__)
    if unknown:
        raise BlockcacheError(f"unknown option {sorted(unknown)[0]!r} (options: plans, "
                              f"{', '.join(Options.__dataclass_fields__)})")
    options = Options(**args)
    cluster = ray.cluster_resources() if ray.is_initialized() else {}
    actor, device = replica_resources(options, cluster.get("GPU", 0))
    logging_config = {"log_level": options.log_level.upper(), "enable_access_log": options.log_level.upper() == "DEBUG"}
    infos, handles = {}, {}
    for name, path in plans.items():
        plan = load_plan(path, verify=False)  # the seal only: each replica checks every file as it loads
        infos[name] = api.describe(name, plan)
        batch = max(infos[name]["batch_sizes"])
        handles[name] = serve.deployment(PlanReplica).options(
            name=deployment_name(name), ray_actor_options=actor, logging_config=logging_config,
            # twice what its contexts run at once: the next batch gathers while one runs
            max_ongoing_requests=2 * batch * options.contexts, graceful_shutdown_timeout_s=10,
            **scaling(options, batch, cluster, actor)).bind(name, path, options, device)
    return serve.deployment(Ingress).options(
        name="ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096,
        logging_config=logging_config).bind(infos, handles)
