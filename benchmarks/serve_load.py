"""blockcache-serve under load (issue 19's measurements; numbers, never timed tests).

    python -m benchmarks.serve_load [--out benchmarks/results] [--plan DIR] [--requests 64] [--seconds 60]

Starts `blockcache-serve` (a local Ray instance, localhost only) with 1 and then 2 replicas of one
plan (one ONNX Runtime thread and one context per replica), and drives it from this process with 1,
4 and 16 concurrent clients, each sending one-image requests (random label, own seed) back to back:
at most `--requests` requests per setting (at least 8 per client), and no new ones after
`--seconds`. Per setting: throughput (images/s over the wall time), latency p50 / p99 (client side),
the batch fill ratio (images a Serve batch gathered / the plan's largest batch size, averaged over
requests), the compiled batch sizes run, and the service's CPU time per image (every process of the
service and its Ray instance, from /proc).

Default plan: the embedded `dit-digits` with CFG, batch sizes 1, 2, 4 and 8 × DDIM-20 (uniform
caching, every 2nd step), exported once into a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from serve.client import Client

from . import write_json

CLIENTS = [1, 4, 16]
REPLICAS = [1, 2]
TICKS = os.sysconf("SC_CLK_TCK")


def export_default(folder: str) -> str:
    from exporter.export import export_plans
    from exporter.models import load_model
    from schedules import Schedule

    model = load_model("dit-digits")
    path = os.path.join(folder, "digits")
    export_plans(model, [Schedule.uniform(model.unit_names, 20, 2, model="dit-digits")], path,
                 batch_sizes=[1, 2, 4, 8])
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_processes(sid: int) -> list[int]:
    """The processes of session `sid`: blockcache-serve started in its own session, its local Ray
    instance (GCS, raylet, agents, actors, whatever names Ray gives them) included."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[3]) == sid:
                pids.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def service_cpu_seconds(sid: int) -> float:
    """User + system CPU time of every process of the service's session."""
    total = 0.0
    for pid in session_processes(sid):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


class Service:
    """blockcache-serve in its own session, stopped with SIGTERM."""

    def __init__(self, plan: str, replicas: int, log: str):
        self.port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "serve.cli", plan, "--port", str(self.port),
                                          "--replicas", str(replicas), "--threads", "1", "--contexts", "1",
                                          "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)
        self.client = Client(f"http://127.0.0.1:{self.port}", timeout=300)
        self.client.wait_ready(timeout=300)

    def stop(self) -> float:
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        return time.monotonic() - start


def drive(service: Service, clients: int, requests: int, seconds: float, largest: int, seed: int) -> dict:
    rng = random.Random(seed)
    work = [(rng.randrange(10), rng.randrange(2 ** 31)) for _ in range(max(requests, 8 * clients))]
    lock, answers = threading.Lock(), []
    deadline = time.monotonic() + seconds

    def client_loop(_):
        while time.monotonic() < deadline:
            with lock:
                if not work:
                    return
                label, s = work.pop()
            answer = service.client.samples([label], seeds=[s])
            with lock:
                answers.append(answer)

    cpu0, start = service_cpu_seconds(service.proc.pid), time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    wall = time.perf_counter() - start
    cpu = service_cpu_seconds(service.proc.pid) - cpu0
    latency = np.array([a.seconds for a in answers]) * 1000
    runs = [b for a in answers for b in a.run_sizes]
    return {"clients": clients, "requests": len(answers), "images": len(answers), "wall_s": round(wall, 2),
            "images_per_s": round(len(answers) / wall, 2), "p50_ms": round(float(np.percentile(latency, 50)), 1),
            "p99_ms": round(float(np.percentile(latency, 99)), 1),
            "fill_ratio": round(float(np.mean([a.batch_images[0] / largest for a in answers])), 3),
            "run_sizes": {str(b): runs.count(b) for b in sorted(set(runs))},
            "replicas_seen": len({a.replica for a in answers}),
            "service_cpu_s_per_image": round(cpu / len(answers), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--plan", help="a plan folder (default: dit-digits DDIM-20, batch sizes 1, 2, 4, 8)")
    p.add_argument("--requests", type=int, default=64, help="requests per setting (at least 8 per client)")
    p.add_argument("--seconds", type=float, default=60.0, help="no new requests after this long per setting")
    p.add_argument("--replicas", default=",".join(map(str, REPLICAS)))
    p.add_argument("--clients", default=",".join(map(str, CLIENTS)))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        plan = args.plan or export_default(tmp)
        rows, stops = [], {}
        for replicas in map(int, args.replicas.split(",")):
            service = Service(plan, replicas, os.path.join(tmp, f"serve-{replicas}.log"))
            try:
                described = service.client.plans()[0]
                largest = max(described["batch_sizes"])
                for _ in range(3):  # warm-up: first calls load lazily
                    service.client.samples([1], seeds=[0])
                for clients in map(int, args.clients.split(",")):
                    row = drive(service, clients, args.requests, args.seconds, largest, seed=clients)
                    row["replicas"] = replicas
                    rows.append(row)
                    print(row, file=sys.stderr, flush=True)
            finally:
                stops[str(replicas)] = round(service.stop(), 1)  # SIGTERM → exit, seconds
    result = {"date": time.strftime("%Y-%m-%d"), "plan": described, "rows": rows, "stop_s": stops,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{platform.system()}, Python {platform.python_version()}",
              "settings": {"requests": args.requests, "seconds": args.seconds, "threads": 1, "contexts": 1,
                           "max_batch_wait_ms": 10, "request": "1 image, own seed"}}
    stem = f"{result['date']}-serve-load-cpu"
    os.makedirs(args.out, exist_ok=True)
    print(write_json(args.out, stem, result))
    with open(os.path.join(args.out, f"{stem}.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result))
    return 0


def markdown(result: dict) -> str:
    plan = result["plan"]
    lines = [f"# blockcache-serve under load, {result['date']}", "",
             f"Machine: {result['machine']}. Plan: {plan['model']}, batch sizes {plan['batch_sizes']}, "
             f"steps {plan['steps']}, guidance {plan['guidance']['scale']}, {plan['precision']}. One-image requests.",
             "", "| replicas | clients | requests | images/s | p50 ms | p99 ms | batch fill | runs (size: count) | "
             "service CPU s / image |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        runs = ", ".join(f"{b}: {n}" for b, n in r["run_sizes"].items())
        lines.append(f"| {r['replicas']} | {r['clients']} | {r['requests']} | {r['images_per_s']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['fill_ratio']} | {runs} | {r['service_cpu_s_per_image']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
