"""blockcache-bench and the GPU suite's harness on CPU with tiny models: every method and precision
produces a row, derived numbers are consistent, outputs are written, and bad input is one line.
No test asserts a timing."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from benchmarks import bench, gpu_suite
from benchmarks.bench import BenchConfig, build_cases, run_benchmark
from conftest import TINY, assert_one_line_error, tiny_model
from schedules import BlockcacheError
from schedules.zoo import model_config, unit_names

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_FLAGS = ["--model", "dit-s2", "--depth", "2", "--hidden-size", "64", "--num-heads", "4", "--input-size", "8",
              "--random-init"]


def test_cases_add_full_and_equal_macs_runs():
    config = model_config("dit-xl2")
    cfg = BenchConfig(model="dit-xl2", schedules=["l2c20", "uniform:4", "l2c50"], steps=20)
    cases = build_cases(cfg, unit_names(config), config)
    assert [(c.name, c.role, c.group) for c in cases] == [
        ("full20", "full", "full20"), ("full50", "full", "full50"),
        ("l2c20", "cached", "full20"), ("ddim16", "fewer-steps", "full20"),
        ("uniform4@20", "cached", "full20"), ("ddim5", "fewer-steps", "full20"),
        ("l2c50", "cached", "full50"), ("ddim38", "fewer-steps", "full50")]
    with pytest.raises(BlockcacheError, match="unknown schedule"):
        build_cases(BenchConfig(model="dit-xl2", schedules=["nope"]), unit_names(config), config)
    small = model_config("dit-s2", **TINY)
    with pytest.raises(BlockcacheError, match="28 blocks"):
        build_cases(BenchConfig(model="dit-s2", schedules=["l2c20"]), unit_names(small), small)


def test_bench_cli_end_to_end(tmp_path, capsys):
    argv = TINY_FLAGS + ["--schedule", "uniform:2", "--steps", "4", "--backends", "eager,torch,onnxruntime",
                         "--precision", "fp32,bf16", "--repeats", "2", "--threads", "1", "--out", str(tmp_path),
                         "--tag", "t", "--quiet"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "| precision | method |" in out and "wrote" in out
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"t.{ext}").stat().st_size > 0
    results = json.loads((tmp_path / "t.json").read_text())
    rows = {(r["precision"], r["method"], r["schedule"]): r for r in results["rows"]}
    schedules = ("full4", "uniform2@4", "ddim2")
    assert set(results["schedules"]) == set(schedules)
    assert len(rows) == 2 * 3 * 3
    for (precision, method, schedule), r in rows.items():
        if method == "onnxruntime" and precision == "bf16":
            assert r["status"] == "skipped" and "bf16" in r["reason"]
            continue
        assert r["status"] == "ok", r.get("reason")
        lat = r["latency_s"]
        assert lat["min"] <= lat["median"] <= lat["max"] and len(lat["all"]) == 2
        assert r["peak_host_mb"] > 0 and r["peak_device_mb"] is None
        assert math.isclose(r["efficiency"], r["speedup"] / r["ideal_speedup"])
        if schedule == "full4":
            assert r["speedup"] == 1.0 and r["ideal_speedup"] == 1.0
        if precision == "fp32":  # plans and eager agree with the fp32 reference to fp32 accuracy
            full_err = rows[("fp32", "eager", schedule)]["relative_error"]
            assert abs(r["relative_error"] - full_err) <= 1e-5
    assert rows[("fp32", "eager", "full4")]["relative_error"] == 0 and \
        math.isinf(rows[("fp32", "eager", "full4")]["psnr_db"])
    assert rows[("fp32", "torch", "full4")]["relative_error"] <= 1e-5
    assert rows[("fp32", "torch", "uniform2@4")]["relative_error"] > 1e-4  # caching changes the result
    assert 0 < rows[("bf16", "torch", "full4")]["relative_error"] <= 5e-2
    assert rows[("bf16", "torch", "full4")]["plan_precision"] == "fp32"
    ideal = results["schedules"]["ddim2"]["ideal_speedup"]
    assert ideal == 2.0 and results["schedules"]["ddim2"]["compared_with"] == "full4"
    md = (tmp_path / "t.md").read_text()
    assert md.count("\n| fp32 |") == 9 and "skipped" in md


def test_compile_and_inductor_methods_and_plan_reuse(tmp_path):
    """The compiled baseline and the torch backend's compiled blocks (dynamo only, 'eager' compiler
    backend, to stay fast); a second run reuses the exported plans."""
    cfg = BenchConfig(model="dit-s2", schedules=["uniform:2"], steps=4, methods=["compile", "torch-inductor"],
                      repeats=1, compile_backend="eager", fewer_steps=False, plans_dir=str(tmp_path / "plans"),
                      progress=False)
    model = tiny_model()
    results = run_benchmark(cfg, model=model)
    rows = {(r["method"], r["schedule"]): r for r in results["rows"]}
    assert set(rows) == {("compile", "full4"), ("torch-inductor", "full4"), ("torch-inductor", "uniform2@4")}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("reason") for r in rows.values()]
    assert rows[("compile", "full4")]["relative_error"] <= 1e-5
    assert rows[("torch-inductor", "full4")]["relative_error"] <= 1e-5
    assert set(results["export_seconds"]) == {"full4-fp32", "uniform2@4-fp32"}
    store = bench.PlanStore(cfg.plans_dir, model, cfg)  # a later run reuses matching plans
    cases = build_cases(cfg, model.unit_names, model.config)
    assert store.get(cases[1], "fp32") == str(tmp_path / "plans" / "uniform2@4-fp32")
    assert store.export_seconds == {}
    other = BenchConfig(**{**cfg.__dict__, "batch_size": 1})  # a different plan is exported again
    assert bench.PlanStore(cfg.plans_dir, model, other).key(cases[1], "fp32") != store.key(cases[1], "fp32")


def test_digits_metrics(tmp_path, monkeypatch):
    """For dit-digits the fidelity columns add class accuracy and digits-FD (tiny random stand-in). The
    metric's classifier is fitted with few iterations here: its full fit takes half a minute."""
    from sklearn.neural_network import MLPClassifier

    from benchmarks import digits_metric as dm
    from exporter.models import load_model

    def quick_classifier(cache={}):
        if "clf" not in cache:
            tr_x, tr_y, _, _ = dm.split()
            clf = MLPClassifier(hidden_layer_sizes=(64,), solver="lbfgs", max_iter=20, random_state=0)
            with warnings.catch_warnings():  # not converged after 20 iterations: fine here
                warnings.simplefilter("ignore")
                cache["clf"] = clf.fit(dm.classifier_input(tr_x), tr_y)
        return cache["clf"]

    monkeypatch.setattr(dm, "classifier", quick_classifier)

    model = load_model("dit-digits", random_init=True, depth=2, hidden_size=32, num_heads=2)
    cfg = BenchConfig(model="dit-digits", schedules=["uniform:2"], steps=4, methods=["eager"], batch_size=4,
                      repeats=1, fewer_steps=False, progress=False)
    results = run_benchmark(cfg, model=model)
    assert results["labels"] == [0, 1, 2, 3]
    assert "2 (digit images" in results["psnr_data_range"]
    for r in results["rows"]:
        assert 0 <= r["class_accuracy"] <= 1 and r["digits_fd"] >= 0
    paths = bench.write_results(results, str(tmp_path), "digits")
    assert "class acc." in open(paths["md"]).read()


