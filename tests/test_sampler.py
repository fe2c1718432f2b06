"""runtime.Sampler in production: concurrent calls, plans with several batch sizes and schedules,
per-image seeds, schedule selection and lifecycle (docs/ARCHITECTURE.md, "Execution contexts").

The expectations are independent of the code under test: a call made alone (the concurrency tests
compare bit for bit), the eager reference (exporter.reference.sample) for the chosen schedule, the
noise re-derived from each image's seed, and hand-computed batch splits."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import cli_error

from exporter.export import export_plans
from exporter.reference import sample
from runtime import Sampler
from runtime.sampler import split_batches
from schedules import BlockcacheError, Schedule
from schedules.sampling import initial_noise

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH_SIZES = [1, 2, 4]
STEPS = (6, 4)  # the plan's two schedules
LATENT = (4, 8, 8)
THREADS = 4
# 12 distinct calls: sizes 1–5 (every split of 1, 2 and 4: 5 runs as 4 + 1), both schedules, own seeds.
CALLS = [([(3 * i + j) % 1000 for j in range(1 + i % 5)], [100 * i + j for j in range(1 + i % 5)], STEPS[i % 2])
         for i in range(12)]


def schedules(model):
    return [Schedule.uniform(model.unit_names, 6, 2), Schedule.uniform(model.unit_names, 4, 3)]


@pytest.fixture(scope="module")
def plan(tiny, tmp_path_factory):
    """One plan: batch sizes 1, 2 and 4 × DDIM-6 (interval 2) and DDIM-4 (interval 3), guided."""
    path = tmp_path_factory.mktemp("multi") / "plan"
    export_plans(tiny, schedules(tiny), str(path), batch_sizes=BATCH_SIZES, guidance_scale=4.0)
    return str(path)


def relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def seeded(seeds) -> np.ndarray:
    """The starting noise `seeds=` promises: image i's latent from seed i alone (a batch of one)."""
    return np.concatenate([initial_noise((1,) + LATENT, s) for s in seeds])


# --------------------------------------------------------------------------------------------------
# batch splitting

@pytest.mark.parametrize("sizes, table", [
    ((1, 2, 4, 8), {1: [1], 2: [2], 3: [2, 1], 4: [4], 5: [4, 1], 6: [4, 2], 7: [4, 2, 1], 8: [8], 9: [8, 1]}),
    ((8,), {1: [8], 3: [8], 8: [8], 9: [8, 8]}),
    ((2, 8), {1: [2], 3: [2, 2], 7: [8], 9: [8, 2]}),  # 7: 8 and 2+2+2+2 pad alike, one run wins
    ((3, 5), {1: [3], 6: [3, 3], 7: [5, 3], 8: [5, 3], 10: [5, 5]}),
])
def test_split_batches_against_a_hand_table(sizes, table):
    """Least padded work first (9 of 1/2/4/8: 8 + 1, not 8 + 8), then fewest runs; largest first."""
    for n, want in table.items():
        assert split_batches(n, sizes) == want, n


def test_split_batches_by_measured_costs():
    """With per-run costs (dit-digits DDIM-20 latencies on this CPU, ms) the split is the fastest one:
    7 images as one batch of 8 (226) rather than 4 + 2 + 1 (286)."""
    costs = {1: 65, 2: 91, 4: 130, 8: 226}
    table = {1: [1], 2: [2], 3: [4], 4: [4], 5: [4, 1], 6: [4, 2], 7: [8], 8: [8], 9: [8, 1], 10: [8, 2], 11: [8, 4]}
    for n, want in table.items():
        assert split_batches(n, costs, costs) == want, n


