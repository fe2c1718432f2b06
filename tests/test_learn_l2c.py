"""The Learning-to-Cache router learner: its loss falls, its scores answer λ, and its files round-trip
through import-l2c, Schedule.load and the exporter."""

import numpy as np
import pytest
import torch

from conftest import TINY_FLAGS, assert_one_line_error, run_cli, tiny_model
from exporter.makers.learn_l2c import learn_router, router_logits, trajectory_inputs
from schedules import Schedule
from schedules.l2c import import_l2c, schedule_from_l2c

STEPS = 8


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_model()
    schedule = Schedule.full(model.unit_names, STEPS)
    xs, y = trajectory_inputs(model, schedule, np.array([1, 2, 3]), [0], 4.0)
    return model, schedule, xs, y


def test_trajectory_inputs_follow_the_sampler(setup):
    """The inputs are the full-compute trajectory from the seeded noise: each is the previous step's output."""
    from runtime.nn.step import DenoisingStep
    from schedules.sampling import initial_noise

    model, schedule, xs, y = setup
    assert xs.shape == (STEPS, 3, 4, 8, 8)
    np.testing.assert_array_equal(xs[0].numpy(), initial_noise((3, 4, 8, 8), 0))
    sampler = schedule.make_sampler()
    a, b = sampler.coefficients()
    with torch.no_grad():
        nxt = DenoisingStep(model, True).denoise(xs[2], y, torch.tensor([int(sampler.timesteps[2])]),
                                                 torch.tensor([a[2]], dtype=torch.float32),
                                                 torch.tensor([b[2]], dtype=torch.float32), torch.tensor([4.0]))
    np.testing.assert_allclose(nxt.numpy(), xs[3].numpy(), rtol=1e-5, atol=1e-6)


def test_loss_decreases_and_scores_answer_lambda(setup):
    model, schedule, xs, y = setup
    mean_scores = {}
    for lam in (0.0, 1e-5, 1e-3):
        logits, history = learn_router(model, schedule, xs, y, lam=lam, epochs=8, lr=0.1)
        assert logits.shape == (STEPS, len(model.unit_names))
        if lam > 0:
            assert history["loss"][-1] < history["loss"][0]
        mean_scores[lam] = float(1 / (1 + np.exp(-logits[1:])).mean())
    assert mean_scores[1e-3] < mean_scores[1e-5] < mean_scores[0.0]
    assert mean_scores[0.0] > 0.9  # nothing pushes scores down without λ: they stay near "compute"


def test_router_file_layout_matches_import(tmp_path, setup):
    """Step s is respaced index N−1−s, as in the published files."""
    model, *_ = setup
    logits = np.random.default_rng(0).normal(size=(STEPS, len(model.unit_names))).astype(np.float32)
    by_index = router_logits(logits)
    np.testing.assert_array_equal(by_index[STEPS - 1], logits[0])
    np.testing.assert_array_equal(by_index[0], logits[STEPS - 1])
    from exporter.makers.learn_l2c import router_state

    torch.save(router_state(logits), tmp_path / "r.pt")
    imported = import_l2c(tmp_path / "r.pt", model.unit_names, STEPS, threshold=0.5, every_step=True)
    direct = schedule_from_l2c(by_index, model.unit_names, STEPS, threshold=0.5, every_step=True)
    np.testing.assert_array_equal(imported.compute, direct.compute)
    want = np.vstack([np.ones(len(model.unit_names), bool), 1 / (1 + np.exp(-logits[1:].astype(np.float64))) > 0.5])
    np.testing.assert_array_equal(imported.compute, want)
    published = import_l2c(tmp_path / "r.pt", model.unit_names, STEPS, threshold=0.5)
    assert published.compute[[s for s in range(STEPS) if (STEPS - 1 - s) % 2 == 1]].all()


