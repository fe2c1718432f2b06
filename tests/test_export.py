"""Exporter + ONNX Runtime runtime: plans match the eager reference, variants are pruned and shared,
liveness decides graph outputs, weights are stored once, and writes are atomic."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from conftest import assert_one_line_error, run_cli
from exporter.export import export_plan, group_variants
from exporter.models import load_model
from exporter.reference import sample
from exporter.surgery import unit_of_nodes
from exporter.trace import StepSettings, trace_step
from runtime import Sampler
from schedules import BlockcacheError, Schedule
from schedules.l2c import import_l2c

# DiT-XL/2's depth with narrow widths, so that a plan exports in seconds.
NARROW = dict(depth=28, hidden_size=64, num_heads=4, input_size=8)
NARROW_FLAGS = ["--depth", "28", "--hidden-size", "64", "--num-heads", "4", "--input-size", "8"]
LABELS = [3, 997, 0]  # three labels on a batch-2 plan: the runtime must batch and pad


@pytest.fixture(scope="module")
def narrow():
    return load_model("dit-s2", random_init=True, seed=7, **NARROW)


@pytest.fixture(scope="module")
def noise(narrow):
    return np.random.default_rng(0).standard_normal((len(LABELS), 4, 8, 8)).astype(np.float32)


def rel_error(got, want) -> float:
    """Max abs error relative to the reference's max abs value (the plan-vs-eager criterion)."""
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def schedules_for(units, router_dir=None):
    out = {"full": Schedule.full(units, 20), "uniform": Schedule.uniform(units, 20, 3)}
    if router_dir is not None:
        out["l2c"] = import_l2c(router_dir / "DDIM20_router.pt", units, 20)
    return out


@pytest.mark.parametrize("kind", ["full", "uniform", "l2c"])
def test_plan_matches_eager_reference(kind, narrow, noise, tmp_path, request):
    router_dir = request.getfixturevalue("router_dir") if kind == "l2c" else None
    schedule = schedules_for(narrow.unit_names, router_dir)[kind]
    manifest = export_plan(narrow, schedule, str(tmp_path / "plan"), batch_size=2, guidance_scale=4.0)
    assert len(manifest["variants"]) == len({row.tobytes() for row in schedule.compute})
    got = Sampler(str(tmp_path / "plan"), device="cpu")(LABELS, noise=noise)
    want = sample(narrow, schedule, LABELS, noise, guidance_scale=4.0)
    assert got.shape == want.shape == noise.shape
    assert rel_error(got, want) <= 1e-5
    if kind != "full":  # the cached run is really different from full compute
        full = sample(narrow, Schedule.full(narrow.unit_names, 20), LABELS, noise, guidance_scale=4.0)
        assert rel_error(full, want) > 1e-3
    # A guidance scale given at sampling time reaches the graph (it is an input, not a constant).
    got2 = Sampler(str(tmp_path / "plan"), device="cpu")(LABELS, noise=noise, guidance_scale=1.5)
    assert rel_error(got2, sample(narrow, schedule, LABELS, noise, guidance_scale=1.5)) <= 1e-5


