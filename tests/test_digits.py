"""The embedded dit-digits model, its training script, and the digits quality/fidelity metrics."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks import digits_metric as dm
from exporter.digits import load_digits_images, to_8x8
from exporter.models import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_data_mapping_and_inverse():
    from sklearn.datasets import load_digits

    images, labels = load_digits_images(16)
    raw = load_digits()
    assert images.shape == (1797, 1, 16, 16) and images.dtype == np.float32
    assert labels.dtype == np.int64 and set(labels) == set(range(10))
    assert images.min() == -1.0 and images.max() == 1.0
    back = to_8x8(images)
    # (x + 1)·8 gives the original 0…16 intensities, and nearest upsampling inverts exactly.
    np.testing.assert_array_equal((back[:, 0] + 1) * 8, raw.images)
    np.testing.assert_array_equal(images[:, :, ::2, ::2], back)
    # The model's own size is the dataset's 8×8, where the mapping is the identity on pixels.
    native, _ = load_digits_images()
    assert native.shape == (1797, 1, 8, 8)
    np.testing.assert_array_equal((native[:, 0] + 1) * 8, raw.images)


def test_shipped_weights_load_and_run():
    model = load_model("dit-digits")
    assert len(model.blocks) >= 8
    path = os.path.join(ROOT, "exporter", "weights", "dit-digits.safetensors")
    assert os.path.getsize(path) <= 20 * 2 ** 20
    x = torch.from_numpy(load_digits_images()[0][:4])
    with torch.no_grad():
        out = model(x, torch.tensor([0, 250, 500, 999]), torch.tensor([0, 3, 7, 10]))
    assert out.shape == (4, 1, 8, 8)
    assert torch.isfinite(out).all()
    # A trained epsilon-predictor recovers the noise it is given far better than predicting zero.
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    from schedules.sampling import linear_betas

    ac = float(np.cumprod(1 - linear_betas())[300])
    with torch.no_grad():
        eps = model(ac ** 0.5 * x + (1 - ac) ** 0.5 * noise, torch.full((4,), 300), torch.tensor([0, 1, 2, 3]))
    assert torch.mean((eps - noise) ** 2) < 0.3 * torch.mean(noise ** 2)


def test_shipped_weights_draw_the_requested_digits():
    """Full-compute DDIM-20 at the default guidance: the classifier reads (almost) every sample as the
    digit it was conditioned on; the same sampler with the labels shuffled scores near chance."""
    from exporter.reference import sample
    from schedules import Schedule
    from schedules.sampling import initial_noise

    model = load_model("dit-digits")
    labels = np.repeat(np.arange(10), 3)
    noise = initial_noise((len(labels), 1, 8, 8), seed=123)
    images = sample(model, Schedule.full(model.unit_names, 20), labels, noise)
    assert images.shape == (30, 1, 8, 8)
    assert dm.class_accuracy(images, labels) >= 0.9
    assert dm.class_accuracy(images, np.roll(labels, 3)) <= 0.3  # 3 per class: rolled by 3 = another digit


def test_classifier_reads_real_digits_and_not_noise():
    _, _, held_x, held_y = dm.split()
    assert dm.class_accuracy(held_x, held_y) >= 0.95
    rng = np.random.default_rng(1)
    noise = rng.uniform(-1, 1, (200, 1, 16, 16)).astype(np.float32)
    assert dm.class_accuracy(noise, np.repeat(np.arange(10), 20)) < 0.25  # chance is 0.1


def test_frechet_distance_separates_real_from_noise():
    train_x, _, held_x, _ = dm.split()
    noise = np.random.default_rng(2).uniform(-1, 1, held_x[:100].shape).astype(np.float32)
    real_vs_real = dm.frechet_distance(held_x[:100], train_x)
    noise_vs_real = dm.frechet_distance(noise, train_x)
    assert real_vs_real >= 0
    assert noise_vs_real > 10 * real_vs_real
    assert dm.frechet_distance(train_x, train_x) == pytest.approx(0, abs=1e-6)
    # A shifted copy of the same digits is farther than the digits themselves.
    assert dm.frechet_distance(np.clip(held_x[:100] + 0.5, -1, 1), train_x) > real_vs_real


def test_psnr_and_relative_error_known_values():
    ref = np.zeros((2, 1, 16, 16), np.float32) + 0.5
    run = ref + 0.1  # MSE 0.01 → PSNR = 10·log10(2² / 0.01) = 26.0206 dB
    assert dm.psnr(run, ref) == pytest.approx(10 * np.log10(400), abs=1e-4)
    assert dm.psnr(ref, ref) == float("inf")
    assert dm.relative_error(run, ref) == pytest.approx(0.2, rel=1e-5)  # ‖0.1‖ / ‖0.5‖
    a = np.array([3.0, 4.0])
    assert dm.relative_error(np.zeros(2), a) == pytest.approx(1.0)
    assert dm.psnr(np.array([1.0, -1.0]), np.array([-1.0, -1.0])) == pytest.approx(10 * np.log10(4 / 2))
    with pytest.raises(Exception):
        dm.psnr(np.zeros(3), np.zeros(4))


def _run_train(*args):
    return subprocess.run([sys.executable, "-m", "exporter.train_digits", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_training_script_writes_loadable_weights(tmp_path):
    out, png = tmp_path / "w.safetensors", tmp_path / "loss.png"
    r = _run_train("--steps", "3", "--batch-size", "8", "--out", str(out), "--loss-png", str(png), "--quiet")
    assert r.returncode == 0, r.stderr
    model = load_model("dit-digits", str(out))
    assert set(model.state_dict()) == set(load_model("dit-digits").state_dict())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [
    ["--steps", "-5"],
    ["--batch-size", "zero"],
    ["--out", "/proc/no-such-dir/w.safetensors"],
    ["--out", "weights.pt"],
])
def test_training_script_bad_arguments_one_line(args, tmp_path):
    r = _run_train(*args, "--loss-png", str(tmp_path / "l.png"))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_sample_cli_needs_no_checkpoint_for_the_embedded_model(tmp_path):
    out = tmp_path / "digits.png"
    r = subprocess.run([sys.executable, "-m", "exporter.sample_cli", "--model", "dit-digits", "--steps", "4",
                        "--labels", "0,7", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["--steps", "0"], ["--interval", "0"], ["--guidance-scale", "nan"],
                                  ["--steps", "many"], ["--out", "/proc/no-such-dir/demo"]])
def test_demo_bad_arguments_one_line(args):
    r = subprocess.run([sys.executable, "-m", "benchmarks.demo", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


def test_training_is_reproducible(tmp_path):
    """Same seed and thread count → bit-identical weights (what lets the shipped file be reproduced)."""
    from safetensors.numpy import load_file

    paths = []
    for k in range(2):
        out = tmp_path / f"w{k}.safetensors"
        r = _run_train("--steps", "4", "--batch-size", "8", "--threads", "2", "--out", str(out), "--loss-png",
                       str(tmp_path / f"l{k}.png"), "--quiet")
        assert r.returncode == 0, r.stderr
        paths.append(out)
    a, b = (load_file(str(p)) for p in paths)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
