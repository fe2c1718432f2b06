"""One model evaluation of a sampling loop, as every side of blockcache runs it.

`DenoisingStep.denoise` is classifier-free guidance (the doubled batch [x; x] with labels [y; null]),
the network under a unit policy, the guidance combination and the solver update folded to
`x_next = a·x + b·eps` (DDIM) or `a·x + b·eps + c·x_carry` (solvers with a carry: DPM-Solver-2's
intermediate evaluation carries the latent its solver step started from, DPM-Solver++ 2M the previous
evaluation's data prediction). With p and q it also returns the carry it hands on, `p·x + q·eps`
(DPM-Solver++ 2M's data prediction D = (x − σ·eps)/α). The eager reference, the torch backend,
`--verify` and the traced graphs all call it, so they compute the same thing by construction.

Conditioning: class labels `y` (N,), doubled here as [y; null]; or, for a text-to-image model, the
network batch's encoded prompt (`encode_prompt`'s `Prompt`, made once per call by the prologue, its
rows already [cond; uncond] under guidance: schedules.prompts.PromptInputs.network doubles the
embeddings before they are encoded). The micro-conditions of PixArt-α 1024 are constants of the
plan's image size.
"""

from __future__ import annotations

import torch

from schedules.sampling import guided_eps
from schedules.zoo import takes_prompt

from .precision import model_dtype
from .units import COMPUTE


class DenoisingStep:
    """`denoise(x, y, timestep, a, b, guidance_scale, policy, c, x_carry) → x_next` for `model`; with
    `p` and `q` too, `→ (x_next, carry_next)`.

    `guidance`: run the doubled CFG batch; `guidance_channels`: the guidance form (schedules.sampling).
    fp16/bf16 models compute the network at their precision; the update, the carry and their inputs
    stay fp32."""

    def __init__(self, model, guidance: bool, guidance_channels: str = "first3"):
        self.model = model
        self.guidance = guidance
        self.guidance_channels = guidance_channels
        self.takes_prompt = takes_prompt(model.config)

    def encode(self, embeds, mask):
        """A text model's prompt work, once per call (the prologue): the network batch's prompt embeddings
        (float32) and mask (int64) to every block's keys and values and the mask's bias, at the model's dtype."""
        return self.model.encode_prompt(embeds.to(model_dtype(self.model)), mask)

    def network(self, x_in, t, y, policy):
        """The network on the (doubled) batch: labels [y; null], or the batch's encoded prompt."""
        if not self.takes_prompt:
            y_in = torch.cat([y, torch.full_like(y, self.model.null_class)]) if self.guidance else y
            return self.model(x_in, t, y_in, policy)
        if y.keys[0].shape[0] != x_in.shape[0]:  # a prompt of the undoubled batch would broadcast silently
            raise ValueError(f"the encoded prompt has {y.keys[0].shape[0]} rows for a network batch of {x_in.shape[0]}")
        return self.model(x_in, t, policy=policy, prompt=y, added_cond=self.model.micro_conditions(x_in.shape[0]))

    def denoise(self, x, y, timestep, a, b, guidance_scale, policy=COMPUTE, c=None, x_carry=None, p=None, q=None):
        if (c is None) != (x_carry is None):  # a carry term needs both: never drop it silently
            raise ValueError("denoise takes the carry coefficient c and the carried latent x_carry together")
        channels = self.model.in_channels
        x_in = torch.cat([x, x]) if self.guidance else x
        t = timestep.expand(x_in.shape[0])
        dtype = model_dtype(self.model)
        eps = self.network(x_in.to(dtype), t, y, policy)[:, :channels].float()
        if self.guidance:
            n = x.shape[0]
            eps = guided_eps(eps[:n], eps[n:], guidance_scale, self.guidance_channels)
        x_next = a * x + b * eps if x_carry is None else a * x + b * eps + c * x_carry
        if p is None:
            return x_next
        return x_next, p * x + q * eps
