"""The autoencoder whose latent space DiT and U-ViT sample in: diffusers' `AutoencoderKL`, loaded from a
diffusers folder or from the original latent-diffusion single file, without running pickled code.

    vae, scaling_factor = load_vae("sd-vae-ft-ema")            # config.json + diffusion_pytorch_model.safetensors
    vae, scaling_factor = load_vae("autoencoder_kl.pth")        # latent-diffusion keys (U-ViT's file)
    images = load_decoder("sd-vae-ft-ema")(latents)             # uint8 (N, H, W, 3): runtime/nn/decoder.py

Layouts:
- a diffusers folder: `config.json` (AutoencoderKL's) and `diffusion_pytorch_model.safetensors` (or
  the `.bin` pickle, read tensors-only);
- one file (`.safetensors`, `.ckpt`, `.pt`, `.pth`) in latent-diffusion's key layout (`encoder.down.0…`,
  `decoder.up.0…`, `post_quant_conv`, optionally under `first_stage_model.` or a `state_dict` entry), as
  the SD autoencoders and U-ViT's `autoencoder_kl.pth` are stored: converted by diffusers' own
  `convert_ldm_vae_checkpoint`, the architecture read from the tensor shapes (levels, widths, blocks
  per level, latent channels; 32 norm groups, as every latent-diffusion autoencoder has).

Scaling factor: the folder config's `scaling_factor`; a single file has none, and latent diffusion's
0.18215 (DiT's and U-ViT's, diffusers' `LDM_VAE_DEFAULT_SCALING_FACTOR`) is used.
"""

from __future__ import annotations

import json
import os
import re

from schedules.errors import BlockcacheError, one_line

SD_SCALING_FACTOR = 0.18215
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MAX_CONFIG_BYTES = 1 << 20


def load_vae(path):
    """(diffusers `AutoencoderKL` in eval mode, float32, the scaling factor) from `path`; one line otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise BlockcacheError(f"an autoencoder path is a folder or file path, not {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        vae, scale = _from_folder(path)
    elif os.path.isfile(path):
        if not path.endswith(SINGLE_FILE_SUFFIXES):
            raise BlockcacheError(f"{path}: not an autoencoder file (expected a diffusers folder or one of "
                                  f"{', '.join(SINGLE_FILE_SUFFIXES)})")
        vae, scale = _from_single_file(path), SD_SCALING_FACTOR
    else:
        raise BlockcacheError(f"autoencoder not found: {path}")
    return vae.float().eval().requires_grad_(False), scale


def _read_tensors(path: str) -> dict:
    """{name: tensor} from a safetensors file or a tensors-only torch pickle."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise BlockcacheError(f"{path}: not a readable safetensors file ({one_line(e)[:200]})") from None
    from schedules.safeload import safe_torch_load

    state = safe_torch_load(path, "autoencoder")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint, as latent diffusion saved them
    if not isinstance(state, dict):
        raise BlockcacheError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    import torch

    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}  # tensors only: the rest is metadata


def _from_folder(path: str):
    from runtime.nn.decoder import autoencoder_class

    AutoencoderKL = autoencoder_class()
    config_path = os.path.join(path, "config.json")
    try:
        if os.path.getsize(config_path) > MAX_CONFIG_BYTES:
            raise BlockcacheError(f"{config_path}: larger than a config file")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise BlockcacheError(f"{path}: no config.json (a diffusers AutoencoderKL folder has one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BlockcacheError(f"{config_path}: not a readable JSON config ({one_line(e)[:200]})") from None
    if not isinstance(config, dict) or config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise BlockcacheError(f"{config_path}: not an AutoencoderKL config")
    weights = next((os.path.join(path, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))), None)
    if weights is None:
        raise BlockcacheError(f"{path}: no {' or '.join(WEIGHT_FILES)}")
    try:
        vae = AutoencoderKL.from_config(config)
    except (TypeError, ValueError, KeyError) as e:
        raise BlockcacheError(f"{config_path}: not an AutoencoderKL config ({one_line(e)[:200]})") from None
    _load_strict(vae, _read_tensors(weights), weights)
    scale = config.get("scaling_factor", SD_SCALING_FACTOR)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < 1e3:
        raise BlockcacheError(f"{config_path}: scaling_factor {scale!r} is not a positive number")
    return vae, float(scale)


def _from_single_file(path: str):
    from runtime.nn.decoder import autoencoder_class

    AutoencoderKL = autoencoder_class()  # refuses in one line without diffusers
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS, convert_ldm_vae_checkpoint

    state = _read_tensors(path)
    prefix = next((p for p in LDM_VAE_KEYS if any(k.startswith(p) for k in state)), "")
    keys = {k[len(prefix):] for k in state if k.startswith(prefix)}
    if "post_quant_conv.weight" not in keys or not any(k.startswith("decoder.up.") for k in keys):
        raise BlockcacheError(f"{path}: not an autoencoder in latent diffusion's layout (no decoder.up.* and "
                              "post_quant_conv tensors)")
    config = _ldm_config(state, prefix, path)
    try:
        converted = convert_ldm_vae_checkpoint(state, config)
    except (KeyError, ValueError, RuntimeError) as e:
        raise BlockcacheError(f"{path}: cannot convert its latent-diffusion keys ({one_line(e)[:200]})") from None
    vae = AutoencoderKL.from_config(config)
    _load_strict(vae, converted, path)
    return vae


def _ldm_config(state: dict, prefix: str, path: str) -> dict:
    """AutoencoderKL's config for a latent-diffusion state dict, from its tensor shapes."""
    def shape(key):
        value = state.get(prefix + key)
        if value is None:
            raise BlockcacheError(f"{path}: lacks {key} (not a complete latent-diffusion autoencoder)")
        return tuple(value.shape)

    levels = sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"decoder\.up\.(\d+)\.", k))})
    if levels != list(range(len(levels))):
        raise BlockcacheError(f"{path}: decoder levels {levels} are not 0…{len(levels) - 1}")
    widths = [shape(f"decoder.up.{i}.block.0.conv2.weight")[0] for i in levels]
    blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"decoder\.up\.0\.block\.(\d+)\.", k))}
    latent = shape("post_quant_conv.weight")[0]
    return {"in_channels": shape("encoder.conv_in.weight")[1], "out_channels": shape("decoder.conv_out.weight")[0],
            "down_block_types": ["DownEncoderBlock2D"] * len(widths), "up_block_types": ["UpDecoderBlock2D"] * len(widths),
            "block_out_channels": widths, "layers_per_block": len(blocks) - 1, "latent_channels": latent,
            "norm_num_groups": 32, "scaling_factor": SD_SCALING_FACTOR}


def _load_strict(vae, state: dict, path: str) -> None:
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else one_line(e)
        raise BlockcacheError(f"{path}: weights do not fit AutoencoderKL ({first[:200]})") from None


def load_decoder(path):
    """The `ImageDecoder` (runtime/nn/decoder.py) of the autoencoder at `path` (`load_vae`)."""
    from runtime.nn.decoder import ImageDecoder

    return ImageDecoder(*load_vae(path))
