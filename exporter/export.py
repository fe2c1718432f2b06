"""Export stages: trace once per batch size → derive variants by surgery → write the plan folder
atomically.

    plan = export_plan(model, schedule, "plans/l2c20", batch_size=8, guidance_scale=4.0)
    plan = export_plans(model, [l2c20, l2c50], "plans/l2c", batch_sizes=[1, 2, 4, 8])   # 8 programs, one weights file

Steps (model evaluations) with the same computed-unit set share one variant graph; the per-step
constants (timestep, the solver's a, b, c (and p, q), guidance scale, and Block Caching scale/shift
vectors) are graph inputs: the solver's are listed per step in the manifest with the step's latent
buffers (input, carry, output, and carry output where the carry is a step's output), the vectors stay
in the schedule's sidecar file. The manifest format is runtime/plan's (docs/ARCHITECTURE.md, "The plan
format").
"""

from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from runtime.plan import names
from runtime.plan.staging import check_destination, staging, write_manifest
from schedules import BlockcacheError, Schedule
from schedules.schedule import scale_shift_file, span_blocks, span_key
from schedules.cost import prologue_macs, schedule_macs, step_macs
from schedules.errors import ParameterError
from schedules.sampling import (carry_term, check_guidance_scale, guidance_needed, model_timesteps,
                                neutral_guidance_scale)
from schedules.zoo import family_of, num_labels, takes_prompt

from .models import check_weights
from .reference import check_schedule
from .surgery import WeightsFile, derive_variant, parameter_sources, stored_weights, tensor_shape
from .trace import StepSettings, TracedStep, at_precision, trace_step, weights_digest


MAX_BATCH_SIZE = 4096  # images per graph run; a plan's buffers grow with it


def group_variants(schedule: Schedule) -> tuple[list[np.ndarray], list[int]]:
    """Distinct rows (what is computed, which blocks are skipped in spans, and the order of each
    forecast read, which is lower while history is short) in order of first use, as their compute rows,
    and each step's variant index."""
    rows, index, step_variant = [], {}, []
    for row, span, orders in zip(schedule.compute, schedule.span, forecast_orders(schedule)):
        key = (row.tobytes(), span.tobytes(), tuple(sorted(orders.items())))
        if key not in index:
            index[key] = len(rows)
            rows.append(row.copy())
        step_variant.append(index[key])
    return rows, step_variant


def forecast_orders(schedule: Schedule) -> list[dict[str, int]]:
    """Per step, {read unit or span key: forecast order} of its reads with more than one history value."""
    return [{name: len(steps) - 1 for name, steps in uses.items() if len(steps) > 1} for uses in schedule.history()]


def span_cuts(schedule: Schedule, spans) -> list[tuple]:
    """Surgery's (first, last, block before first or None, units of the span's blocks) of `spans`."""
    blocks = schedule.blocks()
    order = list(blocks)
    out = []
    for first, last in spans:
        i, j = order.index(first), order.index(last)
        members = {schedule.unit_names[c] for b in order[i:j + 1] for c in blocks[b]}
        out.append((first, last, order[i - 1] if i > 0 else None, members))
    return out


def latent_buffers(carry_source) -> list[tuple[int, int, int]]:
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


def carry_output_buffers(evaluations: int) -> list[tuple[int, int, int, int]]:
    """Per evaluation, the latent buffers (input, carry, output, carry output) of a solver whose carry is
    the previous evaluation's output (DPM-Solver++ 2M's data prediction): the latents ping-pong between
    buffers 0 and 1, the carries between 2 and 3; the first evaluation, whose c is 0, carries its input."""
    return [(s % 2, 2 + (s - 1) % 2 if s else 0, (s + 1) % 2, 2 + s % 2) for s in range(evaluations)]


