"""Writing samples: .npy latents, or a PNG grid where the latent *is* the image (1 or 3 channels)."""

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


def save_samples(samples: np.ndarray, path: str, rows: int | None = None, scale: int = 4) -> None:
    """Write `samples` to `path` (.npy, or .png as a grid); the file appears only when complete."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npy", ".png"):
        raise BlockcacheError(f"output must end in .npy or .png, got {path!r}")
    with atomic_output(path, ext) as tmp:
        if ext == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, samples)
        else:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            grid = np.kron(to_grid(samples, rows), np.ones((scale, scale) + (() if samples.shape[1] == 1 else (1,)),
                                                           np.uint8))
            plt.imsave(tmp, grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, format="png")
