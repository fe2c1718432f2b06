"""Block Caching's scale-shift: stored beside the schedule, applied by the eager reference to reused
values, learned by distillation (held-out error falls), exported as graph inputs and applied by
every backend as by the reference."""

import numpy as np
import pytest
import torch

from conftest import TINY_FLAGS, assert_one_line_error, run_cli, tiny_model
from exporter.reference import sample
from exporter.makers.scale_shift import distillation_error, learn_scale_shift
from runtime.nn.step import DenoisingStep
from schedules import BlockcacheError, Schedule
from schedules.sampling import initial_noise


def corrected(model, steps=6, seed=0):
    plain = Schedule.uniform(model.unit_names, steps, 3)
    rng = np.random.default_rng(seed)
    width = model.config["hidden_size"]
    pairs = {(s, u): (rng.normal(0, 0.2, width), rng.normal(0, 0.1, width))
             for s in range(steps) for u in plain.reused(s)}
    return plain, Schedule(plain.unit_names, plain.compute, plain.sampler, scale_shift=pairs)


def test_schedule_file_round_trip_and_damage(tmp_path):
    model = tiny_model()
    _, schedule = corrected(model)
    schedule.save(tmp_path / "s.yaml")
    assert (tmp_path / "s.scaleshift.safetensors").exists()
    back = Schedule.load(tmp_path / "s.yaml")
    assert back.scale_shift.keys() == schedule.scale_shift.keys()
    for key, (scale, shift) in schedule.scale_shift.items():
        np.testing.assert_array_equal(back.scale_shift[key][0], scale)
        np.testing.assert_array_equal(back.scale_shift[key][1], shift)
    text = (tmp_path / "s.yaml").read_text()
    (tmp_path / "bad.yaml").write_text(text.replace("sha256: ", "sha256: 0"))
    with pytest.raises(BlockcacheError, match="digest"):
        Schedule.load(tmp_path / "bad.yaml")
    (tmp_path / "s.scaleshift.safetensors").unlink()
    with pytest.raises(BlockcacheError, match="cannot read scale-shift"):
        Schedule.load(tmp_path / "s.yaml")
    with pytest.raises(BlockcacheError, match="which that step computes"):
        Schedule(schedule.unit_names, schedule.compute, schedule.sampler,
                 scale_shift={(0, schedule.unit_names[0]): (np.zeros(4), np.zeros(4))})