def plan_settings(model, schedule: Schedule, *, batch_size: int = 1, guidance_scale: float | None = None,
                  guidance: bool | None = None, guidance_channels: str | None = None,
                  precision: str = "fp32", prologue: bool = True) -> tuple[StepSettings, float]:
    """(what the step graph of this export is traced for, the plan's default guidance scale), with the
    defaults `export_plan` documents; bad values are refused in one line."""
    family = family_of(model.config)
    if guidance is False and guidance_scale is None:
        guidance_scale = neutral_guidance_scale(guidance_channels or family.guidance)
    guidance_scale, guidance_channels = family.guidance_settings(guidance_scale, guidance_channels)
    if precision not in names.STORED_PRECISIONS:
        raise ParameterError("precision", f"{{name}} {precision!r} is not supported (available: "
                             f"{', '.join(names.STORED_PRECISIONS)})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ParameterError("batch_size", f"{{name}} must be an integer in 1…{MAX_BATCH_SIZE}, got {batch_size!r}")
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale)
    sampler = schedule.make_sampler()
    settings = StepSettings(batch_size=batch_size,
                            guidance=guidance_needed(guidance_scale, guidance_channels) if guidance is None else guidance,
                            guidance_channels=guidance_channels, carry=carry_term(sampler) is not None,
                            carry_output=carry_term(sampler) == "output",
                            fractional_time=model_timesteps(sampler).dtype.kind == "f", precision=precision,
                            prompt=("prologue" if prologue else "inline") if takes_prompt(model.config) else "")
    return settings, float(guidance_scale)


def export_plan(model, schedule: Schedule, out_dir: str, *, batch_size: int = 1, guidance_scale: float | None = None,
                guidance: bool | None = None, guidance_channels: str | None = None, precision: str = "fp32",
                traced: TracedStep | None = None, finish=None, progress: bool = False, decoder=None,
                prologue: bool = True) -> dict:
    """Write a plan for `model` + `schedule` at `batch_size` to `out_dir` and return its manifest
    (`export_plans` with one schedule and one batch size).

    `guidance` (default: whether the scale changes the prediction) bakes the doubled CFG batch into
    the graphs; the scale stays an input, so a plan made with guidance can be sampled at any scale.
    `guidance_scale` and `guidance_channels` default to the model family's (DiT 4.0 on the first
    three channels, U-ViT 0.4 in its own form); with `guidance=False` the scale defaults to the
    form's neutral one (the conditional prediction).

    `traced`: a step graph traced before (`trace_step(model, plan_settings(…)[0])`) to use instead of
    tracing again; one traced for other settings or other weights is refused. `finish(folder,
    manifest) -> manifest` runs on the finished plan folder before it replaces `out_dir` (e.g. to add
    TensorRT engines, or to verify); if it fails, `out_dir` is left as it was.

    `decoder`: an `ImageDecoder` (runtime/nn/decoder.py, e.g. of `exporter.vae.load_vae`'s autoencoder):
    the plan then also decodes the final latents to uint8 images, in a decoder graph run after the last
    step (fp32 at every plan precision: the autoencoder's activations overflow fp16).

    `prologue` (text-to-image models): the prompt's step-independent work (caption projection, every
    block's cross-attention keys and values, the mask's bias) runs once per call in a prologue graph
    whose outputs stay resident for every step; `False` leaves it in every step graph (the same
    result, more work: for comparison)."""
    return export_plans(model, [schedule], out_dir, batch_sizes=[batch_size], guidance_scale=guidance_scale,
                        guidance=guidance, guidance_channels=guidance_channels, precision=precision,
                        traced=None if traced is None else [traced], finish=finish, progress=progress,
                        decoder=decoder, prologue=prologue)


def export_plans(model, schedules, out_dir: str, *, batch_sizes=(1,), guidance_scale: float | None = None,
                 guidance: bool | None = None, guidance_channels: str | None = None, precision: str = "fp32",
                 traced=None, finish=None, progress: bool = False, decoder=None, prologue: bool = True) -> dict:
    """Write one plan with a program for every (batch size, schedule) to `out_dir`: the weights stored
    once, the model traced once per batch size (whatever the number of schedules), each schedule's
    variants derived per batch size. Schedules must differ in their step counts (a call chooses one by
    `steps=`). `traced`: step graphs traced before, any of the settings this export needs (see
    `export_plan`); the others are traced here. The rest (`decoder`, `prologue`) as `export_plan`."""
    schedules = list(schedules)
    if not schedules:
        raise ParameterError("schedules", "{name} is empty: give at least one schedule")
    for schedule in schedules:
        check_schedule(model, schedule)
    counts = [s.num_steps for s in schedules]
    if len(set(counts)) != len(counts):
        raise ParameterError("schedules", f"{{name}} have step counts {counts}: a plan holds one schedule per step "
                             "count (a call chooses it by steps)")
    batch_sizes = list(batch_sizes)
    programs = []  # (batch size, schedule, settings)
    for schedule in schedules:
        for b in batch_sizes:  # plan_settings checks each value
            settings, resolved_scale = plan_settings(model, schedule, batch_size=b, guidance_scale=guidance_scale,
                                                     guidance=guidance, guidance_channels=guidance_channels,
                                                     precision=precision, prologue=prologue)
            programs.append((b, schedule, settings))
    if not batch_sizes or len(set(batch_sizes)) != len(batch_sizes):
        raise ParameterError("batch_sizes", f"{{name}} must be distinct batch sizes, got {batch_sizes}")
    if decoder is not None:
        check_decoder(model, decoder)
    check_destination(out_dir)  # before minutes of tracing, not after
    check_weights(model)
    model = at_precision(model, precision)
    traces = _traces(model, {settings for _, _, settings in programs}, traced or ())
    try:
        with staging(out_dir) as folder:
            manifest = _write_plan(model, programs, traces, folder, resolved_scale, progress, decoder)
            if finish is not None:
                manifest = finish(folder, manifest)
    except OSError as e:  # a full or read-only file system, a folder that vanished: the old plan stays
        raise BlockcacheError(f"cannot write the plan {out_dir}: {e.strerror or e}") from None
    return manifest