def test_batch_costs_choose_the_split(plan, tiny):
    """Equal costs for batches of 1, 2 and 4: 3 images run as one padded batch of 4 (the padding
    dropped), equal to the reference; bad costs are refused in one line."""
    with Sampler(plan, device="cpu", threads=1, batch_costs={1: 1.0, 2: 1.0, 4: 1.0}) as sampler:
        got = sampler([1, 2, 3], seeds=[4, 5, 6], steps=4)
    want = sample(tiny, schedules(tiny)[1], [1, 2, 3], seeded([4, 5, 6]), guidance_scale=4.0)
    assert got.shape == (3,) + LATENT and relative_error(got, want) <= 1e-5
    for bad in ({1: 1, 2: 1}, {1: 1, 2: 1, 4: -1}, {1: 1, 2: 1, 4: float("nan")}, {1: 1, 2: True, 4: 1}, [1, 2, 4]):
        with pytest.raises(BlockcacheError, match="batch_costs must map each of the plan's batch sizes") as e:
            Sampler(plan, device="cpu", batch_costs=bad)
        assert "\n" not in str(e.value)


def test_measured_batch_costs_time_each_size_and_drive_the_split(plan):
    """One cost per batch size, per model evaluation; the split follows them as given costs would."""
    with Sampler(plan, device="cpu", threads=1) as sampler:
        costs = sampler.measure_batch_costs(repeats=1)
        assert set(costs) == set(BATCH_SIZES) and all(0 < c < 10 for c in costs.values())
        for n in range(1, 8):
            for steps in STEPS:
                assert sampler.split(n, steps) == split_batches(n, BATCH_SIZES, costs)


def test_check_refuses_what_the_call_would_without_sampling(plan):
    with Sampler(plan, device="cpu", threads=1) as sampler:
        sampler.check([1, 2], seeds=[3, 4], steps=6)  # a good request passes
        for bad, words in ((dict(class_labels=[1000], steps=6), "out of range"),
                           (dict(class_labels=[1], steps=5), "schedules of 4, 6 steps"),
                           (dict(class_labels=[1]), "choose one with steps"),
                           (dict(class_labels=[1, 2], seeds=[1], steps=6), "give one per image"),
                           (dict(class_labels=[1], steps=6, guidance_scale=1e9), "guidance_scale")):
            labels = bad.pop("class_labels")
            for call in (sampler.check, sampler):
                with pytest.raises(BlockcacheError, match=words):
                    call(labels, **bad)


def test_a_request_runs_as_the_split_batches(plan, tiny):
    """5 images on a plan of 1, 2 and 4 run as 4 + 1: equal to the eager reference on those noises."""
    labels, seeds = [1, 2, 3, 4, 5], [7, 8, 9, 10, 11]
    with Sampler(plan, device="cpu", threads=1) as sampler:
        assert sampler.batch_size == 4 and sampler.step_counts == (4, 6)
        got = sampler(labels, seeds=seeds, steps=6)
        padded = sampler(labels[:3], seeds=seeds[:3], steps=6)  # 2 + 1, no padding either
    want = sample(tiny, schedules(tiny)[0], labels, seeded(seeds), guidance_scale=4.0)
    assert got.shape == (5,) + LATENT and relative_error(got, want) <= 1e-5
    assert relative_error(padded, want[:3]) <= 1e-5


# --------------------------------------------------------------------------------------------------
# concurrency

@pytest.mark.parametrize("contexts", [1, 3])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_concurrent_calls_are_bit_identical_to_calls_made_alone(plan, backend, contexts):
    """4 threads × 3 calls each (distinct labels, seeds, sizes and schedules) at once on one Sampler:
    every result equals, bit for bit, the same call made alone."""
    with Sampler(plan, backend=backend, device="cpu", contexts=contexts,
                 **({"threads": 1} if backend == "onnxruntime" else {})) as sampler:
        alone = [sampler(labels, seeds=seeds, steps=steps) for labels, seeds, steps in CALLS]
        start = threading.Barrier(THREADS)

        def caller(t):
            start.wait()  # all threads call at once
            return [sampler(labels, seeds=seeds, steps=steps) for labels, seeds, steps in CALLS[t::THREADS]]

        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(caller, range(THREADS)))
        assert len(sampler.backend.contexts) == contexts
    for t, got in enumerate(results):
        for i, out in zip(range(t, len(CALLS), THREADS), got):
            assert np.array_equal(out, alone[i]), f"call {i} in thread {t} differs from the call made alone"


