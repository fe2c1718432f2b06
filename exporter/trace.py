"""Trace one denoising step of a model into the ONNX *master graph*, once.

The traced step contains everything a step does, so that the runtime issues exactly one graph
execution per step: classifier-free guidance (the doubled batch [x; x] with labels [y; null]), the
network, the guidance combination and the solver update `x_next = a·x + b·eps` (DDIM), or
`a·x + b·eps + c·x_carry` for a second-order single-step solver, whose intermediate evaluation also
needs the latent its solver step started from (`x_carry`). The step's timestep (an integer for DDIM,
fractional for DPM-Solver), a, b, c and guidance scale are small graph inputs, so steps with the same
computed units share a graph.

Every cacheable unit's raw output is also a named graph output `unit.<name>`: graph surgery later
detaches exactly these tensors from their producers to make cache reads (exporter/surgery.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch

from schedules.sampling import guided_eps

UNIT_PREFIX = "unit."
STEP_INPUTS = ("x", "y", "timestep", "a", "b", "guidance_scale")
CARRY_INPUTS = ("c", "x_carry")  # only in graphs of samplers with a carry term
OPSET = 20  # tanh-GELU as one op (20), LayerNormalization as one op (17)
IR_VERSION = 10  # onnx >= 1.23 writes IR 14 by default, which ONNX Runtime 1.31 rejects


class DenoisingStep(torch.nn.Module):
    """One sampling step: (x, y, timestep, a, b, guidance_scale[, c, x_carry]) → (x_next, unit outputs…).

    `denoise` is the step itself with a `unit(name, fn)` policy; the eager reference and `--verify`
    call it with their caching policies, `forward` (what is traced) with one that records every unit."""

    def __init__(self, model, guidance: bool, guidance_channels: str = "first3"):
        super().__init__()
        self.model = model
        self.guidance = guidance
        self.guidance_channels = guidance_channels

    def denoise(self, x, y, timestep, a, b, guidance_scale, unit=None, c=None, x_carry=None):
        channels = self.model.in_channels
        if self.guidance:
            x_in = torch.cat([x, x])
            y_in = torch.cat([y, torch.full_like(y, self.model.null_class)])
        else:
            x_in, y_in = x, y
        t = timestep.expand(x_in.shape[0])
        dtype = self.model.pos_embed.dtype  # fp16/bf16 models: the update and its inputs stay fp32
        eps = self.model(x_in.to(dtype), t, y_in, unit=unit)[:, :channels].float()
        if self.guidance:
            n = x.shape[0]
            eps = guided_eps(eps[:n], eps[n:], guidance_scale, self.guidance_channels)
        if x_carry is None:
            return a * x + b * eps
        return a * x + b * eps + c * x_carry

    def forward(self, x, y, timestep, a, b, guidance_scale, c=None, x_carry=None):
        units = []

        def record(name, fn):
            value = fn()
            units.append(value)
            return value

        return (self.denoise(x, y, timestep, a, b, guidance_scale, record, c, x_carry), *units)


def step_inputs(carry: bool) -> tuple[str, ...]:
    return STEP_INPUTS + (CARRY_INPUTS if carry else ())


def example_inputs(model, batch_size: int, carry: bool = False, fractional_time: bool = False):
    c, size = model.in_channels, model.config["input_size"]
    x = torch.zeros(batch_size, c, size, size)
    timestep = torch.zeros(1, dtype=torch.float32 if fractional_time else torch.int64)
    inputs = (x, torch.zeros(batch_size, dtype=torch.int64), timestep, torch.ones(1), torch.ones(1), torch.ones(1))
    return inputs + ((torch.ones(1), torch.zeros_like(x)) if carry else ())


def trace_master(model, batch_size: int, guidance: bool, guidance_channels: str = "first3", carry: bool = False,
                 fractional_time: bool = False):
    """The master step graph as an onnx ModelProto: inputs `step_inputs(carry)`, outputs `x_next` and
    `unit.<name>` for every unit, in the model's unit order. `fractional_time`: a float32 timestep."""
    import onnx

    step = DenoisingStep(model.eval(), guidance, guidance_channels)
    names = ["x_next"] + [UNIT_PREFIX + u for u in model.unit_names]
    # The exporter is chatty (progress lines, warnings about optional packages): keep the CLI clean.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_torch_logs():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(step, example_inputs(model, batch_size, carry, fractional_time),
                                    input_names=list(step_inputs(carry)),
                                    output_names=names, opset_version=OPSET, dynamo=True, external_data=False,
                                    optimize=True, verbose=False)
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
