"""Run-time caches frozen into span schedules (`blockcache-schedule calibrate`): the frozen
FirstBlockCache schedule makes diffusers' FirstBlockCache decisions on the same weights and input,
MagCache's rule on hand-worked ratios and against diffusers' own hook, TeaCache's limits, the
aggregation over calibration runs, and the command line."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_one_line_error, official_diffusers_dit, tiny_model
from schedules import Schedule

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS, LABELS = 12, [1, 3, 5]


def _diffusers_run(model, peer_spec, noise, labels, magcache_ratios=None):
    """(per-step 'F' / 'p' / '-' pattern, latents) of diffusers' hook on the same weights and input."""
    from benchmarks.bench.diffusers_dit import ComputeCounter, DiffusersLoop
    from benchmarks.bench.peers import install, parse_peer

    net = official_diffusers_dit(model)
    loop = DiffusersLoop(net, model.config, Schedule.full(model.unit_names, STEPS).make_sampler(), 4.0)
    peer = parse_peer(peer_spec)
    if magcache_ratios is not None:
        from diffusers.hooks import MagCacheConfig

        net.enable_cache(MagCacheConfig(threshold=peer.params["threshold"], num_inference_steps=STEPS,
                                        mag_ratios=list(magcache_ratios)))
    else:
        install(peer, net, loop, None, labels, "default")
    loop.counter = ComputeCounter(net, model.unit_names, STEPS, 2 * len(labels))
    out = loop(noise, labels)
    rows = loop.counter.rows
    return "".join("F" if (r == 1).all() else "-" if not r.any() else "p" for r in rows), out


def _pattern(schedule: Schedule) -> str:
    return "".join("F" if row.all() else "-" if not row.any() else "p" for row in schedule.compute)


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_frozen_first_block_cache_makes_diffusers_decisions_on_its_calibration_input(threshold):
    from exporter.makers.calibrate import calibrated_schedule
    from exporter.reference import sample, seeded_batch

    model = tiny_model(depth=6)
    full = Schedule.full(model.unit_names, STEPS)
    schedule, runs = calibrated_schedule(model, full, "first-block", threshold, LABELS, [0])
    x, y = seeded_batch(model, LABELS, [0])
    theirs, their_latents = _diffusers_run(model, f"fbc:{threshold}", x.numpy(), y.numpy())
    assert _pattern(schedule) == theirs
    assert "p" in theirs and theirs.count("F") > 1  # some steps skipped, some recomputed: not a vacuous case
    # and the frozen schedule, replayed by the eager reference, gives diffusers' latents
    ours = sample(model, schedule, y.numpy(), x.numpy(), guidance_scale=4.0)
    np.testing.assert_allclose(ours, their_latents, rtol=1e-5, atol=1e-5)


def test_magcache_rule_on_hand_worked_ratios():
    from exporter.makers.calibrate import magcache_decisions

    # 6 steps, retention int(0.2·6 + 0.5) = 1; threshold 0.3, at most 3 skips in a row:
    # s1 ratio .9, err .1 → skip; s2 ratio .855, err .245 → skip; s3 err .39 → compute, reset;
    # s4 ratio 1.1, err .1 → skip; s5 ratio .55, err .55 → compute
    assert magcache_decisions([1.0, 0.9, 0.95, 1.0, 1.1, 0.5], 0.3) == [True, False, False, True, False, True]
    assert magcache_decisions([1.0] * 8, 10.0) == [True, True, False, False, False, True, False, False]


def test_magcache_ratios_and_decisions_match_diffusers_hook():
    from benchmarks.bench.diffusers_dit import DiffusersLoop
    from benchmarks.bench.peers import calibrate_magcache
    from exporter.makers.calibrate import calibrated_schedule, magcache_decisions, stack_statistics
    from exporter.reference import seeded_batch

    model = tiny_model(depth=6)
    full = Schedule.full(model.unit_names, STEPS)
    x, y = seeded_batch(model, LABELS, [0])
    ours = stack_statistics(model, full, LABELS, [0])["mag_ratios"]
    net = official_diffusers_dit(model)
    theirs = calibrate_magcache(net, DiffusersLoop(net, model.config, full.make_sampler(), 4.0), x.numpy(), y.numpy())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    threshold = 0.2
    schedule, _ = calibrated_schedule(model, full, "magcache", threshold, LABELS, [0])
    decisions = magcache_decisions(ours, threshold)
    assert _pattern(schedule) == "".join("F" if d else "-" for d in decisions)
    pattern, _ = _diffusers_run(model, f"magcache:{threshold}", x.numpy(), y.numpy(), magcache_ratios=ours)
    assert pattern == _pattern(schedule) and "-" in pattern


def test_teacache_limits_and_replay():
    from exporter.makers.calibrate import calibrated_schedule

    model = tiny_model(depth=4)
    full = Schedule.full(model.unit_names, STEPS)
    every, _ = calibrated_schedule(model, full, "teacache", 0.0, LABELS, [0])
    assert every.compute.all()  # the accumulated change always reaches a zero threshold
    none, _ = calibrated_schedule(model, full, "teacache", 1e9, LABELS, [0])
    assert _pattern(none) == "F" + "-" * (STEPS - 2) + "F"  # only the first and last steps run
    assert none.span[1:-1].all()


def test_runs_are_combined_by_any_or_most():
    from exporter.makers.calibrate import calibrated_schedule

    model = tiny_model(depth=6)
    full = Schedule.full(model.unit_names, STEPS)
    any_, runs = calibrated_schedule(model, full, "first-block", 0.65, LABELS, [0, 1, 2])
    most, _ = calibrated_schedule(model, full, "first-block", 0.65, LABELS, [0, 1, 2], aggregate="most")
    votes = np.array(runs).sum(axis=0)
    assert len(runs) == 3 and (votes == 1).any() and (votes == 2).any()  # any and most differ here
    want_any = votes >= 1
    want_most = votes >= 2
    want_any[0] = want_most[0] = True
    assert (any_.compute.all(axis=1) == want_any).all()
    assert (most.compute.all(axis=1) == want_most).all()


def test_calibrate_command_line(tmp_path, capsys):
    from exporter import schedule_cli

    out = tmp_path / "fbc.yaml"
    flags = ["--model", "dit-s2", "--random-init", "--depth", "4", "--hidden-size", "64", "--num-heads", "4",
             "--input-size", "8", "--steps", "10", "--labels", "1,2", "--seeds", "0", "--quiet"]
    assert schedule_cli.main(["calibrate", *flags, "--method", "first-block", "--target-speedup", "1.5",
                              "-o", str(out)]) == 0
    schedule = Schedule.load(out)
    from schedules.cost import ideal_speedup

    assert ideal_speedup(tiny_model(depth=4).config, schedule) >= 1.5 and schedule.span.any()
    assert schedule_cli.main(["calibrate", *flags, "--method", "magcache", "--threshold", "-1", "-o",
                              str(tmp_path / "x.yaml")]) == 2
    assert "--threshold must be" in assert_one_line_error(capsys.readouterr().err)
