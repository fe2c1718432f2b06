"""Plans exported by earlier versions (tests/data/plans, made by those commits' own exporters) still
load, and replay the eager reference of the same model and schedule on every CPU backend."""

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


@pytest.mark.parametrize("name", ["dit-a93be39", "dit-2aaa9ff", "uvit-2aaa9ff"])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_old_plan_replays_the_eager_reference(name, backend):
    plan = PLANS / name
    model = load_model(MODELS[name.split("-")[0]], random_init=True, seed=5, **SMALL)
    schedule = Schedule.load(plan / "schedule.yaml")
    labels = [1, 3, 2]  # three labels on a batch-2 plan: batched and padded
    noise = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    sampler = Sampler(str(plan), backend=backend, device="cpu")
    got = sampler(labels, noise=noise)
    want = sample(model, schedule, labels, noise, guidance_scale=sampler.plan.guidance.scale)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_old_plan_of_another_version_is_refused_in_one_line(tmp_path):
    plan = shutil.copytree(PLANS / "dit-a93be39", tmp_path / "plan")
    text = (plan / "plan.json").read_text().replace('"version": 1,', '"version": 0,', 1)
    (plan / "plan.json").write_text(text)
    with pytest.raises(BlockcacheError, match="plan version 0 is not supported") as e:
        Sampler(str(plan))
    assert "\n" not in str(e.value)