def test_memory_monitor():
    with bench.MemoryMonitor("cpu") as monitor:
        block = np.ones(64 << 20, np.uint8)  # touch 64 MB
        block[::4096] = 2
    report = monitor.report()
    assert report["host_increase_mb"] >= 48 and report["peak_device_mb"] is None


@pytest.mark.parametrize("args, message", [
    (["--backends", "eager,warp"], "unknown method 'warp'"),
    (["--precision", "fp8"], "unknown precision"),
    (["--schedule", "l2c20"], "28 blocks"),
    (["--schedule", "uniform:x"], "integer K"),
    (["--batch-size", "0"], "batch size"),
    (["--labels", "1,2,3"], "3 labels given for a batch of 2"),
    (["--repeats", "0"], "repeats"),
    (["--peers", "fbc:0.1,nope"], "unknown peer 'nope'"),
    (["--peers", "fbc:0.1", "--matched", "uniform,oracle"], "unknown matched maker 'oracle'"),
])
def test_bench_bad_inputs(args, message, tmp_path, capsys):
    assert bench.main(TINY_FLAGS + ["--out", str(tmp_path), "--quiet"] + args) == 2
    assert message in assert_one_line_error(capsys.readouterr().err)


def test_gpu_suite_config_and_targets():
    cfg = gpu_suite.suite_config(small=True, device="cpu")
    assert cfg.overrides["depth"] == 28 and cfg.batch_size == 2 and cfg.schedules == ["l2c50", "l2c20"]
    assert cfg.methods == ["eager", "compile", "torch", "torch-inductor", "onnxruntime"]
    assert cfg.precisions == ["bf16", "fp16"] and cfg.bf16_plan == "fp16"
    xl = gpu_suite.suite_config(small=False, steps=(50,), precisions=("bf16",), compile_full=False)
    assert xl.model == "dit-xl2" and xl.batch_size == 8 and xl.labels == gpu_suite.LABELS
    assert xl.schedules == ["l2c50"] and "compile" not in xl.methods
    with pytest.raises(BlockcacheError, match="--steps"):
        gpu_suite.suite_config(small=True, steps=(30,))

    def row(method, schedule, role, median, efficiency=None):
        return {"status": "ok", "precision": "bf16", "method": method, "schedule": schedule, "role": role,
                "latency_s": {"median": median}, "efficiency": efficiency}

    results = {"device": "cuda", "machine": {"gpu": "NVIDIA H100 80GB HBM3"}, "batch_size": 8, "rows": [
        row("eager", "l2c50", "cached", 1.0), row("torch", "l2c50", "cached", 0.2, 0.97),
        row("torch", "full50", "full", 0.3, 1.0), row("compile", "full50", "full", 0.25, 1.0)]}
    targets = {t["target"].split(" ")[0] + t["target"].split(" ")[1]: t
               for t in gpu_suite.evaluate_targets(results, small=False)}
    assert [t["met"] for t in gpu_suite.evaluate_targets(results, small=False)] == [True, True, False, True]
    assert len(targets) == 4
    on_cpu = gpu_suite.evaluate_targets({**results, "device": "cpu", "machine": {}}, small=True)
    assert [t["met"] for t in on_cpu] == [True, None, None, None]  # 0.97 >= 0.9 on CPU; GPU targets n/a
    assert "n/a" in gpu_suite.targets_markdown(on_cpu)


