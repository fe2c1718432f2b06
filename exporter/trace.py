"""Trace one denoising step of a model into the ONNX *master graph*, once.

The traced step contains everything a step does (runtime/nn/step.py), so that the runtime issues
exactly one graph execution per step: classifier-free guidance, the network, the guidance combination
and the solver update. The step's timestep (an integer for DDIM, fractional for DPM-Solver), a, b, c
(p, q) and guidance scale are small graph inputs, so steps with the same computed units share a graph.
A solver whose carry is the previous step's output (DPM-Solver++ 2M) also outputs it, `carry_next`.

Every cacheable unit's raw output is also a named graph output `unit.<name>`: graph surgery later
detaches exactly these tensors from their producers to make cache reads (exporter/surgery.py). For
models whose blocks form one chain, the hidden state before the first block and after each block are
outputs too (`hidden.input`, `hidden.<block>`): where surgery cuts out a span of blocks.

    traced = trace_step(model, plan_settings(model, schedule, batch_size=8)[0])   # exporter/export.py
    export_plan(model, schedule, "plans/a", batch_size=8, traced=traced)   # reuse one trace for many plans
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from dataclasses import dataclass

import torch

from runtime.nn.precision import model_dtype
from runtime.nn.step import DenoisingStep
from runtime.nn.units import CachePolicy
from runtime.plan import names

OPSET = 20  # tanh-GELU as one op (20), LayerNormalization as one op (17)
IR_VERSION = 10  # onnx >= 1.23 writes IR 14 by default, which ONNX Runtime 1.31 rejects


@dataclass(frozen=True)
class StepSettings:
    """What a master graph is traced for; two exports with equal settings (and weights) can share one."""
    batch_size: int
    guidance: bool  # the doubled CFG batch is in the graph
    guidance_channels: str = "first3"
    carry: bool = False  # x_carry and c inputs (solvers with a carry term)
    carry_output: bool = False  # p and q inputs and the carry_next output (a carry that is a step's output)
    fractional_time: bool = False  # a float32 timestep (continuous-time solvers)
    precision: str = "fp32"  # the model's stored precision: fp32 or fp16
    # a text model's conditioning: "prologue" (the step reads the prompt's keys, values and bias, made once
    # per call by the prologue graph) or "inline" (the step takes the embeddings and encodes them itself);
    # "" for class labels
    prompt: str = ""

    def conditioning(self, depth: int) -> tuple[str, ...]:
        """The step graph's conditioning inputs, in order."""
        return {"": (names.Y,), "inline": names.PROMPT_INPUTS,
                "prologue": names.prologue_outputs(depth)}[self.prompt]

    def input_names(self, depth: int) -> tuple[str, ...]:
        return names.step_inputs(self.carry, self.carry_output, self.conditioning(depth))


@dataclass(frozen=True)
class TracedStep:
    # onnx.ModelProto: inputs `settings.input_names(depth)`; outputs `x_next` (and `carry_next`), then
    # `unit.<u>` in unit order
    proto: object
    settings: StepSettings
    weights_digest: str  # of the traced model's config and weights (`weights_digest`)
    prologue: object = None  # a text model's prologue graph (onnx.ModelProto) where settings.prompt == "prologue"


def weights_digest(model) -> str:
    """A digest of `model`'s config and every weight (names, dtypes, bytes): equal digests, same network."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.config, sort_keys=True).encode())
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(str(value.dtype).encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _RecordingStep(torch.nn.Module):
    """What is traced: the denoising step, every unit's fresh value recorded as an extra output. Its
    inputs are `settings.input_names(depth)`, in that order."""

    def __init__(self, model, settings: StepSettings):
        super().__init__()
        self.model = model  # a submodule named "model": the exporter's name scopes read model.blocks.3.attn …
        self.step = DenoisingStep(model, settings.guidance, settings.guidance_channels)
        self.settings = settings
        self.names = settings.input_names(model.config["depth"])

    def forward(self, *inputs):
        given = dict(zip(self.names, inputs))
        record = _Recorder({})
        latents = self.step.denoise(given[names.X], self.conditioning(given), given[names.TIMESTEP], given[names.A],
                                    given[names.B], given[names.GUIDANCE_SCALE], record, given.get(names.C),
                                    given.get(names.X_CARRY), given.get(names.P), given.get(names.Q))
        latents = latents if self.settings.carry_output else (latents,)  # x_next, and carry_next with p and q
        return (*latents, *(record.cache[u] for u in self.model.unit_names), *record.hidden.values())

    def conditioning(self, given: dict):
        """The labels, or the network batch's encoded prompt (from the prologue's outputs, or encoded here)."""
        if self.settings.prompt == "inline":
            return self.step.encode(given[names.PROMPT_EMBEDS], given[names.PROMPT_MASK])
        if self.settings.prompt == "prologue":
            from runtime.nn.pixart import Prompt

            depth = self.model.config["depth"]
            return Prompt(None, tuple(given[names.prompt_key(i)] for i in range(depth)),
                          tuple(given[names.prompt_value(i)] for i in range(depth)), given[names.PROMPT_BIAS])
        return given[names.Y]


class _Prologue(torch.nn.Module):
    """What the prologue graph computes: the network batch's prompt keys, values and mask bias."""

    def __init__(self, model, settings: StepSettings):
        super().__init__()
        self.model = model
        self.step = DenoisingStep(model, settings.guidance, settings.guidance_channels)

    def forward(self, embeds, mask):
        prompt = self.step.encode(embeds, mask)
        return (*(t for kv in zip(prompt.keys, prompt.values) for t in kv), prompt.bias)