def test_contexts_share_the_heavy_state(plan):
    """Contexts add buffers, never weights or sessions: ONNX Runtime keeps one session per variant and
    one OrtValue per weight however many contexts; each context owns distinct latents and caches."""
    with Sampler(plan, device="cpu", threads=1) as one, Sampler(plan, device="cpu", threads=1, contexts=3) as three:
        for s in (one, three):
            assert [len(v) for v in s.backend.sessions] == [len(p.variants) for p in s.plan.programs]
            assert len(s.backend.weights) == len(s.manifest["weights"]["tensors"])
        pointers = [{u: v.data_ptr() for u, v in c.buffers[4]["cache"].items()} for c in three.backend.contexts]
        assert all(pointers[0].keys() == p.keys() for p in pointers)
        assert len({ptr for p in pointers for ptr in p.values()}) == 3 * len(pointers[0])
    for bad in (0, 65, 1.5, True):
        with pytest.raises(BlockcacheError, match="contexts") as e:
            Sampler(plan, device="cpu", contexts=bad)
        assert "\n" not in str(e.value)


def test_torch_contexts_share_the_parameters(plan):
    with Sampler(plan, backend="torch", device="cpu", contexts=2) as sampler:
        backend = sampler.backend
        assert len({p.untyped_storage().data_ptr() for p in backend.model.parameters()}) == 1
        a, b = (c.buffers[2]["cache"] for c in backend.contexts)
        assert a.keys() == b.keys() and all(a[u].data_ptr() != b[u].data_ptr() for u in a)


# --------------------------------------------------------------------------------------------------
# per-image seeds

def test_per_image_seeds_do_not_depend_on_the_batch(plan, tiny):
    """(label, seed) gives the same image whatever it is batched with: bit-identical inside any batch
    of the same size, at any position; alone (batch 1) against inside a batch of 4 within 1e-5
    (measured 0 with one ONNX Runtime thread on this CPU; benchmarks/runtime_cpu.py measures more)."""
    with Sampler(plan, device="cpu", threads=1) as sampler:
        batch = sampler([5, 6, 7, 8], seeds=[40, 41, 42, 43], steps=6)
        other = sampler([9, 7, 1, 2], seeds=[50, 42, 51, 52], steps=6)  # (7, 42) at another place, other company
        five = sampler([5, 6, 7, 8, 3], seeds=[40, 41, 42, 43, 60], steps=6)  # 4 + 1: the same batch of 4
        alone = sampler([7], seeds=[42], steps=6)
        given = sampler([5, 6, 7, 8], noise=seeded([40, 41, 42, 43]), steps=6)
        whole = sampler([5, 6, 7, 8], seed=40, steps=6)  # seed= keeps its meaning: one noise for the call
    assert np.array_equal(other[1], batch[2])
    assert np.array_equal(five[:4], batch)
    assert np.array_equal(given, batch)  # seeds= is exactly the noise re-derived per image
    assert relative_error(alone[0], batch[2]) <= 1e-5
    want = sample(tiny, schedules(tiny)[0], [5, 6, 7, 8], initial_noise((4,) + LATENT, 40), guidance_scale=4.0)
    assert relative_error(whole, want) <= 1e-5 and not np.allclose(whole, batch)


def test_seeds_bad_values_are_one_line(plan):
    with Sampler(plan, device="cpu", threads=1) as sampler:
        for kwargs, match in (({"seeds": [1]}, "1 seeds for 2 images"), ({"seeds": 5}, "list of seeds"),
                              ({"seeds": [1, -2]}, "non-negative"), ({"seeds": [1, 2], "seed": 3}, "one of")):
            with pytest.raises(BlockcacheError, match=match) as e:
                sampler([1, 2], steps=4, **kwargs)
            assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# schedule selection

