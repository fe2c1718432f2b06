"""blockcache's DiT weights in diffusers' `DiTTransformer2DModel`, sampled by a diffusers-style loop, with
the block evaluations that actually ran counted: what the peer rows of `blockcache-bench` run.

The loop is DiTPipeline's (one transformer call per step on the doubled batch, guidance, DDIM update),
with three deliberate differences, so that a peer and a plan differ only in the network: the DDIM
tables and timesteps are blockcache's (DiT's own, which diffusers' `DDIMScheduler` with linspace spacing
does not reproduce), the null class is the model's (DiTPipeline hard-codes 1000, which `dit-digits`
does not have) and guidance uses the plans' form. The doubled batch is [uncond; cond], the order
FasterCache assumes. Where diffusers' DiT itself computes differently (timestep frequencies divided by
half − 1 instead of half, MLP-norm eps 1e-5 instead of 1e-6), each peer is compared with the full
compute of this same loop, so the differences cancel.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from exporter.checkpoints import diffusers_config, to_diffusers
from schedules.errors import BlockcacheError
from schedules.sampling import guidance_needed, guided_eps, model_timesteps
from schedules.zoo import family_of


def diffusers_dit(model, cache_mixin: bool = True):
    """A diffusers `DiTTransformer2DModel` holding `model`'s weights. With `cache_mixin`, of a subclass
    that adds diffusers' `CacheMixin`, as diffusers' own cached transformers have, so that its hooks'
    cache contexts and resets work the documented way (cache-dit wants diffusers' class itself)."""
    import torch
    from diffusers import DiTTransformer2DModel
    from diffusers.models.cache_utils import CacheMixin

    class CachedDiT(DiTTransformer2DModel, CacheMixin):
        pass

    net = (CachedDiT if cache_mixin else DiTTransformer2DModel)(**diffusers_config(model.config))
    state = to_diffusers({k: v.detach().float() for k, v in model.state_dict().items()}, model.config["depth"])
    # diffusers makes DiT's fixed sin-cos table itself, in float32 (a buffer outside its state dict, 2e-5 off
    # DiT's float64-made one): it must be that table, and the model's own copy replaces it
    pos_embed = state.pop("pos_embed.pos_embed")
    table = net.pos_embed.pos_embed
    if table.shape != pos_embed.shape or not torch.allclose(table, pos_embed, atol=1e-4):
        raise BlockcacheError("this model's position embedding is not DiT's fixed sin-cos table: diffusers' DiT "
                              "cannot hold it")
    table.copy_(pos_embed)
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


class ComputeCounter:
    """Counts, per sampling step and blockcache unit (`blocks.{i}.attn`, `blocks.{i}.mlp`), the fraction
    of the full network batch each unit really computed, by forward hooks on a projection inside each
    branch (`attn1.to_q`, `ff.net[2]`): a hook that skips a branch never reaches them, and one that drops
    the unconditional half of the batch (FasterCache) shows up as half a row."""

    def __init__(self, net, unit_names, num_steps: int, batch: int):
        self.units = list(unit_names)
        self.rows = np.zeros((num_steps, len(self.units)))
        self.batch, self.step = batch, 0
        self.handles = []
        for i, block in enumerate(net.transformer_blocks):
            for unit, module in ((f"blocks.{i}.attn", block.attn1.to_q), (f"blocks.{i}.mlp", block.ff.net[2])):
                self.handles.append(module.register_forward_hook(self._hook(self.units.index(unit))))

    def _hook(self, column: int):
        def record(module, args, output):
            self.rows[self.step, column] += args[0].shape[0] / self.batch
        return record

    def reset(self):
        self.rows[:] = 0
        self.step = 0

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class DiffusersLoop:
    """Sampling with the diffusers DiT `net`: `loop(noise, labels)` → final latents (numpy), the
    current original timestep in `current_timestep` for the hooks' timestep callbacks. `counter`
    (a ComputeCounter) follows the steps when given; `transformer` is what runs each step (the hooked
    or a compiled `net`)."""

    def __init__(self, net, config: dict, sampler, guidance_scale: float, device: str = "cpu",
                 transformer=None):
        import torch

        family = family_of(config)
        self.scale, self.channels = family.guidance_settings(guidance_scale)
        self.guided = guidance_needed(self.scale, self.channels)
        self.net, self.transformer = net, transformer if transformer is not None else net
        self.device, self.null = device, config["num_classes"]
        self.in_channels = config["in_channels"]
        self.timesteps = [int(t) for t in model_timesteps(sampler)]
        a, b = sampler.coefficients()
        self.a, self.b = [float(v) for v in a], [float(v) for v in b]
        self.current_timestep = None
        self.counter = None
        self.before_call = None  # what a tool needs done before each sampling call (cache-dit's refresh)
        self._torch = torch

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def __call__(self, noise: np.ndarray, labels: np.ndarray) -> np.ndarray:
        from diffusers.models.cache_utils import CacheMixin

        torch = self._torch
        x = torch.from_numpy(noise).to(self.device)
        y = torch.from_numpy(labels).to(self.device)
        if self.guided:
            y = torch.cat([torch.full_like(y, self.null), y])  # [uncond; cond]
        if isinstance(self.net, CacheMixin):
            self.net._reset_stateful_cache()  # what a diffusers pipeline does after each call
        if self.before_call is not None:
            self.before_call()
        if self.counter is not None:
            self.counter.reset()
        with torch.no_grad():
            for s, t in enumerate(self.timesteps):
                self.current_timestep = t
                if self.counter is not None:
                    self.counter.step = s
                x_in = torch.cat([x, x]) if self.guided else x
                t_in = torch.full((x_in.shape[0],), t, dtype=torch.int64, device=self.device)
                with self.net.cache_context("cond") if isinstance(self.net, CacheMixin) else nullcontext():
                    out = self.transformer(x_in, timestep=t_in, class_labels=y).sample
                eps = out[:, :self.in_channels]
                if self.guided:
                    uncond, cond = eps.chunk(2)
                    eps = guided_eps(cond, uncond, self.scale, self.channels)
                x = self.a[s] * x + self.b[s] * eps
        return x.cpu().numpy()
