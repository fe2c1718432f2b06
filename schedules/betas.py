"""The training noise schedule DiT and PixArt share, in numpy only: 1000 linear betas. Its own module so
that every sampler over it (sampling.py's DDIM, dpm_solver_multistep.py's DPM-Solver++ 2M) derives its
tables from one definition, and sampling.py can build each sampler without an import cycle."""

from __future__ import annotations

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """DiT's `get_named_beta_schedule("linear", 1000)`: scaled so that 1000 steps give 1e-4 … 0.02."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
