"""Reading model weights safely: official DiT `.pt` (plain or under "ema") and U-ViT `.pth`, diffusers
`DiTTransformer2DModel` state dicts, and safetensors. Pickles are read with `weights_only=True`
(plus `argparse.Namespace`, which DiT's and L2C's training checkpoints contain), so a file that would
run code is refused without running it.
"""

from __future__ import annotations

import os

import torch

from schedules.errors import BlockcacheError, one_line
from schedules.safeload import safe_torch_load


def read_tensors(path) -> dict:
    """The dict stored in `path` (safetensors or a torch pickle), tensors on the CPU."""
    path = os.fspath(path)
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise BlockcacheError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
    return safe_torch_load(path, "checkpoint")


def state_dict_from(obj, path="checkpoint") -> dict:
    """Unwrap the training-checkpoint layouts: {"ema": …} (DiT's own), {"model": …}, {"state_dict": …}."""
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BlockcacheError(f"{path}: no state dict of tensors found")
    if any(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("transformer_blocks.") for k in obj):
        obj = from_diffusers(obj)
    return obj


# diffusers `DiTTransformer2DModel` key prefixes → official DiT ones (DESIGN.md, "diffusers format").
_FROM_DIFFUSERS = {
    "pos_embed.proj.": "x_embedder.proj.",
    "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.": "y_embedder.embedding_table.",
    "proj_out_1.": "final_layer.adaLN_modulation.1.",
    "proj_out_2.": "final_layer.linear.",
}
_FROM_DIFFUSERS_BLOCK = {"norm1.linear.": "adaLN_modulation.1.", "attn1.to_out.0.": "attn.proj.",
                         "ff.net.0.proj.": "mlp.fc1.", "ff.net.2.": "mlp.fc2."}


def _renamed(key: str, table: dict) -> str | None:
    """`key` with its prefix replaced by the first matching entry of `table`, None if none matches."""
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return None


def from_diffusers(sd: dict) -> dict:
    """Map a diffusers `DiTTransformer2DModel` state dict onto the official DiT keys.

    diffusers keeps identical copies of the embedders in every block; block 0's are taken. Known
    numeric differences of diffusers' own model (time frequencies divided by half−1, MLP-norm eps 1e-5)
    are not reproduced: the weights run in the official architecture."""
    out = {}
    for key, value in sd.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
            continue
        renamed = _renamed(key, _FROM_DIFFUSERS)
        if renamed is not None:
            out[renamed] = value
            continue
        if not key.startswith("transformer_blocks."):
            out[key] = value  # reported as unexpected by the loader
            continue
        _, i, rest = key.split(".", 2)
        if rest.startswith("norm1.emb."):
            continue  # per-block copies of the embedders
        if rest.startswith(("attn1.to_q.", "attn1.to_k.", "attn1.to_v.")):
            continue  # joined below
        renamed = _renamed(rest, _FROM_DIFFUSERS_BLOCK)
        out[key if renamed is None else f"blocks.{i}.{renamed}"] = value
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in blocks:
        for suffix in ("weight", "bias"):
            parts = [sd.get(f"transformer_blocks.{i}.attn1.to_{n}.{suffix}") for n in "qkv"]
            if all(p is not None for p in parts):
                out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(parts, 0)
    return out


def diffusers_config(config: dict) -> dict:
    """The `DiTTransformer2DModel` config that holds a blockcache DiT `config` (its keyword arguments).

    diffusers' DiT block always has a 4x MLP and a class table of num_classes + 1 rows: other DiT
    configs have no diffusers form and are refused."""
    if config.get("family", "dit") != "dit":
        raise BlockcacheError(f"only DiT has a diffusers DiTTransformer2DModel form, not {config['family']}")
    if config["mlp_ratio"] != 4:
        raise BlockcacheError(f"diffusers' DiT block has a 4x MLP; this model's mlp_ratio is {config['mlp_ratio']:g}")
    d, heads = config["hidden_size"], config["num_heads"]
    return {"num_attention_heads": heads, "attention_head_dim": d // heads, "in_channels": config["in_channels"],
            "out_channels": config["in_channels"] * (2 if config["learn_sigma"] else 1),
            "num_layers": config["depth"], "sample_size": config["input_size"], "patch_size": config["patch_size"],
            "num_embeds_ada_norm": config["num_classes"], "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False, "activation_fn": "gelu-approximate", "attention_bias": True}


def to_diffusers(sd: dict, depth: int) -> dict:
    """The official DiT state dict `sd` in diffusers' `DiTTransformer2DModel` keys: the inverse of
    `from_diffusers`. The embedders are copied into every block (diffusers keeps one copy per block),
    and `attn.qkv` is split in three along dim 0."""
    renames = {value: key for key, value in _FROM_DIFFUSERS.items()}
    block_renames = {value: key for key, value in _FROM_DIFFUSERS_BLOCK.items()}
    out = {}
    for key, value in sd.items():
        if key == "pos_embed":
            out["pos_embed.pos_embed"] = value
            continue
        renamed = _renamed(key, renames)
        if renamed is not None and renamed.startswith("transformer_blocks.0."):  # the embedders, in every block
            for i in range(depth):
                out[f"transformer_blocks.{i}." + renamed.removeprefix("transformer_blocks.0.")] = value
            continue
        if renamed is not None:
            out[renamed] = value
            continue
        if not key.startswith("blocks."):
            raise BlockcacheError(f"{key} is not a DiT weight")
        _, i, rest = key.split(".", 2)
        if rest.startswith("attn.qkv."):
            for name, part in zip("qkv", value.chunk(3, 0)):
                out[f"transformer_blocks.{i}.attn1.to_{name}.{rest.removeprefix('attn.qkv.')}"] = part
            continue
        renamed = _renamed(rest, block_renames)
        if renamed is None:
            raise BlockcacheError(f"{key} is not a DiT weight")
        out[f"transformer_blocks.{i}.{renamed}"] = value
    return out


def load_state_dict(model: torch.nn.Module, path) -> None:
    """Load `path` into `model`, reporting missing, unexpected or mis-shaped keys in one line."""
    sd = state_dict_from(read_tensors(path), os.fspath(path))
    expected = model.state_dict()
    if "pos_embed" not in sd and not getattr(model, "learned_pos_embed", False):  # fixed sin-cos: some exports leave it out
        sd["pos_embed"] = expected["pos_embed"]
    for key, value in sd.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise BlockcacheError(f"{path}: {key} has shape {tuple(value.shape)} but the model expects "
                                  f"{tuple(expected[key].shape)} (wrong model or size options?)")
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise BlockcacheError(f"{path}: missing {missing[0]}" + (f" and {len(missing) - 1} more keys" if len(missing) > 1 else "")
                              + " (wrong model or depth?)")
    if unexpected:
        raise BlockcacheError(f"{path}: unexpected key {unexpected[0]}"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "") + " (wrong model?)")
    for key, value in sd.items():  # weights are cast to fp32 below: only floating-point, finite values
        if not value.is_floating_point():
            raise BlockcacheError(f"{path}: {key} is a {str(value.dtype).removeprefix('torch.')} tensor, not "
                                  "floating-point weights")
        if not torch.isfinite(value).all():
            raise BlockcacheError(f"{path}: {key} holds NaN or infinite values")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
