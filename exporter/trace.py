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


@dataclass(frozen=True)
class TracedStep:
    # onnx.ModelProto: inputs `step_inputs(carry, carry_output)`; outputs `x_next` (and `carry_next`), then
    # `unit.<u>` in unit order
    proto: object
    settings: StepSettings
    weights_digest: str  # of the traced model's config and weights (`weights_digest`)


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
    """What is traced: the denoising step, every unit's fresh value recorded as an extra output."""

    def __init__(self, model, settings: StepSettings):
        super().__init__()
        self.model = model  # a submodule named "model": the exporter's name scopes read model.blocks.3.attn …
        self.step = DenoisingStep(model, settings.guidance, settings.guidance_channels)

    def forward(self, x, y, timestep, a, b, guidance_scale, c=None, x_carry=None, p=None, q=None):
        record = _Recorder({})
        latents = self.step.denoise(x, y, timestep, a, b, guidance_scale, record, c, x_carry, p, q)
        latents = latents if p is not None else (latents,)  # x_next, and carry_next with p and q
        return (*latents, *(record.cache[u] for u in self.model.unit_names), *record.hidden.values())


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


def example_inputs(model, settings: StepSettings):
    c, size, n = model.in_channels, model.config["input_size"], settings.batch_size
    x = torch.zeros(n, c, size, size)
    timestep = torch.zeros(1, dtype=torch.float32 if settings.fractional_time else torch.int64)
    inputs = (x, torch.zeros(n, dtype=torch.int64), timestep, torch.ones(1), torch.ones(1), torch.ones(1))
    inputs += (torch.ones(1), torch.zeros_like(x)) if settings.carry else ()
    return inputs + ((torch.ones(1), torch.ones(1)) if settings.carry_output else ())


def at_precision(model, precision: str):
    """`model` at a plan's stored precision (fp32 or fp16; in fp16 plans norms, guidance and the update
    still run in fp32): the model itself if it is at that precision already, else a converted copy."""
    import copy

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    return model if model.pos_embed.dtype == dtype else copy.deepcopy(model).to(dtype)


def trace_step(model, settings: StepSettings) -> TracedStep:
    """The master step graph of `model` for `settings` (the model is taken at `settings.precision`)."""
    model = at_precision(model, settings.precision)
    step = _RecordingStep(model.eval(), settings)
    output_names = ([names.X_NEXT] + ([names.CARRY_NEXT] if settings.carry_output else [])
                    + [names.unit_output(u) for u in model.unit_names] + hidden_outputs(model))
    proto = export_onnx(step, example_inputs(model, settings),
                        list(names.step_inputs(settings.carry, settings.carry_output)), output_names)
    return TracedStep(proto, settings, weights_digest(model))


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
