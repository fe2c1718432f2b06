"""blockcache-serve on a real local Ray Serve instance (started and stopped by this module, localhost
only, bounded requests): every answer equals the direct Sampler call for its labels and seeds,
batching happens, bad requests get one-line 4xx answers while good ones proceed, two plans side by
side, health, plans, metrics and the per-batch log line, and SIGTERM stops it with its Ray instance.
The request parser and encoder are also tested alone (no Ray)."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from benchmarks.serve_load import free_port, session_processes
from conftest import REPO, tiny_model

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install '.[serve]')")

from runtime import Sampler  # noqa: E402
from schedules import Schedule  # noqa: E402
from serve import api  # noqa: E402
from serve.client import Client  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

STARTUP_S = 240  # a loaded 2-core machine starts Ray and three replicas in 20-60 s
STOP_S = 30  # the README's bound on SIGTERM → exit


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """"multi": batch sizes 1 and 4, DDIM-4; "second": another model with 1-channel latents (images a
    PNG can show), batch size 2, DDIM-4 and DDIM-6. Both guided."""
    from exporter.export import export_plans

    root = tmp_path_factory.mktemp("serve")
    model = tiny_model(seed=0)
    export_plans(model, [Schedule.uniform(model.unit_names, 4, 2)], str(root / "multi"), batch_sizes=[1, 4],
                 guidance_scale=4.0)
    other = tiny_model(seed=1, in_channels=1)
    export_plans(other, [Schedule.uniform(other.unit_names, 4, 2), Schedule.uniform(other.unit_names, 6, 3)],
                 str(root / "second"), batch_sizes=[2], guidance_scale=4.0)
    return {"multi": str(root / "multi"), "second": str(root / "second")}


@pytest.fixture(scope="module")
def direct(plans):
    """The reference: each plan's Sampler called directly in this process (one ONNX Runtime thread)."""
    samplers = {name: Sampler(path, backend="onnxruntime", device="cpu", threads=1) for name, path in plans.items()}
    yield samplers
    for s in samplers.values():
        s.close()


@pytest.fixture(scope="module")
def service(plans, tmp_path_factory):
    """`blockcache-serve` as a user starts it, in its own session so that only it gets our signals."""
    port, metrics = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "serve.cli", f"multi={plans['multi']}",
                                 f"second={plans['second']}", "--port", str(port), "--metrics-port", str(metrics),
                                 "--max-batch-wait-ms", "100", "--log-level", "debug"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    client = Client(f"http://127.0.0.1:{port}", timeout=120)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, f"blockcache-serve exited: {log.read_text()[-2000:]}"
            try:
                client.healthz()
                break
            except Exception:
                assert time.monotonic() < deadline, f"not ready after {STARTUP_S} s: {log.read_text()[-2000:]}"
                time.sleep(1)
        yield {"client": client, "proc": proc, "log": log, "metrics": metrics}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def assert_one_line_error(status: int, headers, body: bytes, expected: int | None = None) -> str:
    assert 400 <= status < 500, (status, body[:300])
    if expected is not None:
        assert status == expected, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json")
    doc = json.loads(body)
    assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"]
    assert "\n" not in doc["error"] and "Traceback" not in doc["error"] and len(doc["error"]) <= 300
    return doc["error"]


# --------------------------------------------------------------------------------------------------
# the API alone (no Ray)

INFOS = {"a": {"labels": 10, "formats": ["npy"], "shape": [4, 8, 8]},
         "b": {"labels": 10, "formats": ["npy", "png"], "shape": [1, 8, 8]}}


