"""`--verify`: run every variant graph on random inputs and compare it with the eager PyTorch step.

Each variant gets random latents, labels (a text model: random prompts, through the plan's prologue
graph where it has one, whose keys and values are checked against the eager encoding too), a timestep, coefficients (and a carried latent for
solvers with a carry, p and q where a step hands its carry on), random cache values for the units it
reads (every history value of a forecast read, and random forecast weights) and random scale/shift
vectors for those it corrects; the eager side runs the same `DenoisingStep` with a `CachePolicy` over
those values. x_next (and carry_next) and every unit output the graph writes must agree within
`tolerance` (max abs error relative to the reference's max abs value). A plan's decoder graphs run on
random latents beside the PyTorch decoder (`ImageDecoder` of the autoencoder it was exported from):
their uint8 images may differ by one level at most (a value that rounds differently), never more.
"""

from __future__ import annotations

import numpy as np
import torch

from runtime.nn.step import DenoisingStep
from runtime.nn.units import CachePolicy
from runtime.plan import Plan, names
from runtime.plan.manifest import Program
from schedules.errors import BlockcacheError
from schedules.schedule import history_key

DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}  # fp16 plans are compared with the fp32 model


def verify_plan(model, plan: Plan, tolerance: float, seed: int = 0, decoder=None) -> list[dict]:
    """One report per variant (and per decoder graph, checked against `decoder` where the plan has one)."""
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    rng = np.random.default_rng(seed)
    if plan.decoder is not None and decoder is None:
        raise BlockcacheError("this plan decodes images: verify it with the decoder it was exported with")
    with OnnxRuntimeBackend(plan, device="cpu") as backend:
        report = [_verify_variant(model, plan, program, k, session, tolerance, rng,
                                  backend.prologues.get(program.batch_size))
                  for program in plan.programs for k, session in enumerate(backend.sessions[program.index])]
        for batch_size, session in backend.prologues.items():
            program = next(p for p in plan.programs if p.batch_size == batch_size)
            report.append(_verify_prologue(model, plan, program, session, tolerance, rng))
        for batch_size, session in backend.decoders.items():
            program = next(p for p in plan.programs if p.batch_size == batch_size)
            report.append(_verify_decoder(decoder, program, session, rng))
    return report


@torch.no_grad()
def _verify_decoder(decoder, program: Program, session, rng) -> dict:
    latents = (rng.standard_normal(program.inputs[names.X].shape) * 0.18215 / decoder.scaling_factor).astype(np.float32)
    got = session.run([names.DECODER_OUTPUT], {names.DECODER_INPUT: latents})[0]
    want = decoder(torch.from_numpy(latents)).numpy()
    worst = int(np.abs(got.astype(np.int16) - want.astype(np.int16)).max())
    if worst > 1:
        raise BlockcacheError(f"verify failed: {program.decoder.file} differs from the PyTorch decoder by {worst} "
                              "levels of 255 (at most 1 allowed)")
    return {"program": program.index, "file": program.decoder.file, "max_level_error": worst}


def _random_prompt(program: Program, rng) -> dict:
    """Random prompt embeddings of the network batch and a mask with 1 to L tokens per row."""
    specs = program.call_inputs
    rows, length = specs[names.PROMPT_MASK].shape
    tokens = rng.integers(1, length + 1, rows)
    return {names.PROMPT_EMBEDS: rng.standard_normal(specs[names.PROMPT_EMBEDS].shape).astype(np.float32),
            names.PROMPT_MASK: (np.arange(length)[None] < tokens[:, None]).astype(np.int64)}


@torch.no_grad()
def _verify_prologue(model, plan: Plan, program: Program, session, tolerance: float, rng) -> dict:
    """The prologue graph's keys, values and bias against the eager model's `encode` of random prompts."""
    feeds = _random_prompt(program, rng)
    outputs = list(program.prologue.outputs)
    got = dict(zip(outputs, session.run(outputs, feeds)))
    step = DenoisingStep(model.eval(), plan.guidance.enabled, plan.guidance.channels)
    prompt = step.encode(*(torch.from_numpy(feeds[n]) for n in names.PROMPT_INPUTS))
    want = dict(zip(outputs, [t.float().numpy() for kv in zip(prompt.keys, prompt.values) for t in kv]
                    + [prompt.bias.float().numpy()]))
    worst = max(_rel_error(got[n], want[n]) for n in outputs)
    if not worst <= tolerance:
        raise BlockcacheError(f"verify failed: {program.prologue.file} differs from the eager model by {worst:.3g} "
                              f"(tolerance {tolerance:g})")
    return {"program": program.index, "file": program.prologue.file, "max_rel_error": worst}


