"""Plans and inputs that cannot silently go wrong: the sealed manifest and its content checks, files
confined to the plan folder, bounded and checked inputs, NaN and inf never passed off as a result,
permissions that follow the umask, and every bad input one line (tests/test_export_crash.py kills
exports). Each case reproduces a fault an adversarial user or an operator met, then shows it refused."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch

from conftest import TINY_FLAGS, cli_error, tiny_model
from exporter import export_cli, sample_cli, schedule_cli
from exporter.export import export_plan
from exporter.models import load_model
from runtime import Sampler
from runtime.plan import load_plan
from runtime.plan.manifest import manifest_seal
from schedules import BlockcacheError, Schedule

pytestmark = pytest.mark.usefixtures("single_thread")
MODEL = ["--model", "dit-s2", *TINY_FLAGS]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def sealed(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sealed") / "plan"
    export_plan(model, Schedule.uniform(model.unit_names, 4, 2), str(path), batch_size=2, guidance_scale=4.0)
    return path


def copy(plan, tmp_path, name="plan"):
    return shutil.copytree(plan, tmp_path / name)


def edit(plan, change, reseal=False):
    path = plan / "plan.json"
    doc = json.loads(path.read_text())
    change(doc)
    if reseal:  # a forger who rewrites the seal too: the content checks must still refuse
        doc["seal"] = manifest_seal(doc)
    path.write_text(json.dumps(doc, indent=1))


def refused(plan, match: str, **options) -> str:
    with pytest.raises(BlockcacheError, match=match) as e:
        Sampler(str(plan), device="cpu", **options)([1, 2], seed=0)
    assert "\n" not in str(e.value)
    return str(e.value)


def snapshot(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


# ---------------------------------------------------------------------------------------------------
# 1. The sealed manifest
# ---------------------------------------------------------------------------------------------------

def a_digit(doc):
    """One digit of a coefficient, one that survives the float32 the graphs run at (the fourth decimal)."""
    text = repr(doc["steps"][1]["a"])
    i = text.index(".") + 4
    doc["steps"][1]["a"] = float(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])


MANIFEST_EDITS = {  # the edits that sampled with exit 0 before, and what refuses them once resealed
    "one digit of a coefficient": (a_digit, "recorded sampler derives"),
    "a timestep": (lambda d: d["steps"][1].__setitem__("timestep", d["steps"][1]["timestep"] + 1), "recorded sampler"),
    "a dropped last step": (lambda d: d["steps"].pop(), "sampler makes 4 model evaluations"),
    "swapped latent buffers": (lambda d: d["steps"][1].__setitem__("latents", [0, 0, 1]), "previous step's output"),
    "variant -1": (lambda d: d["steps"][1].__setitem__("variant", -1), "integer >= 0"),
    "a weight offset moved by 4 bytes": (lambda d: next(iter(d["weights"]["tensors"].values())).__setitem__(
        "offset", next(iter(d["weights"]["tensors"].values()))["offset"] + 4), "weights table"),
    "a negative weight offset": (lambda d: next(iter(d["weights"]["tensors"].values())).__setitem__("offset", -8),
                                 "integer >= 0"),
    "the null class as a label": (lambda d: d["model"].__setitem__("num_labels", 1001), "more than the model's"),
    "a files entry deleted": (lambda d: d["files"].pop("weights.bin"), "not one of the plan's checksummed files"),
    "weights outside the plan": (lambda d: d["weights"].__setitem__("file", "../outside/w.bin"), "outside the plan"),
    "a variant file by absolute path": (lambda d: d["variants"][0].__setitem__("file", "/tmp/x.onnx"),
                                        "outside the plan"),
}


@pytest.mark.parametrize("what", MANIFEST_EDITS)
def test_manifest_edits_are_refused_sealed_or_resealed(what, sealed, tmp_path):
    change, content_message = MANIFEST_EDITS[what]
    plan = copy(sealed, tmp_path, "edited")
    edit(plan, change)
    refused(plan, "fails its seal")
    plan = copy(sealed, tmp_path, "resealed")
    edit(plan, change, reseal=True)
    refused(plan, content_message)


def test_nan_in_the_manifest_is_refused(sealed, tmp_path):
    plan = copy(sealed, tmp_path)
    path = plan / "plan.json"
    path.write_text(path.read_text().replace('"a": ', '"a": NaN, "was": ', 1))
    refused(plan, "NaN is not a number a plan may hold")


def test_a_sealed_plan_loads_and_the_seal_covers_every_value(sealed):
    plan = load_plan(str(sealed))
    assert plan.document["version"] == 2 and plan.document["seal"] == manifest_seal(plan.document)
    changed = json.loads(json.dumps(plan.document))
    changed["guidance"]["scale"] = 4.5  # a value no consistency check can judge: only the seal does
    assert manifest_seal(changed) != plan.document["seal"]


STRUCTURAL_EDITS = {
    "files as a list": (lambda d: d.__setitem__("files", []), "files must be a mapping"),
    "an offset past the end": (lambda d: next(iter(d["weights"]["tensors"].values())).__setitem__("offset", 1 << 40),
                               "lies outside"),
    "a float offset": (lambda d: next(iter(d["weights"]["tensors"].values())).__setitem__("offset", 1.5),
                       "must be an integer"),
    "a bogus dtype": (lambda d: d["inputs"]["x"].__setitem__("dtype", "complex128"), "dtype must be one of"),
    "a variant index out of range": (lambda d: d["steps"][1].__setitem__("variant", 9), "the plan has 2 variants"),
    "a variant index as a string": (lambda d: d["steps"][1].__setitem__("variant", "1"), "must be an integer"),
    "no steps": (lambda d: d.__setitem__("steps", []), "non-empty list"),
    "a step without a": (lambda d: d["steps"][1].pop("a"), "lacks 'a'"),
    "batch size 0": (lambda d: d.__setitem__("batch_size", 0), "integer >= 1"),
    "a cache buffer of the wrong shape": (lambda d: next(iter(d["buffers"].values())).__setitem__("shape", [2, 16, 64]),
                                          "not float32"),
    "a cache buffer of the wrong dtype": (lambda d: next(iter(d["buffers"].values())).__setitem__("dtype", "int64"),
                                          "not float32"),
    "a cache buffer missing": (lambda d: d["buffers"].pop(next(iter(d["buffers"]))), "no cache buffer"),
    "the model config gone": (lambda d: d["model"].pop("config"), "lacks 'config'"),
    "a config with a string depth": (lambda d: d["model"]["config"].__setitem__("depth", "2"), "not a valid model config"),
    "an unknown sampler": (lambda d: d["sampler"].__setitem__("name", "euler"), "unknown sampler"),
    "guidance as a string": (lambda d: d.__setitem__("guidance", "yes"), "guidance must be a mapping"),
    "an unknown guidance form": (lambda d: d["guidance"].__setitem__("channels", "half"), "guidance.channels"),
    "a variant's units not split": (lambda d: d["variants"][1]["reads"].pop(), "does not split"),
    "a write of a read unit": (lambda d: d["variants"][1]["writes"].append(d["variants"][1]["reads"][0]),
                               "writes a unit it does not compute"),
    "a manifest that is a list": (lambda d: (d.clear(),), "not a blockcache plan manifest"),
    "the wrong format": (lambda d: d.__setitem__("format", "other"), "not a blockcache plan manifest"),
    "parameters at another precision": (lambda d: d.__setitem__("precision", "fp16"), "not the plan's float16"),
    "a step with a carry coefficient": (lambda d: d["steps"][1].__setitem__("c", 0.5), "no carry input"),
    "a latent buffer 7": (lambda d: d["steps"][1].__setitem__("latents", [1, 1, 7]), "three buffer numbers"),
    "an unsplittable shape": (lambda d: d["inputs"]["x"].__setitem__("shape", "2x4"), "must be a list"),
    "a negative file size": (lambda d: d["files"]["weights.bin"].__setitem__("size", -1), "integer >= 0"),
}


@pytest.mark.parametrize("what", STRUCTURAL_EDITS)
def test_structural_manifest_edits_are_one_line(what, sealed, tmp_path):
    change, message = STRUCTURAL_EDITS[what]
    plan = copy(sealed, tmp_path)
    edit(plan, change, reseal=True)
    refused(plan, message)


def test_a_scale_shift_plan_needs_its_file(model, tmp_path):
    from test_scale_shift import partly_corrected

    _, schedule = partly_corrected(model)
    plan = tmp_path / "plan"
    export_plan(model, schedule, str(plan), batch_size=2, guidance_scale=4.0)
    edit(plan, lambda d: d.__setitem__("scale_shift", None), reseal=True)
    refused(plan, "no scale-shift file")


# ---------------------------------------------------------------------------------------------------
# Confinement: every file in the plan folder, none through a link
# ---------------------------------------------------------------------------------------------------

def test_a_manifest_that_is_a_link_to_dev_zero_is_refused(sealed, tmp_path):
    plan = copy(sealed, tmp_path)
    os.remove(plan / "plan.json")
    os.symlink("/dev/zero", plan / "plan.json")
    refused(plan, "symbolic link")


def test_a_plan_file_that_links_outside_is_refused(sealed, tmp_path):
    plan = copy(sealed, tmp_path)
    outside = tmp_path / "outside.bin"
    shutil.move(plan / "weights.bin", outside)
    os.symlink(outside, plan / "weights.bin")
    refused(plan, "symbolic link")


def test_a_manifest_too_large_is_refused_before_it_is_read(sealed, tmp_path):
    plan = copy(sealed, tmp_path)
    with open(plan / "plan.json", "ab") as f:
        f.truncate(65 << 20)  # sparse: nothing is written
    refused(plan, "larger than 64 MiB")


def test_a_graph_that_does_not_match_its_manifest_is_refused(sealed, tmp_path):
    """variant_1 replaced by variant_0 and the manifest rewritten to match it: the graph check refuses
    at load; loaded without verification, ONNX Runtime's own failure is still one line."""
    plan = copy(sealed, tmp_path)
    shutil.copy(plan / "variant_0.onnx", plan / "variant_1.onnx")
    from runtime.plan.files import file_entry

    edit(plan, lambda d: d["files"].__setitem__("variant_1.onnx", file_entry(str(plan / "variant_1.onnx"))), reseal=True)
    refused(plan, r"do not match the manifest's variants\[1\]")
    refused(plan, "ONNX Runtime", verify=False)