@pytest.mark.parametrize("body, status, words", [
    (b'{"plan": "a", "labels": [1,', 400, "not valid JSON"),
    (b'[1, 2]', 400, "JSON object"),
    (b'{"plan": "a", "labels": [1], "guidance_scale": NaN}', 400, "NaN"),
    (b'{"plan": "a", "labels": [1], "guidance_scale": Infinity}', 400, "Infinity"),
    (b'{"labels": [1]}', 400, "2 plans"),
    (b'{"plan": "zz", "labels": [1]}', 404, "unknown plan"),
    (b'{"plan": 3, "labels": [1]}', 404, "unknown plan"),
    (b'{"plan": "a", "labels": []}', 400, "non-empty list"),
    (b'{"plan": "a", "labels": "1"}', 400, "non-empty list"),
    (b'{"plan": "a", "labels": [1.0]}', 400, "non-empty list"),
    (b'{"plan": "a", "labels": [true]}', 400, "non-empty list"),
    (b'{"plan": "a", "labels": [10]}', 400, "out of range 0"),
    (b'{"plan": "a", "labels": [-1]}', 400, "out of range 0"),
    (b'{"plan": "a", "labels": [1, 2], "seeds": [1]}', 400, "one seed per label"),
    (b'{"plan": "a", "labels": [1], "seeds": [-1]}', 400, "seeds"),
    (b'{"plan": "a", "labels": [1], "seeds": [1.5]}', 400, "seeds"),
    (b'{"plan": "a", "labels": [1], "seeds": [9223372036854775808]}', 400, "seeds"),
    (b'{"plan": "a", "labels": [1], "guidance_scale": "4"}', 400, "guidance_scale"),
    (b'{"plan": "a", "labels": [1], "guidance_scale": true}', 400, "guidance_scale"),
    (b'{"plan": "a", "labels": [1], "steps": "20"}', 400, "steps"),
    (b'{"plan": "a", "labels": [1], "format": "jpeg"}', 400, "format"),
    (b'{"plan": "a", "labels": [1], "format": "png"}', 400, "not images"),
    (b'{"plan": "a", "labels": [1], "label": [2]}', 400, "unknown field"),
    (json.dumps({"plan": "a", "labels": [1] * (api.MAX_LABELS + 1)}).encode(), 413, "at most"),
    (b" " * (api.MAX_BODY_BYTES + 1), 413, "bytes"),
])
def test_bad_requests_are_refused_with_their_status(body, status, words):
    with pytest.raises(api.RequestError) as e:
        api.parse_sample_request(body, INFOS)
    assert e.value.status == status
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_request_is_parsed_and_seeds_are_drawn_where_absent():
    r = api.parse_sample_request(b'{"plan": "b", "labels": [3, 4], "seeds": [7, 8], "guidance_scale": 2, '
                                 b'"steps": 6, "format": "png"}', INFOS)
    assert r == api.SampleRequest("b", (3, 4), (7, 8), 2.0, 6, "png")
    drawn = api.parse_sample_request(b'{"plan": "a", "labels": [1, 1, 1]}', INFOS)
    assert len(drawn.seeds) == 3 and all(0 <= s < 2 ** 31 for s in drawn.seeds) and drawn.format == "npy"
    only = {"a": INFOS["a"]}
    assert api.parse_sample_request(b'{"labels": [9]}', only).plan == "a"  # one plan: its name may be left out


def test_encoded_results_decode_to_what_was_sampled():
    import matplotlib.image

    latents = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    assert np.array_equal(api.decode_npy(api.encode(latents, "npy", [1, 2, 3], [4, 5, 6])), latents)
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert np.array_equal(api.decode_npy(api.encode(images, "npy", [1, 2], [4, 5])), images)
    grid = matplotlib.image.imread(io.BytesIO(api.encode(images, "png", [1, 2], [4, 5])), format="png")
    assert grid.ndim == 3 and grid.shape[2] in (3, 4)  # a labelled figure of both images
    gray = np.clip(np.random.default_rng(2).standard_normal((2, 1, 8, 8)), -1, 1).astype(np.float32)
    tiles = matplotlib.image.imread(io.BytesIO(api.encode(gray, "png", [1, 2], [4, 5])), format="png")
    assert tiles.shape[:2] == (4 * 10, 4 * 19)  # to_grid: 1 row × 2 of 8 px with 1 px borders, ×4


