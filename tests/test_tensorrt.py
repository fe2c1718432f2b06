"""TensorRT backend. Everything but the TensorRT calls runs everywhere: engine graphs (weights as
inputs, bf16 retyping), the binding plan replayed on host arenas with ONNX Runtime standing in for the
engines, plan bookkeeping with a stand-in builder, and the clear-failure paths. The tests at the end
build and run real engines; they run only where `import tensorrt` works and a CUDA GPU is present.

On a machine with TensorRT 10+ and a GPU:  python -m pytest tests/test_tensorrt.py -q -rs

One module over 400 lines on purpose: the stand-in tests and the real-engine tests share the plans,
the replay and the fake builder, and a GPU session runs this one file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import types

import numpy as np
import onnx
import pytest

from conftest import TINY_FLAGS, assert_one_line_error
from exporter.engines import (EngineSettings, build_engines, config_kwargs, engine_stage, export_with_engines,
                              parse_size, prepare_graph, retype)
from exporter.export import export_plan, export_plans
from runtime import Sampler
from runtime.bindings import (ALIGNMENT, Arena, check_engine_io, pack_weights, plan_bindings, to_bfloat16,
                              weights_arena)
from runtime.plan import Plan, load_manifest, load_plan
from runtime.plan.files import plan_corrections
from runtime.plan.manifest import Engine, program_entries
from schedules import BlockcacheError, Schedule

pytestmark = pytest.mark.usefixtures("single_thread")
LABELS = [3, 7]
SMALL = 1024  # min_weight_bytes for the tiny model: its matrices become inputs, its biases mostly not


def fake_builder(calls=None):
    """Stands in for TensorRT: the 'engine' is the prepared ONNX graph itself, so the tests can run
    it with ONNX Runtime exactly where the runtime would run the engine."""
    def build(path, settings, cache):
        if calls is not None:
            calls.append(cache)
        with open(path, "rb") as f:
            return f.read()
    return build


@pytest.fixture(scope="module")
def plans(tmp_path_factory, tiny):
    """One tiny plan per engine precision, with stand-in engines (exported once for the module)."""
    root = tmp_path_factory.mktemp("trt")
    schedule = Schedule.uniform(tiny.unit_names, 5, 2)  # 2 variants, caches read and written
    out = {}
    for precision in ("fp32", "fp16", "bf16"):
        settings = EngineSettings(precision=precision, min_weight_bytes=SMALL)
        path = root / precision
        export_with_engines(tiny, schedule, str(path), settings, builder=fake_builder(), version="10.test",
                            batch_size=2, guidance_scale=4.0)
        out[precision] = path
    return out


def noise():
    return np.random.default_rng(0).standard_normal((len(LABELS), 4, 8, 8)).astype(np.float32)


def replay(plan_dir, manifest, x, y, scale, retype_to=None, index=0, decode=False):
    """The runtime's binding plan of program `index` executed on host arenas: every 'engine' (an ONNX
    graph here) reads and writes exactly the slots the TensorRT backend would bind, the weights in the
    one arena every program shares. `decode`: then the decoder engine too, returning the images. `y`:
    the labels, or a text model's prompt inputs {name: array} (its prologue engine then runs first)."""
    import onnxruntime as ort

    parsed = Plan.parse(manifest, plan_dir)
    program = parsed.programs[index]
    engines = stored = [entry["engines"] for _, entry in program_entries(manifest)][index]
    if retype_to is not None:  # run fp16 engines' graphs in fp32 (ORT's CPU has few fp16 kernels)
        engines = json.loads(json.dumps(engines).replace('"float16"', '"float32"'))
    arena = weights_arena(parsed) if len(parsed.programs) > 1 else None  # (a retyped single plan: its own)
    plan = plan_bindings(program, [Engine.parse(e) for e in engines], plan_corrections(parsed, program), arena)
    blob = np.fromfile(os.path.join(plan_dir, "weights.bin"), dtype=np.uint8)
    arenas = {"io": plan.initial_io(), "weights": pack_weights(blob, parsed, plan.weights)}
    sessions = []
    for e in stored:
        model = onnx.load(os.path.join(plan_dir, e["file"]))
        if retype_to is not None:
            retype(model, onnx.TensorProto.FLOAT16, retype_to)
        sessions.append(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]))
    arenas_view = lambda ref: getattr(plan, ref[0]).view(arenas[ref[0]], ref[1])  # noqa: E731
    plan.io.view(arenas["io"], plan.input)[...] = x
    for name, value in (y if isinstance(y, dict) else {"y": y}).items():
        plan.io.view(arenas["io"], name)[...] = value
    plan.io.view(arenas["io"], "guidance_scale")[...] = scale
    runs = [(sessions[k], plan.steps[s]) for s, k in enumerate(plan.step_engine)]
    if program.prologue_engine is not None:
        model = onnx.load(os.path.join(plan_dir, program.prologue_engine.file))
        runs.insert(0, (ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]),
                        plan.prologue))
    if decode:
        model = onnx.load(os.path.join(plan_dir, program.decoder_engine.file))
        runs.append((ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), plan.decoder))
    for session, table in runs:
        feeds = {i.name: arenas_view(table[i.name]).copy() for i in session.get_inputs()}
        for o, value in zip(session.get_outputs(), session.run(None, feeds)):
            arenas_view(table[o.name])[...] = value
    return plan.io.view(arenas["io"], "image" if decode else plan.output).copy()


