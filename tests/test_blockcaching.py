"""Block Caching schedule making: the change metric, the δ rule, the δ search, the stats file and
the CLI round trip through Schedule.load and the exporter."""

import numpy as np
import pytest
import torch

from conftest import TINY_FLAGS, assert_one_line_error, run_cli, tiny_model
from exporter.makers.analyze import ChangeRecorder, measure_change
from schedules import BlockcacheError, Schedule
from schedules.blockcaching import delta_rows, search_delta
from schedules.change import load_change, save_change
from schedules.cost import schedule_macs


def test_change_recorder_known_outputs():
    """Image 0 goes 1 → 1.5 → 1.5 (change 1/3, then 0); image 1 goes 2 → 1 → 3 (1, then 2/3)."""
    rec = ChangeRecorder(["u"], 3)
    outputs = [torch.tensor([[1.0, 1.0], [2.0, -2.0]]), torch.tensor([[1.5, 1.5], [1.0, -1.0]]),
               torch.tensor([[1.5, 1.5], [3.0, -3.0]])]
    for s, o in enumerate(outputs):
        rec.step = s
        assert rec("u", lambda o=o: o) is o  # the unit's value passes through unchanged
    assert np.isnan(rec.change[0, 0])
    assert rec.change[1, 0] == pytest.approx((1 / 3 + 1.0) / 2)
    assert rec.change[2, 0] == pytest.approx((0.0 + 2 / 3) / 2)


def test_measure_change_is_a_per_image_average():
    """Change is averaged per image, so two seeds in one batch give the mean of each seed alone; and a
    unit that really moves has a positive change at every step after the first."""
    model = tiny_model()
    schedule = Schedule.full(model.unit_names, 6)
    both = measure_change(model, schedule, [1, 5], [0, 1])
    alone = [measure_change(model, schedule, [1, 5], [seed]) for seed in (0, 1)]
    assert both.shape == (6, len(model.unit_names))
    assert np.isnan(both[0]).all() and (both[1:] > 0).all()
    np.testing.assert_allclose(both[1:], (alone[0][1:] + alone[1][1:]) / 2, rtol=1e-5)


def test_delta_rule_hand_computed():
    change = np.array([[np.nan, np.nan], [0.2, 0.6], [0.2, 0.1], [0.2, 0.1], [0.5, 0.4], [0.1, 0.0]])
    # unit 0: sums 0.2, 0.4, 0.6 > 0.5 → compute at 3 (restart), 0.5 ≤ 0.5, 0.6 → compute at 5
    # unit 1: 0.6 > 0.5 → compute at 1, then 0.1, 0.2, 0.6 → compute at 4, then 0.0
    want = np.array([[1, 1], [0, 1], [0, 0], [1, 0], [0, 1], [1, 0]], dtype=bool)
    np.testing.assert_array_equal(delta_rows(change, 0.5), want)
    assert delta_rows(change, 0.0)[1:].sum() == (change[1:] > 0).sum()  # δ = 0: every real change recomputes
    assert delta_rows(change, 10.0)[1:].sum() == 0
    with pytest.raises(BlockcacheError):
        delta_rows(change, -1)
    with pytest.raises(BlockcacheError):
        delta_rows(np.array([[np.nan], [-0.1]]), 0.5)


def test_delta_search_meets_the_budget_with_the_smallest_delta():
    model = tiny_model()
    units, config = model.unit_names, model.config
    sampler = {"name": "ddim", "steps": 20, "spacing": "linspace"}
    rng = np.random.default_rng(0)
    change = rng.uniform(0.01, 0.3, (20, len(units)))
    change[0] = np.nan
    for target in (1.3, 1.5, 2.0):
        schedule = search_delta(change, config, units, sampler, target_speedup=target)
        full, macs = schedule_macs(config, schedule)
        assert full / macs >= target
        delta = float(schedule.source.split("=")[1])
        below = Schedule(units, delta_rows(change, delta * 0.999), sampler)
        assert np.divide(*schedule_macs(config, below)) < target  # a slightly smaller δ misses it
    by_macs = search_delta(change, config, units, sampler, target_macs=0.5)
    full, macs = schedule_macs(config, by_macs)
    assert macs <= 0.5 * full
    with pytest.raises(BlockcacheError, match="no delta reaches"):
        search_delta(change, config, units, sampler, target_speedup=100.0)


def stats_change():
    change = np.full((2, len(tiny_model().unit_names)), 0.1)
    change[0] = np.nan
    return change


def write_stats(path):
    model = tiny_model()
    save_change(path, change=stats_change(), unit_names=model.unit_names, timesteps=[999, 0],
                sampler={"name": "ddim", "steps": 2, "spacing": "linspace"}, config=model.config, model="dit-s2",
                labels=[1], seeds=[0], guidance_scale=4.0)


