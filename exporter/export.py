"""Export stages: trace once → derive variants by surgery → write the plan folder atomically.

    plan = export_plan(model, schedule, "plans/l2c20", batch_size=8, guidance_scale=4.0)

Steps (model evaluations) with the same computed-unit set share one variant graph; the per-step
constants (timestep, the solver's a, b and c, guidance scale, and Block Caching scale/shift vectors)
are graph inputs: the solver's are listed per step in the manifest with the step's latent buffers
(input, carry, output), the vectors stay in the schedule's sidecar file.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile

import numpy as np
from tqdm.auto import tqdm

from runtime import manifest as mf
from schedules import BlockcacheError, Schedule
from schedules.cost import schedule_macs, step_macs
from schedules.sampling import guidance_needed, neutral_guidance_scale
from schedules.zoo import family_of, num_labels

from .reference import check_schedule, model_timesteps
from .surgery import CACHE_PREFIX, derive_variant, parameter_sources, split_weights, tensor_shape
from .trace import UNIT_PREFIX, step_inputs, trace_master

PRECISIONS = ("fp32", "fp16")


def group_variants(schedule: Schedule) -> tuple[list[np.ndarray], list[int]]:
    """Distinct compute rows in order of first use, and each step's variant index."""
    rows, index, step_variant = [], {}, []
    for row in schedule.compute:
        key = row.tobytes()
        if key not in index:
            index[key] = len(rows)
            rows.append(row.copy())
        step_variant.append(index[key])
    return rows, step_variant


def latent_slots(carry_source) -> list[tuple[int, int, int]]:
    """Per evaluation, the latent buffers (input, carry, output): the output goes to the lowest buffer
    holding neither the input nor the carry. DDIM ping-pongs between two buffers; DPM-Solver-2 needs
    three, since its intermediate evaluation reads the solver step's starting latent too. Only the
    current and the previous evaluation's inputs are kept, so a carry may reach back one evaluation."""
    holds, slots = {}, []  # evaluation → buffer holding its input
    holds[0] = 0
    for s, src in enumerate(carry_source):
        if not s - 1 <= int(src) <= s:
            raise BlockcacheError(f"evaluation {s} carries the input of evaluation {src}: only the current or "
                                  "previous one is kept")
        live = {holds[s], holds[int(src)]}
        out = min(set(range(len(live) + 1)) - live)
        slots.append((holds[s], holds[int(src)], out))
        holds[s + 1] = out
    return slots


