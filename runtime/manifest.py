"""The plan manifest (`plan.json`): everything a runtime needs, without torch.

A plan folder holds `plan.json`, one ONNX graph per variant (`variant_<k>.onnx`), the weights stored
once (`weights.bin`, referenced by every graph as ONNX external data), and a copy of the schedule
(with its Block Caching scale-shift sidecar, which the runtime reads: `step_adjustments`).
The manifest lists each file's SHA-256, checked at load, so a truncated or edited plan is refused.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from schedules.errors import BlockcacheError

FORMAT = "blockcache-plan"
VERSION = 1
MANIFEST = "plan.json"
WEIGHTS = "weights.bin"
SCHEDULE = "schedule.yaml"
SCALE_SHIFT = "schedule.scaleshift.safetensors"  # written by Schedule.save beside SCHEDULE


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(plan_dir: str, verify: bool = True) -> dict:
    """Read and check `plan_dir/plan.json`; with `verify`, every listed file's size and checksum."""
    path = os.path.join(plan_dir, MANIFEST)
    if not os.path.isdir(plan_dir):
        raise BlockcacheError(f"plan folder not found: {plan_dir}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise BlockcacheError(f"{plan_dir} is not a plan: {MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BlockcacheError(f"{path}: truncated or corrupted manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BlockcacheError(f"{path}: not a blockcache plan manifest")
    if manifest.get("version") != VERSION:
        raise BlockcacheError(f"{path}: plan version {manifest.get('version')!r} is not supported "
                              f"(this runtime reads version {VERSION}); re-export the plan")
    for key in ("model", "sampler", "guidance", "batch_size", "inputs", "buffers", "variants", "steps", "files"):
        if key not in manifest:
            raise BlockcacheError(f"{path}: manifest lacks '{key}'")
    if verify:
        verify_files(plan_dir, manifest)
    return manifest


def verify_files(plan_dir: str, manifest: dict) -> None:
    for name, meta in manifest["files"].items():
        if os.path.basename(name) != name:
            raise BlockcacheError(f"plan manifest names a file outside the plan: {name!r}")
        path = os.path.join(plan_dir, name)
        if not os.path.isfile(path):
            raise BlockcacheError(f"plan file missing: {path}")
        if os.path.getsize(path) != meta["size"]:
            raise BlockcacheError(f"plan file {path} has {os.path.getsize(path)} bytes, expected {meta['size']} "
                                  "(truncated or replaced)")
        if sha256_file(path) != meta["sha256"]:
            raise BlockcacheError(f"plan file {path} fails its checksum (corrupted or edited)")


def file_entry(path: str) -> dict:
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def step_adjustments(plan_dir: str, manifest: dict) -> list[dict]:
    """Per step, {unit: (scale, shift)} float32 vectors for every unit its variant corrects
    (`adjusts`); zeros where the schedule has no correction for that step. Empty dicts for a plan
    without scale-shift. Read with safetensors' numpy loader: plain tensors, no code runs."""
    steps = manifest["steps"]
    if not manifest.get("scale_shift"):
        return [{} for _ in steps]
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    name = manifest["scale_shift"].get("file")
    if not isinstance(name, str) or os.path.basename(name) != name or name not in manifest["files"]:
        raise BlockcacheError(f"plan manifest names a scale-shift file {name!r} that is not one of its files")
    path = os.path.join(plan_dir, name)
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise BlockcacheError(f"cannot read the plan's scale-shift file {path}: {e}") from None
    out = []
    for s, step in enumerate(steps):
        adjust = {}
        for unit in manifest["variants"][step["variant"]].get("adjusts", ()):
            width = manifest["buffers"]["cache." + unit]["shape"][-1]
            zeros = np.zeros(width, np.float32)
            pair = tuple(tensors.get(f"{kind}/{s}/{unit}", zeros).astype(np.float32) for kind in ("scale", "shift"))
            if any(v.shape != (width,) for v in pair):
                raise BlockcacheError(f"{path}: scale-shift for step {s}, unit {unit} is not {width} channels")
            adjust[unit] = pair
        out.append(adjust)
    return out


def step_latents(manifest: dict) -> list[tuple[int, int, int]]:
    """Per step, the latent buffers (input, carry, output) it binds: written by the exporter (three
    buffers for DPM-Solver-2); plans without them ping-pong between two (DDIM)."""
    steps = manifest["steps"]
    slots = [tuple(s.get("latents", (i % 2, i % 2, (i + 1) % 2))) for i, s in enumerate(steps)]
    for i, slot in enumerate(slots):
        if len(slot) != 3 or not all(isinstance(v, int) and 0 <= v < 3 for v in slot) or slot[2] in slot[:2]:
            raise BlockcacheError(f"plan step {i} has invalid latent buffers {list(slot)}")
    return slots
