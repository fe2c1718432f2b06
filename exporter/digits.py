"""scikit-learn's bundled 8×8 handwritten digits as images for the embedded `dit-digits` model.

`sklearn.datasets.load_digits` ships with scikit-learn (no download): 1797 images, 8×8, integer
intensities 0…16, labels 0…9. Pixel mapping: x = v/8 − 1, so x ∈ [−1, 1] and (x + 1)·8 gives the
intensities back.

`dit-digits` works at the dataset's own 8×8 (patch 2: 16 tokens of 2×2 pixels). A larger size is
nearest-neighbour upsampling (each pixel a k×k block): it adds no detail, only noise dimensions that
carry no signal (a sweep on a GPU found 8×8 models reach a lower digits-FD for the same training
compute than 16×16 ones with the same 16 tokens). `to_8x8`, the mean over each block, inverts it
exactly and is how the digits metric reads images of any size.
"""

from __future__ import annotations

import numpy as np

from schedules.errors import BlockcacheError


def load_digits_images(size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (N, 1, size, size) in [−1, 1], labels int64 (N,)) for all 1797 digits."""
    if not isinstance(size, int) or size < 8 or size % 8:
        raise BlockcacheError(f"digit image size must be a positive multiple of 8, got {size!r}")
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    factor = size // 8
    images = images.repeat(factor, axis=2).repeat(factor, axis=3)
    return np.ascontiguousarray(images), data.target.astype(np.int64)


def to_8x8(images) -> np.ndarray:
    """(N, 1, H, W) images with H = W a multiple of 8 → (N, 1, 8, 8) by block means."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3] or images.shape[2] % 8:
        raise BlockcacheError(f"expected digit images of shape (N, 1, H, H) with H a multiple of 8, got {images.shape}")
    n, f = images.shape[0], images.shape[2] // 8
    return images.reshape(n, 1, 8, f, 8, f).mean(axis=(3, 5))