def export_plan(model, schedule: Schedule, out_dir: str, *, batch_size: int = 1, guidance_scale: float | None = None,
                guidance: bool | None = None, guidance_channels: str | None = None, precision: str = "fp32",
                progress: bool = False) -> dict:
    """Write a plan for `model` + `schedule` to `out_dir` and return its manifest.

    `guidance` (default: whether the scale changes the prediction) bakes the doubled CFG batch into
    the graphs; the scale stays an input, so a plan made with guidance can be sampled at any scale.
    `guidance_scale` and `guidance_channels` default to the model family's (DiT 4.0 on the first
    three channels, U-ViT 0.4 in its own form); with `guidance=False` the scale defaults to the
    form's neutral one (the conditional prediction)."""
    check_schedule(model, schedule)
    family = family_of(model.config)
    if guidance is False and guidance_scale is None:
        guidance_scale = neutral_guidance_scale(guidance_channels or family.guidance)
    guidance_scale, guidance_channels = family.guidance_settings(guidance_scale, guidance_channels)
    if precision not in PRECISIONS:
        raise BlockcacheError(f"precision {precision!r} is not supported (available: {', '.join(PRECISIONS)})")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BlockcacheError(f"batch size must be a positive integer, got {batch_size!r}")
    guidance = guidance_needed(guidance_scale, guidance_channels) if guidance is None else guidance
    if precision == "fp16":  # weights and activations fp16; norms, guidance and the update stay fp32
        model = copy.deepcopy(model).half()
    _check_destination(out_dir)
    sampler = schedule.make_sampler()
    a, b = sampler.coefficients()
    c = sampler.carry_coefficients()
    carry = bool(np.any(c))
    timesteps = model_timesteps(sampler)
    rows, step_variant = group_variants(schedule)
    latents = latent_slots(sampler.carry_source)
    units = schedule.unit_names

    bar = tqdm(total=3 + len(rows), desc="export", disable=not progress, leave=False)
    bar.set_postfix_str("trace")
    master = trace_master(model, batch_size, guidance, guidance_channels, carry=carry,
                          fractional_time=timesteps.dtype.kind == "f")
    sources = parameter_sources(master, model.state_dict())
    blob, weight_index = split_weights(master, keep={src["tensor"] for src in sources.values()})
    bar.update()

    # A computed unit is a graph output iff some step of this variant has a later reader (liveness).
    outputs = [set() for _ in rows]
    # A read unit is corrected by scale/shift inputs iff some step of this variant has a correction for it.
    adjusts = [set() for _ in rows]
    for s, k in enumerate(step_variant):
        outputs[k].update(schedule.live_after(s))
    for s, unit in schedule.scale_shift:
        adjusts[step_variant[s]].add(unit)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-")
    try:
        import onnx

        variants = []
        for k, row in enumerate(rows):
            bar.set_postfix_str(f"variant {k}")
            compute = dict(zip(units, (bool(c) for c in row)))
            graph = derive_variant(master, compute, outputs[k], adjusts[k])
            name = f"variant_{k}.onnx"
            onnx.save(graph, os.path.join(tmp, name))
            weights = sorted(t.name for t in graph.graph.initializer if t.name in weight_index)
            variants.append({
                "file": name,
                "computes": [u for u, c in compute.items() if c],
                "reads": [u for u, c in compute.items() if not c],
                "writes": [u for u in units if u in outputs[k]],
                "adjusts": [u for u in units if u in adjusts[k]],
                "weights": weights,
                "macs_per_image": step_macs(model.config, row),
                "graph_bytes": os.path.getsize(os.path.join(tmp, name)),
            })
            bar.update()
        bar.set_postfix_str("weights")
        with open(os.path.join(tmp, mf.WEIGHTS), "wb") as f:
            f.write(blob)
        schedule.save(os.path.join(tmp, mf.SCHEDULE))  # with scale-shift, also its sidecar file
        bar.update()

        buffers = {}
        for u in units:
            if any(u in v["reads"] for v in variants):
                shape, dtype = tensor_shape(master, UNIT_PREFIX + u)
                buffers[CACHE_PREFIX + u] = {"shape": shape, "dtype": dtype}
        inputs = {}
        for name in step_inputs(carry):
            shape, dtype = tensor_shape(master, name)
            inputs[name] = {"shape": shape, "dtype": dtype}
        full, scheduled = schedule_macs(model.config, schedule)
        manifest = {
            "format": mf.FORMAT,
            "version": mf.VERSION,
            "model": {"name": getattr(model, "name", None), "family": family.name, "config": dict(model.config),
                      "unit_names": list(units), "num_labels": num_labels(model.config)},
            "sampler": dict(schedule.sampler),
            "schedule_source": schedule.source,
            "guidance": {"enabled": guidance, "scale": float(guidance_scale), "channels": guidance_channels},
            "batch_size": batch_size,
            "precision": precision,
            "inputs": inputs,
            "output": {"shape": inputs["x"]["shape"], "dtype": "float32"},
            "buffers": buffers,
            "weights": {"file": mf.WEIGHTS, "tensors": weight_index, "parameters": sources},
            "variants": variants,
            "steps": [{"variant": k, "timestep": timesteps[s].item(), "a": float(a[s]), "b": float(b[s]),
                       **({"c": float(c[s])} if carry else {}), "latents": list(latents[s])}
                      for s, k in enumerate(step_variant)],
            "scale_shift": {"file": mf.SCALE_SHIFT} if schedule.scale_shift else None,
            "macs_per_image": {"full": full, "scheduled": scheduled, "ideal_speedup": full / scheduled},
        }
        manifest["files"] = {name: mf.file_entry(os.path.join(tmp, name))
                             for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, mf.MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return manifest


def _check_destination(out_dir: str) -> None:
    """Refuse to replace a folder that is not a plan: the user's other files are never deleted."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise BlockcacheError(f"--out {out_dir} exists and is not a folder")
        if os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, mf.MANIFEST)):
            raise BlockcacheError(f"--out {out_dir} is a non-empty folder that is not a plan; choose another")


def _replace_dir(new: str, out_dir: str) -> None:
    """Swap the finished plan into place; an existing plan is removed only after the swap."""
    old = None
    if os.path.exists(out_dir):
        old = f"{new}.old"
        os.rename(out_dir, old)
    try:
        os.rename(new, out_dir)
    except BaseException:
        if old:
            os.rename(old, out_dir)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