def _traces(model, needed: set, given) -> dict:
    """StepSettings → TracedStep for every settings the export needs: the ones handed in (refused where
    traced from other weights or for settings the export does not use), the rest traced now."""
    traces = {}
    for traced in given:
        if traced.settings not in needed:
            raise ParameterError("traced", f"{{name}} step graph was traced for {traced.settings}, which this "
                                 "export does not use")
        if traced.weights_digest != weights_digest(model):
            raise ParameterError("traced", "{name} step graph was traced from other weights than this model's")
        traces[traced.settings] = traced
    for settings in sorted(needed - traces.keys(), key=lambda s: s.batch_size):
        try:
            traces[settings] = trace_step(model, settings)
        except (RuntimeError, MemoryError) as e:
            if "memory" not in str(e).lower():
                raise
            raise BlockcacheError(f"cannot trace the model at batch size {settings.batch_size} here: out of "
                                  "memory") from None
    return traces


def check_decoder(model, decoder) -> None:
    """Refuse, in one line, a decoder whose latent channels are not the model's."""
    if decoder.latent_channels != model.in_channels:
        raise ParameterError("decoder", f"{{name}}: the autoencoder has {decoder.latent_channels} latent channels "
                             f"but {getattr(model, 'name', None) or 'the model'} samples {model.in_channels}")


def _write_decoders(model, decoder, batch_sizes, weights: "WeightsFile", folder: str) -> tuple[dict, dict]:
    """(the manifest's `decoder` entry, {batch size: the program's `decoder_graph` entry}): one decoder graph
    per batch size, its weights stored once in the plan's weights file."""
    import onnx

    from .trace import trace_decoder

    latent = (model.in_channels, model.config["input_size"], model.config["input_size"])
    entries, sources = {}, None
    for b in sorted(set(batch_sizes)):
        graph = trace_decoder(decoder, (b, *latent))
        found = parameter_sources(graph, decoder.state_dict())
        weights.add(graph, keep={src["tensor"] for src in found.values()})
        if sources is None:
            sources = store_folded(weights, decoder, found, "decoder.parameter.")
        name = names.decoder_file(b)
        onnx.save(graph, os.path.join(folder, name))
        shape, dtype = tensor_shape(graph, names.DECODER_OUTPUT)
        entries[b] = {"file": name, "weights": stored_weights(graph),
                      "output": {"shape": shape, "dtype": dtype}}
    top = {"scaling_factor": decoder.scaling_factor, "config": decoder.vae_config, "parameters": sources}
    return top, entries


def store_folded(weights: "WeightsFile", module, sources: dict, prefix: str) -> dict:
    """`sources` completed with the parameters of `module` that no graph holds as they are, stored under
    `prefix` + name: the ONNX exporter folded them into other constants (a norm's ones; PixArt-α's
    micro-condition embedders, whose inputs are constants of the plan's image size). The torch backend
    needs every parameter."""
    for name, value in module.state_dict().items():
        if name not in sources:
            array = value.detach().cpu().contiguous().numpy()
            stored = weights.store(prefix + name, array.tobytes(), list(array.shape), array.dtype.name)
            sources[name] = {"tensor": stored, "transposed": False}
    return sources


