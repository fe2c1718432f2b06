"""The plan format's one validator (runtime.plan.Plan.parse): manifests edited by hand are refused in
one line for every backend, before a backend could run them silently wrong. The plans are the
committed fixtures (tests/data/plans), so these tests export nothing."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import REPO
from runtime.plan import Plan
from schedules import BlockcacheError
from schedules.errors import ParameterError

PLANS = REPO / "tests" / "data" / "plans"


def document(name: str) -> dict:
    return json.loads((PLANS / name / "plan.json").read_text())


def refused(doc: dict, name: str) -> str:
    with pytest.raises(BlockcacheError) as e:
        Plan.parse(doc, str(PLANS / name))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("name", ["dit-a93be39", "dit-2aaa9ff", "uvit-2aaa9ff"])
def test_unedited_plans_parse(name):
    plan = Plan.parse(document(name), str(PLANS / name))
    assert len(plan.program.steps) == 4 and plan.program.batch_size == 2 and len(plan.programs) == 1


def edited(name: str, edit) -> dict:
    doc = copy.deepcopy(document(name))
    edit(doc)
    return doc


def test_carry_buffer_must_hold_the_solver_steps_start():
    """Latents that keep every step's input and output apart but carry a buffer no step wrote (ONNX
    Runtime would read uninitialised memory, the torch backend drop the carry term)."""
    def edit(doc):
        for s, latents in zip(doc["steps"][1:], ([1, 2, 0], [0, 0, 1], [1, 0, 2])):
            s["latents"] = latents
    assert "carry buffer 2 does not hold the input of evaluation 0" in refused(edited("uvit-2aaa9ff", edit),
                                                                                "uvit-2aaa9ff")


def test_carry_inputs_cannot_be_dropped():
    def edit(doc):
        del doc["inputs"]["c"], doc["inputs"]["x_carry"]
    assert "lack 'c'" in refused(edited("uvit-2aaa9ff", edit), "uvit-2aaa9ff")

    def edit_steps(doc):
        edit(doc)
        for s in doc["steps"]:
            s.pop("c")
    assert "lack 'c'" in refused(edited("uvit-2aaa9ff", edit_steps), "uvit-2aaa9ff")


def test_c_on_a_plan_without_carry_is_refused():
    def edit(doc):
        doc["steps"][1]["c"] = 0.5
    assert "steps[1].c is given" in refused(edited("dit-2aaa9ff", edit), "dit-2aaa9ff")


@pytest.mark.parametrize("name, value, message", [
    ("x", {"shape": [2, 4, 8, 8], "dtype": "float16"}, "inputs['x'] is float16[2, 4, 8, 8], not float32[2, 4, 8, 8]"),
    ("y", {"shape": [2], "dtype": "int32"}, "inputs['y'] is int32[2], not int64[2]"),
    ("timestep", {"shape": [1], "dtype": "float32"}, "inputs['timestep'] is float32[1], not int64[1]"),
    ("guidance_scale", {"shape": [2], "dtype": "float32"}, "not float32[1]"),
])
def test_graph_inputs_are_pinned(name, value, message):
    assert message in refused(edited("dit-2aaa9ff", lambda doc: doc["inputs"].__setitem__(name, value)),
                              "dit-2aaa9ff")


def test_cache_buffers_hold_the_doubled_batch_at_the_plan_precision():
    # guidance doubles the batch of 2; 16 patches; width 32; fp32
    buffer = "cache.blocks.0.attn"
    assert document("dit-2aaa9ff")["buffers"][buffer] == {"shape": [4, 16, 32], "dtype": "float32"}
    for spec, message in (({"shape": [2, 16, 32], "dtype": "float32"}, "float32[2, 16, 32], not float32[4, 16, 32]"),
                          ({"shape": [4, 16, 32], "dtype": "float16"}, "not float32[4, 16, 32]")):
        doc = edited("dit-2aaa9ff", lambda d: d["buffers"].__setitem__(buffer, spec))
        assert message in refused(doc, "dit-2aaa9ff")


def test_precision_must_be_the_stored_parameters():
    message = refused(edited("dit-2aaa9ff", lambda d: d.__setitem__("precision", "fp16")), "dit-2aaa9ff")
    assert "is stored as float32, not the plan's float16" in message  # the parameters are read first

    def edit(doc):  # caches relabelled too: the stored parameters still say fp32
        doc["precision"] = "fp16"
        for spec in doc["buffers"].values():
            spec["dtype"] = "float16"
    assert "is stored as float32, not the plan's float16" in refused(edited("dit-2aaa9ff", edit), "dit-2aaa9ff")


@pytest.mark.parametrize("key, value", [("timestep", 666.5), ("timestep", 665), ("a", 5.385859412901787 * 1.0001),
                                        ("b", -4.53)])
def test_step_constants_are_the_samplers(key, value):
    message = refused(edited("dit-2aaa9ff", lambda d: d["steps"][1].__setitem__(key, value)), "dit-2aaa9ff")
    assert f"steps[1].{key} is {float(value)!r}, but the recorded sampler derives" in message


def test_a_dropped_step_is_refused():
    def edit(doc):
        doc["steps"].pop()
    assert "are 3, but the ddim sampler makes 4 model evaluations" in refused(edited("dit-2aaa9ff", edit),
                                                                              "dit-2aaa9ff")


def test_stored_tensor_length_matches_its_shape():
    def edit(doc):
        t = doc["weights"]["tensors"]["model.pos_embed"]
        t["length"] -= 4
    assert "bytes, not those of a" in refused(edited("dit-2aaa9ff", edit), "dit-2aaa9ff")


def test_parameter_error_keeps_braces_in_user_values():
    e = ParameterError("out_dir", "{name} /tmp/{x}{0} exists and is not a folder")
    assert str(e) == "out_dir /tmp/{x}{0} exists and is not a folder"
    assert e.render({"out_dir": "--out"}) == "--out /tmp/{x}{0} exists and is not a folder"
