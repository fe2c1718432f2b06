"""The torch runtime backend: plans replayed on the PyTorch DiT match the eager reference and the
ONNX Runtime backend, weights exist once, precision overrides stay within the documented tolerance,
and bad plans or options are one-line errors. CUDA-graph tests run only where a GPU is present."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from exporter.export import export_plan, plan_settings
from exporter.models import load_model
from exporter.reference import sample
from runtime import Sampler
from runtime.backends.torch import TOLERANCE, TorchBackend
from exporter.trace import trace_step
from runtime.plan import Plan, load_manifest, load_plan
from schedules import BlockcacheError, Schedule
from schedules.l2c import import_l2c

pytestmark = pytest.mark.usefixtures("single_thread")

# DiT-XL/2's depth with narrow widths (the L2C routers need 28 blocks), as tests/test_export.py.
NARROW = dict(depth=28, hidden_size=64, num_heads=4, input_size=8)
TINY = dict(depth=2, hidden_size=64, num_heads=4, input_size=8)
LABELS = [3, 997, 0]  # three labels on a batch-2 plan: the sampler batches and pads
TRACES: dict = {}  # one trace of each model and step settings for all of this module's plans
CUDA = torch.cuda.is_available()


def traced(model, schedule, **options):
    """The step graph of `model` for an export with `options`, traced once per settings (export_plan(traced=…))."""
    settings, _ = plan_settings(model, schedule, **options)
    key = (id(model), settings)
    if key not in TRACES:
        TRACES[key] = trace_step(model, settings)
    return TRACES[key]


def rel_error(got, want) -> float:
    """Max abs error relative to the reference's max abs value (the plan-vs-eager criterion)."""
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def narrow():
    return load_model("dit-s2", random_init=True, seed=7, **NARROW)


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).standard_normal((len(LABELS), 4, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def plan_dir(narrow, tmp_path_factory, request):
    """plan_dir(kind) → an fp32 batch-2 plan of the narrow model: full and uniform (every 3rd step)
    DDIM-10, L2C DDIM-20."""
    root = tmp_path_factory.mktemp("torch-plans")
    made = {}

    def get(kind: str):
        if kind not in made:
            units = narrow.unit_names
            if kind == "full":
                schedule = Schedule.full(units, 10)
            elif kind == "uniform":
                schedule = Schedule.uniform(units, 10, 3)
            else:
                schedule = import_l2c(request.getfixturevalue("router_dir") / "DDIM20_router.pt", units, 20)
            export_plan(narrow, schedule, str(root / kind), batch_size=2, guidance_scale=4.0,
                        traced=traced(narrow, schedule, batch_size=2, guidance_scale=4.0))
            made[kind] = (str(root / kind), schedule)
        return made[kind]

    return get


@pytest.mark.parametrize("kind", ["full", "uniform", "l2c"])
def test_fp32_matches_eager_reference_and_onnxruntime(kind, narrow, noise, plan_dir):
    path, schedule = plan_dir(kind)
    # the L2C plan goes through runtime.Sampler (three labels: batched and padded), the others through
    # the backend directly with one batch, which keeps the test short
    labels, x = (LABELS, noise) if kind == "l2c" else (LABELS[:2], noise[:2])
    sampler = Sampler(path, backend="torch", device="cpu")
    assert sampler.backend_name == "torch (cpu)"
    got = sampler(labels, noise=x)
    want = sample(narrow, schedule, labels, x, guidance_scale=4.0)
    assert got.shape == want.shape == x.shape
    assert rel_error(got, want) <= 1e-5
    ort = Sampler(path, backend="onnxruntime", device="cpu")(labels, noise=x)
    assert rel_error(got, ort) <= 1e-5
    if kind != "full":  # the cached run really differs from full compute
        full = sample(narrow, Schedule.full(narrow.unit_names, schedule.num_steps), labels, x, guidance_scale=4.0)
        assert rel_error(full, want) > 1e-3
    if kind == "uniform":  # the guidance scale is a call-time input, as in the plans
        got2 = sampler(labels, noise=x, guidance_scale=1.5)
        assert rel_error(got2, sample(narrow, schedule, labels, x, guidance_scale=1.5)) <= 1e-5


def test_weights_exist_once(plan_dir):
    path, schedule = plan_dir("uniform")
    manifest = load_manifest(path)
    assert len(manifest["variants"]) == 2
    backend = TorchBackend(Plan.parse(manifest, path), "cpu")
    params = list(backend.model.parameters())
    assert not any(p.is_meta for p in params)
    # every parameter is a view of one buffer: the plan's weights.bin read once, nothing copied
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    size = os.path.getsize(os.path.join(path, "weights.bin"))
    assert backend.weight_bytes() == size
    # transposed-stored linear weights were turned back in place: PyTorch's layout, no copies
    assert all(p.is_contiguous() for p in params)
    # resident cache buffers: one per unit that some step reads, allocated once
    cache = backend.contexts[0].buffers[2]["cache"]  # the one context's buffers for batch size 2
    assert {"cache." + u for u in cache} == set(manifest["buffers"])
    ptrs = {u: b.data_ptr() for u, b in cache.items()}
    x = np.zeros((2, 4, 8, 8), np.float32)
    backend.run(x, np.array([1, 2]), 4.0)
    assert {u: b.data_ptr() for u, b in cache.items()} == ptrs

    bf16 = TorchBackend(Plan.parse(manifest, path), "cpu", dtype="bf16")  # one cast copy at half the size
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert 0.45 * size <= bf16.weight_bytes() <= 0.55 * size


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_override(precision, narrow, noise, plan_dir):
    """An fp32 plan run in bf16/fp16 equals the eager model at that precision (same kernels on CPU)
    and stays within the documented tolerance of the fp32 reference."""
    path, schedule = plan_dir("uniform")
    backend = TorchBackend(load_plan(path), "cpu", dtype=precision)
    assert backend.precision == precision
    got = backend.run(noise[:2], np.array(LABELS[:2]), 4.0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    low = load_model("dit-s2", random_init=True, seed=7, **NARROW).to(dtype)
    assert rel_error(got, sample(low, schedule, LABELS[:2], noise[:2], guidance_scale=4.0)) <= 1e-3
    err = rel_error(got, sample(narrow, schedule, LABELS[:2], noise[:2], guidance_scale=4.0))
    assert 0 < err <= TOLERANCE[precision]


def test_fp16_plan(tmp_path):
    """A plan exported in fp16 runs in fp16 by default, like the eager half model and ORT."""
    model = load_model("dit-s2", random_init=True, seed=3, **TINY)
    schedule = Schedule.uniform(model.unit_names, 8, 2)
    export_plan(model, schedule, str(tmp_path / "p16"), batch_size=2, precision="fp16",
                traced=traced(model, schedule, batch_size=2, precision="fp16"))
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, 4, 8, 8)).astype(np.float32), [5, 9]
    sampler = Sampler(str(tmp_path / "p16"), backend="torch", device="cpu")
    assert sampler.backend.precision == "fp16"
    assert {p.dtype for p in sampler.backend.model.parameters()} == {torch.float16}
    got = sampler(y, noise=x)
    half = load_model("dit-s2", random_init=True, seed=3, **TINY).half()
    assert rel_error(got, sample(half, schedule, y, x)) <= 1e-3
    assert rel_error(got, sample(model, schedule, y, x)) <= TOLERANCE["fp16"]
    ort = Sampler(str(tmp_path / "p16"), backend="onnxruntime", device="cpu")(y, noise=x)
    assert rel_error(got, ort) <= TOLERANCE["fp16"]


def test_compiled_blocks_run_the_same_variants(narrow, noise, plan_dir):
    """compile= routes every block through one compiled function (dynamo only here: the 'eager'
    compiler backend keeps the test fast); results equal the plain backend's."""
    path, _ = plan_dir("uniform")
    manifest = load_manifest(path)
    plain = TorchBackend(Plan.parse(manifest, path), "cpu").run(noise[:2], np.array(LABELS[:2]), 4.0)
    compiled = TorchBackend(Plan.parse(manifest, path), "cpu", compile="default", compile_backend="eager")
    assert compiled.compile == "default"
    np.testing.assert_array_equal(compiled.run(noise[:2], np.array(LABELS[:2]), 4.0), plain)


def test_compiled_blocks_in_several_contexts_at_once(narrow, noise, plan_dir):
    """Two contexts of a compiled backend called from two threads at once: each result equals the plain
    backend's (compiled code runs one call at a time, the contexts keep their own buffers)."""
    from concurrent.futures import ThreadPoolExecutor

    path, _ = plan_dir("uniform")
    manifest = load_manifest(path)
    y = np.array(LABELS[:2])
    plain = TorchBackend(Plan.parse(manifest, path), "cpu")
    want = [plain.run(noise[i: i + 2], y, 4.0) for i in (0, 1)]
    compiled = TorchBackend(Plan.parse(manifest, path), "cpu", compile="default", compile_backend="eager")
    contexts = [compiled.contexts[0], compiled.new_context()]
    program = compiled.plan.program
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda i: [contexts[i].run(program, noise[i: i + 2], y, 4.0) for _ in range(3)],
                            (0, 1)))
    for i in (0, 1):
        for out in got[i]:
            np.testing.assert_array_equal(out, want[i])


