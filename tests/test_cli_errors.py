"""Bad input to the console scripts: exit status 2, exactly one `error:` line on stderr, no traceback.

Most cases call `main(argv)` in-process (fast); a few run the real `python -m …` to check what a user
sees end to end.
"""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

from conftest import TINY_FLAGS, assert_one_line_error, run_cli, tiny_model
from conftest import cli_error as call
from exporter import sample_cli
from schedules import cli as schedule_cli
from schedules.schedule import Schedule
from schedules.zoo import model_config, unit_names

pytestmark = pytest.mark.usefixtures("single_thread")

UNITS = ("blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp")
MODEL = ["--model", "dit-s2", *TINY_FLAGS]


def sample_args(tmp_path, *extra):
    return [*MODEL, "--labels", "1,2", "--steps", "2", "--out", tmp_path / "z.npy", "--quiet", *extra]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(tiny_model(seed=1).state_dict(), path)
    return path


def _yaml(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _rows_yaml(units, rows, steps=None):
    return ("version: 1\n"
            f"sampler: {{name: ddim, steps: {steps or len(rows)}, spacing: linspace}}\n"
            f"units: [{', '.join(units)}]\n"
            "steps:\n" + "".join(f'- "{r}"\n' for r in rows))


# ---------------------------------------------------------------------------------------------------
# blockcache-sample: weights
# ---------------------------------------------------------------------------------------------------

def test_sample_checkpoint_sanity(tmp_path, checkpoint, capsys):
    """The error cases below start from a checkpoint that does load."""
    out = tmp_path / "z.npy"
    assert sample_cli.main([*MODEL, "--checkpoint", str(checkpoint), "--labels", "1", "--steps", "2",
                            "--out", str(out), "--quiet"]) == 0
    assert np.load(out).shape == (1, 4, 8, 8)


def test_truncated_checkpoint(tmp_path, checkpoint, capsys):
    bad = tmp_path / "trunc.pt"
    data = checkpoint.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])
    assert "trunc.pt" in call(sample_cli.main, sample_args(tmp_path, "--checkpoint", bad), capsys)
    assert not (tmp_path / "z.npy").exists()


def test_truncated_safetensors(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model().state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    call(sample_cli.main, sample_args(tmp_path, "--checkpoint", path), capsys)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_malicious_checkpoint_does_not_run(tmp_path, container, capsys):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"pos_embed": torch.zeros(1), "x": _Payload(marker)}
    if container == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    call(sample_cli.main, sample_args(tmp_path, "--checkpoint", path), capsys)
    assert not marker.exists(), "the CLI ran code from the checkpoint"
    pickle.loads(path.read_bytes()) if container == "raw-pickle" else torch.load(path, weights_only=False)
    assert marker.exists()  # the payload was live


def test_wrong_shapes_name_the_key(tmp_path, capsys):
    sd = tiny_model().state_dict()
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(10, 64)
    path = tmp_path / "shape.pt"
    torch.save(sd, path)
    assert "blocks.0.attn.qkv.weight" in call(sample_cli.main, sample_args(tmp_path, "--checkpoint", path), capsys)


def test_checkpoint_for_other_size(tmp_path, checkpoint, capsys):
    # The tiny checkpoint (D = 64) given to a D = 32 model: a mismatched key is named.
    args = ["--model", "dit-s2", "--depth", "2", "--hidden-size", "32", "--num-heads", "4", "--input-size", "8",
            "--checkpoint", checkpoint, "--labels", "1", "--steps", "2", "--out", tmp_path / "z.npy", "--quiet"]
    line = call(sample_cli.main, args, capsys)
    found = re.search(r": (\S+) has shape (\(.*?\)) but the model expects (\(.*?\))", line)
    assert found, line
    key, have, want = found.groups()
    assert have == str(tuple(torch.load(checkpoint)[key].shape))
    assert want == str(tuple(tiny_model(hidden_size=32).state_dict()[key].shape))
    assert have != want


def test_missing_checkpoint(tmp_path, capsys):
    assert "absent.pt" in call(sample_cli.main, sample_args(tmp_path, "--checkpoint", tmp_path / "absent.pt"), capsys)


def test_no_weights_given(tmp_path, capsys):
    line = call(sample_cli.main, [*MODEL, "--labels", "1", "--steps", "2", "--out", tmp_path / "z.npy", "--quiet"],
                capsys)
    assert "random-init" in line


