"""`runtime.Sampler`: sample from an exported plan.

    sampler = Sampler("plans/l2c20")
    latents = sampler([207, 360, 387], seed=0)        # numpy (N, C, H, W)

Labels beyond the plan's batch size are run in batches of that size (the last one padded).
"""

from __future__ import annotations

import numpy as np

from schedules.errors import BlockcacheError
from schedules.sampling import guidance_needed, initial_noise, neutral_guidance_scale

from .backends import make_backend
from .manifest import load_manifest


class Sampler:
    def __init__(self, plan_dir: str, backend: str = "auto", device: str = "auto", verify: bool = True,
                 threads: int | None = None):
        """`threads`: intra-op threads of the ONNX Runtime CPU backend (default: ORT's choice)."""
        self.plan_dir = plan_dir
        self.manifest = load_manifest(plan_dir, verify=verify)
        self.backend = make_backend(backend, plan_dir, self.manifest, device, threads)
        config = self.manifest["model"]["config"]
        self.num_classes = self.manifest["model"].get("num_labels", config["num_classes"])
        self.batch_size = self.manifest["batch_size"]
        self.latent_shape = tuple(self.manifest["inputs"]["x"]["shape"][1:])

    @property
    def backend_name(self) -> str:
        return f"{self.backend.name} ({self.backend.device})"

    def __call__(self, class_labels, *, noise=None, seed: int | None = None, guidance_scale: float | None = None):
        labels = np.asarray(class_labels)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise BlockcacheError("class labels must be a non-empty list of integers")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.size:
            raise BlockcacheError(f"class label {int(bad[0])} is out of range 0…{self.num_classes - 1}")
        n = len(labels)
        if noise is not None and seed is not None:
            raise BlockcacheError("give noise or seed, not both")
        if noise is None:
            noise = initial_noise((n,) + self.latent_shape, 0 if seed is None else seed)
        noise = np.asarray(noise)
        if noise.shape != (n,) + self.latent_shape:
            raise BlockcacheError(f"noise has shape {noise.shape} but {(n,) + self.latent_shape} is needed "
                                  "(N, C, H, W) for N labels")
        if not np.issubdtype(noise.dtype, np.floating) or not np.isfinite(noise).all():
            raise BlockcacheError("noise must be finite floating-point values")
        guidance = self.manifest["guidance"]
        scale = guidance["scale"] if guidance_scale is None else float(guidance_scale)
        if not guidance["enabled"] and guidance_needed(scale, guidance["channels"]):
            raise BlockcacheError("this plan was exported without guidance; re-export with --guidance-scale")
        if guidance["enabled"] and not guidance_needed(scale, guidance["channels"]):
            scale = neutral_guidance_scale(guidance["channels"])  # eps = cond (the doubled batch still runs)
        out = []
        b = self.batch_size
        for start in range(0, n, b):
            x = noise[start: start + b].astype(np.float32)
            y = labels[start: start + b].astype(np.int64)
            pad = b - len(x)
            if pad:
                x = np.concatenate([x, np.zeros((pad,) + self.latent_shape, np.float32)])
                y = np.concatenate([y, np.zeros(pad, np.int64)])
            out.append(self.backend.run(x, y, scale)[: b - pad])
        return np.concatenate(out)
