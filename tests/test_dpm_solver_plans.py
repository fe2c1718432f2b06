"""DPM-Solver++ 2M on DiT through the whole pipeline: the eager reference against diffusers'
DPMSolverMultistepScheduler driving the same network, plans (whose steps hand their data prediction
on as the next step's carry, `carry_next`) against the eager reference on ONNX Runtime and the torch
backend, `--verify`, the manifest's refusals of a damaged carry, and the TensorRT binding plan
replayed with ONNX Runtime standing in for the engines. A tiny random DiT, with guidance throughout."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import TINY_FLAGS
from exporter.export import export_plan
from exporter.reference import sample
from runtime import Sampler
from runtime.plan import Plan, load_manifest, load_plan
from schedules import BlockcacheError, Schedule
from schedules.sampling import guided_eps, initial_noise

pytestmark = pytest.mark.usefixtures("single_thread")
LABELS = [3, 7]
SAMPLER = "dpm-solver++-2m"
STEPS = 8  # first order at 0 and 7, second order (a carry) at 1…6


def rel_error(got, want) -> float:
    """Max abs error relative to the reference's max abs value (the plan-vs-eager criterion)."""
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def diffusers_loop(model, noise, steps: int, scale: float, **overrides) -> np.ndarray:
    """Final latents of a loop written with diffusers' scheduler (PixArt's configuration, as
    tests/test_dpm_solver_multistep.py; float32 tables and arithmetic, as shipped) on `model`'s guided
    eps: DiT's doubled batch [x; x] with labels [y; null], guidance on the first three channels."""
    from diffusers import DPMSolverMultistepScheduler
    from test_dpm_solver_multistep import PIXART

    scheduler = DPMSolverMultistepScheduler(**{**PIXART, **overrides})
    scheduler.set_timesteps(steps)
    x, y = torch.from_numpy(noise), torch.tensor(LABELS)
    y_in = torch.cat([y, torch.full_like(y, model.null_class)])
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(torch.cat([x, x]), t.reshape(1).expand(2 * len(LABELS)), y_in)[:, :model.in_channels]
            eps = guided_eps(out[:len(LABELS)], out[len(LABELS):], scale, "first3")
            x = scheduler.step(eps, t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("steps", [20, 8])
def test_eager_reference_is_diffusers_multistep_loop(tiny, steps):
    """The folded constants (a, b, c and the carry's p, q, in float32) against diffusers' own update
    in float32 (its float32 tables): measured 6.2e-7 (20 steps) and 5.1e-7 (8 steps) relative on the
    final latents, against 3e-2 between diffusers' first order and 2M."""
    noise = initial_noise((len(LABELS), 4, 8, 8), 3)
    want = diffusers_loop(tiny, noise, steps, 4.0)
    got = sample(tiny, Schedule.full(tiny.unit_names, steps, sampler=SAMPLER), LABELS, noise, guidance_scale=4.0)
    assert rel_error(got, want) <= 1e-4
    # The test can fail: first order all the way (no carry) is far from 2M.
    assert rel_error(diffusers_loop(tiny, noise, steps, 4.0, solver_order=1), want) > 1e-3


@pytest.fixture(scope="module")
def block_caching(tiny):
    """A Block Caching schedule: δ searched on the change statistics of the DPM-Solver++ 2M run,
    then scale-shift learned by distillation (both run the eager loop with its carry)."""
    from exporter.makers.analyze import measure_change
    from exporter.makers.scale_shift import learn_scale_shift
    from schedules.blockcaching import search_delta

    full = Schedule.full(tiny.unit_names, STEPS, sampler=SAMPLER)
    change = measure_change(tiny, full, LABELS, [0], guidance_scale=4.0)
    schedule = search_delta(change, tiny.config, tiny.unit_names, full.sampler, target_speedup=1.3)
    assert not schedule.compute.all()
    return learn_scale_shift(tiny, schedule, LABELS, [0], guidance_scale=4.0, epochs=2)[0]


@pytest.fixture(scope="module")
def plans(tiny, block_caching, tmp_path_factory):
    """{kind: (schedule, plan folder)}: full compute, uniform reuse and Block Caching, guided, batch 2."""
    root = tmp_path_factory.mktemp("dpmpp")
    schedules = {"full": Schedule.full(tiny.unit_names, STEPS, sampler=SAMPLER),
                 "uniform": Schedule.uniform(tiny.unit_names, STEPS, 3, sampler=SAMPLER),
                 "block-caching": block_caching}
    out = {}
    for kind, schedule in schedules.items():
        export_plan(tiny, schedule, str(root / kind), batch_size=2, guidance_scale=4.0)
        out[kind] = (schedule, str(root / kind))
    return out


@pytest.mark.parametrize("kind", ["full", "uniform", "block-caching"])
def test_plan_matches_eager_reference(tiny, plans, kind):
    """Measured: ONNX Runtime 5e-7…7e-7 relative to the eager reference, the torch backend 0."""
    schedule, path = plans[kind]
    program = load_plan(path).program
    assert program.carry_output and program.num_latents == 4
    assert [step.latents[1] for step in program.steps[1:]] == [step.latents[3] for step in program.steps[:-1]]
    noise = initial_noise((len(LABELS), 4, 8, 8), 5)
    want = sample(tiny, schedule, LABELS, noise, guidance_scale=4.0)
    unguided = sample(tiny, schedule, LABELS, noise, guidance_scale=1.0)
    assert rel_error(unguided, want) > 1e-3  # guidance matters
    for backend in ("onnxruntime", "torch"):
        got = Sampler(path, backend=backend, device="cpu")(LABELS, noise=noise)
        assert rel_error(got, want) <= 1e-5, backend


def test_cli_export_verifies_a_dpm_solver_pp_plan(tmp_path, capsys):
    from exporter.export_cli import main as export_main
    from schedules.cli import main as schedule_main

    flags = ["--model", "dit-s2", *TINY_FLAGS]
    assert schedule_main(["uniform", *flags, "--sampler", SAMPLER, "--steps", "6", "--interval", "2",
                          "-o", str(tmp_path / "u.yaml")]) == 0
    assert Schedule.load(tmp_path / "u.yaml").sampler == {"name": SAMPLER, "steps": 6, "spacing": "linspace"}
    capsys.readouterr()
    assert export_main([*flags, "--random-init", "--schedule", str(tmp_path / "u.yaml"), "--out",
                        str(tmp_path / "plan"), "--batch-size", "2", "--verify", "--quiet"]) == 0
    assert "verified 2 variants" in capsys.readouterr().out
    assert {"p", "q", "x_carry"} <= load_manifest(str(tmp_path / "plan"))["inputs"].keys()


def test_pixart_schedules_default_to_dpm_solver_pp(tmp_path):
    from schedules.cli import main as schedule_main

    assert schedule_main(["full", "--model", "pixart-alpha-256", "--steps", "20", "-o", str(tmp_path / "p.yaml")]) == 0
    assert Schedule.load(tmp_path / "p.yaml").sampler == {"name": SAMPLER, "steps": 20, "spacing": "linspace"}


def refused(path: str, edit) -> str:
    doc = copy.deepcopy(load_manifest(path))
    edit(doc)
    with pytest.raises(BlockcacheError) as e:
        Plan.parse(doc, path)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("edit, message", [
    # step 2 carrying the carry step 0 wrote (buffer 2), not step 1's (3), and writing its own to 3
    (lambda d: d["steps"][2].__setitem__("latents", [0, 2, 1, 3]),
     "steps[2].latents carry buffer 2 does not hold the carry step 1 wrote"),
    # the first step carrying a buffer nothing wrote (its c is 0, but 0·NaN is not 0)
    (lambda d: d["steps"][0]["latents"].__setitem__(1, 3), "carry buffer 3 does not hold the input of evaluation 0"),
    # the carry written over the step's own output
    (lambda d: d["steps"][1]["latents"].__setitem__(3, d["steps"][1]["latents"][2]), "are not four buffer numbers"),
    (lambda d: d["steps"][1]["latents"].pop(), "are not four buffer numbers (input, carry, output, carry output)"),
    (lambda d: d["steps"][3].__setitem__("p", 1.0), "steps[3].p is 1.0, but the recorded sampler derives"),
    (lambda d: d["steps"][3].pop("q"), "steps[3] lacks 'q'"),
    (lambda d: d["inputs"].pop("p"), "inputs lack 'p', which a dpm-solver++-2m plan's graphs take"),
])
def test_damaged_carry_entries_are_refused_in_one_line(plans, edit, message):
    assert message in refused(plans["uniform"][1], edit)


def test_carry_output_entries_on_a_ddim_plan_are_refused(tiny, tmp_path):
    path = str(tmp_path / "ddim")
    export_plan(tiny, Schedule.uniform(tiny.unit_names, 4, 2), path, batch_size=2)
    assert "steps[1].p is given but the plan's graphs hand on no carry" in refused(
        path, lambda d: d["steps"][1].__setitem__("p", 1.0))


def test_tensorrt_binding_plan_binds_the_carry_output(tiny, block_caching, tmp_path):
    """The binding plan rotates four latent slots, binds `carry_next` to the slot the next step reads
    as `x_carry` and `p`, `q` as step constants; replayed with ONNX Runtime standing in for the
    engines it reproduces the ONNX Runtime backend."""
    from exporter.engines import EngineSettings, export_with_engines
    from runtime.bindings import plan_bindings
    from runtime.plan.files import plan_corrections
    from test_tensorrt import SMALL, fake_builder, replay

    path = str(tmp_path / "plan")
    export_with_engines(tiny, block_caching, path, EngineSettings(precision="fp32", min_weight_bytes=SMALL),
                        builder=fake_builder(), version="10.test", batch_size=2, guidance_scale=4.0)
    loaded = load_plan(path)
    plan = plan_bindings(loaded.program, corrections=plan_corrections(loaded, loaded.program))
    assert {n for n in plan.io.slots if n.startswith("x.")} == {"x.0", "x.1", "x.2", "x.3"}
    for s in range(1, STEPS):
        assert plan.steps[s]["x_carry"] == plan.steps[s - 1]["carry_next"] == ("io", f"x.{2 + (s - 1) % 2}")
    assert plan.steps[0]["x_carry"] == plan.steps[0]["x"]  # c = 0 there
    assert {"step.3.p", "step.3.q"} <= plan.constants.keys()
    x = initial_noise((len(LABELS), 4, 8, 8), 2)
    want = Sampler(path, backend="onnxruntime", device="cpu")(LABELS, noise=x)
    got = replay(path, load_manifest(path), x, np.array(LABELS, np.int64), 4.0)
    assert rel_error(got, want) <= 1e-6
