"""The eager cached reference: any schedule run on the PyTorch model with blockcache's caching
semantics (docs/ARCHITECTURE.md, "Caching semantics"), one Python branch per unit, as the papers'
code runs. Every compiled backend is checked against it.

Semantics: a reused unit returns the raw branch output (before gate and residual) from the last step
that computed it, corrected by Block Caching's scale-shift where the schedule has one; everything
else runs with the current step's inputs. With guidance the network runs on [x; x] with labels
[y; null] and the cache holds the doubled batch. A forecasting schedule reuses TaylorSeer's
extrapolation instead, computed here by TaylorSeer's own recursion (`TaylorSeerCache`), not by the
weights the plans use.
"""

from __future__ import annotations

from math import factorial

import numpy as np
import torch
from tqdm.auto import tqdm

from runtime.nn.step import DenoisingStep
from runtime.nn.units import COMPUTE, CachePolicy
from schedules import BlockcacheError, Schedule
from schedules.prompts import PromptInputs, check_conditioning, check_prompts
from schedules.schedule import span_blocks
from schedules.sampling import (carry_term, check_finite_result, check_guidance_scale, check_labels, check_noise,
                                guidance_needed, initial_noise, model_timesteps)
from schedules.zoo import DIT, check_sampler, family_of, takes_prompt

DEFAULT_GUIDANCE_SCALE = DIT.guidance_scale  # DiT's demo setting, 4; 1.5 is the paper's FID setting


def correction_tensors(schedule: Schedule, device="cpu", dtype=torch.float32) -> list[dict]:
    """Per step, {unit: (scale, shift)}: the schedule's scale-shift as tensors made once on the model's
    device and dtype, so that sampling moves nothing per step."""
    out = [{} for _ in range(schedule.num_steps)]
    for (step, unit), pair in schedule.scale_shift.items():
        out[step][unit] = tuple(torch.from_numpy(a).to(device=device, dtype=dtype) for a in pair)
    return out


def guided_step(model, guidance_scale: float | None = None, guidance_channels: str | None = None):
    """(the `DenoisingStep` of `model` with guidance where the scale needs it, the scale): scale and
    form default to the model family's published ones."""
    guidance_scale, channels = family_of(model.config).guidance_settings(guidance_scale, guidance_channels)
    return DenoisingStep(model, guidance_needed(guidance_scale, channels), channels), guidance_scale


class Denoiser:
    """Evaluation s of a schedule's sampler as one call: `x_next = denoiser(s, x, y, policy, x_carry,
    carried)` (CFG, network with the unit `policy`, solver update), with the per-step constants made
    once on `device`. `x_carry` is s's carry, `carry(carried, s, x)` (needed where `has_carry`): the
    input of evaluation `carry_source[s]` (DPM-Solver-2's intermediate evaluations), or where
    `carry_output` the carry the previous evaluation handed on, p·x + q·eps (DPM-Solver++ 2M's data
    prediction), which a call records in `carried`; `run` shows the bookkeeping. `guidance_channels`
    defaults to the model family's guidance form, `guidance_scale` to its published setting."""

    def __init__(self, model, schedule: Schedule, guidance_scale: float | None = None,
                 guidance_channels: str | None = None, device="cpu"):
        self.step, guidance_scale = guided_step(model, guidance_scale, guidance_channels)
        self.denoise = self.step.denoise  # what runs one evaluation (a caller may put a compiled one here)
        self.scale = torch.tensor([guidance_scale], dtype=torch.float32, device=device)
        sampler = schedule.make_sampler()
        self.timesteps = [torch.from_numpy(t.reshape(1)).to(device) for t in model_timesteps(sampler)]

        def constants(values):
            return (torch.from_numpy(v.astype(np.float32)).reshape(-1, 1).to(device) for v in values)

        self.a, self.b, self.c = constants((*sampler.coefficients(), sampler.carry_coefficients()))
        self.has_carry, self.carry_output = carry_term(sampler) is not None, carry_term(sampler) == "output"
        if self.carry_output:
            self.p, self.q = constants(sampler.carry_output_coefficients())
        else:  # the evaluation whose input each carries (without a carry term, as in DDIM, its own)
            self.carry_source = [int(k) for k in sampler.carry_source] if self.has_carry else list(range(len(self)))

    def __len__(self):
        return len(self.timesteps)

    def __call__(self, s: int, x, y, policy=None, x_carry=None, carried: dict | None = None):
        needed = s > 0 if self.carry_output else self.has_carry and self.carry_source[s] != s
        if needed and x_carry is None:
            raise BlockcacheError(f"evaluation {s} needs " + (f"the carry of evaluation {s - 1}" if self.carry_output
                                                            else f"the latent of evaluation {self.carry_source[s]}"))
        c = self.c[s] if x_carry is not None else None
        p_q = (self.p[s], self.q[s]) if self.carry_output else ()
        out = self.denoise(x, y, self.timesteps[s], self.a[s], self.b[s], self.scale,
                           COMPUTE if policy is None else policy, c, x_carry, *p_q)
        if not self.carry_output:
            return out
        if carried is not None:  # detached, as callers detach the latent: nothing trains across evaluations
            carried[s + 1] = out[1].detach()
        return out[0]

    def carry(self, carried: dict, s: int, x):
        """Evaluation s's carry (None without a carry term) from `carried`, the run's record: the input
        of evaluation `carry_source[s]` (x is recorded as s's input; inputs no later evaluation carries
        are dropped), or where `carry_output` the carry evaluation s − 1 recorded (evaluation 0, whose
        c is 0, carries its own input)."""
        if self.carry_output:
            return carried.pop(s, None) if s else x
        carried[s] = x
        for k in [k for k in carried if k < self.carry_source[s]]:
            del carried[k]
        return carried[self.carry_source[s]] if self.has_carry else None

    def run(self, x, y, policy=lambda s: None, progress: bool = False, desc: str = "sampling"):
        """All evaluations from `x`; `policy(s)` gives evaluation s's unit policy (None: compute)."""
        carried = {}
        for s in tqdm(range(len(self)), desc=desc, disable=not progress, leave=False):
            x = self(s, x, y, policy(s), self.carry(carried, s, x), carried)
        return x