# ---------------------------------------------------------------------------------------------------
# Binding plan
# ---------------------------------------------------------------------------------------------------

def test_binding_plan_layout(plans):
    manifest = load_manifest(str(plans["fp32"]))
    plan = plan_bindings(Plan.parse(manifest, str(plans["fp32"])).program)
    steps = manifest["steps"]
    # every slot 256-byte aligned, no two overlapping, inside the arena
    for arena in (plan.io, plan.weights):
        spans = sorted((s.offset, s.offset + s.nbytes) for s in arena.slots.values())
        assert all(start % ALIGNMENT == 0 for start, _ in spans)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
        assert spans[-1][1] <= arena.nbytes
    for s, table in enumerate(plan.steps):
        assert table["x"] == ("io", f"x.{s % 2}") and table["x_next"] == ("io", f"x.{(s + 1) % 2}")
        assert table["timestep"] == ("io", f"step.{s}.timestep")
        engine = manifest["tensorrt"]["engines"][steps[s]["variant"]]
        for w in engine["weight_inputs"]:
            assert table[w] == ("weights", w)  # every engine binds the one copy of each weight
        inputs = {table[n] for n in engine["inputs"]}
        outputs = [table[n] for n in engine["outputs"]]
        assert len(set(outputs)) == len(outputs) and not inputs & set(outputs)  # no step aliases itself
    assert plan.output == f"x.{len(steps) % 2}"
    # caches: written by the full variant as unit.*, read by the reuse variant as cache.*
    writes = {plan.steps[0][n] for n in manifest["tensorrt"]["engines"][0]["outputs"] if n.startswith("unit.")}
    reads = {plan.steps[1][n] for n in manifest["tensorrt"]["engines"][1]["inputs"] if n.startswith("cache.")}
    assert reads and reads <= writes
    # step constants written once, with each step's values
    io = plan.initial_io()
    for s, step in enumerate(steps):
        assert plan.io.view(io, f"step.{s}.timestep")[0] == step["timestep"]
        assert plan.io.view(io, f"step.{s}.b")[0] == np.float32(step["b"])
    bases = {"io": 1 << 20, "weights": 1 << 30}
    addresses = plan.addresses(1, bases)
    assert addresses["x"] == bases["io"] + plan.io.slots["x.1"].offset
    assert all(a % ALIGNMENT == 0 for a in addresses.values())


def test_binding_plan_without_engines_matches_variants(plans):
    """A plan's ORT view (no engines) binds the same buffers the ONNX Runtime backend binds."""
    manifest = load_manifest(str(plans["fp32"]))
    del manifest["tensorrt"]
    plan = plan_bindings(Plan.parse(manifest, str(plans["fp32"])).program)
    assert plan.weights.nbytes == 0
    for s, step in enumerate(manifest["steps"]):
        v = manifest["variants"][step["variant"]]
        assert {n for n in plan.steps[s] if n.startswith("cache.")} == {"cache." + u for u in v["reads"]}
        assert {slot for n, (_, slot) in plan.steps[s].items() if n.startswith("unit.")} == \
            {"cache." + u for u in v["writes"]}


