"""The schedule makers that run a network (`blockcache-schedule analyze`, `derive`, `learn-l2c`,
`scale-shift`) on a tiny random PixArt, through the CLI's main in-process: they calibrate on the
prompts of an embeddings file (`--prompt-embeds`, written here with np.savez as schedules/prompts.py
documents it), write schedules that `Schedule` loads with PixArt's units, and refuse in one line a
text model without prompts, prompts for a class model and labels for a text model."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from conftest import TINY_FLAGS, cli_error
from exporter.schedule_cli import main
from schedules import Schedule
from schedules.change import load_change

pytestmark = pytest.mark.usefixtures("single_thread")

LENGTH, WIDTH = 7, 32
PIXART = ["--model", "pixart-alpha-256", "--depth", "2", "--hidden-size", "48", "--num-heads", "4",
          "--input-size", "8", "--caption-channels", str(WIDTH), "--max-text-tokens", str(LENGTH)]
RANDOM = PIXART + ["--random-init", "--quiet"]
UNITS = tuple(f"transformer_blocks.{i}.{kind}" for i in range(2) for kind in ("attn1", "attn2", "ff"))


def write_embeds(path, n=3, length=LENGTH, width=WIDTH, seed=0):
    """An embeddings file of n prompts (padded masks), the layout blockcache-encode-prompts writes."""
    rng = np.random.default_rng(seed)
    tokens = np.arange(length)[None]
    np.savez(path, prompt_embeds=rng.standard_normal((n, length, width)).astype(np.float32),
             prompt_mask=(tokens < np.array([length, 3, 5][:n] + [length] * max(0, n - 3))[:, None]).astype(np.int64),
             negative_embeds=rng.standard_normal((1, length, width)).astype(np.float32),
             negative_mask=(tokens < 1).astype(np.int64), prompts=np.array([f"prompt {i}" for i in range(n)]),
             max_length=np.int64(length))
    return path


@pytest.fixture(scope="module")
def embeds(tmp_path_factory):
    return write_embeds(tmp_path_factory.mktemp("prompts") / "calib.npz")


def run(argv, capsys) -> str:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def check_schedule_file(path, sampler):
    schedule = Schedule.load(path)
    assert schedule.unit_names == UNITS
    assert schedule.sampler["name"] == sampler
    assert schedule.compute[0].all()
    return schedule


def test_analyze_then_derive(embeds, tmp_path, capsys):
    stats = tmp_path / "stats.npz"
    out = run(["analyze", *RANDOM, "--steps", "8", "--prompt-embeds", embeds, "--seeds", "0,1", "-o", stats], capsys)
    assert "3 prompts × 2 seeds" in out
    change = load_change(stats)
    assert change["unit_names"] == UNITS and change["change"].shape == (8, 6)
    assert np.isnan(change["change"][0]).all() and np.isfinite(change["change"][1:]).all()
    assert (change["change"][1:] > 0).all()
    assert change["sampler"]["name"] == "dpm-solver++-2m"  # PixArt's default sampler
    derived = tmp_path / "bc.yaml"
    run(["derive", stats, "--target-speedup", "1.3", "-o", derived], capsys)
    schedule = check_schedule_file(derived, "dpm-solver++-2m")
    assert not schedule.compute.all()


def test_analyze_reads_a_diffusers_folder(embeds, tmp_path, capsys):
    """The same analysis with the weights of a diffusers folder (save_pretrained), and the statistics
    follow the weights: a random draw with the same seed gives other numbers."""
    pytest.importorskip("diffusers")
    from diffusers import PixArtTransformer2DModel
    from test_pixart_model import diffusers_kwargs

    from schedules.zoo import model_config

    cfg = model_config("pixart-alpha-256", depth=2, hidden_size=48, num_heads=4, input_size=8,
                       caption_channels=WIDTH, max_text_tokens=LENGTH)
    torch.manual_seed(0)
    PixArtTransformer2DModel(**diffusers_kwargs(cfg, explicit=False)).save_pretrained(tmp_path / "transformer")
    common = ["--steps", "4", "--prompt-embeds", embeds, "--seeds", "0", "--quiet"]
    run(["analyze", *PIXART, "--checkpoint", tmp_path / "transformer", *common, "-o", tmp_path / "a.npz"], capsys)
    run(["analyze", *PIXART, "--random-init", *common, "-o", tmp_path / "b.npz"], capsys)
    a, b = load_change(tmp_path / "a.npz")["change"], load_change(tmp_path / "b.npz")["change"]
    assert np.isfinite(a[1:]).all() and not np.allclose(a[1:], b[1:])


def test_learn_l2c(embeds, tmp_path, capsys):
    out_file = tmp_path / "l2c.yaml"
    out = run(["learn-l2c", *RANDOM, "--steps", "6", "--prompt-embeds", embeds, "--seeds", "0", "--epochs", "4",
               "--lambda", "1e-2", "--lr", "0.5", "-o", out_file], capsys)
    first, last = map(float, re.search(r"loss (\S+) → (\S+) ", out).groups())
    assert last < first  # the λ·Σβ term falls as the router learns to reuse
    schedule = check_schedule_file(out_file, "ddim")  # routers are learned for DDIM, which PixArt samples too
    assert not schedule.compute.all()
    assert (tmp_path / "l2c.pt").is_file()


def test_scale_shift(embeds, tmp_path, capsys):
    uniform = tmp_path / "uniform.yaml"
    run(["uniform", *PIXART, "--steps", "6", "--interval", "2", "-o", uniform], capsys)
    corrected = tmp_path / "ss.yaml"
    out = run(["scale-shift", *RANDOM, "--schedule", uniform, "--prompt-embeds", embeds, "--seeds", "0,1",
               "--epochs", "3", "--lr", "0.01", "-o", corrected], capsys)
    first, last = map(float, re.search(r"training error (\S+) → (\S+);", out).groups())
    assert last < first
    schedule = check_schedule_file(corrected, "dpm-solver++-2m")
    reused = {(s, u) for s, row in enumerate(schedule.compute) for u, c in zip(UNITS, row) if not c}
    assert set(schedule.scale_shift) == reused
    assert all(scale.shape == (48,) for scale, _ in schedule.scale_shift.values())


@pytest.mark.parametrize("command", ["analyze", "learn-l2c", "scale-shift"])
def test_a_text_model_needs_prompts(command, tmp_path, capsys):
    argv = [command, *RANDOM, "-o", tmp_path / ("s.npz" if command == "analyze" else "s.yaml")]
    argv += ["--schedule", tmp_path / "none.yaml"] if command == "scale-shift" else ["--steps", "4"]
    if command == "scale-shift":
        Schedule.full(UNITS, 4, sampler="dpm-solver++-2m").save(tmp_path / "none.yaml")
    line = cli_error(main, argv, capsys)
    assert "text-to-image model: give its calibration prompts with --prompt-embeds" in line


def test_labels_for_a_text_model_are_refused(embeds, tmp_path, capsys):
    line = cli_error(main, ["analyze", *RANDOM, "--steps", "4", "--prompt-embeds", embeds, "--labels", "1,2",
                            "-o", tmp_path / "s.npz"], capsys)
    assert "--labels: pixart-alpha-256 is a text-to-image model" in line


@pytest.mark.parametrize("command", ["analyze", "learn-l2c"])
def test_prompts_for_a_class_model_are_refused(command, embeds, tmp_path, capsys):
    line = cli_error(main, [command, "--model", "dit-s2", *TINY_FLAGS, "--random-init", "--steps", "4",
                            "--prompt-embeds", embeds, "-o", tmp_path / ("s.npz" if command == "analyze" else "s.yaml")],
                     capsys)
    assert "--prompt-embeds: dit-s2 is class-conditional" in line


@pytest.mark.parametrize("what, message", [("width", "16 wide but .* takes 32"), ("length", "5 tokens but .* takes 7"),
                                           ("missing", "prompt embeddings not found")])
def test_bad_embeddings_are_one_line(what, message, tmp_path, capsys):
    path = tmp_path / "bad.npz"
    if what == "width":
        write_embeds(path, width=16)
    elif what == "length":
        write_embeds(path, length=5)
    line = cli_error(main, ["analyze", *RANDOM, "--steps", "4", "--prompt-embeds", path, "-o", tmp_path / "s.npz"],
                     capsys)
    assert re.search(message, line), line


@pytest.mark.parametrize("command", ["calibrate", "choose"])
def test_calibrate_and_choose_refuse_a_text_model(command, embeds, tmp_path, capsys):
    schedule = tmp_path / "full.yaml"
    Schedule.full(UNITS, 4, sampler="dpm-solver++-2m").save(schedule)
    extra = ["--steps", "4", "--method", "first-block", "--threshold", "0.1"] if command == "calibrate" \
        else ["--schedule", schedule]
    line = cli_error(main, [command, *RANDOM, *extra, "--prompt-embeds", embeds, "-o", tmp_path / "s.yaml"], capsys)
    assert f"{command} does not run text-to-image models yet" in line


def test_learn_l2c_dpm_solver(embeds, tmp_path, capsys):
    """learn-l2c for PixArt's own sampler, DPM-Solver++ 2M (its steps read the previous data prediction)."""
    out_file = tmp_path / "l2c-dpm.yaml"
    out = run(["learn-l2c", *RANDOM, "--sampler", "dpm-solver++-2m", "--steps", "6", "--prompt-embeds", embeds,
               "--seeds", "0", "--epochs", "4", "--lambda", "1e-2", "--lr", "0.5", "-o", out_file], capsys)
    first, last = map(float, re.search(r"loss (\S+) → (\S+) ", out).groups())
    assert last < first
    schedule = check_schedule_file(out_file, "dpm-solver++-2m")
    assert schedule.num_steps == 6 and not schedule.compute.all()