class _Recorder(CachePolicy):
    """Computes everything and keeps every unit's value and, in order, the hidden state before the
    first block and after each block."""

    def __init__(self, cache):
        super().__init__(cache)
        self.hidden = {}

    def block(self, name, x, run):
        if not self.hidden:
            self.hidden[names.HIDDEN_INPUT] = x
        out = run(x)
        self.hidden[names.hidden_output(name)] = out
        return out


def hidden_outputs(model) -> list[str]:
    """The master graph's hidden-state outputs (none for families without spans)."""
    from schedules.schedule import unit_blocks
    from schedules.zoo import family_of

    if not family_of(model.config).spans:
        return []
    return [names.HIDDEN_INPUT] + [names.hidden_output(b) for b in unit_blocks(model.unit_names)]


def example_inputs(model, settings: StepSettings) -> tuple:
    """Zeros (ones for the coefficients) of every step input's shape, in `settings.input_names` order."""
    c, size, n = model.in_channels, model.config["input_size"], settings.batch_size
    x = torch.zeros(n, c, size, size)
    values = {names.X: x, names.Y: torch.zeros(n, dtype=torch.int64),
              names.TIMESTEP: torch.zeros(1, dtype=torch.float32 if settings.fractional_time else torch.int64),
              names.X_CARRY: torch.zeros_like(x)}
    if settings.prompt:
        embeds, mask = prompt_examples(model, settings)
        values.update({names.PROMPT_EMBEDS: embeds, names.PROMPT_MASK: mask})
        if settings.prompt == "prologue":
            with torch.no_grad():
                values.update(zip(names.prologue_outputs(model.config["depth"]), _Prologue(model, settings)(embeds, mask)))
    return tuple(values.get(name, torch.ones(1)) for name in settings.input_names(model.config["depth"]))


def prompt_examples(model, settings: StepSettings) -> tuple:
    """Example prompt embeddings (float32) and mask (int64, all tokens) of the network batch."""
    rows = settings.batch_size * (2 if settings.guidance else 1)
    length = model.config["max_text_tokens"]
    return (torch.zeros(rows, length, model.config["caption_channels"]),
            torch.ones(rows, length, dtype=torch.int64))


def at_precision(model, precision: str):
    """`model` at a plan's stored precision (fp32 or fp16; in fp16 plans norms, guidance and the update
    still run in fp32): the model itself if it is at that precision already, else a converted copy."""
    import copy

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    return model if model_dtype(model) == dtype else copy.deepcopy(model).to(dtype)


def trace_step(model, settings: StepSettings) -> TracedStep:
    """The master step graph of `model` for `settings` (the model is taken at `settings.precision`), and
    a text model's prologue graph where `settings.prompt` is "prologue"."""
    model = at_precision(model, settings.precision)
    step = _RecordingStep(model.eval(), settings)
    output_names = ([names.X_NEXT] + ([names.CARRY_NEXT] if settings.carry_output else [])
                    + [names.unit_output(u) for u in model.unit_names] + hidden_outputs(model))
    proto = export_onnx(step, example_inputs(model, settings), list(step.names), output_names)
    prologue = None
    if settings.prompt == "prologue":
        prologue = export_onnx(_Prologue(model, settings), prompt_examples(model, settings), list(names.PROMPT_INPUTS),
                               list(names.prologue_outputs(model.config["depth"])))
    return TracedStep(proto, settings, weights_digest(model), prologue)


def trace_decoder(decoder, latent_shape) -> object:
    """The decoder graph (onnx.ModelProto) of an `ImageDecoder` (runtime/nn/decoder.py) for latents of
    `latent_shape` (N, C, h, w): input `latents` float32, output `image` uint8 (N, H, W, 3); fp32 always."""
    example = (torch.zeros(tuple(latent_shape), dtype=torch.float32),)
    return export_onnx(decoder.float().eval(), example, [names.DECODER_INPUT], [names.DECODER_OUTPUT])


def export_onnx(module, example_inputs, input_names, output_names):
    """`module` traced by torch's ONNX exporter (dynamo, opset OPSET, IR IR_VERSION, weights inline),
    checked by onnx's checker; the exporter's chatter kept off the console."""
    import onnx

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_torch_logs():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, example_inputs, input_names=input_names, output_names=output_names,
                                    opset_version=OPSET, dynamo=True, external_data=False, optimize=True,
                                    verbose=False)
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)  # in-memory check (weights inline here)
    return proto


@contextlib.contextmanager
def _quiet_torch_logs():
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._export", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