def test_steps_selects_the_plans_schedule(plan, tiny):
    noise = initial_noise((2,) + LATENT, 3)
    with Sampler(plan, device="cpu", threads=1) as sampler:
        outs = {steps: sampler([1, 2], noise=noise, steps=steps) for steps in STEPS}
        for steps, match in ((None, "schedules of 4, 6 steps: choose one with steps"),
                             (5, "steps 5: this plan has schedules of 4, 6 steps"), (True, "4, 6")):
            with pytest.raises(BlockcacheError, match=match) as e:
                sampler([1, 2], noise=noise, steps=steps)
            assert "\n" not in str(e.value)
    for schedule in schedules(tiny):
        want = sample(tiny, schedule, [1, 2], noise, guidance_scale=4.0)
        assert relative_error(outs[schedule.num_steps], want) <= 1e-5
    assert not np.allclose(outs[4], outs[6])


def test_sample_cli_steps_and_seeds(plan, tmp_path, capsys):
    from exporter.sample_cli import main

    out = tmp_path / "x.npy"
    assert main(["--plan", plan, "--steps", "4", "--labels", "1,2,3", "--seeds", "5,6,7", "--out", str(out),
                 "--quiet", "--device", "cpu"]) == 0
    with Sampler(plan, device="cpu") as sampler:
        assert np.array_equal(np.load(out), sampler([1, 2, 3], seeds=[5, 6, 7], steps=4))
    argv = ["--plan", plan, "--labels", "1,2", "--out", str(tmp_path / "y.npy"), "--device", "cpu"]
    assert "4, 6" in cli_error(main, argv + ["--steps", "5"], capsys)
    assert "4, 6" in cli_error(main, argv, capsys)
    assert "one per label" in cli_error(main, argv + ["--steps", "4", "--seeds", "1"], capsys)
    assert "drop --model" in cli_error(main, argv + ["--steps", "4", "--model", "dit-s2"], capsys)


# --------------------------------------------------------------------------------------------------
# lifecycle

def stop_at(function: str, call: int, action):
    """A trace function for this thread that runs `action()` at the `call`-th call of any function
    named `function` (a step of a backend's loop), mid-call and at a known step."""
    count = [0]

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name == function:
            count[0] += 1
            if count[0] == call:
                action()
        return None

    return tracer


STEP_FUNCTION = {"onnxruntime": "run_with_iobinding", "torch": "denoise"}


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_an_interrupted_call_leaves_the_sampler_correct(plan, backend):
    """KeyboardInterrupt in the middle of a call (at its 3rd of 6 steps, caches half written): the
    context returns to the pool and the next call is correct."""
    def interrupt():
        raise KeyboardInterrupt

    with Sampler(plan, backend=backend, device="cpu") as sampler:  # one context: a lost one would hang
        want = sampler([1, 2], seeds=[1, 2], steps=6)
        sys.settrace(stop_at(STEP_FUNCTION[backend], 3, interrupt))
        try:
            with pytest.raises(KeyboardInterrupt):
                sampler([3, 4], seeds=[3, 4], steps=6)
        finally:
            sys.settrace(None)
        assert np.array_equal(sampler([1, 2], seeds=[1, 2], steps=6), want)


def test_close_waits_for_calls_in_progress_then_refuses(plan):
    """close() while a call is mid-way: the call finishes correctly, close returns after it and frees
    the backend; a call waiting for a context and any later call are refused in one line."""
    with Sampler(plan, device="cpu", threads=1) as reference:
        want = reference([1, 2], seeds=[1, 2], steps=6)
    sampler = Sampler(plan, device="cpu", threads=1)
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(60)

    def call():
        sys.settrace(stop_at("run_with_iobinding", 2, hold))
        try:
            return sampler([1, 2], seeds=[1, 2], steps=6)
        finally:
            sys.settrace(None)

    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(call)
        assert started.wait(60)
        waiting = pool.submit(sampler, [5], seeds=[5], steps=4)  # the one context is busy: it waits
        closing = pool.submit(sampler.close)
        with pytest.raises(BlockcacheError, match="closed"):
            waiting.result(60)
        assert not closing.done() and not sampler.backend.closed  # the call in progress holds it
        release.set()
        assert np.array_equal(running.result(60), want)
        closing.result(60)
    assert sampler.backend.closed
    with pytest.raises(BlockcacheError, match="closed") as e:
        sampler([1], seed=0, steps=4)
    assert "\n" not in str(e.value)
