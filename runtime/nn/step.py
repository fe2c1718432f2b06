"""One model evaluation of a sampling loop, as every side of blockcache runs it.

`DenoisingStep.denoise` is classifier-free guidance (the doubled batch [x; x] with labels [y; null]),
the network under a unit policy, the guidance combination and the solver update folded to
`x_next = a·x + b·eps` (DDIM) or `a·x + b·eps + c·x_carry` (solvers with a carry: DPM-Solver-2's
intermediate evaluation carries the latent its solver step started from, DPM-Solver++ 2M the previous
evaluation's data prediction). With p and q it also returns the carry it hands on, `p·x + q·eps`
(DPM-Solver++ 2M's data prediction D = (x − σ·eps)/α). The eager reference, the torch backend,
`--verify` and the traced graphs all call it, so they compute the same thing by construction.
"""

from __future__ import annotations

import torch

from schedules.sampling import guided_eps

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

    def denoise(self, x, y, timestep, a, b, guidance_scale, policy=COMPUTE, c=None, x_carry=None, p=None, q=None):
        if (c is None) != (x_carry is None):  # a carry term needs both: never drop it silently
            raise ValueError("denoise takes the carry coefficient c and the carried latent x_carry together")
        channels = self.model.in_channels
        if self.guidance:
            x_in = torch.cat([x, x])
            y_in = torch.cat([y, torch.full_like(y, self.model.null_class)])
        else:
            x_in, y_in = x, y
        t = timestep.expand(x_in.shape[0])
        dtype = self.model.pos_embed.dtype
        eps = self.model(x_in.to(dtype), t, y_in, policy)[:, :channels].float()
        if self.guidance:
            n = x.shape[0]
            eps = guided_eps(eps[:n], eps[n:], guidance_scale, self.guidance_channels)
        x_next = a * x + b * eps if x_carry is None else a * x + b * eps + c * x_carry
        if p is None:
            return x_next
        return x_next, p * x + q * eps
