"""Span-residual reuse (`s` in a schedule row): a run of skipped blocks replaced by its residual from the
last step that ran them, checked against a sampling loop written out by hand from the blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from schedules import BlockcacheError, Schedule

pytestmark = pytest.mark.usefixtures("single_thread")

# step 0 full; step 1: block 0 runs, blocks 1–3 one span; step 2 full; step 3: span 1–2, block 3's units
# reused alone (from step 2)
ROWS = ["xx xx xx xx", "xx ss ss ss", "xx xx xx xx", "xx ss ss .."]


def _schedule(units, rows=ROWS, steps=4):
    text = (f"version: 1\nsampler: {{name: ddim, steps: {steps}, spacing: linspace}}\nunits: [" + ", ".join(units)
            + "]\nsteps:\n" + "".join(f'- "{r}"\n' for r in rows))
    return Schedule.from_yaml(text)


def test_span_rows_read_write_and_name_their_spans():
    units = tiny_model(depth=4).unit_names
    schedule = _schedule(units)
    assert [schedule.row_string(s) for s in range(4)] == ROWS
    assert Schedule.from_yaml(schedule.to_yaml()).span.tolist() == schedule.span.tolist()
    assert [schedule.spans(s) for s in range(4)] == [[], [("blocks.1", "blocks.3")], [], [("blocks.1", "blocks.2")]]
    # each span's residual is recorded at the last step before its skip that ran its blocks
    # (units of step 0 are recomputed or span-skipped before any reuse alone: none is kept)
    assert schedule.writes() == [("span:blocks.1:blocks.3",), (), ("blocks.3.attn", "blocks.3.mlp",
                                                                   "span:blocks.1:blocks.2"), ()]
    assert schedule.reused(3) == ("blocks.3.attn", "blocks.3.mlp")  # units reused alone; span units are not


@pytest.mark.parametrize("rows, message", [
    (["xx xx xx xx", "xx sx ss ss", "xx xx xx xx", "xx xx xx xx"], "only part of blocks.1"),
    (["xx xx xx xx", "xx s. ss ss", "xx xx xx xx", "xx xx xx xx"], "only part of blocks.1"),
    (["ss xx xx xx", "xx xx xx xx", "xx xx xx xx", "xx xx xx xx"], "step 0 must compute every unit"),
    (["xx xx xx xx", "xx xx xx xq", "xx xx xx xx", "xx xx xx xx"], "character 'q'"),
])
def test_malformed_span_rows_are_refused_in_one_line(rows, message):
    with pytest.raises(BlockcacheError, match=message):
        _schedule(tiny_model(depth=4).unit_names, rows)


def test_span_reuse_equals_the_loop_written_by_hand():
    from exporter.reference import sample
    from schedules.sampling import guided_eps, initial_noise, model_timesteps

    model = tiny_model(depth=4)
    schedule = _schedule(model.unit_names)
    labels, noise = np.array([1, 3]), initial_noise((2, 4, 8, 8), 5)
    got = sample(model, schedule, labels, noise, guidance_scale=4.0)

    sampler = schedule.make_sampler()
    a, b = sampler.coefficients()
    x, y = torch.from_numpy(noise), torch.from_numpy(labels)
    y_in = torch.cat([y, torch.full_like(y, model.null_class)])
    residual, raw = {}, {}

    def keep(name, compute):  # computes the unit and keeps its raw output
        raw[name] = compute()
        return raw[name]

    with torch.no_grad():
        for s, t in enumerate(model_timesteps(sampler)):
            x_in = torch.cat([x, x])
            h = model.x_embedder(x_in) + model.pos_embed
            c = model.t_embedder(torch.full((4,), float(t))) + model.y_embedder(y_in)
            blocks = model.blocks
            if s in (0, 2):  # full steps: record the span residuals the next step needs
                h = blocks[0](h, c, keep, "blocks.0")
                before = h
                h = blocks[1](h, c, keep, "blocks.1")
                h = blocks[2](h, c, keep, "blocks.2")
                residual["1-2"] = h - before
                h = blocks[3](h, c, keep, "blocks.3")
                residual["1-3"] = h - before
            elif s == 1:
                h = blocks[0](h, c, keep, "blocks.0")
                h = h + residual["1-3"]  # from step 0
            else:
                h = blocks[0](h, c, keep, "blocks.0")
                h = h + residual["1-2"]  # from step 2
                h = blocks[3](h, c, lambda name, compute: raw[name], "blocks.3")  # raw outputs of step 2, current gates
            out = model.final_layer(h, c)
            from runtime.nn.layers import unpatchify

            eps = unpatchify(out, model.out_channels, model.patch_size, model.x_embedder.grid_size)[:, :4]
            eps = guided_eps(eps[:2], eps[2:], 4.0, "first3")
            x = float(a[s]) * x + float(b[s]) * eps
    want = x.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    full = sample(model, Schedule.full(model.unit_names, 4), labels, noise, guidance_scale=4.0)
    assert np.abs(got - full).max() > 1e-3  # the spans changed the result: the comparison is not vacuous


def test_span_reuse_differs_from_unit_reuse():
    """`s` adds the span's total residual from the cached step; `.` reuses each raw branch output under
    the current gates: two different approximations."""
    from exporter.reference import sample
    from schedules.sampling import initial_noise

    model = tiny_model(depth=4)
    span = _schedule(model.unit_names, ["xx xx xx xx", "xx ss ss ss", "xx xx xx xx", "xx ss ss ss"])
    unit = _schedule(model.unit_names, ["xx xx xx xx", "xx .. .. ..", "xx xx xx xx", "xx .. .. .."])
    labels, noise = np.array([0]), initial_noise((1, 4, 8, 8), 0)
    assert np.abs(sample(model, span, labels, noise) - sample(model, unit, labels, noise)).max() > 1e-4


def test_span_plans_equal_the_eager_reference(tmp_path):
    """Plan = eager within 1e-5 on ONNX Runtime and torch, the span's blocks absent from its graph,
    and `--verify`'s check of every variant against the eager model."""
    import onnx

    from exporter.export import export_plan
    from exporter.surgery import unit_of_nodes
    from exporter.verify import verify_plan
    from runtime.plan import load_plan

    model = tiny_model(depth=4)
    schedule = _schedule(model.unit_names)
    path = str(tmp_path / "plan")
    export_plan(model, schedule, path, batch_size=2, guidance_scale=4.0)
    plan = load_plan(path)
    variants = plan.program.variants
    assert len(variants) == 3  # full (steps 0, 2), span 1–3 (step 1), span 1–2 with block 3 read (step 3)
    assert variants[1].skips == ("span:blocks.1:blocks.3",) and variants[2].skips == ("span:blocks.1:blocks.2",)
    assert set(variants[0].writes) >= {"span:blocks.1:blocks.3", "span:blocks.1:blocks.2"}
    from exporter.trace import StepSettings, trace_step

    master = trace_step(model, StepSettings(batch_size=2, guidance=True)).proto
    owner = unit_of_nodes(master, model.unit_names)
    graph = onnx.load(plan.path(variants[1].file), load_external_data=False)
    present = {owner[n.name] for n in graph.graph.node if n.name in owner}
    assert present == {"blocks.0.attn", "blocks.0.mlp"}  # blocks 1–3 are gone from the graph
    _plan_equals_eager(model, schedule, path, seed=5)
    report = verify_plan(model, plan, 1e-5)
    assert len(report) == 3