# ---------------------------------------------------------------------------------------------------
# 4. NaN and inf never returned
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1e30, float("inf"), float("nan"), "abc", True])
def test_bad_guidance_scales_are_refused(scale, sealed):
    with pytest.raises(BlockcacheError, match="guidance_scale must be"):
        Sampler(str(sealed), device="cpu")([1, 2], seed=0, guidance_scale=scale)


def test_noise_that_overflows_float32_is_refused(sealed):
    with pytest.raises(BlockcacheError, match="finite"):
        Sampler(str(sealed), device="cpu")([1, 2], noise=np.full((2, 4, 8, 8), 1e39))  # finite in float64


def test_cli_guidance_scale_out_of_range(sealed, tmp_path, capsys):
    line = cli_error(sample_cli.main, ["--plan", sealed, "--labels", "1", "--guidance-scale", "1e30", "--out",
                                       tmp_path / "z.npy", "--quiet"], capsys)
    assert "--guidance-scale must be a finite number" in line and not (tmp_path / "z.npy").exists()


def test_a_result_that_overflows_is_refused(tmp_path):
    """Finite but huge weights overflow to inf while sampling: refused, never returned."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e18)
    plan = tmp_path / "plan"
    export_plan(model, Schedule.full(model.unit_names, 2), str(plan), batch_size=2)
    with pytest.raises(BlockcacheError, match="non-finite values"):
        Sampler(str(plan), device="cpu")([1, 2], seed=0)
    from exporter.reference import sample

    with pytest.raises(BlockcacheError, match="non-finite values"):
        sample(model, Schedule.full(model.unit_names, 2), [1, 2], np.zeros((2, 4, 8, 8), np.float32))


def test_nan_weights_are_refused_at_load_and_export(model, tmp_path, capsys):
    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["blocks.0.attn.qkv.bias"][3] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    line = cli_error(sample_cli.main, [*MODEL, "--checkpoint", tmp_path / "nan.safetensors", "--labels", "1",
                                       "--steps", "2", "--out", tmp_path / "z.npy", "--quiet"], capsys)
    assert "blocks.0.attn.qkv.bias holds NaN" in line
    broken = tiny_model()
    with torch.no_grad():
        broken.blocks[0].mlp.fc1.bias[0] = float("inf")
    with pytest.raises(BlockcacheError, match="holds NaN or infinite"):
        export_plan(broken, Schedule.full(broken.unit_names, 2), str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


def test_integer_weights_are_refused_not_cast(model, tmp_path, capsys):
    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"].to(torch.int64)
    save_file(state, str(tmp_path / "int.safetensors"))
    line = cli_error(sample_cli.main, [*MODEL, "--checkpoint", tmp_path / "int.safetensors", "--labels", "1",
                                       "--steps", "2", "--out", tmp_path / "z.npy", "--quiet"], capsys)
    assert "is a int64 tensor, not floating-point weights" in line


# ---------------------------------------------------------------------------------------------------
# 5. Bounded work from small inputs
# ---------------------------------------------------------------------------------------------------

def schedule_text(model) -> str:
    return Schedule.uniform(model.unit_names, 4, 2).to_yaml()


@pytest.mark.parametrize("command", ["stats", "show"])
def test_yaml_alias_bomb_is_refused(command, model, tmp_path, capsys):
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n"
        for i in range(8))
    text = schedule_text(model).replace("source:", bomb + "source:")
    assert len(text) < 2000
    (tmp_path / "bomb.yaml").write_text(text)
    assert "anchors and aliases are not allowed" in cli_error(schedule_cli.main, [command, tmp_path / "bomb.yaml"],
                                                              capsys)


@pytest.mark.parametrize("rows, message", [(400_000, "larger than 2 MiB"), (3000, "at most 2000 rows")])
def test_a_schedule_with_too_many_rows_is_refused_before_parsing(rows, message, model):
    text = schedule_text(model).split("steps:")[0] + "steps:\n" + '- "xx xx"\n' * rows
    with pytest.raises(BlockcacheError, match=message):
        Schedule.from_yaml(text, "big.yaml")


def test_threads_are_bounded(sealed):
    for threads in (0, 100_000, 1.5):
        with pytest.raises(BlockcacheError, match="threads must be an integer in 1…1024"):
            Sampler(str(sealed), device="cpu", threads=threads)


# ---------------------------------------------------------------------------------------------------
# 6. Permissions follow the umask
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, folder, file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_plan_and_schedule_permissions_follow_the_umask(umask, folder, file, model, tmp_path):
    before = os.umask(umask)
    try:
        schedule = Schedule.uniform(model.unit_names, 4, 2)
        schedule.save(tmp_path / "s.yaml")
        export_plan(model, schedule, str(tmp_path / "plan"))
    finally:
        os.umask(before)
    assert stat.S_IMODE(os.stat(tmp_path / "s.yaml").st_mode) == file
    assert stat.S_IMODE(os.stat(tmp_path / "plan").st_mode) == folder
    for name in os.listdir(tmp_path / "plan"):
        assert stat.S_IMODE(os.stat(tmp_path / "plan" / name).st_mode) == file, name


# ---------------------------------------------------------------------------------------------------
# 7./8. One line for everything else, at the earliest point
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_file_system_is_one_line(code, model, sealed, tmp_path, monkeypatch, capsys):
    import onnx

    plan = copy(sealed, tmp_path)
    before = snapshot(plan)

    def failing_save(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(onnx, "save", failing_save)
    Schedule.uniform(model.unit_names, 4, 2).save(tmp_path / "s.yaml")
    line = cli_error(export_cli.main, [*MODEL, "--random-init", "--schedule", tmp_path / "s.yaml", "--out", plan,
                                       "--quiet"], capsys)
    assert os.strerror(code) in line
    assert snapshot(plan) == before and sorted(os.listdir(tmp_path)) == ["plan", "s.yaml"]


@pytest.mark.parametrize("replace, message", [
    ("sampler: {name: ddim", "sampler: {name: [ddim]"),
    ("model: dit-s2", "model: [x]"),
    ("steps: 4,", 'steps: "4",'),
])
def test_schedule_fields_of_the_wrong_type(replace, message, model, tmp_path, capsys):
    text = Schedule.uniform(model.unit_names, 4, 2, model="dit-s2").to_yaml()
    assert replace in text
    (tmp_path / "s.yaml").write_text(text.replace(replace, message))
    cli_error(schedule_cli.main, ["stats", tmp_path / "s.yaml"], capsys)


def test_deeply_nested_and_duplicated_yaml(model, tmp_path, capsys):
    text = schedule_text(model)
    (tmp_path / "deep.yaml").write_text(text.replace("source: ", "source: " + "[" * 5000 + "]" * 5000 + " #"))
    assert "nested deeper" in cli_error(schedule_cli.main, ["show", tmp_path / "deep.yaml"], capsys)
    (tmp_path / "dup.yaml").write_text(text + "version: 1\n")
    assert "appears twice" in cli_error(schedule_cli.main, ["show", tmp_path / "dup.yaml"], capsys)


@pytest.mark.parametrize("ratio, message", [("inf", "positive finite number"), ("1e-9", "MLP of width 0")])
def test_mlp_ratio_out_of_range(ratio, message, tmp_path, capsys):
    line = cli_error(sample_cli.main, [*MODEL, "--random-init", "--mlp-ratio", ratio, "--labels", "1", "--steps", "2",
                                       "--out", tmp_path / "z.npy", "--quiet"], capsys)
    assert message in line


@pytest.mark.parametrize("tolerance", ["nan", "-1", "0"])
def test_verify_tolerance_is_checked_before_export(tolerance, model, tmp_path, capsys):
    Schedule.uniform(model.unit_names, 4, 2).save(tmp_path / "s.yaml")
    line = cli_error(export_cli.main, [*MODEL, "--random-init", "--schedule", tmp_path / "s.yaml", "--out",
                                       tmp_path / "plan", "--verify", "--tolerance", tolerance, "--quiet"], capsys)
    assert "--tolerance must be a positive number" in line and not (tmp_path / "plan").exists()


def test_sample_out_in_a_missing_folder_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    import exporter.reference as reference

    monkeypatch.setattr(reference, "sample", lambda *a, **k: pytest.fail("sampled before checking --out"))
    line = cli_error(sample_cli.main, [*MODEL, "--random-init", "--labels", "1", "--steps", "2", "--out",
                                       "/nonexistent/x.npy", "--quiet"], capsys)
    assert "does not exist" in line


def test_a_protocol_4_pickle_is_refused_naming_what_it_calls(tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": Payload()}, f, protocol=4)
    line = cli_error(sample_cli.main, [*MODEL, "--checkpoint", tmp_path / "evil.pt", "--labels", "1", "--steps", "2",
                                       "--out", tmp_path / "z.npy", "--quiet"], capsys)
    assert "would import posix.system" in line or "would import os.system" in line


def test_api_inputs_of_the_wrong_type(sealed):
    with pytest.raises(BlockcacheError, match="plan_dir must be a folder path"):
        Sampler(None)
    with pytest.raises(BlockcacheError, match="integer in 1…1024"):
        Sampler(str(sealed), threads=1.5)


def test_load_model_refuses_overrides_out_of_range():
    with pytest.raises(BlockcacheError, match="depth must be a positive integer up to"):
        load_model("dit-s2", random_init=True, depth=10 ** 9)


# ---------------------------------------------------------------------------------------------------
# An adversarial pass (a second tester's findings), each refused now
# ---------------------------------------------------------------------------------------------------

def test_an_export_never_replaces_a_folder_whose_plan_json_is_not_a_plan(model, tmp_path, capsys):
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "plan.json").write_text('{"my": "own"}')
    (mine / "important.txt").write_text("precious")
    Schedule.uniform(model.unit_names, 4, 2).save(tmp_path / "s.yaml")
    line = cli_error(export_cli.main, [*MODEL, "--random-init", "--schedule", tmp_path / "s.yaml", "--out", mine,
                                       "--quiet"], capsys)
    assert "is no blockcache manifest" in line and (mine / "important.txt").read_text() == "precious"


@pytest.mark.parametrize("flags, message", [(["--input-size", "65536"], "tokens, more than"),
                                            (["--depth", "60000", "--hidden-size", "8192"], "G parameters"),
                                            (["--batch-size", "1000000000"], "--batch-size must be an integer in")])
def test_small_inputs_cannot_ask_for_terabytes(flags, message, model, tmp_path, capsys):
    Schedule.uniform(model.unit_names, 4, 2).save(tmp_path / "s.yaml")
    args = ["--model", "dit-s2", *TINY_FLAGS, *flags, "--random-init", "--schedule", tmp_path / "s.yaml", "--out",
            tmp_path / "plan", "--quiet"]
    assert message in cli_error(export_cli.main, args, capsys)


def test_change_statistics_with_a_huge_model_are_refused(tmp_path, capsys):
    from schedules.change import save_change

    save_change(tmp_path / "c.npz", change=np.zeros((2, 2)), unit_names=["blocks.0.attn", "blocks.0.mlp"],
                timesteps=[999, 0], sampler={"name": "ddim", "steps": 2, "spacing": "linspace"},
                config={"family": "dit", "depth": 10 ** 10}, model=None, labels=[0], seeds=[0], guidance_scale=4.0)
    assert "not valid" in cli_error(schedule_cli.main, ["derive", tmp_path / "c.npz", "--delta", "0.5", "-o",
                                                        tmp_path / "s.yaml"], capsys)


@pytest.mark.parametrize("field, value", [("version", np.arange(2)), ("version", np.asarray("abc")),
                                          ("guidance_scale", np.zeros(3)), ("sampler", np.asarray("[1]")),
                                          ("change", np.asarray([["a", "b"], ["c", "d"]]))])
def test_damaged_change_statistics_are_one_line(field, value, model, tmp_path, capsys):
    from exporter.makers.analyze import measure_change
    from schedules.change import save_change

    schedule = Schedule.full(model.unit_names, 2)
    save_change(tmp_path / "c.npz", change=measure_change(model, schedule, [1], [0]), unit_names=model.unit_names,
                timesteps=[999, 0], sampler=schedule.sampler, config=model.config, model="dit-s2", labels=[1],
                seeds=[0], guidance_scale=4.0)
    with np.load(tmp_path / "c.npz") as f:
        fields = dict(f)
    fields[field] = value
    np.savez(tmp_path / "c.npz", **fields)
    cli_error(schedule_cli.main, ["derive", tmp_path / "c.npz", "--delta", "0.5", "-o", tmp_path / "s.yaml"], capsys)


@pytest.mark.parametrize("damage", ["9" * 5000, "1e999", '"\\ud800"'])
def test_manifest_values_json_cannot_hold_are_one_line(damage, sealed, tmp_path):
    plan = copy(sealed, tmp_path)
    path = plan / "plan.json"
    path.write_text(path.read_text().replace('"schedule_source": ', f'"extra": {damage}, "schedule_source": ', 1))
    with pytest.raises(BlockcacheError) as e:
        Sampler(str(plan), device="cpu")
    assert "\n" not in str(e.value)


FORGERIES = {
    "a dtype that is a list": lambda d: d["inputs"]["x"].__setitem__("dtype", []),
    "a sampler name that is a list": lambda d: d["sampler"].__setitem__("name", []),
    "unit names that are a number": lambda d: d["model"].__setitem__("unit_names", 5),
    "a parameter's tensor that is a list": lambda d: next(iter(d["weights"]["parameters"].values())).__setitem__(
        "tensor", []),
    "a file name with a NUL": lambda d: d["files"].__setitem__("a\u0000b", {"size": 1, "sha256": "0"}),
    "a file name with a lone surrogate": lambda d: d["files"].__setitem__("\ud800", {"size": 1, "sha256": "0"}),
    "transposed as a string": lambda d: next(iter(d["weights"]["parameters"].values())).__setitem__("transposed", "no"),
    "scale_shift as an empty mapping": lambda d: d.__setitem__("scale_shift", {}),
    "a spacing that is a list": lambda d: d["sampler"].__setitem__("spacing", []),
    "schedule.yaml left out of files": lambda d: d["files"].pop("schedule.yaml"),
    "version true": lambda d: d.__setitem__("version", True),
    "a default guidance scale of 1e300": lambda d: d["guidance"].__setitem__("scale", 1e300),
}


@pytest.mark.parametrize("what", FORGERIES)
def test_resealed_forgeries_are_one_line(what, sealed, tmp_path):
    plan = copy(sealed, tmp_path)
    edit(plan, FORGERIES[what], reseal=True)
    with pytest.raises(BlockcacheError) as e:
        Sampler(str(plan), device="cpu")
    assert "\n" not in str(e.value)


def test_a_downgraded_plan_does_not_escape_its_seal(sealed, tmp_path):
    """Version 2 edited to 1 (no reseal needed) with a value changed: refused, never loaded unsealed."""
    plan = copy(sealed, tmp_path)
    edit(plan, lambda d: (d.__setitem__("version", 1), d["guidance"].__setitem__("scale", 0.0)))
    refused(plan, "plan version 1 has no seal")


def test_schedule_and_sidecar_and_router_damage_is_one_line(model, tmp_path, capsys):
    text = Schedule.uniform(model.unit_names, 4, 2).to_yaml()
    (tmp_path / "big.yaml").write_text(text.replace("steps: 4,", "steps: " + "9" * 5000 + ","))
    cli_error(schedule_cli.main, ["show", tmp_path / "big.yaml"], capsys)
    from safetensors.numpy import save_file

    from test_scale_shift import partly_corrected

    _, corrected = partly_corrected(model)
    corrected.save(tmp_path / "c.yaml")
    tensors = {name.replace("/", "/²", 1) if i == 0 else name: value
               for i, (name, value) in enumerate(corrected.scale_shift_tensors().items())}
    save_file(tensors, str(tmp_path / "c.scaleshift.safetensors"))
    assert "unexpected scale-shift tensor" in cli_error(schedule_cli.main, ["show", tmp_path / "c.yaml"], capsys)
    for name, routers in (("super.pt", {"².prob": torch.zeros(4)}), ("long.pt", {"9" * 5000 + ".prob": torch.zeros(4)}),
                          ("nan.pt", {"0.prob": torch.full((4,), float("nan")), "1.prob": torch.zeros(4)}),
                          ("sparse.pt", {"0.prob": torch.zeros(4).to_sparse()})):
        torch.save({"routers": routers}, tmp_path / name)
        cli_error(schedule_cli.main, ["import-l2c", tmp_path / name, *MODEL, "--steps", "2", "-o",
                                      tmp_path / "out.yaml"], capsys)
    assert not (tmp_path / "out.yaml").exists()


def test_guidance_scales_a_plan_could_not_sample_with_are_not_exported(model, tmp_path, capsys):
    Schedule.uniform(model.unit_names, 4, 2).save(tmp_path / "s.yaml")
    line = cli_error(export_cli.main, [*MODEL, "--random-init", "--schedule", tmp_path / "s.yaml", "--out",
                                       tmp_path / "plan", "--guidance-scale", "1e300", "--quiet"], capsys)
    assert "--guidance-scale must be a finite number within" in line


def test_a_random_init_seed_out_of_range_is_one_line(model, tmp_path, capsys):
    Schedule.uniform(model.unit_names, 4, 2).save(tmp_path / "s.yaml")
    line = cli_error(export_cli.main, [*MODEL, "--random-init", "--seed", "9" * 23, "--schedule", tmp_path / "s.yaml",
                                       "--out", tmp_path / "plan", "--quiet"], capsys)
    assert line.startswith("error: --seed must be an integer in")


def test_bench_output_paths_are_checked_before_it_runs(tmp_path, capsys):
    from benchmarks.bench.cli import main

    (tmp_path / "afile").write_text("")
    args = [*MODEL, "--random-init", "--schedule", "uniform:2", "--steps", "4", "--backends", "onnxruntime",
            "--repeats", "1", "--device", "cpu", "--quiet"]
    assert "is not a folder" in cli_error(main, [*args, "--out", tmp_path / "afile"], capsys)
    assert "plain file name" in cli_error(main, [*args, "--out", tmp_path, "--tag", "../escaped"], capsys)
    assert "--guidance-scale must be a finite number within" in cli_error(
        main, [*args, "--out", tmp_path, "--guidance-scale", "1e300"], capsys)


@pytest.mark.parametrize("png, message", [("afile/x.png", "does not exist"), ("x.txt", "must end in .png")])
def test_show_png_paths_are_checked(png, message, model, tmp_path, capsys):
    Schedule.uniform(model.unit_names, 4, 2).save(tmp_path / "s.yaml")
    (tmp_path / "afile").write_text("")
    assert message in cli_error(schedule_cli.main, ["show", tmp_path / "s.yaml", "--png", tmp_path / png], capsys)


@pytest.mark.parametrize("labels", ["1,,2", "1_0", "1,2,"])
def test_labels_are_written_plainly(labels, tmp_path, capsys):
    assert "--labels must be comma-separated integers" in cli_error(sample_cli.main, [
        *MODEL, "--random-init", "--labels", labels, "--steps", "2", "--out", tmp_path / "z.npy", "--quiet"], capsys)


def test_api_inputs_a_tester_tried(sealed):
    sampler = Sampler(str(sealed), device="cpu")
    for call in (lambda: sampler([[1], [1, 2]]), lambda: sampler([1, 2], guidance_scale=10 ** 400),
                 lambda: sampler([1, 2], noise=np.ma.masked_array(np.zeros((2, 4, 8, 8)), mask=True)),
                 lambda: Sampler(str(sealed), verify="no"), lambda: Schedule.load(3),
                 lambda: Schedule.load("a\x00b"), lambda: Schedule.from_yaml(None), lambda: Schedule.from_yaml(b"x")):
        with pytest.raises(BlockcacheError) as e:
            call()
        assert "\n" not in str(e.value)