def test_cli_learn_import_and_export_round_trip(tmp_path):
    out = tmp_path / "l2c.yaml"
    r = run_cli("exporter.schedule_cli", "learn-l2c", "--model", "dit-s2", *TINY_FLAGS, "--random-init", "--steps",
                str(STEPS), "--labels", "1,2", "--seeds", "0", "--epochs", "6", "--lr", "0.3", "--lambda", "1e-3",
                "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    learned = Schedule.load(out)
    assert not learned.compute.all()  # λ made it reuse something
    again = tmp_path / "again.yaml"
    r = run_cli("exporter.schedule_cli", "import-l2c", tmp_path / "l2c.pt", "--every-step", "--threshold", "0.5",
                "--model", "dit-s2", *TINY_FLAGS, "--steps", str(STEPS), "-o", again)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(Schedule.load(again).compute, learned.compute)

    from exporter.export import export_plan
    from exporter.reference import sample
    from runtime import Sampler
    from schedules.sampling import initial_noise

    model = tiny_model()
    export_plan(model, learned, str(tmp_path / "plan"), batch_size=2)
    noise = initial_noise((2, 4, 8, 8), 5)
    got = Sampler(str(tmp_path / "plan"), backend="onnxruntime", device="cpu")([1, 2], noise=noise)
    want = sample(model, learned, [1, 2], noise)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("extra", [["--lambda", "-1"], ["--threshold", "1.5"], ["--data", "digits"],
                                   ["--epochs", "0"], ["-o", "x.txt"], ["--seeds", "x"]])
def test_cli_bad_inputs_one_line(extra, tmp_path):
    args = ["learn-l2c", "--model", "dit-s2", *TINY_FLAGS, "--random-init", "--steps", "4", "-o", "x.yaml"]
    if "-o" in extra:
        args = args[:-2]
    r = run_cli("exporter.schedule_cli", *args, *extra, cwd=tmp_path)
    assert r.returncode == 2
    assert_one_line_error(r.stderr)


def test_cli_default_lambda_is_the_learners():
    from exporter.makers.learn_l2c import DEFAULT_LAMBDA
    from exporter.schedule_cli import build_parser

    args = build_parser().parse_args(["learn-l2c", "--model", "dit-digits", "--steps", "4", "-o", "x.yaml"])
    assert args.lam == DEFAULT_LAMBDA


# Samplers with a carry (docs/ARCHITECTURE.md, "Caching semantics", "Carries"): DPM-Solver++ 2M on DiT
# (the previous step's data prediction) and DPM-Solver-2 on U-ViT (the input of the solver step's outer
# evaluation). Tiny models on one thread.
UVIT = dict(depth=4, hidden_size=32, num_heads=2, input_size=8)
UVIT_FLAGS = ["--depth", "4", "--hidden-size", "32", "--num-heads", "2", "--input-size", "8"]


def carry_setup(sampler, steps=6):
    from exporter.models import load_model

    torch.manual_seed(0)
    model = tiny_model() if sampler == "dpm-solver++-2m" else load_model("uvit-h2", random_init=True, seed=1, **UVIT)
    schedule = Schedule.full(model.unit_names, steps, sampler=sampler)
    return model, schedule


@pytest.mark.parametrize("sampler", ["dpm-solver++-2m", "dpm-solver-2"])
def test_recorded_carries_rebuild_the_reference_trajectory(sampler, single_thread):
    """Each recorded (x_s, carry_s) run through step s gives the recorded x_{s+1}, and the last one the
    eager reference's final latent for the same noise and labels: the carries are the sampler's."""
    from exporter.makers.learn_l2c import trajectory
    from exporter.reference import Denoiser, sample
    from schedules.sampling import initial_noise

    model, schedule = carry_setup(sampler)
    labels = np.array([1, 2])
    xs, carries, y = trajectory(model, schedule, labels, [3], None)
    assert carries is not None and carries.shape == xs.shape
    noise = initial_noise((2, *xs.shape[2:]), 3)
    np.testing.assert_array_equal(xs[0].numpy(), noise)
    np.testing.assert_array_equal(carries[0].numpy(), noise)  # step 0 carries its own input (c = 0)
    c = schedule.make_sampler().carry_coefficients()
    assert np.count_nonzero(c) >= 2  # the carries do enter the trajectory
    if sampler == "dpm-solver-2":  # an intermediate evaluation carries its solver step's input latent
        for s in range(1, len(xs), 2):
            np.testing.assert_array_equal(carries[s].numpy(), xs[s - 1].numpy())
    else:  # the previous step's data prediction differs from every recorded latent
        assert all(not torch.allclose(carries[s], xs[s - 1]) and not torch.allclose(carries[s], xs[s])
                   for s in range(1, len(xs)))
    denoiser = Denoiser(model, schedule)
    with torch.no_grad():
        nxt = [denoiser(s, xs[s], y, None, carries[s]) for s in range(len(xs))]
    for s in range(len(xs) - 1):
        np.testing.assert_allclose(nxt[s].numpy(), xs[s + 1].numpy(), rtol=1e-6, atol=1e-7)
    want = sample(model, schedule, labels, noise)
    assert np.abs(nxt[-1].numpy() - want).max() <= 1e-6 * np.abs(want).max()


def test_fresh_student_equals_the_teacher_with_its_carry(single_thread):
    """β = 1 everywhere (every unit fresh): the student's step output is the full step on the recorded
    x_s and carry, i.e. the recorded x_{s+1}, at every step, including those whose carry weight c ≠ 0."""
    from exporter.makers.learn_l2c import student_and_teacher, trajectory
    from exporter.reference import Denoiser

    model, schedule = carry_setup("dpm-solver++-2m")
    xs, carries, y = trajectory(model, schedule, np.array([1, 2]), [0], 4.0)
    denoiser = Denoiser(model, schedule, 4.0)
    index = {u: j for j, u in enumerate(model.unit_names)}
    ones = torch.ones(len(model.unit_names))
    for s in range(1, len(xs)):
        student, teacher = student_and_teacher(denoiser, s, xs, carries, y, slice(None), index, ones)
        assert torch.equal(student, teacher)
        if s + 1 < len(xs):
            want = xs[s + 1]
        else:
            with torch.no_grad():
                want = denoiser(s, xs[s], y, None, carries[s])
        assert torch.equal(student.detach(), want), s
    # the carry matters: the same step with the latent itself as carry is another output
    s = 2
    wrong, _ = student_and_teacher(denoiser, s, xs, xs, y, slice(None), index, ones)
    assert not torch.allclose(wrong, xs[s + 1], atol=1e-4)


def test_learn_router_needs_the_carries(single_thread):
    from schedules import BlockcacheError
    from exporter.makers.learn_l2c import trajectory

    model, schedule = carry_setup("dpm-solver++-2m", steps=3)
    xs, carries, y = trajectory(model, schedule, np.array([1]), [0], 4.0)
    with pytest.raises(BlockcacheError, match="read a carry"):
        learn_router(model, schedule, xs, y, epochs=1)


@pytest.mark.parametrize("argv, sampler", [(["--model", "dit-s2", *TINY_FLAGS, "--sampler", "dpm-solver++-2m"],
                                            "dpm-solver++-2m"),
                                           (["--model", "uvit-h2", *UVIT_FLAGS], "dpm-solver-2")])
def test_cli_learns_for_a_carrying_sampler(argv, sampler, tmp_path, capsys, single_thread):
    import re

    from exporter.schedule_cli import main

    out_file = tmp_path / "l2c.yaml"
    rc = main([str(a) for a in ["learn-l2c", *argv, "--random-init", "--quiet", "--steps", "6", "--labels", "1,2",
                                "--seeds", "0", "--epochs", "4", "--lambda", "1e-2", "--lr", "0.5", "-o", out_file]])
    out = capsys.readouterr()
    assert rc == 0, out.err
    first, last = map(float, re.search(r"loss (\S+) → (\S+) ", out.out).groups())
    assert last < first
    learned = Schedule.load(out_file)
    assert learned.sampler["name"] == sampler and learned.num_steps == 6
    assert learned.compute[0].all() and not learned.compute.all()
    assert (tmp_path / "l2c.pt").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--model", "dit-s2", *TINY_FLAGS, "--sampler", "dpm-solver++-2m", "--data", "digits"],
     "--data digits noises real images .* no dpm-solver\\+\\+-2m carry"),
    (["--model", "dit-s2", *TINY_FLAGS, "--sampler", "dpm-solver-2"], "a dpm-solver-2 schedule cannot run on dit-s2"),
    (["--model", "uvit-h2", *UVIT_FLAGS, "--sampler", "ddim"], "a ddim schedule cannot run on uvit-h2"),
])
def test_cli_refusals_one_line(argv, message, tmp_path, capsys):
    import re

    from conftest import cli_error
    from exporter.schedule_cli import main

    line = cli_error(main, ["learn-l2c", *argv, "--random-init", "--steps", "4", "-o", tmp_path / "x.yaml"], capsys)
    assert line.startswith("error:") and re.search(message, line), line