# ---------------------------------------------------------------------------------------------------
# blockcache-sample: schedules
# ---------------------------------------------------------------------------------------------------

SCHEDULES = {
    "broken-yaml": "version: 1\nsteps: [\"xx xx\"\n  units: : :\n",
    "row-length": _rows_yaml(UNITS, ["xx xx", "xx x"]),
    "step0-not-full": _rows_yaml(UNITS, ["xx x.", "xx xx"]),
    "unknown-version": _rows_yaml(UNITS, ["xx xx"]).replace("version: 1", "version: 7"),
    "unknown-unit": _rows_yaml(("blocks.0.attn", "blocks.0.mlp", "blocks.7.attn", "blocks.7.mlp"), ["xx xx"]),
    "unknown-unit-kind": _rows_yaml(("blocks.0.attn", "blocks.0.ffn", "blocks.1.attn", "blocks.1.mlp"), ["xx xx"]),
    "fewer-units": _rows_yaml(("blocks.0.attn", "blocks.0.mlp"), ["xx"]),
    "step-count": _rows_yaml(UNITS, ["xx xx", "xx xx"], steps=20),
    "bad-spacing": _rows_yaml(UNITS, ["xx xx"]).replace("linspace", "cosine"),
}
EXPECT = {"unknown-unit": "blocks.7.attn", "unknown-unit-kind": "blocks.0.ffn", "unknown-version": "version",
          "step0-not-full": "step 0", "fewer-units": "units", "bad-spacing": "spacing"}


@pytest.mark.parametrize("case", sorted(SCHEDULES))
def test_bad_schedule_for_sample(tmp_path, case, capsys):
    path = _yaml(tmp_path, f"{case}.yaml", SCHEDULES[case])
    line = call(sample_cli.main, [*MODEL, "--random-init", "--schedule", path, "--labels", "1",
                                  "--out", tmp_path / "z.npy", "--quiet"], capsys)
    if case in EXPECT:
        assert EXPECT[case] in line


def test_schedule_for_a_different_model(tmp_path, capsys):
    path = tmp_path / "xl.yaml"
    Schedule.full(unit_names(model_config("dit-xl2")), 2, model="dit-xl2").save(path)
    call(sample_cli.main, [*MODEL, "--random-init", "--schedule", path, "--labels", "1", "--out", tmp_path / "z.npy",
                           "--quiet"], capsys)
    # …and the stats command refuses it for the tiny model too.
    call(schedule_cli.main, ["stats", path, *MODEL], capsys)


def test_missing_schedule(tmp_path, capsys):
    assert "nothere.yaml" in call(sample_cli.main, [*MODEL, "--random-init", "--schedule", tmp_path / "nothere.yaml",
                                                    "--labels", "1", "--out", tmp_path / "z.npy", "--quiet"], capsys)


