"""Quality and fidelity metrics for the embedded `dit-digits` model.

Quality of generated digits is judged the way FID judges ImageNet samples, with a network trained on
the real data: a small MLP classifier (scikit-learn, 64 → 64 ReLU → 10) fitted on a fixed 75 % of the
real 8×8 digits. `class_accuracy` asks whether a sample shows the digit it was conditioned on;
`frechet_distance` is the Fréchet distance between Gaussian fits of the classifier's hidden features
for generated and real digits ("digits-FD"). FD is biased upwards at small sample counts: compare
values computed with the same number of images.

Fidelity of a cached run against the full-compute run from the same noise: `psnr` uses data range 2
(images live in [−1, 1]) and the MSE over the whole batch, on the raw arrays (no clipping);
`relative_error` is ‖run − reference‖₂ / ‖reference‖₂ over the whole batch.

Images everywhere are (N, 1, 8, 8) (or any multiple of 8) in [−1, 1]; they are clipped to [−1, 1]
and block-averaged to 8×8 before classification.

    python -m benchmarks.digits_metric [--guidance-scale S] [--grid PATH]

prints the classifier's held-out accuracy and evaluates the shipped model (full-compute DDIM-50,
10 samples per class from seed-0 noise) and writes a 10×10 sample grid, one row per digit.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import numpy as np

from exporter.digits import load_digits_images, to_8x8
from schedules.errors import BlockcacheError, cli_main
from schedules.images import save_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GRID = os.path.join(ROOT, "benchmarks", "results", "dit-digits-grid.png")
PSNR_DATA_RANGE = 2.0  # images in [-1, 1]
HELD_OUT_FRACTION = 0.25
SPLIT_SEED = 0


def classifier_input(images) -> np.ndarray:
    """Classifier input: clipped, 8×8, flattened (64 values in [−1, 1])."""
    x = np.clip(np.asarray(images, dtype=np.float32), -1.0, 1.0)
    return to_8x8(x).reshape(len(x), 64)


@functools.lru_cache(maxsize=1)
def split():
    """The fixed (stratified) split of the real digits: (train_images, train_labels, held_images, held_labels)."""
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_images(8)
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED,
                                              stratify=labels)
    return tr_x, tr_y, te_x, te_y


@functools.lru_cache(maxsize=1)
def classifier():
    """The digits classifier (scikit-learn MLPClassifier), fitted once per process on the training
    split. Deterministic: fixed split, fixed random_state, full-batch L-BFGS."""
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    tr_x, tr_y, _, _ = split()
    clf = MLPClassifier(hidden_layer_sizes=(64,), activation="relu", solver="lbfgs", alpha=1.0, max_iter=2000,
                        random_state=0)
    # One BLAS thread: the fit is small, the result then does not depend on the core count, and
    # multi-threaded BLAS crawls when other work shares the CPU.
    with threadpool_limits(1):
        clf.fit(classifier_input(tr_x), tr_y)
    return clf


def held_out_accuracy() -> float:
    _, _, te_x, te_y = split()
    return class_accuracy(te_x, te_y)


def predict(images) -> np.ndarray:
    return classifier().predict(classifier_input(images))


def hidden_features(images) -> np.ndarray:
    """The classifier's hidden ReLU activations: the feature space of digits-FD."""
    clf = classifier()
    return np.maximum(classifier_input(images) @ clf.coefs_[0] + clf.intercepts_[0], 0.0).astype(np.float64)


def class_accuracy(images, labels) -> float:
    """Fraction of images the classifier reads as their intended label."""
    labels = np.asarray(labels)
    if len(labels) != len(images) or len(labels) == 0:
        raise BlockcacheError(f"need one label per image, got {len(labels)} labels for {len(images)} images")
    return float(np.mean(predict(images) == labels))


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(images, reference_images=None) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) of Gaussian fits to hidden features. The reference
    defaults to all 1797 real digits (the data the model was trained on)."""
    if reference_images is None:
        reference_images = load_digits_images(8)[0]
    if len(images) < 2 or len(reference_images) < 2:
        raise BlockcacheError("the Fréchet distance needs at least two images on each side")
    f1, f2 = hidden_features(images), hidden_features(reference_images)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # tr((Σ₁Σ₂)^½) = tr((√Σ₁ Σ₂ √Σ₁)^½), whose argument is symmetric PSD: an eigen-decomposition suffices.
    r1 = _sqrtm_psd(s1)
    covmean_trace = np.trace(_sqrtm_psd(r1 @ s2 @ r1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * covmean_trace)


def _pair(run, reference):
    run, reference = np.asarray(run, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if run.shape != reference.shape:
        raise BlockcacheError(f"cannot compare arrays of shapes {run.shape} and {reference.shape}")
    return run, reference


def psnr(run, reference) -> float:
    """Peak signal-to-noise ratio in dB, data range 2 ([−1, 1] images); inf for identical arrays."""
    run, reference = _pair(run, reference)
    mse = np.mean((run - reference) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(PSNR_DATA_RANGE ** 2 / mse))


def relative_error(run, reference) -> float:
    """‖run − reference‖₂ / ‖reference‖₂ over the whole batch."""
    run, reference = _pair(run, reference)
    return float(np.linalg.norm(run - reference) / np.linalg.norm(reference))


def evaluate_model(model=None, guidance_scale=None, steps: int = 50, per_class: int = 10, seed: int = 0,
                   progress: bool = False):
    """Full-compute DDIM samples of the shipped model: (images, labels), one block of `per_class` per digit."""
    from exporter.models import load_model
    from exporter.reference import DEFAULT_GUIDANCE_SCALE, sample
    from schedules import Schedule
    from schedules.sampling import initial_noise

    model = model if model is not None else load_model("dit-digits")
    scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    labels = np.repeat(np.arange(model.num_classes), per_class)
    c, size = model.in_channels, model.config["input_size"]
    noise = initial_noise((len(labels), c, size, size), seed=seed)
    images = sample(model, Schedule.full(model.unit_names, steps), labels, noise, guidance_scale=scale,
                    progress=progress)
    return images, labels


@cli_main
def main(argv=None):
    from exporter.reference import DEFAULT_GUIDANCE_SCALE

    parser = argparse.ArgumentParser(prog="python -m benchmarks.digits_metric", description=__doc__.split("\n\n")[0])
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--grid", default=DEFAULT_GRID, help="sample grid PNG")
    args = parser.parse_args(argv)
    if not np.isfinite(args.guidance_scale) or args.guidance_scale < 0:
        raise BlockcacheError(f"guidance scale must be a non-negative number, got {args.guidance_scale}")

    start = time.perf_counter()
    print(f"classifier held-out accuracy: {held_out_accuracy():.4f} ({len(split()[3])} real digits)")
    _, _, te_x, _ = split()
    print(f"digits-FD of 100 held-out real digits vs all real digits: {frechet_distance(te_x[:100]):.3f}")
    images, labels = evaluate_model(guidance_scale=args.guidance_scale, progress=True)
    print(f"dit-digits, DDIM-50 full compute, guidance {args.guidance_scale:g}, {len(labels)} samples: "
          f"class accuracy {class_accuracy(images, labels):.3f}, digits-FD {frechet_distance(images):.3f}")
    save_samples(images, args.grid, rows=10, scale=6)
    print(f"wrote {args.grid} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
