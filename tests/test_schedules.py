"""Schedules: YAML format, makers, caching structure, L2C import, cost model and the schedule CLI."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY, TINY_FLAGS
from runtime.nn.dit import DiT
from schedules import cli
from schedules.cost import stats
from schedules.errors import BlockcacheError
from schedules.l2c import import_l2c, read_router_logits
from schedules.schedule import Schedule
from schedules.zoo import model_config, unit_names

pytestmark = pytest.mark.usefixtures("single_thread")

U4 = ("blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp")

# A hand-made 5-step schedule on 2 blocks (x compute, . reuse):
HAND_ROWS = ["xx xx",   # step 0
             "x. x.",   # step 1
             ".. xx",   # step 2
             "x. .x",   # step 3
             "xx x."]   # step 4
HAND = np.array([[c == "x" for c in r.replace(" ", "")] for r in HAND_ROWS])


def hand_schedule(**kw) -> Schedule:
    return Schedule(U4, HAND, {"name": "ddim", "steps": 5, "spacing": "linspace"}, **kw)


# ---------------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------------

def test_yaml_round_trip(tmp_path):
    s = hand_schedule(model="dit-s2", source="hand-made: rows #1 'quoted'")
    path = tmp_path / "s.yaml"
    s.save(path)
    t = Schedule.load(path)
    assert t.unit_names == U4
    assert t.compute.dtype == bool and np.array_equal(t.compute, HAND)
    assert t.sampler == {"name": "ddim", "steps": 5, "spacing": "linspace"}
    assert t.model == "dit-s2"
    assert t.source == "hand-made: rows #1 'quoted'"
    # One quoted row per step, written as the documented x/. strings with a space between blocks.
    text = path.read_text()
    assert "version: 1" in text
    for row in HAND_ROWS:
        assert f'- "{row}"' in text
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write leaves nothing behind


@pytest.mark.parametrize("text", ["x: y # z", "it's", "- dash", "yes", "123", "null", "\u2026\u00fcn\u00ef", "a\nb",
                                  "[1, 2]", "{a: b}"])
def test_yaml_round_trip_awkward_strings(text):
    s = hand_schedule(model=text, source=text)
    t = Schedule.from_yaml(s.to_yaml())
    assert t.model == text and t.source == text
    assert np.array_equal(t.compute, HAND)


def test_yaml_round_trip_ddim_spacing_large(tmp_path):
    units = unit_names(model_config("dit-xl2"))
    rng = np.random.default_rng(0)
    compute = rng.random((50, 56)) < 0.6
    compute[0] = True
    s = Schedule(units, compute, {"name": "ddim", "steps": 50, "spacing": "ddim"}, model="dit-xl2")
    s.save(tmp_path / "big.yaml")
    t = Schedule.load(tmp_path / "big.yaml")
    assert np.array_equal(t.compute, compute) and t.unit_names == units
    assert t.sampler["spacing"] == "ddim" and t.source is None


def test_hand_written_yaml_is_read():
    text = """