def test_l2c_trajectory_with_carries_is_the_reference(embeds):
    """The recorded DPM-Solver++ 2M trajectory on prompts: every step run on its recorded latent and
    carry gives the next recorded latent, and the last the eager reference's final latent for the same
    noise and prompts."""
    from exporter.makers.conditioning import network_conditioning
    from exporter.makers.learn_l2c import trajectory
    from exporter.models import load_model
    from exporter.reference import Denoiser, sample
    from schedules.prompts import NEGATIVE_EMBEDS, NEGATIVE_MASK, PROMPT_EMBEDS, PROMPT_MASK, PromptInputs, \
        load_prompt_embeds
    from schedules.sampling import initial_noise

    model = load_model("pixart-alpha-256", random_init=True, seed=0, depth=2, hidden_size=48, num_heads=4,
                       input_size=8, caption_channels=WIDTH, max_text_tokens=LENGTH)
    schedule = Schedule.full(model.unit_names, 5, sampler="dpm-solver++-2m")
    data = load_prompt_embeds(embeds)
    prompts = PromptInputs(data[PROMPT_EMBEDS], data[PROMPT_MASK], data[NEGATIVE_EMBEDS], data[NEGATIVE_MASK])
    xs, carries, y = trajectory(model, schedule, None, [2], None, prompts=prompts)
    noise = initial_noise((3, model.in_channels, 8, 8), 2)
    np.testing.assert_array_equal(xs[0].numpy(), noise)
    denoiser = Denoiser(model, schedule)
    conditioning = network_conditioning(denoiser.step, y)
    with torch.no_grad():
        nxt = [denoiser(s, xs[s], conditioning, None, carries[s]) for s in range(5)]
    for s in range(4):
        np.testing.assert_allclose(nxt[s].numpy(), xs[s + 1].numpy(), rtol=1e-6, atol=1e-7)
    last = nxt[4]
    want = sample(model, schedule, None, noise, prompts=prompts)
    assert np.abs(last.numpy() - want).max() <= 1e-6 * np.abs(want).max()


def test_learn_l2c_refuses_dpm_solver_2_for_pixart(embeds, tmp_path, capsys):
    line = cli_error(main, ["learn-l2c", *RANDOM, "--sampler", "dpm-solver-2", "--steps", "4", "--prompt-embeds",
                            embeds, "-o", tmp_path / "s.yaml"], capsys)
    assert "a dpm-solver-2 schedule cannot run on pixart-alpha-256" in line