def test_exact_fp32_holds_until_the_last_thread_leaves():
    """exact_fp32 changes process-wide settings: with two threads inside, the first to leave must not
    turn TF32 back on under the other; the last restores what was there before."""
    import threading

    import torch

    from runtime.nn.precision import exact_fp32

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    inside, first_left, seen = threading.Barrier(2), threading.Event(), {}

    def first():
        with exact_fp32():
            inside.wait()
        first_left.set()

    def second():
        with exact_fp32():
            inside.wait()
            first_left.wait(30)
            seen["after the first left"] = matmul.fp32_precision

    try:
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert seen == {"after the first left": "ieee"}
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def test_bad_plans_and_options(plan_dir, tmp_path):
    path, _ = plan_dir("uniform")
    manifest = load_manifest(path)
    with pytest.raises(BlockcacheError, match="precision"):
        TorchBackend(Plan.parse(manifest, path), "cpu", dtype="int8")
    with pytest.raises(BlockcacheError, match="device"):
        TorchBackend(Plan.parse(manifest, path), "tpu")
    if not CUDA:
        with pytest.raises(BlockcacheError, match="no CUDA GPU"):
            TorchBackend(Plan.parse(manifest, path), "cuda")
    with pytest.raises(BlockcacheError, match="re-export"):
        TorchBackend(Plan.parse({**manifest, "weights": {**manifest["weights"], "parameters": {}}}, path), "cpu")

    backend = TorchBackend(Plan.parse(manifest, path), "cpu")
    with pytest.raises(BlockcacheError, match="exactly"):
        backend.run(np.zeros((3, 4, 8, 8), np.float32), np.zeros(3, np.int64), 4.0)

    # a plan whose weights file was cut short (checksums not verified: the backend's own check)
    short = tmp_path / "short"
    shutil.copytree(path, short)
    data = (short / "weights.bin").read_bytes()
    (short / "weights.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(BlockcacheError, match="too short"):
        TorchBackend(load_plan(str(short), verify=False), "cpu")

    # a variant that claims to read a unit without a cache buffer
    broken = json.loads(json.dumps(manifest))
    broken["buffers"] = {}
    with pytest.raises(BlockcacheError, match="cache buffer"):
        TorchBackend(Plan.parse(broken, path), "cpu")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["full", "uniform"])
