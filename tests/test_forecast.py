"""Forecast reuse (`forecast: K` in a schedule): TaylorSeer's extrapolation from the last K + 1 computed
values, checked against hand-worked numbers, against diffusers' TaylorSeer hook on the same weights, and
plans (history buffers rotated by binding, per-step weights) against the eager reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, official_diffusers_dit, run_cli, tiny_model
from schedules import BlockcacheError, Schedule
from schedules.forecast import taylor_weights
from schedules.sampling import initial_noise

pytestmark = pytest.mark.usefixtures("single_thread")

# 8 steps of a depth-4 DiT: units reused alone ('.') and a span of blocks 2–3 ('s'), both forecast
ROWS = ["xx xx xx xx", "xx .. ss ss", "xx xx xx xx", "x. .. ss ss", "xx xx xx xx", "xx .x ss ss", "xx .. ss ss",
        "xx xx xx xx"]


def _schedule(units, order, rows=ROWS):
    text = (f"version: 1\nforecast: {order}\nsampler: {{name: ddim, steps: {len(rows)}, spacing: linspace}}\n"
            "units: [" + ", ".join(units) + "]\nsteps:\n" + "".join(f'- "{r}"\n' for r in rows))
    return Schedule.from_yaml(text)


def test_taylor_weights_hand_worked():
    # computed at 2 and 4, reused at 5: D0 = F4, D1 = (F4 − F2)/2, forecast F4 + D1·1
    np.testing.assert_allclose(taylor_weights([4, 2], 5), [1.5, -0.5])
    # computed at 0, 2, 4: D2 = ((F4 − F2)/2 − (F2 − F0)/2)/2, forecast F4 + D1 + D2/2
    #   = 1.625 F4 − 0.75 F2 + 0.125 F0
    np.testing.assert_allclose(taylor_weights([4, 2, 0], 5), [1.625, -0.75, 0.125])
    # uneven gaps 3, 4, 5 (computed 0, 1, 3, reused at 6): D1 = (F3 − F1)/2, D1⁻ = F1 − F0,
    # D2 = (D1 − D1⁻)/2 = F3/4 − 3F1/4 + F0/2; d = 3: F3 + 3·D1 + 4.5·D2
    np.testing.assert_allclose(taylor_weights([3, 1, 0], 6), [1 + 1.5 + 1.125, -1.5 - 3.375, 2.25])
    np.testing.assert_allclose(taylor_weights([7], 9), [1.0])  # one value: plain reuse


def test_eager_recursion_hand_worked():
    """TaylorSeerCache (the eager specification) on values stored at steps 0, 2, 4 and read at 5."""
    from exporter.reference import TaylorSeerCache

    factors = {}
    values = {0: torch.tensor([1.0, 0.0]), 2: torch.tensor([2.0, 1.0]), 4: torch.tensor([5.0, 1.0])}
    for step, value in values.items():
        TaylorSeerCache(factors, step, 2, reads=()).store("u", value)
    for order, want in ((0, [5.0, 1.0]),  # TaylorSeer with order 0 is plain reuse
                        (2, [1.625 * 5 - 0.75 * 2 + 0.125 * 1, 1.625 - 0.75])):
        f = {}
        for step, value in values.items():
            TaylorSeerCache(f, step, order, reads=()).store("u", value)
        np.testing.assert_allclose(TaylorSeerCache(f, 5, order, reads=("u",)).reuse("u").numpy(), want)
    assert len(factors["u"][1]) == 3


def test_forecast_schedules_read_validate_and_keep_their_history():
    units = tiny_model(depth=4).unit_names
    s = _schedule(units, 2)
    assert Schedule.from_yaml(s.to_yaml()).forecast == 2
    # step 5 reuses blocks.1.attn, computed at 4, 2 and 0 (steps 1 and 3 reused it): newest first
    assert s.history()[5]["blocks.1.attn"] == (4, 2, 0)
    assert s.history()[6]["span:blocks.2:blocks.3"] == (4, 2, 0)  # the steps that ran blocks 2 and 3
    assert s.history()[1]["blocks.1.attn"] == (0,)  # short history: fewer values, lower order
    assert s.history()[3]["blocks.0.mlp"] == (2, 1, 0)
    # so step 1's blocks.0.mlp is kept although step 2 recomputes it before the reuse at step 3
    assert "blocks.0.mlp" in s.writes()[1] and "blocks.0.mlp" not in _schedule(units, 0).writes()[1]
    for bad in ("3", "-1", "true", "'two'", "1.5"):
        with pytest.raises(BlockcacheError, match="forecast"):
            Schedule.from_yaml(s.to_yaml().replace("forecast: 2", f"forecast: {bad}"))


def test_with_reuse_span_turns_wholly_reused_blocks_into_spans():
    units = tiny_model(depth=4).unit_names
    s = _schedule(units, 0, ["xx xx xx xx", "x. .. .. xx", "xx xx xx xx"]).with_reuse("span", 1)
    assert [s.row_string(i) for i in range(3)] == ["xx xx xx xx", "x. ss ss xx", "xx xx xx xx"]
    assert s.spans(1) == [("blocks.1", "blocks.2")] and s.forecast == 1


def test_uniform_warmup_is_diffusers_taylorseer_rule():
    units = tiny_model(depth=2).unit_names
    s = Schedule.uniform(units, 12, 3, warmup=3)
    # diffusers: step < disable_cache_before_step, or (step − before − 1) % interval == 0
    assert [int(r.all()) for r in s.compute] == [int(i < 3 or (i - 4) % 3 == 0) for i in range(12)]


@pytest.mark.parametrize("order", [1, 2])
def test_eager_forecast_gives_diffusers_taylorseer_latents(order):
    """The same weights in diffusers' DiT with its TaylorSeer hook on every attn1 and ff (float32
    factors), and blockcache's eager reference on the schedule of its decisions: the same latents."""
    from benchmarks.bench.diffusers_dit import ComputeCounter, DiffusersLoop
    from benchmarks.bench.peers import install, parse_peer
    from exporter.reference import sample, seeded_batch

    model = tiny_model(depth=4)
    steps, labels = 12, [1, 3]
    schedule = Schedule.uniform(model.unit_names, steps, 3, warmup=3).with_reuse("unit", order)
    net = official_diffusers_dit(model)
    loop = DiffusersLoop(net, model.config, schedule.make_sampler(), 4.0)
    install(parse_peer(f"taylorseer:3:{order}"), net, loop, None, labels, "default")
    loop.counter = ComputeCounter(net, model.unit_names, steps, 2 * len(labels))
    x, y = seeded_batch(model, labels, [0])
    theirs = loop(x.numpy(), y.numpy())
    np.testing.assert_array_equal(loop.counter.rows, schedule.compute.astype(float))
    ours = sample(model, schedule, y.numpy(), x.numpy(), guidance_scale=4.0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    plain = sample(model, schedule.with_reuse("unit", 0), y.numpy(), x.numpy(), guidance_scale=4.0)
    assert np.abs(plain - theirs).max() > 100 * np.abs(ours - theirs).max()  # the forecast mattered


def _plan_equals_eager(model, schedule, path, labels, noise, guidance_scale):
    from exporter.reference import sample
    from runtime import Sampler

    want = sample(model, schedule, labels, noise, guidance_scale=guidance_scale)
    for backend in ("onnxruntime", "torch"):
        with Sampler(path, backend=backend) as sampler:
            got = sampler(labels, noise=noise, guidance_scale=guidance_scale)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), backend
    return want


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_plans_equal_the_eager_reference(tmp_path, order):
    from exporter.export import export_plan
    from exporter.reference import sample
    from exporter.verify import verify_plan
    from runtime.plan import load_plan
    from runtime.plan.graphs import variant_io

    model = tiny_model(depth=4)
    schedule = _schedule(model.unit_names, order)
    path = str(tmp_path / "plan")
    export_plan(model, schedule, path, batch_size=2, guidance_scale=4.0)
    plan = load_plan(path)
    program = plan.program
    # one buffer per history value: blocks.1.attn and the span keep order + 1 values
    assert {f"blocks.1.attn@{r}" for r in range(1, order + 1)} <= set(program.cache)
    assert f"span:blocks.2:blocks.3@{order}" in program.cache
    last = program.variants[program.steps[6].variant]
    assert last.forecasts["span:blocks.2:blocks.3"] == order
    assert "forecast.span:blocks.2:blocks.3" in variant_io(program)[program.steps[6].variant].inputs
    np.testing.assert_allclose(program.steps[6].forecast["blocks.1.attn"],
                               taylor_weights(schedule.history()[6]["blocks.1.attn"], 6))
    labels, noise = np.array([2, 4]), initial_noise((2, 4, 8, 8), 3)
    want = _plan_equals_eager(model, schedule, path, labels, noise, 4.0)
    plain = sample(model, schedule.with_reuse("unit", 0), labels, noise, guidance_scale=4.0)
    assert np.abs(plain - want).max() > 1e-4  # the forecasts changed the result: not a vacuous comparison
    assert max(r["max_rel_error"] for r in verify_plan(model, plan, 1e-5)) <= 1e-5