def test_replica_resources_and_autoscaling_follow_the_cluster():
    from serve.app import Options, replica_resources, scaling

    cpu = Options(contexts=2, threads=3)
    assert replica_resources(cpu, gpus=0) == ({"num_cpus": 6}, "cpu")
    assert replica_resources(cpu, gpus=4) == ({"num_gpus": 1, "num_cpus": 1}, "cuda")
    assert replica_resources(Options(device="cpu"), gpus=4) == ({"num_cpus": 1}, "cpu")
    assert scaling(Options(replicas=3), 8, {"CPU": 16}, {"num_cpus": 1}) == {"num_replicas": 3}
    auto = Options(replicas="auto", contexts=2)
    assert scaling(auto, 8, {"CPU": 16, "GPU": 4}, {"num_gpus": 1, "num_cpus": 1}) == {"autoscaling_config": {
        "min_replicas": 1, "initial_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}}
    assert scaling(auto, 4, {"CPU": 16}, {"num_cpus": 4})["autoscaling_config"]["max_replicas"] == 4
    assert scaling(Options(replicas="auto", max_replicas=9), 4, {"CPU": 2}, {"num_cpus": 1}
                   )["autoscaling_config"]["max_replicas"] == 9


def test_plan_names_and_options_are_checked():
    from serve.app import Options, parse_plans
    from schedules import BlockcacheError

    assert parse_plans(["a=/x/p", "/y/q/"]) == {"a": "/x/p", "q": "/y/q"}
    assert parse_plans("a=/x/p,b=/y") == {"a": "/x/p", "b": "/y"} == parse_plans({"a": "/x/p", "b": "/y"})
    for bad, words in ((["a=/x", "a=/y"], "two plans are named"), (["bad name=/x"], "plan name"), ([], "at least one")):
        with pytest.raises(BlockcacheError, match=words):
            parse_plans(bad)
    for bad in (dict(replicas=0), dict(replicas="many"), dict(contexts=0), dict(threads=True),
                dict(max_batch_wait_ms=-1), dict(device="tpu"), dict(log_level="loud"), dict(log_level=3)):
        with pytest.raises(BlockcacheError):
            Options(**bad)


@pytest.mark.parametrize("args, words", [
    (["/no/such/plan"], "plan folder not found"),
    (["a=PLAN", "a=PLAN"], "two plans are named"),
    (["PLAN", "--replicas", "some"], "--replicas must be a number or auto"),
    (["PLAN", "--port", "70000"], "port number"),
    (["PLAN", "--contexts", "0"], "contexts must be an integer"),
])
def test_bad_command_lines_are_one_line_before_ray_starts(plans, args, words):
    args = [a.replace("PLAN", plans["multi"]) for a in args]
    done = subprocess.run([sys.executable, "-m", "serve.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert words in lines[-1] and "Traceback" not in done.stderr and "Ray" not in done.stderr


# --------------------------------------------------------------------------------------------------
# the service

def test_health_and_plans(service, plans):
    client = service["client"]
    assert client.healthz() == {"status": "ready", "replicas": {"multi": 1, "second": 1}}
    listed = {p["name"]: p for p in client.plans()}
    assert set(listed) == {"multi", "second"}
    assert listed["multi"]["batch_sizes"] == [1, 4] and listed["multi"]["steps"] == [4]
    assert listed["second"]["batch_sizes"] == [2] and listed["second"]["steps"] == [4, 6]
    for p in listed.values():
        assert p["model"] == "dit-s2" and p["family"] == "dit" and p["precision"] == "fp32" and p["labels"] == 1000
        assert p["guidance"] == {"enabled": True, "scale": 4.0, "channels": "first3"} and p["output"] == "latents"
    assert listed["multi"]["formats"] == ["npy"] and listed["second"]["formats"] == ["npy", "png"]


def check_against_direct(sampler: Sampler, labels, seeds, got, run_sizes, steps=None):
    """Each image bit-identical to the direct call that runs it at the same compiled batch size (the
    image in every row of that batch), and within 1e-5 of the image sampled alone."""
    assert got.shape == (len(labels),) + sampler.latent_shape and len(run_sizes) == len(labels)
    for image, label, seed, b in zip(got, labels, seeds, run_sizes):
        assert b in sampler.plan.batch_sizes(steps or sampler.step_counts[0])
        same_size = sampler([label] * b, seeds=[seed] * b, steps=steps)[0]
        assert np.array_equal(image, same_size)
        alone = sampler([label], seeds=[seed], steps=steps)[0]
        assert np.abs(image - alone).max() <= 1e-5 * np.abs(alone).max()


def test_concurrent_requests_equal_the_direct_sampler_and_are_batched(service, direct):
    client = service["client"]
    requests = [([(7 * i + j) % 1000 for j in range(1 + i % 3)], [1000 + 10 * i + j for j in range(1 + i % 3)])
                for i in range(16)]
    start = threading.Barrier(16)

    def send(request):
        start.wait()
        return client.samples(request[0], seeds=request[1], plan="multi")

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, requests))
    for (labels, seeds), answer in zip(requests, answers):
        assert answer.seeds == tuple(seeds)
        check_against_direct(direct["multi"], labels, seeds, answer.array, answer.run_sizes)
    # batching happened: some request shared its Serve batch with another one's images
    assert any(max(a.batch_images) > len(labels) for (labels, _), a in zip(requests, answers))
    assert all(max(a.batch_images) <= 4 for a in answers)  # never more than the largest compiled batch


def test_seeds_drawn_by_the_service_reproduce_the_images(service, direct):
    client = service["client"]
    first = client.samples([5, 6], plan="multi")
    assert len(first.seeds) == 2
    again = client.samples([5, 6], seeds=list(first.seeds), plan="multi")
    check_against_direct(direct["multi"], [5, 6], first.seeds, first.array, first.run_sizes)
    check_against_direct(direct["multi"], [5, 6], again.seeds, again.array, again.run_sizes)


BAD = [  # (method, route, body, expected status)
    ("POST", "/v1/samples", b'{"plan": "multi", "labels": [1,', 400),
    ("POST", "/v1/samples", b'{"labels": [1]}', 400),  # two plans: which one?
    ("POST", "/v1/samples", b'{"plan": "nope", "labels": [1]}', 404),
    ("POST", "/v1/samples", b'{"plan": "multi", "labels": [1000]}', 400),
    ("POST", "/v1/samples", b'{"plan": "multi", "labels": ["1"]}', 400),
    ("POST", "/v1/samples", b'{"plan": "multi", "labels": [1], "seeds": [0.5]}', 400),
    ("POST", "/v1/samples", b'{"plan": "multi", "labels": [1], "guidance_scale": "high"}', 400),
    ("POST", "/v1/samples", b'{"plan": "multi", "labels": [1], "guidance_scale": 1e300}', 400),  # the Sampler's check
    ("POST", "/v1/samples", b'{"plan": "multi", "labels": [1], "steps": 5}', 400),  # the plan has 4 steps only
    ("POST", "/v1/samples", b'{"plan": "second", "labels": [1]}', 400),  # two schedules: steps needed
    ("POST", "/v1/samples", b'{"plan": "multi", "labels": [1], "format": "png"}', 400),  # 4-channel latents
    ("POST", "/v1/samples", json.dumps({"plan": "multi", "labels": [1] * (api.MAX_LABELS + 1)}).encode(), 413),
    ("POST", "/v1/samples", b"[" + b"1," * 40000 + b"1]", 413),
    ("GET", "/v1/samples", None, 405),
    ("POST", "/v1/plans", b"{}", 405),
    ("GET", "/v2/anything", None, 404),
]


def test_bad_requests_get_one_line_4xx_while_good_ones_are_in_flight(service, direct):
    client = service["client"]
    n = api.MAX_LABELS
    labels, seeds = [i % 1000 for i in range(n)], list(range(n))
    good, done = [None] * 6, [0.0] * 6  # 6 × 64 runs of 4: seconds of work queued on the replica

    def send_good(i):
        good[i] = client.samples(labels, seeds=seeds, plan="multi")
        done[i] = time.monotonic()

    workers = [threading.Thread(target=send_good, args=(i,)) for i in range(6)]
    for w in workers:
        w.start()
    time.sleep(0.2)
    with ThreadPoolExecutor(len(BAD)) as pool:
        answers = list(pool.map(lambda bad: client.request(*bad[:3]), BAD))
    bad_done = time.monotonic()
    for (method, route, body, status), (got, headers, data) in zip(BAD, answers):
        assert_one_line_error(got, headers, data, status)
    for w in workers:
        w.join(timeout=300)
    assert max(done) > bad_done, "the good requests ended before the bad ones: nothing was in flight"
    picks = [0, 57, n - 1]
    for answer in good:
        assert answer.array.shape == (n, 4, 8, 8) and set(answer.run_sizes) == {4}
        assert np.array_equal(answer.array, good[0].array)
    check_against_direct(direct["multi"], [labels[i] for i in picks], [seeds[i] for i in picks],
                         good[0].array[picks], [good[0].run_sizes[i] for i in picks])
    assert client.healthz()["status"] == "ready"  # and the service still serves


def test_two_plans_side_by_side(service, direct):
    import matplotlib.image

    client = service["client"]
    for steps in (4, 6):
        answer = client.samples([3, 4, 5], seeds=[9, 8, 7], plan="second", steps=steps)
        assert set(answer.run_sizes) == {2}
        check_against_direct(direct["second"], [3, 4, 5], [9, 8, 7], answer.array, answer.run_sizes, steps=steps)
    multi = client.samples([3], seeds=[9], plan="multi")
    assert not np.allclose(multi.array[0, :1], answer.array[0])  # another model answered
    png = client.samples([3, 4], seeds=[9, 8], plan="second", steps=4, format="png")
    grid = matplotlib.image.imread(io.BytesIO(png.png), format="png")
    assert grid.shape[:2] == (4 * 10, 4 * 19)  # two 8×8 one-channel images, as schedules.images draws them


def test_metrics_and_the_per_batch_log_line(service):
    images = service["client"].samples([1, 2, 3], seeds=[1, 2, 3], plan="multi").array
    assert images.shape[0] == 3
    names = ("ray_blockcache_images_total", "ray_blockcache_batch_fill_ratio_bucket", "ray_blockcache_requests_total",
             "ray_blockcache_queue_wait_ms_bucket", "ray_blockcache_sampling_ms_bucket", "ray_serve_num_http_requests")
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:  # Ray's metrics agent exports every few seconds
        text = urllib.request.urlopen(f"http://127.0.0.1:{service['metrics']}/metrics", timeout=10).read().decode()
        if all(name in text for name in names):
            break
        time.sleep(2)
    assert [name for name in names if name not in text] == []
    counts = [float(m) for m in re.findall(r'^ray_blockcache_images_total\{[^}]*plan="multi"[^}]*\} (\S+)$', text,
                                             re.MULTILINE)]
    assert counts and sum(counts) >= 3
    assert re.search(r"plan multi: batch of \d+ images from \d+ chunks \(fill \d\.\d\d\)", service["log"].read_text())


def test_sigterm_stops_the_service_and_the_ray_instance_it_started(service):
    proc, log = service["proc"], service["log"]
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=STOP_S + 30) == 0
    took = time.monotonic() - start
    assert took < STOP_S, f"took {took:.1f} s"
    assert re.search(r"stopped in \d+\.\d s", log.read_text())
    time.sleep(2)
    assert session_processes(proc.pid) == []  # its Ray instance (GCS, raylet, actors) went with it


def test_joining_a_cluster_deploys_there_and_leaves_it_running(plans, tmp_path):
    """`--address`: the application runs on a cluster started apart (`ray start --head`); a join
    without the cluster's token is refused in one line; SIGTERM deletes only the application."""
    port, http = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    # The cluster's own token, in the environment: whether `ray start` enables token authentication must
    # not depend on a ~/.ray/auth_token that an earlier local ray.init() may or may not have left.
    with_token = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard=false", "--disable-usage-stats"], env=with_token,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        serve_cmd = [sys.executable, "-m", "serve.cli", f"multi={plans['multi']}", "--address", address,
                     "--port", str(http)]
        deadline = time.monotonic() + STARTUP_S
        while True:  # the head is up once a join gets past the connection (to the token, or in)
            refused = subprocess.run(serve_cmd, cwd=REPO, env=dict(env, RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN=""),
                                     capture_output=True, text=True, timeout=STARTUP_S)
            if "Token" in refused.stderr or "token" in refused.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert refused.returncode == 2
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "cannot join the Ray cluster" in errors[0] and "RAY_AUTH_MODE=token" in errors[0]
        assert "Traceback" not in refused.stderr

        log = tmp_path / "join.txt"
        with open(log, "w") as err:
            joined = subprocess.Popen(serve_cmd, cwd=REPO, env=with_token,
                                      stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        client = Client(f"http://127.0.0.1:{http}", timeout=120)
        try:
            client.wait_ready(timeout=STARTUP_S)
            assert client.samples([1, 2], seeds=[3, 4]).array.shape == (2, 4, 8, 8)
        finally:
            joined.send_signal(signal.SIGTERM)
            assert joined.wait(timeout=STOP_S + 30) == 0, log.read_text()[-2000:]
        assert "stopped in" in log.read_text()
        assert head.poll() is None and session_processes(head.pid)  # the cluster runs on
        status = subprocess.run([sys.executable, "-c", "import ray; from ray import serve; "
                                 f"ray.init(address='{address}', logging_level='error'); "
                                 "import json; print(json.dumps({n: str(a.status) for n, a in "
                                 "serve.status().applications.items()}))"],
                                env=with_token, capture_output=True, text=True, timeout=120)
        apps = json.loads(status.stdout.strip().splitlines()[-1])  # {name: status}
        assert apps == {}, (apps, log.read_text()[-3000:])  # only our app went away
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for pid in session_processes(head.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