def test_reference_applies_scale_shift_to_reused_values():
    """Against a hand-written loop: remember computed units, return v·(1 + scale) + shift when reused."""
    model = tiny_model()
    plain, schedule = corrected(model)
    labels, noise = [1, 2], initial_noise((2, 4, 8, 8), 0)
    got = sample(model, schedule, labels, noise)
    step = DenoisingStep(model, guidance=True)
    sampler = schedule.make_sampler()
    a, b = sampler.coefficients()
    x, y, memory = torch.from_numpy(noise), torch.tensor(labels), {}
    with torch.no_grad():
        for s, t in enumerate(sampler.timesteps):
            def unit(name, fn, s=s):
                if schedule.compute[s, schedule.unit_names.index(name)]:
                    memory[name] = fn()
                    return memory[name]
                scale, shift = schedule.scale_shift[(s, name)]
                return memory[name] * (1 + torch.from_numpy(scale)) + torch.from_numpy(shift)
            x = step.denoise(x, y, torch.tensor([int(t)]), torch.tensor([a[s]], dtype=torch.float32),
                             torch.tensor([b[s]], dtype=torch.float32), torch.tensor([4.0]), unit)
    np.testing.assert_allclose(got, x.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(got - sample(model, plain, labels, noise)).max() > 1e-3  # it really changes the run


def test_learning_reduces_held_out_distillation_error():
    torch.manual_seed(0)
    model = tiny_model()
    schedule = Schedule.uniform(model.unit_names, 8, 2)
    learned, history = learn_scale_shift(model, schedule, [0, 1, 2, 3], [0, 1], epochs=8, lr=3e-3)
    assert set(learned.scale_shift) == {(s, u) for s in range(8) for u in schedule.reused(s)}
    assert history[-1] < history[0]
    before = distillation_error(model, schedule, [0, 1, 2, 3], [7])
    after = distillation_error(model, learned, [0, 1, 2, 3], [7])
    assert after < before


def partly_corrected(model, steps=7):
    """Scale-shift on some reuse steps only: the steps without one share their variant with steps
    that have one, so the plan must feed zeros there (and still share the graph)."""
    plain, full = corrected(model, steps)
    keep = {key: pair for key, pair in full.scale_shift.items() if key[0] % 4 != 1}
    assert len(keep) < len(full.scale_shift)
    return plain, Schedule(plain.unit_names, plain.compute, plain.sampler, scale_shift=keep)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_plan_applies_scale_shift_like_the_reference(backend, tmp_path):
    from exporter.export import export_plan
    from exporter.verify import verify_plan
    from runtime import Sampler
    from runtime.plan import load_plan

    model = tiny_model()
    plain, schedule = partly_corrected(model)
    manifest = export_plan(model, schedule, str(tmp_path / "plan"), batch_size=2, guidance_scale=4.0)
    assert len(manifest["variants"]) == 2  # scale-shift did not split the reuse steps' graph
    assert manifest["variants"][1]["adjusts"] == manifest["variants"][1]["reads"]
    labels, noise = [1, 2], initial_noise((2, 4, 8, 8), 3)
    got = Sampler(str(tmp_path / "plan"), backend=backend, device="cpu")(labels, noise=noise)
    want = sample(model, schedule, labels, noise)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(want - sample(model, plain, labels, noise)).max() > 1e-3  # the correction matters
    verify_plan(model, load_plan(str(tmp_path / "plan")), 1e-4)
    # a sidecar tensor for a (step, unit) that no step of the plan corrects: not this plan's vectors
    from safetensors.numpy import load_file, save_file

    from runtime.plan.files import plan_corrections

    sidecar = tmp_path / "plan" / "schedule.scaleshift.safetensors"
    tensors = load_file(str(sidecar))
    tensors["scale/0/blocks.0.attn"] = np.zeros(64, np.float32)  # step 0 computes everything
    save_file(tensors, str(sidecar))
    with pytest.raises(BlockcacheError, match="which no step of the plan corrects"):
        damaged = load_plan(str(tmp_path / "plan"), verify=False)
        plan_corrections(damaged, damaged.program)


def test_cli_round_trip_and_bad_inputs(tmp_path):
    model = tiny_model()
    Schedule.uniform(model.unit_names, 6, 2).save(tmp_path / "u.yaml")
    r = run_cli("exporter.schedule_cli", "scale-shift", "--model", "dit-s2", *TINY_FLAGS, "--random-init",
                "--schedule", tmp_path / "u.yaml", "--epochs", "2", "-o", tmp_path / "u-ss.yaml", "--quiet")
    assert r.returncode == 0, r.stderr
    assert Schedule.load(tmp_path / "u-ss.yaml").scale_shift
    r = run_cli("exporter.export_cli", "--model", "dit-s2", *TINY_FLAGS, "--random-init", "--schedule",
                tmp_path / "u-ss.yaml", "--out", tmp_path / "plan", "--verify", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "plan" / "schedule.scaleshift.safetensors").exists()
    for extra in (["--epochs", "0"], ["--seeds", "0,1000"], ["--schedule", str(tmp_path / "nope.yaml")]):
        args = ["scale-shift", "--model", "dit-s2", *TINY_FLAGS, "--random-init", "--schedule", tmp_path / "u.yaml",
                "-o", tmp_path / "x.yaml", *extra]
        r = run_cli("exporter.schedule_cli", *args)
        assert r.returncode == 2
        assert_one_line_error(r.stderr)


def test_scale_shift_of_another_width_is_refused(tmp_path):
    """Vectors learned for another model (same unit names, other width) are refused in one line by the
    reference and the exporter, before anything is written."""
    from exporter.export import export_plan

    model = tiny_model()
    _, schedule = corrected(model)
    wide = tiny_model(hidden_size=128)
    wrong = Schedule(schedule.unit_names, schedule.compute, schedule.sampler,
                     scale_shift={k: (np.zeros(128), np.zeros(128)) for k in schedule.scale_shift})
    for run in (lambda: sample(model, wrong, [1], initial_noise((1, 4, 8, 8), 0)),
                lambda: export_plan(model, wrong, str(tmp_path / "plan"))):
        with pytest.raises(BlockcacheError, match="128 channels"):
            run()
    assert not (tmp_path / "plan").exists()
    sample(wide, wrong, [1], initial_noise((1, 4, 8, 8), 0))  # the right model takes them