def test_binding_plan_rejects_inconsistent_engines(plans):
    manifest = load_manifest(str(plans["fp32"]))
    engines = json.loads(json.dumps(manifest["tensorrt"]["engines"]))
    name = next(n for n in engines[1]["inputs"] if n.startswith("cache."))
    engines[1]["inputs"][name]["dtype"] = "float16"
    with pytest.raises(BlockcacheError, match="another engine"):
        plan_bindings(Plan.parse(manifest, str(plans["fp32"])).program, [Engine.parse(e) for e in engines])
    engines = json.loads(json.dumps(manifest["tensorrt"]["engines"]))
    engines[0]["inputs"]["mystery"] = {"shape": [1], "dtype": "float32"}
    with pytest.raises(BlockcacheError, match="mystery"):
        plan_bindings(Plan.parse(manifest, str(plans["fp32"])).program, [Engine.parse(e) for e in engines])
    expected = Engine.parse(manifest["tensorrt"]["engines"][0])
    actual = {n: {"mode": "input", "shape": list(s.shape), "dtype": s.dtype} for n, s in expected.inputs.items()}
    actual.update({n: {"mode": "output", "shape": list(s.shape), "dtype": s.dtype} for n, s in expected.outputs.items()})
    check_engine_io(expected, actual, "engine_0.plan")
    del actual["guidance_scale"]  # an unused input the builder dropped: fine
    check_engine_io(expected, actual, "engine_0.plan")
    actual["x_next"]["shape"] = [9]
    with pytest.raises(BlockcacheError, match="x_next"):
        check_engine_io(expected, actual, "engine_0.plan")
    del actual["x_next"]
    with pytest.raises(BlockcacheError, match="x_next"):
        check_engine_io(expected, actual, "engine_0.plan")


def test_scale_shift_vectors_are_step_constants(tiny, tmp_path):
    """Block Caching scale/shift inputs are bound to per-step constant slots holding the schedule's
    vectors (zeros where a step has none); the replayed engines reproduce ONNX Runtime's samples."""
    from test_scale_shift import partly_corrected

    _, schedule = partly_corrected(tiny)
    path = str(tmp_path / "plan")
    export_with_engines(tiny, schedule, path, EngineSettings(precision="fp32", min_weight_bytes=SMALL),
                        builder=fake_builder(),
                        version="10.test", batch_size=2, guidance_scale=4.0)
    manifest = load_manifest(path)
    with pytest.raises(BlockcacheError, match="scale-shift"):
        plan_bindings(load_plan(path).program)
    loaded = load_plan(path)
    plan = plan_bindings(loaded.program, corrections=plan_corrections(loaded, loaded.program))
    buffer = plan.initial_io()
    unit = manifest["variants"][1]["adjusts"][0]
    for s in range(schedule.num_steps):
        if unit in schedule.reused(s):
            want = schedule.scale_shift.get((s, unit), (np.zeros(64),))[0]
            np.testing.assert_array_equal(plan.io.view(buffer, f"step.{s}.scale.{unit}"), want)
    x, y = noise(), np.array(LABELS, np.int64)
    want = Sampler(path, backend="onnxruntime", device="cpu")(LABELS, noise=x)
    got = replay(path, manifest, x, y, 4.0)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_engines_of_every_program_share_one_weights_arena(tiny, tmp_path):
    """A plan of batch sizes 1 and 2 × two schedules gets an engine per variant of every program, all
    binding one weights arena (the parameters once, as a single-program plan's); each program's
    engines replayed reproduce ONNX Runtime on that program."""
    settings = EngineSettings(precision="fp32", min_weight_bytes=SMALL)
    stage = engine_stage(settings, builder=fake_builder(), version="10.test")
    path = str(tmp_path / "plan")
    manifest = export_plans(tiny, [Schedule.uniform(tiny.unit_names, 5, 2), Schedule.uniform(tiny.unit_names, 3, 3)],
                            path, batch_sizes=[1, 2], guidance_scale=4.0, finish=stage)
    assert "engines" not in manifest["tensorrt"]
    files = [e["file"] for p in manifest["programs"] for e in p["engines"]]
    assert [len(p["engines"]) for p in manifest["programs"]] == [len(p["variants"]) for p in manifest["programs"]]
    assert len(set(files)) == len(files) and all(f in manifest["files"] for f in files)
    single = export_with_engines(tiny, Schedule.uniform(tiny.unit_names, 5, 2), str(tmp_path / "single"), settings,
                                 builder=fake_builder(), version="10.test", batch_size=1, guidance_scale=4.0)
    assert manifest["tensorrt"]["weights_bytes"] == single["tensorrt"]["weights_bytes"]
    plan = load_plan(path)
    with Sampler(path, backend="onnxruntime", device="cpu", threads=1) as sampler:
        for program in plan.programs:
            x = np.random.default_rng(program.index).standard_normal((program.batch_size, 4, 8, 8)).astype(np.float32)
            y = np.arange(program.batch_size, dtype=np.int64)
            want = sampler.backend.run(x, y, 4.0, program=sampler.plan.programs[program.index])
            got = replay(path, manifest, x, y, 4.0, index=program.index)
            assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), program.index