def test_forecast_with_scale_shift_plan_equals_the_eager_reference(tmp_path):
    """A correction applies to the forecast, in the eager reference and the graphs alike."""
    import dataclasses

    from exporter.export import export_plan

    model = tiny_model(depth=4)
    schedule = _schedule(model.unit_names, 2)
    rng = np.random.default_rng(0)
    pairs = {(s, u): tuple(rng.normal(0, 0.2, 64).astype(np.float32) for _ in "ab")
             for s in (3, 5, 6) for u in schedule.reused(s)}
    schedule = dataclasses.replace(schedule, scale_shift=pairs)
    export_plan(model, schedule, str(tmp_path / "plan"), batch_size=1, guidance_scale=4.0)
    _plan_equals_eager(model, schedule, str(tmp_path / "plan"), np.array([5]), initial_noise((1, 4, 8, 8), 1), 4.0)


def test_uvit_unit_forecast_plan_equals_the_eager_reference(tmp_path):
    from exporter.export import export_plan
    from exporter.models import load_model

    model = load_model("uvit-h2", random_init=True, seed=1, depth=4, hidden_size=32, num_heads=2, input_size=8)
    schedule = Schedule.uniform(model.unit_names, 10, 2, sampler="dpm-solver-2", warmup=2).with_reuse("unit", 2)
    export_plan(model, schedule, str(tmp_path / "plan"), batch_size=2)
    _plan_equals_eager(model, schedule, str(tmp_path / "plan"), np.array([3, 9]), initial_noise((2, 4, 8, 8), 2), 0.4)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["steps"][6]["forecast"]["blocks.1.attn"].__setitem__(0, 9.0), "not TaylorSeer's weights"),
    (lambda d: d["steps"][6].pop("forecast"), "weights for exactly the variant's forecast reads"),
    (lambda d: d["buffers"].pop("cache.blocks.1.attn@2"), "history"),
    (lambda d: d["buffers"].update({"cache.blocks.1.attn@7": d["buffers"]["cache.blocks.1.attn"]}), "history"),
])
def test_damaged_forecast_manifests_are_refused_in_one_line(tmp_path, edit, message):
    from exporter.export import export_plan
    from runtime.plan import load_plan
    from runtime.plan.manifest import manifest_seal

    model = tiny_model(depth=4)
    path = tmp_path / "plan"
    export_plan(model, _schedule(model.unit_names, 2), str(path), batch_size=1, guidance_scale=4.0)
    doc = json.loads((path / "plan.json").read_text())
    edit(doc)
    doc["seal"] = manifest_seal(doc)
    (path / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(BlockcacheError, match=message):
        load_plan(str(path))


def test_cli_makes_forecast_and_span_schedules(tmp_path):
    out = tmp_path / "u.yaml"
    r = run_cli("schedules.cli", "uniform", "--model", "dit-s2", "--steps", "10", "--interval", "3", "--warmup", "3",
                "--reuse", "span", "--forecast-order", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    s = Schedule.load(out)
    assert s.forecast == 2 and s.span[3].all() and not s.compute[3].any() and s.compute[4].all()
    r = run_cli("schedules.cli", "stats", str(out), "--model", "dit-s2")
    assert "TaylorSeer order 2" in r.stdout
    bad = run_cli("schedules.cli", "uniform", "--model", "dit-s2", "--steps", "10", "--interval", "3",
                  "--forecast-order", "3", "-o", str(tmp_path / "v.yaml"))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    (tmp_path / "w.yaml").write_text(out.read_text().replace("forecast: 2", "forecast: 5"))
    bad = run_cli("schedules.cli", "stats", str(tmp_path / "w.yaml"))
    assert "forecast" in assert_one_line_error(bad.stderr)


def test_learn_l2c_blends_with_the_forecast_of_the_previous_steps():
    """learn-l2c with forecasts: the value a reuse at step 3 blends with is TaylorSeer's forecast from
    the full model's units at steps 2, 1, 0 (each on its own input), here checked against the eager
    recursion fed the same values."""
    from exporter.makers.learn_l2c import reused_values, trajectory_inputs
    from exporter.reference import Denoiser, TaylorSeerCache
    from runtime.nn.units import CachePolicy

    model = tiny_model(depth=2)
    full = Schedule.full(model.unit_names, 6)
    xs, y = trajectory_inputs(model, full, np.array([1, 2]), [0], 4.0)
    denoiser = Denoiser(model, full, 4.0)
    with torch.no_grad():
        got = reused_values(denoiser, 3, xs, y, slice(None), 2)
        factors = {}
        for k in range(3):
            record = CachePolicy({})
            denoiser(k, xs[k], y, record)
            for name, value in record.cache.items():
                TaylorSeerCache(factors, k, 2, reads=()).store(name, value)
    reader = TaylorSeerCache(factors, 3, 2, reads=model.unit_names)
    for name in model.unit_names:
        want = reader.reuse(name)
        assert torch.allclose(got[name], want, rtol=1e-5, atol=1e-6 * float(want.abs().max())), name
    assert not torch.allclose(got[model.unit_names[0]], factors[model.unit_names[0]][1][0])  # not step 2's value


def test_learn_l2c_cli_with_forecasts_writes_a_forecasting_schedule(tmp_path):
    from conftest import TINY_FLAGS

    out = tmp_path / "l2c.yaml"
    r = run_cli("exporter.schedule_cli", "learn-l2c", "--model", "dit-s2", *TINY_FLAGS, "--random-init", "--steps", "6",
                "--labels", "1", "--seeds", "0", "--epochs", "2", "--lr", "0.3", "--lambda", "1e-3",
                "--forecast-order", "1", "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert Schedule.load(out).forecast == 1