def test_variants_pruned_and_liveness(tmp_path):
    """A hand-made 4-block, 6-step schedule: check each variant's ops, inputs and outputs by hand."""
    model = load_model("dit-s2", random_init=True, seed=1, depth=4, hidden_size=64, num_heads=4, input_size=8)
    u = model.unit_names  # b0.attn b0.mlp b1.attn b1.mlp b2.attn b2.mlp b3.attn b3.mlp
    rows = ["xxxxxxxx",
            "..xxxxxx",   # reuses block 0 (both units)
            "xxxxxxxx",
            "..xxxx.x",   # same block-0 reuse plus b3.attn
            "..xxxxxx",   # same compute set as step 1: shares its graph
            "xxxxxxxx"]
    compute = np.array([[c == "x" for c in r] for r in rows])
    schedule = Schedule(u, compute, {"name": "ddim", "steps": 6, "spacing": "linspace"})
    manifest = export_plan(model, schedule, str(tmp_path / "plan"), batch_size=1, guidance_scale=4.0)
    variants = manifest["variants"]
    assert [s["variant"] for s in manifest["steps"]] == [0, 1, 0, 2, 1, 0]
    assert len(variants) == 3
    # Liveness: full variant serves steps 0, 2, 5; step 0's and 2's block-0 values are read at 1 and 3,
    # step 2's b3.attn at 3. Nothing computed at the reuse steps is read later before recomputation.
    assert variants[0]["writes"] == ["blocks.0.attn", "blocks.0.mlp", "blocks.3.attn"]
    assert variants[1]["writes"] == [] and variants[2]["writes"] == []
    assert variants[1]["reads"] == ["blocks.0.attn", "blocks.0.mlp"]
    assert variants[2]["reads"] == ["blocks.0.attn", "blocks.0.mlp", "blocks.3.attn"]

    owner = unit_of_nodes(trace_step(model, StepSettings(batch_size=1, guidance=True)).proto, u)
    assert set(owner.values()) == set(u)  # every unit has operators in the master graph
    for v in variants:
        graph = onnx.load(str(tmp_path / "plan" / v["file"]), load_external_data=False)
        present = {owner[n.name] for n in graph.graph.node if n.name in owner}
        assert present == set(v["computes"])  # skipped units' operators are absent
        inputs = {i.name for i in graph.graph.input}
        outputs = {o.name for o in graph.graph.output}
        assert {n for n in inputs if n.startswith("cache.")} == {"cache." + r for r in v["reads"]}
        assert outputs == {"x_next"} | {"unit." + w for w in v["writes"]}
        # weights live in weights.bin, not in the graph files
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer
                   if len(t.dims) and np.prod(t.dims) >= 256)
    assert manifest["buffers"].keys() == {"cache." + n for n in ["blocks.0.attn", "blocks.0.mlp", "blocks.3.attn"]}

    # Weights are stored once: weights.bin holds the parameters (fp32) once, give or take the
    # small tensors left inline and alignment padding.
    params = sum(p.numel() for p in model.state_dict().values()) * 4
    size = os.path.getsize(tmp_path / "plan" / "weights.bin")
    assert 0.95 * params <= size <= 1.05 * params
    assert sum(v["graph_bytes"] for v in variants) < 0.2 * params


def test_group_variants_first_use_order():
    compute = np.array([[1, 1], [0, 1], [1, 1], [0, 1], [1, 0]], bool)
    s = Schedule(["blocks.0.attn", "blocks.0.mlp"], compute, {"name": "ddim", "steps": 5, "spacing": "linspace"})
    rows, step_variant = group_variants(s)
    assert step_variant == [0, 1, 0, 1, 2]
    assert [r.tolist() for r in rows] == [[True, True], [False, True], [True, False]]


def test_runtime_shares_weights_across_sessions(tmp_path):
    model = load_model("dit-s2", random_init=True, depth=2, hidden_size=64, num_heads=4, input_size=8)
    schedule = Schedule.uniform(model.unit_names, 6, 2)
    export_plan(model, schedule, str(tmp_path / "plan"), batch_size=1)
    sampler = Sampler(str(tmp_path / "plan"), device="cpu")
    backend = sampler.backend
    # one OrtValue per stored weight, no matter how many sessions use it
    assert len(backend.weights) == len(sampler.manifest["weights"]["tensors"])
    assert [len(sessions) for sessions in backend.sessions] == [2]  # one program, two variants
    # a closed sampler frees its backend and refuses to run, in one line
    with Sampler(str(tmp_path / "plan"), device="cpu") as scoped:
        scoped([1], seed=0)
    sampler.close()
    for closed in (scoped, sampler):
        assert closed.backend.closed and not closed.backend.sessions
        with pytest.raises(BlockcacheError, match="closed"):
            closed([1], seed=0)


