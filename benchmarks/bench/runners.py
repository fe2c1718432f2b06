"""What a benchmark row times: eager PyTorch sampling (the papers' way, through the eager reference's
`Denoiser`), `torch.compile` of the full step, or a plan backend."""

from __future__ import annotations

import numpy as np

from runtime.plan.names import STORED_PRECISIONS
from schedules.schedule import Schedule

from .config import BenchConfig


class EagerRunner:
    """Eager PyTorch sampling on the device, how the papers' code runs: a Python loop over steps; for
    full compute the official forward, for a cached schedule one Python branch per unit (the eager
    reference's caching policy). With `step_fn` (a compiled `DenoisingStep.denoise`) that function
    runs each step."""

    def __init__(self, model, schedule: Schedule, cfg: BenchConfig, device: str, step_fn=None):
        from exporter.reference import Denoiser, correction_tensors

        self.device = device
        self.schedule = schedule
        self.denoiser = Denoiser(model, schedule, cfg.guidance_scale, device=device)
        if step_fn is not None:
            self.denoiser.denoise = _fresh_outputs(step_fn, device)
        self.full = bool(schedule.compute.all())
        param = next(model.parameters())
        self.corrections = correction_tensors(schedule, param.device, param.dtype)

    def __call__(self, noise: np.ndarray, labels: np.ndarray) -> np.ndarray:
        import torch

        from exporter.reference import schedule_policy

        with torch.no_grad():
            x = torch.from_numpy(noise).to(self.device)
            y = torch.from_numpy(labels).to(self.device)
            policy = (lambda s: None) if self.full else schedule_policy(self.schedule, self.corrections)
            return self.denoiser.run(x, y, policy).cpu().numpy()


def _fresh_outputs(step_fn, device: str):
    """`step_fn` with each output copied out: inductor's CUDA graphs reuse their output memory."""
    import torch

    def step(*args):
        if device.startswith("cuda"):
            torch.compiler.cudagraph_mark_step_begin()
        out = step_fn(*args)  # x_next, or (x_next, carry_next) where a step hands its carry on
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    return step


def compiled_step(model, cfg: BenchConfig):
    """`torch.compile` of the full denoising step of `model` (`cfg.compile_mode` with inductor)."""
    import torch

    from exporter.reference import guided_step

    step, _ = guided_step(model, cfg.guidance_scale)
    return torch.compile(step.denoise, mode=cfg.compile_mode if cfg.compile_backend == "inductor" else None,
                         backend=cfg.compile_backend)


class BackendRunner:
    def __init__(self, backend, guidance_scale: float):
        self.backend, self.scale = backend, guidance_scale

    def __call__(self, noise, labels):
        return self.backend.run(noise, labels, self.scale)


def block_compile_mode(mode: str) -> str:
    """The torch.compile mode for the torch backend's blocks: never inductor's own CUDA graphs."""
    return {"max-autotune": "max-autotune-no-cudagraphs", "reduce-overhead": "default"}.get(mode, mode)


def plan_precision(method: str, precision: str, cfg: BenchConfig) -> tuple[str | None, str | None]:
    """(stored plan precision, reason it cannot run) for a plan method at a precision."""
    if precision in STORED_PRECISIONS:
        return precision, None
    if method in ("torch", "torch-inductor"):
        return cfg.bf16_plan, None
    return None, f"{method} plans are fp32 or fp16 (no bf16)"