version: 1
sampler: {name: ddim, steps: 3, spacing: ddim}
units: [blocks.0.attn, blocks.0.mlp, blocks.1.attn, blocks.1.mlp]
steps:
- "xxxx"        # spaces are optional
- ".x x."
- "  . . x x "
"""
    s = Schedule.from_yaml(text)
    assert s.compute.tolist() == [[True] * 4, [False, True, True, False], [False, False, True, True]]
    assert s.sampler == {"name": "ddim", "steps": 3, "spacing": "ddim"}


def test_full_and_uniform_rows():
    full = Schedule.full(U4, 6)
    assert full.compute.shape == (6, 4) and full.compute.all()
    uni = Schedule.uniform(U4, 7, 3)
    # Recompute every 3rd step (0, 3, 6), reuse everything in between.
    assert uni.compute.tolist() == [[True] * 4, [False] * 4, [False] * 4, [True] * 4, [False] * 4, [False] * 4,
                                    [True] * 4]
    assert Schedule.uniform(U4, 5, 2, spacing="ddim").compute[:, 0].tolist() == [True, False, True, False, True]
    assert Schedule.uniform(U4, 4, 1).compute.all()
    assert uni.sampler == {"name": "ddim", "steps": 7, "spacing": "linspace"}
    for bad in (0, -1, 1.5):
        with pytest.raises(BlockcacheError):
            Schedule.uniform(U4, 7, bad)
    with pytest.raises(BlockcacheError):
        Schedule.full(U4, 0)


def test_reused_and_writes_hand_example():
    s = hand_schedule()
    assert [s.reused(i) for i in range(5)] == [
        (),
        ("blocks.0.mlp", "blocks.1.mlp"),
        ("blocks.0.attn", "blocks.0.mlp"),
        ("blocks.0.mlp", "blocks.1.attn"),
        ("blocks.1.mlp",),
    ]
    # Computed at step i and read from the cache by a later step before being recomputed:
    assert s.writes() == [
        ("blocks.0.mlp", "blocks.1.mlp"),  # step 0's mlp outputs are reused at step 1 (and 0.mlp up to 3)
        ("blocks.0.attn",),                # 0.attn reused at step 2; 1.attn recomputed at 2
        ("blocks.1.attn",),                # 1.attn reused at 3; 1.mlp recomputed at 3
        ("blocks.1.mlp",),                 # 1.mlp reused at 4; 0.attn recomputed at 4
        (),                                # last step: nothing is read later
    ]


def test_check_units():
    s = hand_schedule()
    s.check_units(U4)
    with pytest.raises(BlockcacheError, match="4 units"):
        s.check_units(unit_names(model_config("dit-s2")), "dit-s2")  # 24 units
    other = Schedule(("blocks.0.attn", "blocks.0.mlp", "blocks.9.attn", "blocks.9.mlp"), HAND,
                     {"name": "ddim", "steps": 5, "spacing": "linspace"})
    with pytest.raises(BlockcacheError, match="blocks.9.attn"):
        other.check_units(U4)


BAD_YAML = {
    "broken": "version: 1\nsteps: [\"xx\n",
    "not-mapping": "- just\n- a list\n",
    "version": 'version: 2\nsampler: {name: ddim, steps: 1, spacing: linspace}\nunits: [a.attn]\nsteps: ["x"]\n',
    "no-version": 'sampler: {name: ddim, steps: 1, spacing: linspace}\nunits: [a.attn]\nsteps: ["x"]\n',
    "row-length": 'version: 1\nsampler: {name: ddim, steps: 2, spacing: linspace}\nunits: [b.0.attn, b.0.mlp]\n'
                  'steps: ["xx", "x"]\n',
    "step0": 'version: 1\nsampler: {name: ddim, steps: 2, spacing: linspace}\nunits: [b.0.attn, b.0.mlp]\n'
             'steps: ["x.", "xx"]\n',
    "bad-char": 'version: 1\nsampler: {name: ddim, steps: 1, spacing: linspace}\nunits: [b.0.attn]\nsteps: ["o"]\n',
    "step-count": 'version: 1\nsampler: {name: ddim, steps: 20, spacing: linspace}\nunits: [b.0.attn]\n'
                  'steps: ["x"]\n',
    "spacing": 'version: 1\nsampler: {name: ddim, steps: 1, spacing: cosine}\nunits: [b.0.attn]\nsteps: ["x"]\n',
    "sampler": 'version: 1\nsampler: {name: plms, steps: 1, spacing: linspace}\nunits: [b.0.attn]\nsteps: ["x"]\n',
    "duplicate-unit": 'version: 1\nsampler: {name: ddim, steps: 1, spacing: linspace}\nunits: [b.0.attn, b.0.attn]\n'
                      'steps: ["xx"]\n',
    "missing-steps": 'version: 1\nsampler: {name: ddim, steps: 1, spacing: linspace}\nunits: [b.0.attn]\n',
    "unquoted-row": 'version: 1\nsampler: {name: ddim, steps: 1, spacing: linspace}\nunits: [b.0.attn]\nsteps: [1]\n',
    "no-units": 'version: 1\nsampler: {name: ddim, steps: 1, spacing: linspace}\nunits: []\nsteps: ["x"]\n',
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_schedule_files(case, tmp_path):
    path = tmp_path / f"{case}.yaml"
    path.write_text(BAD_YAML[case])
    with pytest.raises(BlockcacheError) as e:
        Schedule.load(path)
    message = str(e.value)
    assert "\n" not in message
    assert str(path) in message
    expected_word = {"version": "version", "no-version": "version", "row-length": "entries", "step0": "step 0",
                     "step-count": "steps", "spacing": "spacing", "sampler": "sampler", "broken": "YAML"}.get(case)
    if expected_word:
        assert expected_word in message


def test_schedule_file_missing_or_binary(tmp_path):
    with pytest.raises(BlockcacheError, match="nope.yaml"):
        Schedule.load(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(BlockcacheError):
        Schedule.load(tmp_path / "bin.yaml")


def test_constructor_validation():
    with pytest.raises(BlockcacheError, match="step 0"):
        Schedule(U4, np.zeros((2, 4), bool), {"name": "ddim", "steps": 2, "spacing": "linspace"})
    with pytest.raises(BlockcacheError):
        Schedule(U4, np.ones((2, 3), bool), {"name": "ddim", "steps": 2, "spacing": "linspace"})
    with pytest.raises(BlockcacheError):
        Schedule(U4, np.ones((2, 4), bool), {"name": "ddim", "steps": 3, "spacing": "linspace"})


# ---------------------------------------------------------------------------------------------------
# Learning-to-Cache import
# ---------------------------------------------------------------------------------------------------

XL_UNITS = unit_names(model_config("dit-xl2"))


def _file_logits(path) -> dict[int, torch.Tensor]:
    # Trusted project data: read independently of the code under test (it carries an argparse.Namespace
    # and CUDA tensors).
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return {int(k.split(".")[0]): v for k, v in obj["routers"].items()}


def expected_l2c_rows(logits: dict[int, torch.Tensor], n: int, threshold: float) -> np.ndarray:
    rows = np.ones((n, 56), bool)
    for s in range(n):
        i = n - 1 - s                      # respaced index; sampling runs from N−1 down to 0
        if i % 2 == 1:
            continue                       # odd index: every unit computed
        logit = logits[i].double().tolist()
        for j in range(28):
            for kind, entry in (("attn", 2 * j), ("mlp", 2 * j + 1)):
                score = 1.0 / (1.0 + math.exp(-logit[entry]))
                rows[s, XL_UNITS.index(f"blocks.{j}.{kind}")] = score > threshold
    return rows


@pytest.mark.parametrize("n", [20, 50])
@pytest.mark.parametrize("threshold", [0.1, 0.5])
def test_l2c_import_matches_router_file(router_dir, n, threshold):
    path = router_dir / f"DDIM{n}_router.pt"
    logits = _file_logits(path)
    assert sorted(logits) == list(range(n))
    s = import_l2c(path, XL_UNITS, n, threshold=threshold, model="dit-xl2")
    want = expected_l2c_rows(logits, n, threshold)
    assert np.array_equal(s.compute, want)
    assert s.sampler == {"name": "ddim", "steps": n, "spacing": "linspace"}
    assert f"DDIM{n}_router.pt" in s.source
    # Non-trivial: the even-index steps reuse something, the odd ones nothing.
    assert s.compute[0].all()
    assert (~s.compute).any()
    assert all(s.compute[st].all() for st in range(n) if (n - 1 - st) % 2 == 1)


def test_read_router_logits(router_dir):
    for n in (20, 50):
        got = read_router_logits(router_dir / f"DDIM{n}_router.pt")
        want = _file_logits(router_dir / f"DDIM{n}_router.pt")
        assert sorted(got) == list(range(n))
        for i in range(n):
            assert got[i].dtype == np.float64 and got[i].shape == (56,)
            assert np.array_equal(got[i], want[i].double().numpy())
    uvit = read_router_logits(router_dir / "dpm20_router.pth")
    assert next(iter(uvit.values())).shape == (58,)


def test_l2c_cli_import_writes_the_same_schedule(router_dir, tmp_path, capsys):
    out = tmp_path / "l2c20.yaml"
    assert cli.main(["import-l2c", str(router_dir / "DDIM20_router.pt"), "--model", "dit-xl2", "--steps", "20",
                     "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    s = Schedule.load(out)
    assert np.array_equal(s.compute, expected_l2c_rows(_file_logits(router_dir / "DDIM20_router.pt"), 20, 0.1))
    assert s.model == "dit-xl2" and s.unit_names == XL_UNITS


@pytest.mark.parametrize("router,steps,n_units,match", [
    ("DDIM50_router.pt", 20, 56, "50 steps"),
    ("DDIM20_router.pt", 50, 56, "20 steps"),
    ("dpm20_router.pth", 20, 56, "58"),
    ("DDIM20_router.pt", 20, 4, "56"),
])
def test_l2c_import_mismatches(router_dir, router, steps, n_units, match):
    units = XL_UNITS if n_units == 56 else U4
    with pytest.raises(BlockcacheError, match=match) as e:
        import_l2c(router_dir / router, units, steps)
    assert "\n" not in str(e.value)


def test_l2c_bad_threshold_and_missing_file(router_dir, tmp_path):
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(BlockcacheError):
            import_l2c(router_dir / "DDIM20_router.pt", XL_UNITS, 20, threshold=bad)
    with pytest.raises(BlockcacheError, match="not found"):
        read_router_logits(tmp_path / "none.pt")


# ---------------------------------------------------------------------------------------------------
# Cost model, counted independently with torch's FLOP counter on the meta device
# ---------------------------------------------------------------------------------------------------

def counted_macs(config: dict) -> tuple[int, dict[str, int]]:
    """(MACs of one full step for one image, MACs per unit) from torch's FlopCounterMode (2 FLOPs/MAC)."""
    with torch.device("meta"):
        model = DiT(**config)
        size, c = config["input_size"], config["in_channels"]
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, c, size, size), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    per_module = {k.removeprefix("DiT."): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    units = {u: per_module[u] // 2 for u in unit_names(config)}
    return counter.get_total_flops() // 2, units


def expected_speedup(config, compute) -> tuple[int, int]:
    full_step, per_unit = counted_macs(config)
    names = unit_names(config)
    scheduled = sum(full_step - sum(per_unit[u] for u, c in zip(names, row) if not c) for row in compute)
    return full_step * len(compute), scheduled


def _stats_json(capsys, *argv) -> dict:
    assert cli.main(["stats", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_xl2_full_step_is_118_6_gmacs(tmp_path, capsys):
    full_step, _ = counted_macs(model_config("dit-xl2"))
    assert abs(full_step / 1e9 - 118.6) < 0.1
    path = tmp_path / "full.yaml"
    assert cli.main(["full", "--model", "dit-xl2", "--steps", "20", "-o", str(path)]) == 0
    capsys.readouterr()
    s = _stats_json(capsys, path)  # the schedule's own model (dit-xl2) is used for MACs
    assert abs(s["macs_per_image_full"] / 20 / 1e9 - 118.6) < 0.1
    assert s["macs_per_image_full"] == pytest.approx(20 * full_step, rel=1e-12)
    assert s["macs_per_image_scheduled"] == s["macs_per_image_full"]
    assert s["ideal_speedup"] == 1.0 and s["skipped_share"] == 0.0


def test_stats_hand_schedule_on_tiny_model(tmp_path, capsys):
    path = tmp_path / "hand.yaml"
    hand_schedule().save(path)
    s = _stats_json(capsys, path, "--model", "dit-s2", *TINY_FLAGS)
    full, scheduled = expected_speedup(model_config("dit-s2", **TINY), HAND)
    assert s["macs_per_image_full"] == full
    assert s["macs_per_image_scheduled"] == scheduled
    assert s["ideal_speedup"] == pytest.approx(full / scheduled, rel=1e-12)
    assert s["ideal_speedup"] > 1.0
    # Shares by hand: 7 of 20 entries reused; 4 cached steps with 7 of 16 reused; attn 2/10, mlp 5/10.
    assert s["steps"] == 5 and s["units"] == 4
    assert s["skipped_share"] == pytest.approx(7 / 20)
    assert s["cached_steps"] == 4
    assert s["skipped_share_in_cached_steps"] == pytest.approx(7 / 16)
    assert s["skipped_share_by_kind"] == {"attn": pytest.approx(2 / 10), "mlp": pytest.approx(5 / 10)}
    assert s["distinct_rows"] == 5


def test_stats_l2c_xl2(router_dir, tmp_path, capsys):
    path = tmp_path / "l2c50.yaml"
    import_l2c(router_dir / "DDIM50_router.pt", XL_UNITS, 50, model="dit-xl2").save(path)
    s = _stats_json(capsys, path, "--model", "dit-xl2")
    want = expected_l2c_rows(_file_logits(router_dir / "DDIM50_router.pt"), 50, 0.1)
    full, scheduled = expected_speedup(model_config("dit-xl2"), want)
    assert s["ideal_speedup"] == pytest.approx(full / scheduled, rel=1e-9)
    assert 1.0 < s["ideal_speedup"] < 2.0  # L2C alternates full steps: capped at 2×


def test_stats_without_model_and_text_output(tmp_path, capsys):
    path = tmp_path / "hand.yaml"
    hand_schedule(model="not-in-zoo").save(path)
    s = _stats_json(capsys, path)
    assert "ideal_speedup" not in s and s["skipped_share"] == pytest.approx(7 / 20)
    assert cli.main(["stats", str(path), "--model", "dit-s2", *TINY_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "ideal speedup" in out and "35.0%" in out


def test_stats_python_api_matches_cli(tmp_path, capsys):
    path = tmp_path / "u.yaml"
    Schedule.uniform(U4, 6, 3).save(path)
    cfg = model_config("dit-s2", **TINY)
    api = stats(cfg, Schedule.load(path))
    full, scheduled = expected_speedup(cfg, Schedule.uniform(U4, 6, 3).compute)
    assert api["ideal_speedup"] == pytest.approx(full / scheduled, rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# The schedule CLI's makers and views
# ---------------------------------------------------------------------------------------------------

def test_cli_makers(tmp_path, capsys):
    full, uni = tmp_path / "full.yaml", tmp_path / "uni.yaml"
    assert cli.main(["full", "--model", "dit-s2", *TINY_FLAGS, "--steps", "4", "--spacing", "ddim",
                     "-o", str(full)]) == 0
    assert cli.main(["uniform", "--model", "dit-s2", *TINY_FLAGS, "--steps", "5", "--interval", "2",
                     "-o", str(uni)]) == 0
    out = capsys.readouterr().out
    assert out.count("wrote") == 2
    f, u = Schedule.load(full), Schedule.load(uni)
    assert f.unit_names == U4 and f.compute.all() and f.sampler == {"name": "ddim", "steps": 4, "spacing": "ddim"}
    assert u.compute.tolist() == [[True] * 4, [False] * 4, [True] * 4, [False] * 4, [True] * 4]
    assert f.model == "dit-s2"


def test_show_text_and_png(tmp_path, capsys):
    path, png = tmp_path / "hand.yaml", tmp_path / "hand.png"
    hand_schedule(source="hand").save(path)
    assert cli.main(["show", str(path), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # Header, one line per step with the step's t (linspace 5: 999, 749, 500, 250, 0), then "wrote".
    assert len([line for line in lines if "t=" in line]) == 5
    for t, row in zip((999, 749, 500, 250, 0), HAND_ROWS):
        assert any(re.search(rf"\bt=\s*{t}\b", line) and row in line for line in lines), (t, row)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100
