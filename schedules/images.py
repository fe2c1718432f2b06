"""Writing samples: .npy arrays, and PNG grids of decoded images or of latents that *are* images (1 or 3
channels), to files (complete or absent) or to file objects (a service's response)."""

from __future__ import annotations

import os

import numpy as np

from .errors import BlockcacheError
from .files import atomic_output


def to_grid(samples: np.ndarray, rows: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → uint8 (rows·(H+pad), cols·(W+pad)[, 3]) image grid."""
    n, c, h, w = samples.shape
    if c not in (1, 3):
        raise BlockcacheError(f"{c}-channel latents are not images (no decoder here): write .npy instead")
    cols = n if rows is None else -(-n // rows)
    rows = rows or 1
    img = np.clip((samples + 1) * 127.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img[i]
    return grid[..., 0] if c == 1 else grid


def _write(path: str, array: np.ndarray, draw, formats: str = "") -> None:
    """`array` to `path`: `.npy` as is, `.png` by `draw(file)`; the file appears only when complete."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npy", ".png"):
        raise BlockcacheError(f"output must end in .npy or .png{formats}, got {path!r}")
    with atomic_output(path, ext) as tmp:
        if ext == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, array)
        else:
            draw(tmp)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_samples_png(samples: np.ndarray, file, rows: int | None = None, scale: int = 4) -> None:
    """Latents that are images (1 or 3 channels, in [-1, 1]) as one PNG grid, to a path or file object."""
    grid = np.kron(to_grid(samples, rows), np.ones((scale, scale) + (() if samples.shape[1] == 1 else (1,)), np.uint8))
    _pyplot().imsave(file, grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, format="png")


def save_samples(samples: np.ndarray, path: str, rows: int | None = None, scale: int = 4) -> None:
    """Write `samples` to `path` (.npy, or .png as a grid); the file appears only when complete."""
    _write(path, samples, lambda tmp: write_samples_png(samples, tmp, rows, scale))


def is_folder_output(path: str) -> bool:
    """`--out DIR/` (or an existing folder): one PNG per image."""
    return path.endswith(("/", os.sep)) or os.path.isdir(path)


def check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise BlockcacheError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")


def write_images_png(images: np.ndarray, file, labels, seeds) -> None:
    """uint8 images (N, H, W, 3) as one PNG grid, each titled with its label and seed, to a path or file object."""
    check_images(images)
    plt = _pyplot()
    n = len(images)
    cols = min(n, int(np.ceil(np.sqrt(n))))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label, seed in zip(axes.flat, images, labels, seeds):
        ax.imshow(image)
        ax.set_title(f"label {int(label)}, seed {seed}", fontsize=8)
    fig.tight_layout()
    fig.savefig(file, format="png", dpi=100)
    plt.close(fig)


def save_images(images: np.ndarray, path: str, labels, seeds) -> list[str]:
    """Write uint8 images (N, H, W, 3): `.npy` the array, `.png` a grid with each image's label and seed,
    `DIR/` one PNG per image named `<index>-<label>-<seed>.png` (`seeds`: one entry per image, a seed or
    a word such as "noise"). Each file appears only when complete; returns the files written."""
    check_images(images)
    if is_folder_output(path):
        os.makedirs(path, exist_ok=True)
        written = []
        for i, (image, label, seed) in enumerate(zip(images, labels, seeds)):
            target = os.path.join(path, f"{i}-{int(label)}-{seed}.png")
            with atomic_output(target, ".png") as tmp:
                _pyplot().imsave(tmp, image, format="png")
            written.append(target)
        return written
    _write(path, images, lambda tmp: write_images_png(images, tmp, labels, seeds), ", or be a folder (DIR/)")
    return [path]
