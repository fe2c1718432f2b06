"""Plans with several programs (batch sizes × schedules) over one copy of the weights: what the export
writes, that a damaged one is refused in one line, and the CLI with the published L2C DDIM-20 and
DDIM-50 schedules (docs/ARCHITECTURE.md, "Plan format")."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
from conftest import REPO, TINY_FLAGS

from exporter import export as export_module
from exporter.export import export_plan, export_plans, group_variants
from exporter.reference import sample
from runtime import Sampler
from runtime.plan.manifest import manifest_seal
from schedules import BlockcacheError, Schedule
from schedules.sampling import initial_noise

pytestmark = pytest.mark.usefixtures("single_thread")

PRESETS = REPO / "schedules" / "presets"


def schedules(model):
    return [Schedule.uniform(model.unit_names, 6, 2), Schedule.uniform(model.unit_names, 4, 3)]


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """(plan folder, traced settings) of a plan with batch sizes 1, 2, 4 × DDIM-6 and DDIM-4."""
    traced = []
    real = export_module.trace_step

    def counting(model, settings):  # the real tracer, counted
        traced.append(settings)
        return real(model, settings)

    export_module.trace_step = counting
    try:
        path = tmp_path_factory.mktemp("multi") / "plan"
        export_plans(tiny, schedules(tiny), str(path), batch_sizes=[1, 2, 4], guidance_scale=4.0)
    finally:
        export_module.trace_step = real
    return path, traced


def test_one_trace_per_batch_size_and_one_copy_of_the_weights(exported, tiny, tmp_path):
    path, traced = exported
    assert sorted(s.batch_size for s in traced) == [1, 2, 4]  # not once per schedule
    manifest = json.loads((path / "plan.json").read_text())
    assert [(p["batch_size"], len(p["steps"])) for p in manifest["programs"]] == \
        [(1, 6), (2, 6), (4, 6), (1, 4), (2, 4), (4, 4)]
    # weights.bin holds the parameters once (fp32), as a plan of one batch size and one schedule does
    params = sum(p.numel() for p in tiny.state_dict().values()) * 4
    export_plan(tiny, schedules(tiny)[0], str(tmp_path / "single"), batch_size=1, guidance_scale=4.0)
    size = os.path.getsize(path / "weights.bin")
    assert size == os.path.getsize(tmp_path / "single" / "weights.bin")
    assert 0.95 * params <= size <= 1.05 * params
    # each schedule stored once, each program with its own variant graphs
    for schedule in schedules(tiny):
        stored = Schedule.load(str(path / f"schedule-{schedule.num_steps}.yaml"))
        assert np.array_equal(stored.compute, schedule.compute)
    for p in manifest["programs"]:
        assert len(p["variants"]) == len(group_variants(schedules(tiny)[0 if len(p["steps"]) == 6 else 1])[0])
        assert p["schedule"] == f"schedule-{len(p['steps'])}.yaml"
    files = [v["file"] for p in manifest["programs"] for v in p["variants"]]
    assert len(set(files)) == len(files)


def test_every_program_replays_its_schedule(exported, tiny):
    """Each (batch size, schedule) program against the eager reference of that schedule."""
    path, _ = exported
    with Sampler(str(path), device="cpu", threads=1) as sampler:
        for program in sampler.plan.programs:
            b = program.batch_size
            noise, labels = initial_noise((b, 4, 8, 8), b), np.arange(b)
            got = sampler.backend.run(noise, labels, 4.0, program=program)
            schedule = next(s for s in schedules(tiny) if s.num_steps == program.evaluations)
            want = sample(tiny, schedule, labels, noise, guidance_scale=4.0)
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (b, program.evaluations)


def resealed(path, tmp_path, change):
    """A copy of the plan with its manifest edited and resealed (a consistent forgery): the content
    checks must refuse it."""
    import shutil

    copy_path = tmp_path / "edited"
    shutil.copytree(path, copy_path)
    doc = json.loads((copy_path / "plan.json").read_text())
    change(doc)
    doc["seal"] = manifest_seal(doc)
    (copy_path / "plan.json").write_text(json.dumps(doc))
    return copy_path


def other_graph(d):
    """The batch-1 program's first variant pointed at the batch-4 program's graph of the same schedule."""
    d["programs"][0]["variants"][0]["file"] = d["programs"][2]["variants"][0]["file"]


DAMAGE = {
    "a program twice": (lambda d: d["programs"].append(copy.deepcopy(d["programs"][0])),
                        "two programs for batch 1 with 6 steps"),
    "two schedules for one step count": (lambda d: d["programs"][1].__setitem__("schedule", "schedule-4.yaml"),
                                         "two schedules of 6 steps"),
    "one schedule for two step counts": (lambda d: [p.__setitem__("schedule", "schedule-6.yaml")
                                                    for p in d["programs"]], "a schedule has one step count"),
    "an edited batch size": (lambda d: d["programs"][1].__setitem__("batch_size", 3), r"programs\[1\]"),
    "another program's graph": (other_graph, r"programs\[0\]\.variants\[0\] \('x' is float32\[4, 4, 8, 8\] in the "
                                             r"graph, float32\[1, 4, 8, 8\] in the manifest\)"),
    "program entries beside the list": (lambda d: d.__setitem__("steps", d["programs"][0]["steps"]),
                                        "no program entries beside it"),
    "an empty program list": (lambda d: d.__setitem__("programs", []), "non-empty list"),
    "a program that is not a mapping": (lambda d: d["programs"].__setitem__(1, [1]), r"programs\[1\] must be"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_multi_program_plan_is_refused_in_one_line(exported, tmp_path, damage):
    change, match = DAMAGE[damage]
    plan = resealed(exported[0], tmp_path, change)
    with pytest.raises(BlockcacheError, match=match) as e:
        Sampler(str(plan), device="cpu")([1], seed=0, steps=6)
    assert "\n" not in str(e.value)


def test_export_refuses_two_schedules_of_one_step_count(tiny, tmp_path):
    twice = [Schedule.uniform(tiny.unit_names, 4, 2), Schedule.uniform(tiny.unit_names, 4, 3)]
    for kwargs, match in (({"schedules": twice}, "one schedule per step count"),
                          ({"schedules": twice[:1], "batch_sizes": [2, 2]}, "distinct batch sizes"),
                          ({"schedules": [], "batch_sizes": [1]}, "at least one schedule")):
        with pytest.raises(BlockcacheError, match=match):
            export_plans(tiny, out_dir=str(tmp_path / "p"), **kwargs)
    assert not (tmp_path / "p").exists()


def test_cli_plan_with_the_l2c_ddim20_and_ddim50_schedules(tmp_path, capsys):
    """blockcache-export with both published DiT-XL/2 L2C schedules and two batch sizes (a depth-28
    tiny DiT, the routers' depth), then blockcache-sample --steps 20 and 50 against the eager reference."""
    from exporter import export_cli, sample_cli
    from exporter.models import load_model

    flags = [f if f != "2" or TINY_FLAGS[i - 1] != "--depth" else "28" for i, f in enumerate(TINY_FLAGS)]
    plan = tmp_path / "plan"
    presets = [PRESETS / "dit-xl2-l2c-ddim20.yaml", PRESETS / "dit-xl2-l2c-ddim50.yaml"]
    argv = ["--model", "dit-s2", "--random-init", *flags, "--schedule", presets[0], "--schedule", presets[1],
            "--batch-sizes", "1,2", "--out", plan, "--quiet"]
    assert export_cli.main([str(a) for a in argv]) == 0
    line = capsys.readouterr().out
    assert "batch 1 × 20 steps" in line and "batch 2 × 50 steps" in line and "stored once" in line
    model = load_model("dit-s2", random_init=True, depth=28, hidden_size=64, num_heads=4, input_size=8)
    for steps, preset in zip((20, 50), presets):
        out = tmp_path / f"x{steps}.npy"
        assert sample_cli.main(["--plan", str(plan), "--steps", str(steps), "--labels", "3,1,4", "--seeds", "1,2,3",
                                "--out", str(out), "--quiet", "--device", "cpu"]) == 0
        noise = np.concatenate([initial_noise((1, 4, 8, 8), s) for s in (1, 2, 3)])
        want = sample(model, Schedule.load(str(preset)), [3, 1, 4], noise)
        got = np.load(out)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), steps