def test_change_file_round_trip_and_damage(tmp_path):
    path = tmp_path / "s.npz"
    write_stats(path)
    data = load_change(path)
    np.testing.assert_array_equal(data["change"], stats_change())
    assert data["unit_names"] == tiny_model().unit_names and data["config"] == tiny_model().config
    (tmp_path / "bad.npz").write_bytes(path.read_bytes()[:100])
    with pytest.raises(BlockcacheError):
        load_change(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(BlockcacheError, match="not a blockcache"):
        load_change(tmp_path / "other.npz")


def test_cli_analyze_derive_and_export_round_trip(tmp_path):
    stats, png = tmp_path / "stats.npz", tmp_path / "change.png"
    r = run_cli("exporter.schedule_cli", "analyze", "--model", "dit-s2", *TINY_FLAGS, "--random-init", "--steps", "8",
                "--labels", "1,2", "--seeds", "0", "-o", stats, "--png", png, "--quiet")
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "bc.yaml"
    r = run_cli("exporter.schedule_cli", "derive", stats, "--target-speedup", "1.4", "-o", out)
    assert r.returncode == 0, r.stderr
    schedule = Schedule.load(out)
    model = tiny_model()
    full, macs = schedule_macs(model.config, schedule)
    assert full / macs >= 1.4 and not schedule.compute.all()
    np.testing.assert_array_equal(schedule.compute, delta_rows(load_change(stats)["change"],
                                                               float(schedule.source.split("=")[1])))

    from exporter.export import export_plan
    from exporter.reference import sample
    from runtime import Sampler
    from schedules.sampling import initial_noise

    export_plan(model, schedule, str(tmp_path / "plan"), batch_size=2)
    noise = initial_noise((2, 4, 8, 8), 3)
    got = Sampler(str(tmp_path / "plan"), backend="onnxruntime", device="cpu")([1, 2], noise=noise)
    want = sample(model, schedule, [1, 2], noise)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("args", [
    ["derive", "nope.npz", "--delta", "0.5", "-o", "x.yaml"],
    ["derive", "STATS", "--delta", "-1", "-o", "x.yaml"],
    ["derive", "STATS", "--target-speedup", "50", "-o", "x.yaml"],
    ["derive", "STATS", "--delta", "0.5", "--target-macs", "0.5", "-o", "x.yaml"],
    ["analyze", "--model", "dit-s2", *TINY_FLAGS, "--random-init", "--steps", "4", "--seeds", "a", "-o", "s.npz"],
    ["analyze", "--model", "dit-s2", *TINY_FLAGS, "--random-init", "--steps", "4", "-o", "s.txt"],
])
def test_cli_bad_inputs_one_line(args, tmp_path):
    stats = tmp_path / "stats.npz"
    write_stats(stats)
    r = run_cli("exporter.schedule_cli", *[str(stats) if a == "STATS" else a for a in args], cwd=tmp_path)
    assert r.returncode == 2
    assert_one_line_error(r.stderr)


def test_search_speedup_finds_the_smallest_parameter():
    """A made-up monotone family: p computes the first ceil((1 - p)·S) steps of 10 fully, the rest reuse all."""
    from schedules.cost import ideal_speedup, search_speedup

    model = tiny_model()
    units, config = model.unit_names, model.config
    sampler = {"name": "ddim", "steps": 10, "spacing": "linspace"}

    def make(p):
        compute = np.zeros((10, len(units)), bool)
        compute[: max(1, int(np.ceil((1 - p) * 10 - 1e-9)))] = True
        return Schedule(units, compute, sampler)

    got = search_speedup(make, 0.0, 0.95, 2.0, config)
    assert ideal_speedup(config, got) >= 2.0
    # the smallest p keeps the most full steps that still reach 2x: count them by brute force
    speedups = {k: ideal_speedup(config, make(1 - k / 10)) for k in range(1, 11)}
    assert got.compute.all(axis=1).sum() == max(k for k, v in speedups.items() if v >= 2.0)
    with pytest.raises(BlockcacheError, match="no parameter reaches"):
        search_speedup(make, 0.0, 0.05, 5.0, config)


def test_uniform_spread():
    from schedules import Schedule
    from schedules.cost import ideal_speedup, spread_for_speedup

    model = tiny_model()
    s = Schedule.spread(model.unit_names, 10, 4)
    # steps round(0, 2.5, 5, 7.5) with numpy's round-half-to-even: 0, 2, 5, 8
    assert np.flatnonzero(s.compute.all(axis=1)).tolist() == [0, 2, 5, 8]
    assert not s.compute[~s.compute.all(axis=1)].any()  # all-or-nothing rows
    u = spread_for_speedup(model.unit_names, 20, model.config, 1.5)
    assert ideal_speedup(model.config, u) >= 1.5
    more = Schedule.spread(model.unit_names, 20, int(u.compute.all(axis=1).sum()) + 1)
    assert ideal_speedup(model.config, more) < 1.5  # one more full step would miss the target