def _write_prologue(model, graph, settings: StepSettings, weights: "WeightsFile", folder: str) -> tuple[dict, dict]:
    """(a program's `prologue_graph` entry, the parameter sources it adds): the prologue graph of one batch
    size written to `folder`, its weights moved into the plan's weights file."""
    import onnx

    prologue = onnx.ModelProto()
    prologue.CopyFrom(graph)
    found = parameter_sources(prologue, model.state_dict())
    weights.add(prologue, keep={src["tensor"] for src in found.values()})
    name = names.prologue_file(settings.batch_size)
    onnx.save(prologue, os.path.join(folder, name))

    def specs(names_):
        return {n: dict(zip(("shape", "dtype"), tensor_shape(prologue, n))) for n in names_}

    entry = {"file": name, "weights": stored_weights(prologue), "inputs": specs(names.PROMPT_INPUTS),
             "outputs": specs(names.prologue_outputs(model.config["depth"]))}
    return entry, found


def _write_plan(model, programs, traces: dict, folder: str, guidance_scale: float, progress: bool,
                decoder=None) -> dict:
    import onnx

    single = len(programs) == 1
    schedules = {schedule.num_steps: schedule for _, schedule, _ in programs}  # one per step count
    schedule_files = {}
    for steps, schedule in schedules.items():  # with scale-shift, also its sidecar file
        schedule_files[steps] = names.SCHEDULE if len(schedules) == 1 else names.schedule_file(steps)
        schedule.save(os.path.join(folder, schedule_files[steps]))
    bar = tqdm(total=len(traces) + sum(len(group_variants(s)[0]) for _, s, _ in programs), desc="export",
               disable=not progress, leave=False)
    weights, masters, sources, prologues = WeightsFile(), {}, None, {}
    for settings, traced in sorted(traces.items(), key=lambda item: item[0].batch_size):
        master = onnx.ModelProto()
        master.CopyFrom(traced.proto)  # weights move out of the copy; a handed-in trace stays whole
        found = parameter_sources(master, model.state_dict())
        sources = sources or found
        weights.add(master, keep={src["tensor"] for src in found.values()})
        masters[settings] = master
        if traced.prologue is not None:  # the parameters only the prologue reads (caption projection, keys, values)
            prologues[settings.batch_size], found = _write_prologue(model, traced.prologue, settings, weights, folder)
            for name, source in found.items():
                sources.setdefault(name, source)
        bar.update()
    entries = []
    for j, (batch_size, schedule, settings) in enumerate(programs):
        entries.append(_program(model, schedule, masters[settings], settings, weights, folder,
                                schedule_files[schedule.num_steps], None if single else j, bar))
        if settings.prompt == "prologue":
            entries[-1]["prologue_graph"] = prologues[batch_size]
    bar.close()
    decoder_entry = None
    if decoder is not None:
        decoder_entry, graphs = _write_decoders(model, decoder, [b for b, _, _ in programs], weights, folder)
        for entry in entries:
            entry["decoder_graph"] = graphs[entry["batch_size"]]
    store_folded(weights, model, sources, "parameter.")
    weights.write(os.path.join(folder, names.WEIGHTS))
    first = programs[0][2]
    manifest = {
        "format": names.FORMAT,
        "version": names.VERSION,
        "model": {"name": getattr(model, "name", None), "family": family_of(model.config).name,
                  "config": dict(model.config), "unit_names": list(model.unit_names),
                  "num_labels": num_labels(model.config)},
        "guidance": {"enabled": first.guidance, "scale": guidance_scale, "channels": first.guidance_channels},
        "precision": first.precision,
        "weights": {"file": names.WEIGHTS, "tensors": weights.index, "parameters": sources},
        **({"decoder": decoder_entry} if decoder_entry else {}),
    }
    if single:
        manifest.update(entries[0])
    else:
        manifest["programs"] = entries
    return write_manifest(folder, manifest)