class TaylorSeerCache(CachePolicy):
    """Evaluation `step` of a forecasting schedule, as TaylorSeer defines it (diffusers'
    `TaylorSeerState.update` and `.predict`, hooks/taylorseer_cache.py): every stored value (unit or span
    residual) updates its Taylor factors D_0 = F, D_{j+1} = (D_j − D_j⁻)/h up to `order` where the
    previous update had D_j⁻; a read at distance d from the last update is Σ_j D_j·d^j/j!.
    `factors` (name → (step of the last update, [D_0, …])) is carried across evaluations."""

    def __init__(self, factors: dict, step: int, order: int, reads, corrections=None, spans=(), span_writes=()):
        super().__init__({}, reads, corrections=corrections, spans=spans, span_writes=span_writes)
        self.factors, self.step, self.order = factors, step, order

    def read(self, name):
        last, factors = self.factors[name]
        d = self.step - last
        value = factors[0]
        for j in range(1, len(factors)):
            value = value + factors[j] * (d ** j / factorial(j))
        return value

    def store(self, name, value):
        new = [value]
        if name in self.factors:
            last, previous = self.factors[name]
            for j in range(min(self.order, len(previous))):
                new.append((new[j] - previous[j]) / (self.step - last))
        self.factors[name] = (self.step, new)


def schedule_policy(schedule: Schedule, corrections: list[dict] | None = None,
                    classes=(CachePolicy, TaylorSeerCache)):
    """`policy(s)` for `Denoiser.run`: evaluation s of `schedule` under blockcache's caching semantics,
    one cache carried across the evaluations (`corrections`: `correction_tensors(schedule)`). `classes`:
    the policy classes for schedules without and with forecasts (subclasses of the two defaults)."""
    cache = {}
    corrections = correction_tensors(schedule) if corrections is None else corrections
    span_writes = [[span_blocks(n) for n in names if span_blocks(n)] for names in schedule.writes()]
    if schedule.forecast:
        return lambda s: classes[1](cache, s, schedule.forecast, schedule.reused(s), corrections[s],
                                    schedule.spans(s), span_writes[s])
    return lambda s: classes[0](cache, schedule.reused(s), corrections=corrections[s], spans=schedule.spans(s),
                                span_writes=span_writes[s])


def seeded_batch(model, labels, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, labels) for every (seed, label) pair, seed-major: seed k's noise for all labels is
    `initial_noise((len(labels), C, H, W), k)`."""
    c, size = model.in_channels, model.config["input_size"]
    x = np.concatenate([initial_noise((len(labels), c, size, size), int(seed)) for seed in seeds])
    return torch.from_numpy(x), torch.from_numpy(np.tile(np.asarray(labels, dtype=np.int64), len(seeds)))


def check_schedule(model, schedule: Schedule) -> None:
    """Refuse, in one line, a schedule made for other units, another solver or (scale-shift) another
    width than `model` has."""
    name = getattr(model, "name", None) or "the model"
    schedule.check_units(model.unit_names, name)
    check_sampler(model.config, schedule.sampler["name"], name)
    if schedule.span.any() and not family_of(model.config).spans:
        raise BlockcacheError(f"{name} is a {family_of(model.config).name} model: its long skips leave no span of "
                              "blocks to replace by a residual ('s' rows are for DiT)")
    width = model.config["hidden_size"]  # every unit's output has the model's width
    for (step, unit), (scale, _) in schedule.scale_shift.items():
        if scale.shape != (width,):
            raise BlockcacheError(f"scale-shift vectors have {scale.shape[0]} channels but {name}'s units have "
                                  f"{width} (learned for another model?)")


def encoded_prompt(step: DenoisingStep, prompts: PromptInputs):
    """The network batch's encoded prompt for `step` (the negative rows under its guidance): what a
    plan's prologue computes once per call."""
    embeds, mask = prompts.network(step.guidance)
    return step.encode(torch.from_numpy(embeds), torch.from_numpy(mask))


@torch.no_grad()
def sample(model, schedule: Schedule, labels, noise, *, prompts: PromptInputs | None = None,
           guidance_scale: float | None = None, guidance_channels: str | None = None,
           progress: bool = False) -> np.ndarray:
    """Final latents (N, C, H, W) for `labels` from `noise`, following `schedule` evaluation by evaluation.
    A text-to-image model takes `prompts` (`schedules.prompts.check_prompt_inputs`) and labels None."""
    check_schedule(model, schedule)
    name = getattr(model, "name", None) or "the model"
    check_conditioning(model.config, labels, None if prompts is None else prompts.embeds, name)
    if guidance_scale is not None:
        guidance_scale = check_guidance_scale(guidance_scale)
    denoiser = Denoiser(model, schedule, guidance_scale, guidance_channels)
    if takes_prompt(model.config):
        prompts = check_prompts(model.config, prompts, denoiser.step.guidance, name)
        n, y = len(prompts), encoded_prompt(denoiser.step, prompts)
    else:
        labels = check_labels(labels, model.num_classes)
        n, y = len(labels), torch.from_numpy(labels)
    c, size = model.in_channels, model.config["input_size"]
    x = torch.from_numpy(check_noise(noise, (n, c, size, size)))
    out = denoiser.run(x, y, schedule_policy(schedule), progress).numpy()
    return check_finite_result(out, float(denoiser.scale))