def test_schedule_and_steps_together(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    Schedule.full(UNITS, 2).save(path)
    call(sample_cli.main, [*sample_args(tmp_path, "--random-init"), "--schedule", path], capsys)


# ---------------------------------------------------------------------------------------------------
# blockcache-sample: labels, noise, model, options
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("labels,word", [("1000", "1000"), ("3,-1", "-1"), ("a,b", "labels"), (",", "labels"),
                                         ("1.5", "labels")])
def test_bad_labels(tmp_path, labels, word, capsys):
    args = [*MODEL, "--random-init", "--steps", "2", "--labels", labels, "--out", tmp_path / "z.npy", "--quiet"]
    assert word in call(sample_cli.main, args, capsys)


def test_noise_of_wrong_shape(tmp_path, capsys):
    np.save(tmp_path / "noise.npy", np.zeros((2, 4, 16, 16), np.float32))
    line = call(sample_cli.main, sample_args(tmp_path, "--random-init", "--noise", tmp_path / "noise.npy"), capsys)
    assert "(2, 4, 16, 16)" in line and "(2, 4, 8, 8)" in line
    np.save(tmp_path / "noise3.npy", np.zeros((3, 4, 8, 8), np.float32))  # 3 noises for 2 labels
    call(sample_cli.main, sample_args(tmp_path, "--random-init", "--noise", tmp_path / "noise3.npy"), capsys)


def test_noise_file_missing_or_not_npy(tmp_path, capsys):
    call(sample_cli.main, sample_args(tmp_path, "--random-init", "--noise", tmp_path / "none.npy"), capsys)
    (tmp_path / "text.npy").write_text("not numpy")
    call(sample_cli.main, sample_args(tmp_path, "--random-init", "--noise", tmp_path / "text.npy"), capsys)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    call(sample_cli.main, sample_args(tmp_path, "--random-init", "--noise", tmp_path / "obj.npy"), capsys)


def test_unknown_model_name(tmp_path, capsys):
    line = call(sample_cli.main, ["--model", "dit-xxl2", "--random-init", "--labels", "1", "--out",
                                  tmp_path / "z.npy", "--quiet"], capsys)
    assert "dit-xxl2" in line
    assert "dit-xxl2" in call(schedule_cli.main, ["full", "--model", "dit-xxl2", "--steps", "20", "-o",
                                                  tmp_path / "s.yaml"], capsys)


def test_bad_model_override(tmp_path, capsys):
    call(sample_cli.main, ["--model", "dit-s2", "--random-init", "--hidden-size", "66", "--num-heads", "6",
                           "--depth", "1", "--labels", "1", "--out", tmp_path / "z.npy", "--quiet"], capsys)
    call(sample_cli.main, [*MODEL, "--depth", "0", "--random-init", "--labels", "1", "--out", tmp_path / "z.npy"],
         capsys)


def test_bad_spacing(tmp_path, capsys):
    assert "spacing" in call(sample_cli.main, sample_args(tmp_path, "--random-init", "--spacing", "quadratic"), capsys)
    assert "spacing" in call(schedule_cli.main, ["full", *MODEL, "--steps", "20", "--spacing", "quadratic", "-o",
                                                 tmp_path / "s.yaml"], capsys)


def test_sample_steps_zero_is_refused(tmp_path, capsys):
    """--steps 0 is not "use the default": it must be refused like --steps -1 or --steps 1001."""
    call(sample_cli.main, [*MODEL, "--random-init", "--labels", "1", "--steps", "0", "--out", tmp_path / "z.npy",
                           "--quiet"], capsys)
    assert not (tmp_path / "z.npy").exists()


def test_sample_steps_zero_with_schedule_is_refused(tmp_path, capsys):
    """--schedule with --steps is refused ("not both"), whatever the value of --steps."""
    path = tmp_path / "s.yaml"
    Schedule.full(UNITS, 2).save(path)
    call(sample_cli.main, [*MODEL, "--random-init", "--labels", "1", "--schedule", path, "--steps", "0",
                           "--out", tmp_path / "z.npy", "--quiet"], capsys)


def test_bad_steps(tmp_path, capsys):
    call(sample_cli.main, [*MODEL, "--random-init", "--labels", "1", "--steps", "-3", "--out", tmp_path / "z.npy"],
         capsys)
    call(sample_cli.main, [*MODEL, "--random-init", "--labels", "1", "--steps", "many", "--out", tmp_path / "z.npy"],
         capsys)
    call(schedule_cli.main, ["full", *MODEL, "--steps", "1001", "-o", tmp_path / "s.yaml"], capsys)
    call(schedule_cli.main, ["full", *MODEL, "--steps", "999", "--spacing", "ddim", "-o", tmp_path / "s.yaml"], capsys)
    call(schedule_cli.main, ["uniform", *MODEL, "--steps", "20", "--interval", "0", "-o", tmp_path / "s.yaml"], capsys)


def test_negative_seed(tmp_path, capsys):
    """A negative --seed is bad input like any other: one line, not numpy's traceback."""
    call(sample_cli.main, sample_args(tmp_path, "--random-init", "--seed", "-1"), capsys)


def test_bad_output(tmp_path, capsys):
    args = [*MODEL, "--random-init", "--labels", "1", "--steps", "2", "--quiet"]
    assert ".npy" in call(sample_cli.main, [*args, "--out", tmp_path / "z.jpg"], capsys)
    assert "channel" in call(sample_cli.main, [*args, "--out", tmp_path / "z.png"], capsys)  # 4-channel latents
    call(sample_cli.main, [*args, "--out", tmp_path / "no" / "such" / "dir" / "z.npy"], capsys)


def test_model_or_plan_required(tmp_path, capsys):
    call(sample_cli.main, ["--labels", "1", "--out", tmp_path / "z.npy"], capsys)
    call(sample_cli.main, ["--model", "dit-s2", "--out", tmp_path / "z.npy"], capsys)  # --labels missing


# ---------------------------------------------------------------------------------------------------
# blockcache-schedule
# ---------------------------------------------------------------------------------------------------

def test_router_for_other_step_count(router_dir, tmp_path, capsys):
    line = call(schedule_cli.main, ["import-l2c", router_dir / "DDIM50_router.pt", "--model", "dit-xl2",
                                    "--steps", "20", "-o", tmp_path / "s.yaml"], capsys)
    assert "50" in line and "20" in line
    assert not (tmp_path / "s.yaml").exists()


def test_uvit_router_on_dit(router_dir, tmp_path, capsys):
    line = call(schedule_cli.main, ["import-l2c", router_dir / "dpm20_router.pth", "--model", "dit-xl2",
                                    "--steps", "20", "-o", tmp_path / "s.yaml"], capsys)
    assert "58" in line and "56" in line


def test_router_for_other_model_size(router_dir, tmp_path, capsys):
    call(schedule_cli.main, ["import-l2c", router_dir / "DDIM20_router.pt", *MODEL, "--steps", "20",
                             "-o", tmp_path / "s.yaml"], capsys)


def test_bad_router_files(tmp_path, capsys):
    base = ["--model", "dit-xl2", "--steps", "20", "-o", tmp_path / "s.yaml"]
    assert "missing.pt" in call(schedule_cli.main, ["import-l2c", tmp_path / "missing.pt", *base], capsys)
    routers = {"routers": {f"{i}.prob": torch.zeros(56) for i in range(20)}}
    torch.save(routers, tmp_path / "r.pt")
    data = (tmp_path / "r.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    call(schedule_cli.main, ["import-l2c", tmp_path / "trunc.pt", *base], capsys)
    marker = tmp_path / "PWNED"
    torch.save({"routers": {"0.prob": torch.zeros(56)}, "args": _Payload(marker)}, tmp_path / "evil.pt")
    call(schedule_cli.main, ["import-l2c", tmp_path / "evil.pt", *base], capsys)
    assert not marker.exists()
    torch.save({"routers": {"0.weight": torch.zeros(56)}}, tmp_path / "odd.pt")
    call(schedule_cli.main, ["import-l2c", tmp_path / "odd.pt", *base], capsys)


@pytest.mark.parametrize("case", ["broken-yaml", "row-length", "step0-not-full", "unknown-version"])
def test_bad_schedule_for_stats_and_show(tmp_path, case, capsys):
    path = _yaml(tmp_path, f"{case}.yaml", SCHEDULES[case])
    call(schedule_cli.main, ["stats", path], capsys)
    call(schedule_cli.main, ["show", path], capsys)


def test_missing_schedule_for_stats(tmp_path, capsys):
    assert "gone.yaml" in call(schedule_cli.main, ["stats", tmp_path / "gone.yaml"], capsys)


def test_unwritable_output(tmp_path, capsys):
    call(schedule_cli.main, ["full", *MODEL, "--steps", "4", "-o", tmp_path / "no" / "dir" / "s.yaml"], capsys)


def test_no_subcommand(capsys):
    call(schedule_cli.main, [], capsys)


# ---------------------------------------------------------------------------------------------------
# End to end, as a user runs them (`python -m …`): no traceback reaches the terminal.
# ---------------------------------------------------------------------------------------------------

def test_subprocess_truncated_checkpoint(tmp_path, checkpoint):
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(checkpoint.read_bytes()[:1000])
    p = run_cli("exporter.sample_cli", *sample_args(tmp_path, "--checkpoint", bad))
    assert p.returncode == 2
    assert "trunc.pt" in assert_one_line_error(p.stderr)


def test_subprocess_schedule_errors(router_dir, tmp_path):
    p = run_cli("schedules.cli", "import-l2c", router_dir / "DDIM50_router.pt", "--model", "dit-xl2", "--steps", "20",
                "-o", tmp_path / "s.yaml")
    assert p.returncode == 2
    assert_one_line_error(p.stderr)
    p = run_cli("schedules.cli", "full", "--model", "dit-xl2", "--steps", "20", "--spacing", "nope",
                "-o", tmp_path / "s.yaml")
    assert p.returncode == 2
    assert_one_line_error(p.stderr)


def test_subprocess_labels_out_of_range(tmp_path):
    p = run_cli("exporter.sample_cli", *MODEL, "--random-init", "--steps", "2", "--labels", "5,1000",
                "--out", tmp_path / "z.npy", "--quiet")
    assert p.returncode == 2
    assert "1000" in assert_one_line_error(p.stderr)
