"""The image decoder of a plan: an autoencoder's decoder (diffusers' `AutoencoderKL`) from latents to
uint8 RGB. What the exporter traces into a plan's decoder graph and what the torch backend runs."""

from __future__ import annotations

import json

import torch


class ImageDecoder(torch.nn.Module):
    """Latents divided by the scaling factor, decoded (`post_quant_conv`, then `decoder`: what
    `AutoencoderKL.decode` does), mapped from [-1, 1] to uint8 RGB as diffusers' image processor does
    ((x/2 + 0.5) clamped to [0, 1], ·255, rounded), channels last: (N, C, h, w) → (N, H, W, 3)."""

    def __init__(self, vae, scaling_factor: float):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder
        self.scaling_factor = float(scaling_factor)
        # as a manifest holds it (JSON: lists, not tuples)
        self.vae_config = json.loads(json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")}))
        self.latent_channels = int(vae.config.latent_channels)

    def decoded(self, latents):
        """The decoded image in [-1, 1] (N, 3, H, W), before quantisation."""
        return self.decoder(self.post_quant_conv(latents / self.scaling_factor))

    def forward(self, latents):
        image = (self.decoded(latents) / 2 + 0.5).clamp(0, 1) * 255
        return torch.round(image).to(torch.uint8).permute(0, 2, 3, 1)


def autoencoder_class():
    """diffusers' `AutoencoderKL`, or a one-line refusal where diffusers is not installed."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        from schedules.errors import BlockcacheError

        raise BlockcacheError("decoding images needs diffusers' AutoencoderKL: pip install diffusers") from None
    return AutoencoderKL


def autoencoder_from_config(config: dict):
    """diffusers' `AutoencoderKL` built from its config (weights uninitialised on the meta device)."""
    with torch.device("meta"):
        return autoencoder_class().from_config(config)