def test_atomic_export_keeps_existing_plan(tmp_path, monkeypatch):
    model = load_model("dit-s2", random_init=True, depth=2, hidden_size=64, num_heads=4, input_size=8)
    plan = tmp_path / "plan"
    export_plan(model, Schedule.full(model.unit_names, 4), str(plan))
    before = {f: (plan / f).read_bytes() for f in os.listdir(plan)}

    import exporter.export as ex

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "derive_variant", broken)
    with pytest.raises(RuntimeError):
        export_plan(model, Schedule.uniform(model.unit_names, 4, 2), str(plan))
    assert {f: (plan / f).read_bytes() for f in os.listdir(plan)} == before
    assert [p for p in os.listdir(tmp_path) if p != "plan"] == []  # no temporary folder left behind

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    monkeypatch.undo()

    def no_tracing(*args, **kwargs):  # the destination is refused before minutes of tracing
        raise AssertionError("traced before checking --out")

    monkeypatch.setattr(ex, "trace_step", no_tracing)
    with pytest.raises(BlockcacheError, match="not a plan"):
        export_plan(model, Schedule.full(model.unit_names, 4), str(other))
    assert (other / "notes.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def small_plan(tmp_path_factory):
    model = load_model("dit-s2", random_init=True, depth=2, hidden_size=64, num_heads=4, input_size=8)
    path = tmp_path_factory.mktemp("plans") / "small"
    export_plan(model, Schedule.uniform(model.unit_names, 6, 2), str(path), batch_size=2)
    return path


def copy_plan(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_plan_damage_refused(small_plan, tmp_path):
    damaged = copy_plan(small_plan, tmp_path / "missing")
    os.remove(damaged / "variant_1.onnx")
    with pytest.raises(BlockcacheError, match="missing"):
        Sampler(str(damaged))

    damaged = copy_plan(small_plan, tmp_path / "corrupt")
    data = bytearray((damaged / "weights.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(BlockcacheError, match="checksum"):
        Sampler(str(damaged))

    damaged = copy_plan(small_plan, tmp_path / "truncated")
    text = (damaged / "plan.json").read_text()
    (damaged / "plan.json").write_text(text[: len(text) // 2])
    with pytest.raises(BlockcacheError, match="manifest"):
        Sampler(str(damaged))

    damaged = copy_plan(small_plan, tmp_path / "future")
    manifest = json.loads((damaged / "plan.json").read_text())
    manifest["version"] = 99
    (damaged / "plan.json").write_text(json.dumps(manifest))
    with pytest.raises(BlockcacheError, match="version"):
        Sampler(str(damaged))


def test_sampler_bad_inputs(small_plan):
    sampler = Sampler(str(small_plan), device="cpu")
    with pytest.raises(BlockcacheError, match="out of range"):
        sampler([1, 1000])
    with pytest.raises(BlockcacheError, match="shape"):
        sampler([1, 2], noise=np.zeros((2, 4, 8, 4), np.float32))
    with pytest.raises(BlockcacheError, match="finite"):
        sampler([1], noise=np.full((1, 4, 8, 8), np.nan, np.float32))
    # seeds give the same noise as the eager path (schedules.sampling.initial_noise)
    from schedules.sampling import initial_noise

    assert np.array_equal(sampler([5, 6, 7], seed=3), sampler([5, 6, 7], noise=initial_noise((3, 4, 8, 8), 3)))


def test_cli_export_and_sample_roundtrip(tmp_path):
    sched = tmp_path / "u.yaml"
    r = run_cli("schedules.cli", "uniform", "--model", "dit-s2", *NARROW_FLAGS[:2], "--steps", "8",
                "--interval", "2", "-o", sched)
    assert r.returncode == 0, r.stderr
    flags = ["--model", "dit-s2", "--depth", "28", "--hidden-size", "64", "--num-heads", "4", "--input-size", "8"]
    r = run_cli("exporter.export_cli", *flags, "--random-init", "--schedule", sched, "--out", tmp_path / "plan",
                "--batch-size", "2", "--verify", "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 variants" in r.stdout and "verified 2 variants" in r.stdout
    r = run_cli("exporter.sample_cli", "--plan", tmp_path / "plan", "--labels", "1,2,3", "--seed", "4",
                "--out", tmp_path / "plan.npy", "--quiet")
    assert r.returncode == 0, r.stderr
    r = run_cli("exporter.sample_cli", *flags, "--random-init", "--schedule", sched, "--labels", "1,2,3",
                "--seed", "4", "--out", tmp_path / "eager.npy", "--quiet")
    assert r.returncode == 0, r.stderr
    assert rel_error(np.load(tmp_path / "plan.npy"), np.load(tmp_path / "eager.npy")) <= 1e-5


def test_cli_bad_inputs(small_plan, tmp_path):
    # schedule for another model
    sched = tmp_path / "s.yaml"
    assert run_cli("schedules.cli", "full", "--model", "dit-s2", "--depth", "3", "--steps", "4",
                   "-o", sched).returncode == 0
    r = run_cli("exporter.export_cli", "--model", "dit-s2", "--depth", "2", "--random-init", "--schedule", sched,
                "--out", tmp_path / "p")
    assert r.returncode != 0 and "blocks.2.attn" in assert_one_line_error(r.stderr)
    # truncated checkpoint
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"PK\x03\x04 not really a zip")
    r = run_cli("exporter.export_cli", "--model", "dit-s2", "--depth", "3", "--checkpoint", ckpt, "--schedule",
                sched, "--out", tmp_path / "p")
    assert r.returncode != 0 and "corrupted" in assert_one_line_error(r.stderr)
    assert not (tmp_path / "p").exists()
    # sampling: labels out of range, noise of the wrong shape, missing plan
    r = run_cli("exporter.sample_cli", "--plan", small_plan, "--labels", "1,1000", "--out", tmp_path / "o.npy")
    assert r.returncode != 0 and "out of range" in assert_one_line_error(r.stderr)
    np.save(tmp_path / "z.npy", np.zeros((1, 4, 8, 8), np.float32))
    r = run_cli("exporter.sample_cli", "--plan", small_plan, "--labels", "1,2", "--noise", tmp_path / "z.npy",
                "--out", tmp_path / "o.npy")
    assert r.returncode != 0 and "shape" in assert_one_line_error(r.stderr)
    r = run_cli("exporter.sample_cli", "--plan", tmp_path / "nope", "--labels", "1", "--out", tmp_path / "o.npy")
    assert r.returncode != 0 and "not found" in assert_one_line_error(r.stderr)
    assert not (tmp_path / "o.npy").exists()


def test_plan_weights_rebuild_the_state_dict(tmp_path):
    """Every PyTorch parameter can be read back from the one stored copy (what the torch backend
    relies on), in fp32 and fp16 plans."""
    model = load_model("dit-s2", random_init=True, depth=2, hidden_size=64, num_heads=4, input_size=8)
    for precision, dtype in (("fp32", np.float32), ("fp16", np.float16)):
        manifest = export_plan(model, Schedule.full(model.unit_names, 4), str(tmp_path / precision), precision=precision)
        blob = np.fromfile(tmp_path / precision / "weights.bin", dtype=np.uint8)
        tensors = manifest["weights"]["tensors"]
        params = manifest["weights"]["parameters"]
        assert params.keys() == model.state_dict().keys()
        for name, value in model.state_dict().items():
            t = tensors[params[name]["tensor"]]
            array = blob[t["offset"]: t["offset"] + t["length"]].view(t["dtype"]).reshape(t["shape"])
            if params[name]["transposed"]:
                array = array.T
            assert np.array_equal(array, value.numpy().astype(dtype)), name