def _verify_variant(model, plan: Plan, program: Program, k: int, session, tolerance: float, rng,
                    prologue=None) -> dict:
    """Variant k on random inputs against the eager step; a text model's prompt made by the program's
    `prologue` session (the eager side encodes the same prompt itself)."""
    variant, inputs = program.variants[k], program.inputs
    x_shape = inputs[names.X].shape
    if program.takes_prompt:
        prompt = _random_prompt(program, rng)
        conditioning = dict(zip(program.prologue.outputs, prologue.run(list(program.prologue.outputs), prompt))) \
            if program.prologue is not None else prompt
    else:
        prompt = conditioning = {names.Y: rng.integers(0, model.num_classes, inputs[names.Y].shape).astype(np.int64)}
    feeds = {
        names.X: rng.standard_normal(x_shape).astype(np.float32),
        **conditioning,
        names.TIMESTEP: (rng.uniform(1, 1000, (1,)) if inputs[names.TIMESTEP].dtype == "float32"
                         else rng.integers(0, 1000, (1,))).astype(inputs[names.TIMESTEP].dtype),
        names.A: rng.uniform(0.5, 1.5, (1,)).astype(np.float32),
        names.B: rng.uniform(-1, 1, (1,)).astype(np.float32),
        names.GUIDANCE_SCALE: np.array([plan.guidance.scale], np.float32),
    }
    if program.has_carry:  # solvers with a carry term (DPM-Solver-2, DPM-Solver++ 2M)
        feeds[names.C] = rng.uniform(0.5, 1.5, (1,)).astype(np.float32)
        feeds[names.X_CARRY] = rng.standard_normal(x_shape).astype(np.float32)
    if program.carry_output:  # carry_next = p·x + q·eps (DPM-Solver++ 2M)
        feeds[names.P] = rng.uniform(0.5, 1.5, (1,)).astype(np.float32)
        feeds[names.Q] = rng.uniform(-1, 1, (1,)).astype(np.float32)
    cached, forecasts = {}, {}
    for u in variant.reads:
        spec, order = program.cache[u], variant.forecasts.get(u, 0)
        for i in range(order + 1):
            cached[history_key(u, i)] = rng.standard_normal(spec.shape).astype(spec.dtype)
        if order:
            forecasts[u] = rng.normal(0, 1, order + 1).astype(spec.dtype)
            feeds[names.forecast_input(u)] = forecasts[u]
    feeds.update({names.cache_input(key): v for key, v in cached.items()})
    corrections = {}
    for u in variant.adjusts:
        pair = tuple(rng.normal(0, 0.2, program.cache[u].shape[-1:]).astype(program.cache[u].dtype) for _ in "ab")
        corrections[u] = pair
        feeds.update(zip(names.correction_inputs(u), pair))
    outputs = ([names.X_NEXT] + ([names.CARRY_NEXT] if program.carry_output else [])
               + [names.unit_output(u) for u in variant.writes])
    got = dict(zip(outputs, session.run(outputs, feeds)))
    want = _eager(model, plan, feeds, prompt, cached, corrections, forecasts, variant)
    worst = max(_rel_error(got[n], want[n]) for n in outputs)
    if not worst <= tolerance:
        raise BlockcacheError(f"verify failed: {variant.file} differs from the eager model by {worst:.3g} "
                              f"(tolerance {tolerance:g})")
    return {"program": program.index, "variant": k, "file": variant.file, "max_rel_error": worst}


@torch.no_grad()
def _eager(model, plan: Plan, feeds: dict, conditioning: dict, cached: dict, corrections: dict, forecasts: dict,
           variant) -> dict:
    step = DenoisingStep(model.eval(), plan.guidance.enabled, plan.guidance.channels)
    given = {n: torch.from_numpy(v) for n, v in conditioning.items()}
    y = step.encode(given[names.PROMPT_EMBEDS], given[names.PROMPT_MASK]) if names.Y not in given else given[names.Y]
    cache = {u: torch.from_numpy(v).float() for u, v in cached.items()}
    writes = variant.writes
    policy = CachePolicy(cache, reads=variant.reads, writes=writes,
                         corrections={u: tuple(torch.from_numpy(v).float() for v in pair)
                                      for u, pair in corrections.items()},
                         spans=variant.spans, span_writes=variant.span_records,
                         forecasts={u: [float(w) for w in ws] for u, ws in forecasts.items()})
    t = {k: torch.from_numpy(v) for k, v in feeds.items() if k in names.step_inputs(True, True)}
    latents = step.denoise(t[names.X], y, t[names.TIMESTEP], t[names.A], t[names.B], t[names.GUIDANCE_SCALE],
                           policy, t.get(names.C), t.get(names.X_CARRY), t.get(names.P), t.get(names.Q))
    latents = latents if names.P in t else (latents,)  # x_next, and carry_next where the step hands it on
    return {**{n: v.numpy() for n, v in zip((names.X_NEXT, names.CARRY_NEXT), latents)},
            **{names.unit_output(u): cache[u].numpy() for u in writes}}


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    want = want.astype(np.float64)
    scale = float(np.abs(want).max()) or 1.0
    return float(np.abs(got.astype(np.float64) - want).max() / scale)


def verify_summary(report) -> str:
    variants = [r for r in report if "variant" in r]
    text = (f"verified {len(variants)} variants against the eager model: max relative error "
            f"{max(r['max_rel_error'] for r in variants):.2e}")
    prologues = [r for r in report if "max_rel_error" in r and "variant" not in r]
    if prologues:
        text += (f"; {len(prologues)} prologue graphs: max relative error "
                 f"{max(r['max_rel_error'] for r in prologues):.2e}")
    decoders = [r for r in report if "max_level_error" in r]
    if decoders:
        text += (f"; {len(decoders)} decoder graphs against the PyTorch decoder: images within "
                 f"{max(r['max_level_error'] for r in decoders)} of 255 levels")
    return text
