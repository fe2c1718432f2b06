"""Plans exported by earlier versions (tests/data/plans, made by those commits' own exporters, version
1: no seal) are refused in one line naming their version; `blockcache-plan upgrade` checks and seals
them, and then they replay the eager reference of the same model and schedule on every CPU backend."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import REPO
from exporter.models import load_model
from exporter.reference import sample
from runtime import Sampler
from schedules import BlockcacheError, Schedule

pytestmark = pytest.mark.usefixtures("single_thread")

PLANS = REPO / "tests" / "data" / "plans"
MODELS = {"dit": "dit-s2", "uvit": "uvit-h2"}  # the zoo entries the fixtures were made from (README there)
SMALL = dict(depth=2, hidden_size=32, num_heads=2, input_size=8)


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory):
    """Each fixture plan, copied and upgraded with the CLI."""
    from runtime.plan.cli import main

    root = tmp_path_factory.mktemp("upgraded")
    for name in ("dit-a93be39", "dit-2aaa9ff", "uvit-2aaa9ff"):
        shutil.copytree(PLANS / name, root / name)
        assert main(["upgrade", str(root / name)]) == 0
    return root


@pytest.mark.parametrize("name", ["dit-a93be39", "dit-2aaa9ff", "uvit-2aaa9ff"])
def test_an_unsealed_plan_is_refused_in_one_line_naming_its_version(name):
    with pytest.raises(BlockcacheError, match="plan version 1 has no seal") as e:
        Sampler(str(PLANS / name))
    assert "\n" not in str(e.value) and "blockcache-plan upgrade" in str(e.value)


@pytest.mark.parametrize("name", ["dit-a93be39", "dit-2aaa9ff", "uvit-2aaa9ff"])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_old_plan_upgraded_replays_the_eager_reference(name, backend, upgraded):
    plan = upgraded / name
    model = load_model(MODELS[name.split("-")[0]], random_init=True, seed=5, **SMALL)
    schedule = Schedule.load(plan / "schedule.yaml")
    labels = [1, 3, 2]  # three labels on a batch-2 plan: batched and padded
    noise = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    sampler = Sampler(str(plan), backend=backend, device="cpu")
    got = sampler(labels, noise=noise)
    want = sample(model, schedule, labels, noise, guidance_scale=sampler.plan.guidance.scale)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_upgrade_checks_before_it_seals(tmp_path, capsys):
    """A damaged version-1 plan is not sealed: upgrade checks every file first."""
    from conftest import cli_error
    from runtime.plan.cli import main

    plan = shutil.copytree(PLANS / "dit-2aaa9ff", tmp_path / "plan")
    data = bytearray((plan / "weights.bin").read_bytes())
    data[100] ^= 0xFF
    (plan / "weights.bin").write_bytes(bytes(data))
    before = (plan / "plan.json").read_bytes()
    assert "fails its checksum" in cli_error(main, ["upgrade", plan], capsys)
    assert (plan / "plan.json").read_bytes() == before


def test_old_plan_of_another_version_is_refused_in_one_line(tmp_path):
    plan = shutil.copytree(PLANS / "dit-a93be39", tmp_path / "plan")
    text = (plan / "plan.json").read_text().replace('"version": 1,', '"version": 0,', 1)
    (plan / "plan.json").write_text(text)
    with pytest.raises(BlockcacheError, match="plan version 0 is not supported") as e:
        Sampler(str(plan))
    assert "\n" not in str(e.value)