def test_dpm_solver_plan_binds_three_latents(tmp_path):
    """A U-ViT DPM-Solver-2 plan: the binding plan rotates three latent buffers (input, carry, output
    per evaluation) and binds `c` as a step constant; the replayed engines reproduce ONNX Runtime."""
    from exporter.models import load_model

    model = load_model("uvit-h2", random_init=True, hidden_size=32, num_heads=2, input_size=8)
    compute = np.ones((8, len(model.unit_names)), bool)
    compute[2::2, 1::3] = False
    schedule = Schedule(model.unit_names, compute, {"name": "dpm-solver-2", "steps": 8, "spacing": "time-uniform"})
    path = str(tmp_path / "plan")
    export_with_engines(model, schedule, path, EngineSettings(precision="fp32", min_weight_bytes=SMALL),
                        builder=fake_builder(), version="10.test", batch_size=2, guidance_scale=0.4)
    manifest = load_manifest(path)
    plan = plan_bindings(load_plan(path).program)
    assert {n for n in plan.io.slots if n.startswith("x.")} == {"x.0", "x.1", "x.2"}
    assert plan.steps[1]["x_carry"] == ("io", "x.0") and plan.steps[1]["x"] == ("io", "x.1")
    assert "step.1.c" in plan.constants
    x = noise()
    want = Sampler(path, backend="onnxruntime", device="cpu")(LABELS, noise=x)
    got = replay(path, manifest, x, np.array(LABELS, np.int64), 0.4)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_arena_pack_and_bfloat16():
    arena = Arena.pack([("a", [3], "float32"), ("b", [2, 2], "bfloat16"), ("c", [], "int64")])
    assert [s.offset for s in arena.slots.values()] == [0, 256, 512] and arena.nbytes == 768
    torch = pytest.importorskip("torch")
    values = np.concatenate([np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 100,
                             np.array([0, -0.0, 1e-40, 3.4e38, np.inf, -np.inf], np.float32)])
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(to_bfloat16(values), want)  # round to nearest even, like torch
    assert to_bfloat16(np.array([np.nan], np.float32))[0] & 0x7F80 == 0x7F80  # NaN stays NaN


# ---------------------------------------------------------------------------------------------------
# Engine graphs, plan bookkeeping and the replayed plan
# ---------------------------------------------------------------------------------------------------

def test_engine_graphs_take_weights_as_inputs(plans):
    manifest = load_manifest(str(plans["fp32"]))
    tensors = manifest["weights"]["tensors"]
    total = sum(t["length"] for t in tensors.values())
    for e in manifest["tensorrt"]["engines"]:
        graph = onnx.load(str(plans["fp32"] / e["file"]))  # stand-in engine = the prepared graph
        inits = {t.name for t in graph.graph.initializer}
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
        assert set(e["weight_inputs"]) <= set(tensors) and not inits & set(e["weight_inputs"])
        assert {i.name for i in graph.graph.input} >= set(e["weight_inputs"])
        assert "model.x_embedder.proj.weight" in inits  # Conv kernels stay baked
        assert e["baked_bytes"] < 0.1 * total
    weight_bytes = manifest["tensorrt"]["weights_bytes"]
    assert weight_bytes < 1.1 * total  # held once (plus alignment), not once per engine


def test_default_threshold_keeps_small_tensors_baked(plans):
    manifest = load_manifest(str(plans["fp32"]))
    blob = np.fromfile(plans["fp32"] / "weights.bin", dtype=np.uint8)
    model = onnx.load(str(plans["fp32"] / "variant_0.onnx"), load_external_data=False)
    _, inputs, _ = prepare_graph(model, blob)
    t = manifest["weights"]["tensors"]
    assert inputs and all(t[n]["length"] >= 16 * 1024 for n in inputs)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_replayed_plan_matches_onnxruntime(plans, precision):
    """Prepared graphs + binding plan + packed weights reproduce the ONNX Runtime backend's samples."""
    path = plans[precision]
    manifest = load_manifest(str(path))
    x, y = noise(), np.array(LABELS, np.int64)
    want = Sampler(str(path), backend="onnxruntime", device="cpu")(LABELS, noise=x)
    got = replay(str(path), manifest, x, y, 4.0)
    tol = 1e-6 if precision == "fp32" else 2e-3
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_bf16_engine_graphs(plans):
    manifest = load_manifest(str(plans["bf16"]))
    assert manifest["precision"] == "fp16" and manifest["tensorrt"]["precision"] == "bf16"
    bf16 = onnx.TensorProto.BFLOAT16
    for e in manifest["tensorrt"]["engines"]:
        model = onnx.load(str(plans["bf16"] / e["file"]))
        onnx.checker.check_model(model, full_check=True)  # types consistent everywhere
        text = str(model)
        assert "elem_type: 10" not in text and "data_type: 10" not in text  # no float16 left
        assert all(e["inputs"][w]["dtype"] == "bfloat16" for w in e["weight_inputs"])
        assert e["inputs"]["x"]["dtype"] == "float32" and e["outputs"]["x_next"]["dtype"] == "float32"
        assert any(v.type.tensor_type.elem_type == bf16 for v in model.graph.input)
    # weights converted from the fp16 weights.bin on packing
    plan = plan_bindings(Plan.parse(manifest, str(plans["bf16"])).program)
    blob = np.fromfile(plans["bf16"] / "weights.bin", dtype=np.uint8)
    packed = pack_weights(blob, Plan.parse(manifest, str(plans["bf16"])), plan.weights)
    name = next(iter(plan.weights.slots))
    t = manifest["weights"]["tensors"][name]
    fp16 = blob[t["offset"]: t["offset"] + t["length"]].view(np.float16).reshape(t["shape"])
    assert np.array_equal(plan.weights.view(packed, name), to_bfloat16(fp16))
    # the caches follow the engines' type
    assert all(s.dtype == "bfloat16" for n, s in plan.io.slots.items() if n.startswith("cache."))


