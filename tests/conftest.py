"""Shared fixtures for the foundation tests: paths, tiny random DiTs, the L2C router folder, and a
helper that runs a CLI the way a user would (subprocess) or in-process (main(argv) + capsys)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
L2C_DIR = SHARED / "data" / "l2c"

# A tiny DiT: 2 blocks, D = 64, 4 heads (head size 16), 8×8 latents with patch 2 → 16 tokens,
# learn_sigma (8 output channels) as the official model.
TINY = dict(depth=2, hidden_size=64, num_heads=4, input_size=8)
TINY_FLAGS = ["--depth", "2", "--hidden-size", "64", "--num-heads", "4", "--input-size", "8"]


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run far faster on one thread (and a loaded 2-core machine makes the thread pool
    thrash). Used by this suite's modules through `pytestmark`; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def router_dir() -> Path:
    if not (L2C_DIR / "DDIM20_router.pt").is_file():
        pytest.skip(f"L2C router files not found in {L2C_DIR} (the shared data folder is absent)")
    return L2C_DIR


def tiny_model(seed: int = 0, **overrides):
    from exporter.models import load_model

    return load_model("dit-s2", random_init=True, seed=seed, **{**TINY, **overrides})


@pytest.fixture(scope="session")
def tiny():
    """A tiny random-everywhere DiT (eval mode). Tests must not modify it in place."""
    return tiny_model(seed=0)


def run_cli(module: str, *args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    """Run `python -m module args…` as a user would; returns the completed process (text mode)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cli_error(main, argv, capsys) -> str:
    """Run a CLI main in-process; assert a user error (exit 2, one line, no traceback); return the line."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors exit from inside parse_args
        rc = e.code
    captured = capsys.readouterr()
    assert rc == 2, f"exit status {rc!r}, stderr: {captured.err}"
    return assert_one_line_error(captured.err)


def official_diffusers_dit(model):
    """diffusers' DiT on `model`'s weights, with its two numeric differences (time frequencies divided
    by half − 1, MLP-norm eps 1e-5) set to the official DiT's, so both compute the same numbers."""
    pytest.importorskip("diffusers", reason="diffusers is not installed (pip install '.[bench]')")
    from benchmarks.bench.diffusers_dit import diffusers_dit

    net = diffusers_dit(model)
    for block in net.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    return net


def assert_one_line_error(stderr: str) -> str:
    """A user error: exactly one non-empty line on stderr, starting with `error:`, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# Independent re-implementation of DiT's diffusion/respace.py `space_timesteps` and SpacedDiffusion.
# ---------------------------------------------------------------------------------------------------

def dit_space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """facebookresearch/DiT diffusion/respace.py, rewritten here from its description."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start, all_steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        assert size >= count
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            all_steps.append(start + round(cur))
            cur += stride
        start += size
    return set(all_steps)


def dit_spaced_tables(kept_ascending):
    """SpacedDiffusion: base linear betas (float64), ᾱ, new betas from the kept ᾱ, recomputed ᾱ."""
    betas = np.linspace(0.0001, 0.02, 1000, dtype=np.float64)
    base_ac = np.cumprod(1.0 - betas, axis=0)
    use = set(int(t) for t in kept_ascending)
    last, new_betas, timestep_map = 1.0, [], []
    for i, ac in enumerate(base_ac):
        if i in use:
            new_betas.append(1 - ac / last)
            last = ac
            timestep_map.append(i)
    new_betas = np.array(new_betas, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - new_betas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    return np.array(timestep_map), alphas_cumprod, alphas_cumprod_prev


def tiny_vae(latent_channels=4, seed=0):
    """A tiny random diffusers AutoencoderKL (eval mode), norms away from ones and zeros."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=latent_channels,
                        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    with torch.no_grad():  # norms away from ones and zeros, so that every parameter matters
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return vae.eval()