def test_gpu_suite_bad_inputs(tmp_path, capsys):
    assert gpu_suite.main(["--out", str(tmp_path), "--small", "--steps", "10"]) == 2
    assert "--steps" in assert_one_line_error(capsys.readouterr().err)
    assert gpu_suite.main(["--out", str(tmp_path), "--small", "--precision", "fp8"]) == 2
    assert "--precision" in assert_one_line_error(capsys.readouterr().err)


def _part(date, rows):
    schedules = {"full20": {"compared_with": "full20", "ideal_speedup": 1.0},
                 "l2c20": {"compared_with": "full20", "ideal_speedup": 1.25}}
    return {"model": {"name": "m"}, "batch_size": 8, "labels": [1], "noise_seed": 0, "guidance_scale": 4.0,
            "device": "cuda", "repeats": 5, "machine": {"gpu": "H100"}, "date": date, "schedules": schedules,
            "export_seconds": {}, "notes": [],
            "rows": [{"precision": "bf16", "method": m, "schedule": s, "status": "ok", "latency_s": {"median": t}}
                     for m, s, t in rows]}


def test_suite_merge_keeps_each_method_from_one_run():
    """A suite split across runs: each method's rows come from the run that measured most of its cases,
    so its speedup never divides latencies of two runs (hand-computed: 1.0 / 0.8 = 1.25, efficiency 1)."""
    from benchmarks.gpu_suite import merge_parts
    from schedules import BlockcacheError

    first = _part("d1", [("eager", "full20", 2.0), ("eager", "l2c20", 1.0), ("torch", "full20", 9.0)])
    second = _part("d2", [("torch", "full20", 1.0), ("torch", "l2c20", 0.8), ("eager", "full20", 5.0)])
    merged = merge_parts([first, second], ["a.json", "b.json"])
    got = {(r["method"], r["schedule"]): (r["part"], r["speedup"]) for r in merged["rows"]}
    assert got == {("eager", "full20"): ("a.json", 1.0), ("eager", "l2c20"): ("a.json", 2.0),
                   ("torch", "full20"): ("b.json", 1.0), ("torch", "l2c20"): ("b.json", pytest.approx(1.25))}
    assert next(r for r in merged["rows"] if r["method"] == "torch" and r["schedule"] == "l2c20")["efficiency"] == \
        pytest.approx(1.0)
    other = _part("d3", [])
    other["batch_size"] = 4
    with pytest.raises(BlockcacheError, match="batch_size"):
        merge_parts([first, other], ["a.json", "c.json"])