def _program(model, schedule: Schedule, master, settings: StepSettings, weights: "WeightsFile", folder: str,
             schedule_file: str, index: int | None, bar) -> dict:
    """The manifest entry of one program (batch size × schedule), its variant graphs written to `folder`."""
    import onnx

    sampler = schedule.make_sampler()
    a, b = sampler.coefficients()
    c = sampler.carry_coefficients()
    timesteps = model_timesteps(sampler)
    rows, step_variant = group_variants(schedule)
    if settings.carry_output:
        latents = carry_output_buffers(len(timesteps))
        p, q = sampler.carry_output_coefficients()
    else:  # an earlier input carried (DPM-Solver-2), or no carry term (DDIM: each evaluation's own input)
        latents = latent_buffers(sampler.carry_source if settings.carry else range(len(timesteps)))
    units = schedule.unit_names
    # A computed unit is a graph output iff some step of this variant has a later reader (liveness).
    outputs = [set() for _ in rows]
    # A read unit is corrected by scale/shift inputs iff some step of this variant has a correction for it.
    adjusts = [set() for _ in rows]
    # Spans: the ones a variant skips (the same at each of its steps), the residuals it records (any step's).
    skips, records = [None] * len(rows), [[] for _ in rows]
    forecasts = [None] * len(rows)  # the orders of the variant's forecast reads (the same at each of its steps)
    orders = forecast_orders(schedule)
    for s, (k, written) in enumerate(zip(step_variant, schedule.writes())):
        outputs[k].update(u for u in written if span_blocks(u) is None)
        skips[k] = schedule.spans(s)
        records[k] += [span_blocks(n) for n in written if span_blocks(n) is not None and span_blocks(n) not in records[k]]
        forecasts[k] = orders[s]
    for s, unit in schedule.scale_shift:
        adjusts[step_variant[s]].add(unit)

    hoisted = settings.prompt == "prologue"  # a text model's prompt work once per call, not in the steps
    variants = []
    for k, row in enumerate(rows):
        bar.set_postfix_str(f"batch {settings.batch_size}, {schedule.num_steps} steps, variant {k}")
        compute = dict(zip(units, (bool(v) for v in row)))
        cuts = span_cuts(schedule, skips[k])
        skipped = {u for *_, members in cuts for u in members}
        graph = derive_variant(master, compute, outputs[k], adjusts[k], cuts, span_cuts(schedule, records[k]),
                               forecasts[k])
        name = names.variant_file(k, index)
        onnx.save(graph, os.path.join(folder, name))
        skip_keys = [span_key(*span) for span in skips[k]]
        variants.append({
            "file": name,
            "computes": [u for u, v in compute.items() if v],
            "reads": [u for u, v in compute.items() if not v and u not in skipped] + skip_keys,
            "writes": [u for u in units if u in outputs[k]] + [span_key(*span) for span in records[k]],
            "adjusts": [u for u in units if u in adjusts[k]],
            **({"skips": skip_keys} if skip_keys else {}),
            **({"forecasts": forecasts[k]} if forecasts[k] else {}),
            "weights": stored_weights(graph),
            "macs_per_image": step_macs(model.config, row, hoisted),
            "graph_bytes": os.path.getsize(os.path.join(folder, name)),
        })
        bar.update()
    # One cache buffer per read unit and span; a forecast over m + 1 values rotates through m + 1 of them.
    buffers = {}
    read = [u for u in units if any(u in v["reads"] for v in variants)]
    read += list(dict.fromkeys(r for v in variants for r in v["reads"] if span_blocks(r) is not None))
    for name in read:
        blocks = span_blocks(name)
        shape, dtype = tensor_shape(master, names.unit_output(name) if blocks is None else names.hidden_output(blocks[1]))
        for r in range(1 + max(v.get("forecasts", {}).get(name, 0) for v in variants)):
            buffers[names.cache_input(names.ring_buffer(name, r))] = {"shape": shape, "dtype": dtype}
    inputs = {}
    for name in settings.input_names(model.config["depth"]):
        shape, dtype = tensor_shape(master, name)
        inputs[name] = {"shape": shape, "dtype": dtype}
    full, scheduled = schedule_macs(model.config, schedule, hoisted)
    forecast_weights = schedule.forecast_weights()
    return {
        "batch_size": settings.batch_size,
        "sampler": dict(schedule.sampler),
        "schedule": schedule_file,
        "schedule_source": schedule.source,
        "inputs": inputs,
        "output": {"shape": inputs[names.X]["shape"], "dtype": "float32"},
        "buffers": buffers,
        "variants": variants,
        "steps": [{"variant": k, "timestep": timesteps[s].item(), "a": float(a[s]), "b": float(b[s]),
                   **({"c": float(c[s])} if settings.carry else {}),
                   **({"p": float(p[s]), "q": float(q[s])} if settings.carry_output else {}),
                   "latents": list(latents[s]),
                   **({"forecast": {n: [float(v) for v in w] for n, w in forecast_weights[s].items()}}
                      if forecast_weights[s] else {})}
                  for s, k in enumerate(step_variant)],
        "scale_shift": {"file": scale_shift_file(schedule_file)} if schedule.scale_shift else None,
        "macs_per_image": {"full": full, "scheduled": scheduled, "ideal_speedup": full / scheduled,
                           **({"prologue": prologue_macs(model.config)} if hoisted else {})},
    }
