"""`runtime.Sampler`: sample from an exported plan.

    with Sampler("plans/l2c20") as sampler:
        latents = sampler([207, 360, 387], seed=0)        # numpy (N, C, H, W)

Labels beyond the plan's batch size are run in batches of that size (the last one padded).
"""

from __future__ import annotations

import numpy as np

from schedules.errors import BlockcacheError, ParameterError
from schedules.sampling import (check_finite_result, check_guidance_scale, check_labels, check_noise, guidance_needed,
                                initial_noise, neutral_guidance_scale)

from .backends import make_backend
from .plan import load_plan


class Sampler:
    def __init__(self, plan_dir: str, backend: str = "auto", device: str = "auto", verify: bool = True,
                 threads: int | None = None):
        """`backend`: auto, onnxruntime, torch or tensorrt; `device`: auto, cpu, cuda or cuda:N;
        `verify`: check every plan file's checksum at load; `threads`: intra-op threads of the ONNX
        Runtime backend (default: ORT's choice)."""
        self.plan = load_plan(plan_dir, verify=verify)
        self.backend = make_backend(backend, self.plan, device, **({} if threads is None else {"threads": threads}))
        self.num_classes = self.plan.num_labels
        self.batch_size = self.plan.batch_size
        self.latent_shape = self.plan.latent_shape

    @property
    def manifest(self) -> dict:
        return self.plan.document

    @property
    def backend_name(self) -> str:
        return f"{self.backend.name} ({self.backend.device})"

    def __call__(self, class_labels, *, noise=None, seed: int | None = None, guidance_scale: float | None = None):
        labels = check_labels(class_labels, self.num_classes)
        n = len(labels)
        if noise is not None and seed is not None:
            raise BlockcacheError("give noise or seed, not both")
        if noise is None:
            noise = initial_noise((n,) + self.latent_shape, 0 if seed is None else seed)
        noise = check_noise(noise, (n,) + self.latent_shape)
        scale = self._guidance_scale(guidance_scale)
        out = []
        b = self.batch_size
        for start in range(0, n, b):
            x, y = noise[start: start + b], labels[start: start + b]
            pad = b - len(x)
            if pad:
                x = np.concatenate([x, np.zeros((pad,) + self.latent_shape, np.float32)])
                y = np.concatenate([y, np.zeros(pad, np.int64)])
            out.append(self.backend.run(x, y, scale)[: b - pad])
        return check_finite_result(np.concatenate(out), scale)

    def _guidance_scale(self, guidance_scale) -> float:
        """The scale the graphs are run with: the given one or the plan's; a plan made with guidance runs
        the doubled batch anyway, so 'no guidance' becomes the form's neutral scale (eps = cond)."""
        guidance = self.plan.guidance
        scale = guidance.scale if guidance_scale is None else check_guidance_scale(guidance_scale)
        if not guidance.enabled and guidance_needed(scale, guidance.channels):
            raise ParameterError("guidance_scale", "this plan was exported without guidance; re-export it with a "
                                 "guidance scale to sample with {name} " + f"{scale:g}")
        if guidance.enabled and not guidance_needed(scale, guidance.channels):
            scale = neutral_guidance_scale(guidance.channels)  # eps = cond (the doubled batch still runs)
        return scale

    def close(self) -> None:
        """Release the backend's memory (device memory first); the sampler is not usable afterwards."""
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