def test_cuda_graph_matches_eager(kind, narrow, noise, plan_dir):
    """On CUDA the whole loop is one CUDA graph; its output follows the static inputs call by call."""
    path, schedule = plan_dir(kind)
    backend = TorchBackend(load_plan(path), "cuda")
    assert backend.cuda_graph, backend.graph_error
    for labels, x in ((LABELS[:2], noise[:2]), (LABELS[1:], noise[1:])):  # new static inputs each call
        got = backend.run(x, np.array(labels), 4.0)
        want = sample(narrow, schedule, labels, x, guidance_scale=4.0)
        assert rel_error(got, want) <= 1e-5  # captured with TF32 off (exact_fp32)
    bf16 = TorchBackend(load_plan(path), "cuda", dtype="bf16")
    assert bf16.cuda_graph, bf16.graph_error
    got = bf16.run(noise[:2], np.array(LABELS[:2]), 4.0)
    assert rel_error(got, sample(narrow, schedule, LABELS[:2], noise[:2], guidance_scale=4.0)) <= TOLERANCE["bf16"]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_with_inductor_blocks(narrow, noise, plan_dir):
    path, schedule = plan_dir("uniform")
    backend = TorchBackend(load_plan(path), "cuda", dtype="bf16", compile="max-autotune-no-cudagraphs")
    assert backend.cuda_graph, backend.graph_error
    got = backend.run(noise[:2], np.array(LABELS[:2]), 4.0)
    assert rel_error(got, sample(narrow, schedule, LABELS[:2], noise[:2], guidance_scale=4.0)) <= TOLERANCE["bf16"]