def test_calibrated_first_block_plan_equals_the_eager_reference(tmp_path):
    from exporter.export import export_plan
    from exporter.makers.calibrate import calibrated_schedule

    model = tiny_model(depth=6)
    schedule, _ = calibrated_schedule(model, Schedule.full(model.unit_names, 12), "first-block", 0.5, [1, 3], [0])
    assert schedule.span.any()
    path = str(tmp_path / "plan")
    export_plan(model, schedule, path, batch_size=2, guidance_scale=4.0)
    _plan_equals_eager(model, schedule, path, seed=9)


def _plan_equals_eager(model, schedule, path, seed):
    """The plan at `path`, on ONNX Runtime and torch, within 1e-5 of the eager reference."""
    from exporter.reference import sample
    from runtime import Sampler
    from schedules.sampling import initial_noise

    labels, noise = np.array([2, 4]), initial_noise((2, 4, 8, 8), seed)
    want = sample(model, schedule, labels, noise, guidance_scale=4.0)
    for backend in ("onnxruntime", "torch"):
        with Sampler(path, backend=backend) as sampler:
            got = sampler(labels, noise=noise)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), backend


@pytest.mark.parametrize("edit, message", [
    (lambda v: v[1].update(skips=["span:blocks.3:blocks.1"]), "not a span of the model's consecutive blocks"),
    (lambda v: v[1].update(reads=[]), "does not read its residual"),
    (lambda v: v[0].update(writes=[w for w in v[0]["writes"] if w != "span:blocks.1:blocks.3"]),
     "did not write to the cache"),
    (lambda v: v[1].update(skips=[], reads=[]), "does not split the model's units"),
])
def test_damaged_span_manifests_are_refused_in_one_line(tmp_path, edit, message):
    import json

    from exporter.export import export_plan
    from runtime.plan import load_plan
    from runtime.plan.manifest import manifest_seal

    model = tiny_model(depth=4)
    path = tmp_path / "plan"
    export_plan(model, _schedule(model.unit_names), str(path), batch_size=1, guidance_scale=4.0)
    doc = json.loads((path / "plan.json").read_text())
    edit(doc["variants"])
    doc["seal"] = manifest_seal(doc)
    (path / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(BlockcacheError, match=message):
        load_plan(str(path))


def test_span_schedules_are_refused_for_uvit():
    from exporter.models import load_model
    from exporter.reference import sample

    uvit = load_model("uvit-l2", random_init=True, depth=2, hidden_size=64, num_heads=4, input_size=8)
    rows = ["xx xx xx", "xx ss xx"]
    uvit_schedule = Schedule.from_yaml(
        "version: 1\nsampler: {name: dpm-solver-2, steps: 2, spacing: time-uniform}\nunits: ["
        + ", ".join(uvit.unit_names) + "]\nsteps:\n" + "".join(f'- "{r}"\n' for r in rows))
    with pytest.raises(BlockcacheError, match="long skips"):
        sample(uvit, uvit_schedule, np.array([0]), np.zeros((1, 4, 8, 8), np.float32))