def test_retype_is_complete(plans):
    """Retyping every fp16 tensor (here to fp32, which ORT runs) leaves a consistent graph that
    computes the fp16 plan's result: the same pass makes the bf16 graphs."""
    path = plans["fp16"]
    manifest = load_manifest(str(path))
    x, y = noise(), np.array(LABELS, np.int64)
    want = replay(str(path), manifest, x, y, 4.0)
    got = replay(str(path), manifest, x, y, 4.0, retype_to=onnx.TensorProto.FLOAT)
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


def test_plan_with_engines_is_still_an_onnx_plan(plans):
    path = plans["fp32"]
    manifest = load_manifest(str(path))  # checksums of every file, engines included
    engines = manifest["tensorrt"]["engines"]
    assert [e["file"] for e in engines] == [f"engine_{k}.plan" for k in range(len(manifest["variants"]))]
    assert all(e["file"] in manifest["files"] for e in engines)
    assert manifest["version"] == 2 and manifest["tensorrt"]["built_with"] == "10.test"  # sealed format
    assert sorted(os.listdir(path)) == sorted([*manifest["files"], "plan.json"])  # nothing left behind
    data = bytearray((path / "engine_1.plan").read_bytes())
    damaged = path.parent / "damaged"
    import shutil

    shutil.copytree(path, damaged)
    data[len(data) // 2] ^= 0xFF
    (damaged / "engine_1.plan").write_bytes(bytes(data))
    with pytest.raises(BlockcacheError, match="checksum"):
        load_manifest(str(damaged))


def test_build_engines_shares_timing_cache_and_is_atomic(tiny, tmp_path):
    schedule = Schedule.uniform(tiny.unit_names, 4, 2)
    plan = tmp_path / "plan"
    settings = EngineSettings(precision="fp32", min_weight_bytes=SMALL)
    calls = []
    export_with_engines(tiny, schedule, str(plan), settings, builder=fake_builder(calls), version="10.test")
    assert len(calls) == 2 and len(set(calls)) == 1  # one timing cache for all engines of an export
    before = {f: (plan / f).read_bytes() for f in os.listdir(plan)}

    def broken(path, settings, cache):
        if path.endswith("variant_1.trt.onnx"):
            raise BlockcacheError("TensorRT could not build variant_1")
        return b"engine"

    with pytest.raises(BlockcacheError, match="could not build"):
        export_with_engines(tiny, Schedule.uniform(tiny.unit_names, 6, 3), str(plan), settings, builder=broken,
                            version="10.test")
    assert {f: (plan / f).read_bytes() for f in os.listdir(plan)} == before  # old plan untouched
    assert os.listdir(tmp_path) == ["plan"]  # no staging folder left
    # engines added to an existing ONNX plan: the files move in, then the manifest is replaced
    onnx_plan = tmp_path / "onnx"
    manifest = export_plan(tiny, schedule, str(onnx_plan))
    with pytest.raises(BlockcacheError, match="could not build"):
        build_engines(str(onnx_plan), manifest, settings, builder=broken, version="10.test")
    assert "tensorrt" not in load_manifest(str(onnx_plan)) and not list(onnx_plan.glob("engine_*"))
    assert not [p for p in os.listdir(onnx_plan) if p.startswith(".")]
    with pytest.raises(BlockcacheError, match="fp16 plan"):
        build_engines(str(onnx_plan), manifest, EngineSettings(precision="bf16"), builder=broken, version="1")


# ---------------------------------------------------------------------------------------------------
# Build settings and options
# ---------------------------------------------------------------------------------------------------

def test_build_settings(tmp_path):
    trt = types.SimpleNamespace(ProfilingVerbosity=types.SimpleNamespace(DETAILED="detailed"),
                                MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"))
    kw = config_kwargs(EngineSettings(precision="fp16", workspace=1 << 30, opt_level=5), trt)
    assert kw == {"tf32": False, "profiling_verbosity": "detailed", "memory_pool_limits": {"workspace": 1 << 30},
                  "builder_optimization_level": 5}
    assert config_kwargs(EngineSettings(precision="fp32", tf32=True), trt)["tf32"] is True
    assert config_kwargs(EngineSettings(precision="fp16", tf32=True), trt)["tf32"] is False
    assert [EngineSettings(precision=p).onnx_precision for p in ("fp32", "fp16", "bf16")] == ["fp32", "fp16", "fp16"]
    assert parse_size("4G") == 4 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    assert parse_size("1.5GB") == 3 << 29 and parse_size(None) is None
    for bad in ("lots", "-1G", "0", "nanG"):
        with pytest.raises(BlockcacheError, match="workspace"):
            parse_size(bad)
    with pytest.raises(BlockcacheError, match="int8"):
        EngineSettings(precision="int8")
    with pytest.raises(BlockcacheError, match="opt_level"):  # the library names its parameter; the CLI its flag
        EngineSettings(opt_level=9)
    with pytest.raises(BlockcacheError, match="folder"):
        EngineSettings(timing_cache=str(tmp_path))
    with pytest.raises(BlockcacheError, match="does not exist"):
        EngineSettings(timing_cache=str(tmp_path / "no" / "cache"))


# ---------------------------------------------------------------------------------------------------
# Clear failures without TensorRT
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_cli_tensorrt_missing_fails_at_once(no_tensorrt, tmp_path, capsys):
    from exporter.export_cli import main

    # the schedule does not exist: the TensorRT check must come first
    rc = main(["--model", "dit-s2", *TINY_FLAGS, "--random-init", "--schedule", str(tmp_path / "none.yaml"),
               "--out", str(tmp_path / "plan"), "--backend", "tensorrt", "--precision", "fp16"])
    line = assert_one_line_error(capsys.readouterr().err)
    assert rc == 2 and "TensorRT 10+" in line and "pip install tensorrt" in line
    assert not (tmp_path / "plan").exists()


@pytest.mark.parametrize("flags, message", [
    (["--precision", "bf16"], "bf16 needs --backend tensorrt"),
    (["--workspace", "4G"], "--workspace is a TensorRT build option"),
    (["--opt-level", "3"], "--opt-level is a TensorRT build option"),
])
def test_cli_tensorrt_options_need_tensorrt_backend(flags, message, tmp_path, capsys):
    from exporter.export_cli import main

    rc = main(["--model", "dit-s2", *TINY_FLAGS, "--random-init", "--schedule", str(tmp_path / "s.yaml"),
               "--out", str(tmp_path / "plan"), *flags])
    assert rc == 2 and message in assert_one_line_error(capsys.readouterr().err)


def test_cli_tensorrt_export_with_stand_in(monkeypatch, tmp_path, capsys, tiny):
    """The CLI path of --backend tensorrt, with TensorRT replaced by the stand-in builder."""
    import exporter.engines as engines
    import runtime.backends.tensorrt as rt

    monkeypatch.setattr(rt, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.test"))
    monkeypatch.setattr(engines, "build_engine_bytes", fake_builder())
    monkeypatch.setattr(engines, "tensorrt_version", lambda: "10.test")
    from exporter.export_cli import main

    Schedule.uniform(tiny.unit_names, 4, 2).save(str(tmp_path / "s.yaml"))
    rc = main(["--model", "dit-s2", *TINY_FLAGS, "--random-init", "--schedule", str(tmp_path / "s.yaml"),
               "--out", str(tmp_path / "plan"), "--backend", "tensorrt", "--precision", "bf16", "--quiet",
               "--timing-cache", str(tmp_path / "t.cache"), "--opt-level", "2", "--workspace", "1G"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "2 TensorRT bf16 engines" in out.out and "held once" in out.out
    manifest = load_manifest(str(tmp_path / "plan"))
    assert manifest["tensorrt"]["settings"]["opt_level"] == 2
    assert manifest["tensorrt"]["settings"]["workspace"] == 1 << 30


def test_sampler_tensorrt_missing(no_tensorrt, plans, caplog):
    path = str(plans["fp32"])
    with pytest.raises(BlockcacheError, match=r"TensorRT 10\+ \(pip install tensorrt"):
        Sampler(path, backend="tensorrt")
    with pytest.raises(BlockcacheError, match="CUDA GPU"):
        Sampler(path, backend="tensorrt", device="cpu")
    with caplog.at_level(logging.WARNING, logger="blockcache"):
        sampler = Sampler(path, backend="auto", device="auto")
    assert sampler.backend.name == "onnxruntime"
    lines = [r.getMessage() for r in caplog.records if r.name == "blockcache"]
    assert len(lines) == 1 and "using ONNX Runtime" in lines[0] and "not installed here" in lines[0]
    assert "\n" not in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="blockcache"):
        assert Sampler(path, backend="auto", device="cpu").backend.name == "onnxruntime"
    assert not caplog.records  # the user asked for the CPU: nothing to explain


def test_tensorrt_backend_refuses_plan_without_engines(tmp_path, tiny):
    from runtime.backends.tensorrt import TensorRTBackend

    export_plan(tiny, Schedule.full(tiny.unit_names, 2), str(tmp_path / "p"))
    with pytest.raises(BlockcacheError, match="no TensorRT engines"):
        TensorRTBackend(load_plan(str(tmp_path / "p")))


# ---------------------------------------------------------------------------------------------------
# With TensorRT and a GPU only
# ---------------------------------------------------------------------------------------------------

def _gpu_reason() -> str | None:
    from runtime.backends.tensorrt import tensorrt_available

    if not tensorrt_available():
        return "TensorRT 10+ is not importable here (pip install tensorrt from NVIDIA's index)"
    try:
        from polygraphy import cuda

        cuda.wrapper().free(cuda.wrapper().malloc(1))
    except Exception:
        return "no usable CUDA GPU"
    return None


@pytest.fixture(scope="module")
def gpu():
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-3), ("fp16", 3e-2), ("bf16", 1e-1)])
def test_real_engines_match_onnxruntime(gpu, precision, tol, tiny, tmp_path):
    schedule = Schedule.uniform(tiny.unit_names, 5, 2)
    path = str(tmp_path / "plan")
    export_with_engines(tiny, schedule, path, EngineSettings(precision=precision, min_weight_bytes=SMALL,
                                                             timing_cache=str(tmp_path / "t.cache")),
                        batch_size=2, guidance_scale=4.0)
    assert os.path.getsize(tmp_path / "t.cache") > 0
    x = noise()
    want = Sampler(path, backend="onnxruntime", device="cpu")(LABELS, noise=x)
    sampler = Sampler(path, backend="tensorrt")
    backend = sampler.backend
    assert backend.cuda_graph and len(backend.contexts) == len(sampler.manifest["steps"])
    got = sampler(LABELS, noise=x)
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    assert np.array_equal(sampler(LABELS, noise=x), got)  # graph replay is repeatable
    assert backend.memory["weights"] == sampler.manifest["tensorrt"]["weights_bytes"]
    assert Sampler(path, backend="auto").backend.name == "tensorrt"


def test_span_plan_binds_span_residual_buffers(tmp_path):
    """A plan with spans skipped (`s` rows): its residual buffers are cache slots like units'; the
    replayed engines reproduce ONNX Runtime."""
    from conftest import tiny_model
    from test_span_reuse import _schedule

    model = tiny_model(depth=4)
    path = str(tmp_path / "plan")
    export_with_engines(model, _schedule(model.unit_names), path, EngineSettings(precision="fp32", min_weight_bytes=SMALL),
                        builder=fake_builder(), version="10.test", batch_size=2, guidance_scale=4.0)
    manifest = load_manifest(path)
    x, y = noise(), np.array(LABELS, np.int64)
    want = Sampler(path, backend="onnxruntime", device="cpu")(LABELS, noise=x)
    got = replay(path, manifest, x, y, 4.0)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_plan_binds_history_in_rotation(tmp_path, order):
    """A forecasting plan: each reused value's history buffers are slots that its inputs `cache.<u>~i`
    are bound to in rotation, its weights per-step constants; the replayed engines reproduce ONNX
    Runtime, and the TensorRT binding plan gives no slot to a rotation that copies."""
    from conftest import tiny_model
    from test_forecast import _schedule

    model = tiny_model(depth=4)
    path = str(tmp_path / "plan")
    export_with_engines(model, _schedule(model.unit_names, order), path,
                        EngineSettings(precision="fp32", min_weight_bytes=SMALL), builder=fake_builder(),
                        version="10.test", batch_size=2, guidance_scale=4.0)
    manifest = load_manifest(path)
    x, y = noise(), np.array(LABELS, np.int64)
    want = Sampler(path, backend="onnxruntime", device="cpu")(LABELS, noise=x)
    got = replay(path, manifest, x, y, 4.0)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    program = Plan.parse(manifest, path).program
    plan = plan_bindings(program)
    ring = {"cache.blocks.1.attn"} | {f"cache.blocks.1.attn@{r}" for r in range(1, order + 1)}
    # blocks.1.attn is reused at steps 3 and 5 and computed at 4 in between: the newest value moved
    newest = [plan.steps[s]["cache.blocks.1.attn"][1] for s in (3, 5)]
    assert set(newest) <= ring and newest[0] != newest[1]
    # at step 5 (history 4, 2, 0) its order + 1 values are in the order + 1 distinct buffers of the ring
    roles = [plan.steps[5]["cache.blocks.1.attn" + (f"~{i}" if i else "")][1] for i in range(order + 1)]
    assert len(set(roles)) == order + 1 and set(roles) == ring


def test_decoder_engine_decodes_the_final_latent_slot(tmp_path):
    """A TensorRT plan with a decoder: one fp32 decoder engine per batch size, its weights in the shared
    arena, bound to the final latent's slot and the image slot; its replay gives ONNX Runtime's images."""
    from conftest import tiny_model, tiny_vae

    from runtime.nn.decoder import ImageDecoder

    model = tiny_model()
    path = str(tmp_path / "plan")
    export_with_engines(model, Schedule.uniform(model.unit_names, 5, 2), path,
                        EngineSettings(precision="fp32", min_weight_bytes=SMALL), builder=fake_builder(),
                        version="10.test", batch_size=2, guidance_scale=4.0, decoder=ImageDecoder(tiny_vae(), 0.18215))
    manifest = load_manifest(path)
    assert manifest["decoder_engine"]["file"] == "decoder_engine_2.plan" and manifest["decoder_engine"]["weight_inputs"]
    program = Plan.parse(manifest, path).program
    plan = plan_bindings(program)
    assert plan.decoder["latents"] == ("io", plan.output) and plan.decoder["image"] == ("io", "image")
    x, y = noise(), np.array(LABELS, np.int64)
    want = Sampler(path, backend="onnxruntime", device="cpu")(LABELS, noise=x)
    got = replay(path, manifest, x, y, 4.0, decode=True)
    assert got.dtype == np.uint8 and np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_prologue_engine_feeds_every_step_of_a_text_plan(tmp_path):
    """A TensorRT plan of a text model (PixArt): one prologue engine per batch size at the plan's
    precision, its weights in the shared arena, reading the prompt slots and writing the key, value and
    bias slots the step engines bind; its replay gives ONNX Runtime's latents."""
    from exporter.models import load_model
    from schedules.prompts import PromptInputs

    model = load_model("pixart-alpha-1024", random_init=True, input_size=8, hidden_size=48, depth=2, num_heads=4,
                       caption_channels=40, max_text_tokens=7)
    path = str(tmp_path / "plan")
    export_with_engines(model, Schedule.uniform(model.unit_names, 5, 2, sampler="dpm-solver++-2m"), path,
                        EngineSettings(precision="fp32", min_weight_bytes=SMALL), builder=fake_builder(),
                        version="10.test", batch_size=2)
    manifest = load_manifest(path)
    assert manifest["prologue_engine"]["file"] == "prologue_engine_2.plan"
    assert manifest["prologue_engine"]["weight_inputs"]  # the caption projection and the key/value weights
    program = Plan.parse(manifest, path).program
    plan = plan_bindings(program)
    assert plan.prologue["prompt_embeds"] == ("io", "prompt_embeds")
    assert plan.prologue["prompt.keys.1"] == ("io", "prompt.keys.1") == plan.steps[0]["prompt.keys.1"]
    rng = np.random.default_rng(0)
    prompts = PromptInputs(rng.standard_normal((2, 7, 40)).astype(np.float32), np.array([[1] * 3 + [0] * 4, [1] * 7]),
                           rng.standard_normal((1, 7, 40)).astype(np.float32), np.ones((1, 7), np.int64))
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    want = Sampler(path, backend="onnxruntime", device="cpu")(
        prompt_embeds=prompts.embeds, prompt_mask=prompts.mask, negative_embeds=prompts.negative_embeds,
        negative_mask=prompts.negative_mask, noise=x)
    embeds, mask = prompts.network(True)
    got = replay(path, manifest, x, {"prompt_embeds": embeds, "prompt_mask": mask}, 4.5)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
