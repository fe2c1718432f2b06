"""`--verify`: run every variant graph on random inputs and compare it with the eager PyTorch step.

Each variant gets random latents, labels, a timestep, coefficients (and a carried latent for
DPM-Solver-2), random cache values for the
units it reads and random scale/shift vectors for those it corrects; the eager side runs the same
`DenoisingStep` with those (corrected) cache values substituted.
Both x_next and every unit output the graph writes must agree within `tolerance` (max abs error
relative to the reference's max abs value).
"""

from __future__ import annotations

import numpy as np
import torch

from schedules.errors import BlockcacheError

from .trace import CARRY_INPUTS, STEP_INPUTS, DenoisingStep

DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}  # fp16 plans are compared with the fp32 model


def verify_plan(model, plan_dir: str, manifest: dict, tolerance: float, seed: int = 0) -> list[dict]:
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(plan_dir, manifest, device="cpu")
    guidance = manifest["guidance"]
    step = DenoisingStep(model.eval(), guidance["enabled"], guidance["channels"])
    rng = np.random.default_rng(seed)
    inputs = manifest["inputs"]
    report = []
    for k, (variant, session) in enumerate(zip(manifest["variants"], backend.sessions)):
        feeds = {
            "x": rng.standard_normal(inputs["x"]["shape"]).astype(np.float32),
            "y": rng.integers(0, model.num_classes, inputs["y"]["shape"]).astype(np.int64),
            "timestep": (rng.uniform(1, 1000, (1,)) if inputs["timestep"]["dtype"] == "float32"
                         else rng.integers(0, 1000, (1,))).astype(inputs["timestep"]["dtype"]),
            "a": rng.uniform(0.5, 1.5, (1,)).astype(np.float32),
            "b": rng.uniform(-1, 1, (1,)).astype(np.float32),
            "guidance_scale": np.array([guidance["scale"]], np.float32),
        }
        if "x_carry" in inputs:  # solvers with a carry term (DPM-Solver-2)
            feeds["c"] = rng.uniform(0.5, 1.5, (1,)).astype(np.float32)
            feeds["x_carry"] = rng.standard_normal(inputs["x"]["shape"]).astype(np.float32)
        buffers = {u: manifest["buffers"]["cache." + u] for u in variant["reads"]}
        cached = {u: rng.standard_normal(b["shape"]).astype(b["dtype"]) for u, b in buffers.items()}
        feeds.update({"cache." + u: v for u, v in cached.items()})
        adjust = {u: tuple(rng.normal(0, 0.2, buffers[u]["shape"][-1:]).astype(buffers[u]["dtype"]) for _ in "ab")
                  for u in variant.get("adjusts", ())}
        for u, (scale, shift) in adjust.items():
            feeds["scale." + u], feeds["shift." + u] = scale, shift
        names = ["x_next"] + ["unit." + u for u in variant["writes"]]
        got = dict(zip(names, session.run(names, feeds)))
        want = _eager(step, feeds, cached, adjust, variant["writes"])
        worst = max(_rel_error(got[n], want[n]) for n in names)
        report.append({"variant": k, "file": variant["file"], "max_rel_error": worst})
        if not worst <= tolerance:
            raise BlockcacheError(f"verify failed: {variant['file']} differs from the eager model by {worst:.3g} "
                                  f"(tolerance {tolerance:g})")
    return report


@torch.no_grad()
def _eager(step: DenoisingStep, feeds: dict, cached: dict, adjust: dict, writes) -> dict:
    values = {}

    def unit(name, fn):
        if name not in cached:
            values[name] = fn()
            return values[name]
        value = torch.from_numpy(cached[name]).float()
        if name in adjust:
            scale, shift = (torch.from_numpy(v).float() for v in adjust[name])
            value = value * (1 + scale) + shift
        return value

    t = {k: torch.from_numpy(v) for k, v in feeds.items() if k in STEP_INPUTS + CARRY_INPUTS}
    x_next = step.denoise(t["x"], t["y"], t["timestep"], t["a"], t["b"], t["guidance_scale"], unit, t.get("c"),
                          t.get("x_carry"))
    return {"x_next": x_next.numpy(), **{"unit." + u: values[u].numpy() for u in writes}}


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    want = want.astype(np.float64)
    scale = float(np.abs(want).max()) or 1.0
    return float(np.abs(got.astype(np.float64) - want).max() / scale)


def verify_summary(report) -> str:
    worst = max(r["max_rel_error"] for r in report)
    return f"verified {len(report)} variants against the eager model: max relative error {worst:.2e}"

