"""Reading model weights safely: official DiT `.pt` (plain or under "ema") and U-ViT `.pth`, diffusers
`DiTTransformer2DModel` state dicts, safetensors, and diffusers model folders (`transformer/` of a
pipeline: config.json and diffusion_pytorch_model.safetensors, or its shards with their index), whose
config.json must describe the zoo model being loaded. PixArt loads from safetensors only (its keys
are diffusers' own, runtime/nn/pixart.py); other pickles are read with `weights_only=True` (plus
`argparse.Namespace`, which DiT's and L2C's training checkpoints contain), so a file that would run
code is refused without running it.
"""

from __future__ import annotations

import json
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


def state_dict_from(obj, path="checkpoint", family: str = "dit") -> dict:
    """Unwrap the training-checkpoint layouts: {"ema": …} (DiT's own), {"model": …}, {"state_dict": …};
    a DiT's diffusers keys are mapped onto the official ones (PixArt's keys are diffusers' already)."""
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BlockcacheError(f"{path}: no state dict of tensors found")
    if any(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    if family == "dit" and any(k.startswith("transformer_blocks.") for k in obj):
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


def load_state_dict(model: torch.nn.Module, path, name: str | None = None) -> None:
    """Load `path` (a file or a diffusers model folder) into `model`, reporting a folder's config that
    is not `model`'s and missing, unexpected or mis-shaped keys in one line. `name`: the model's, for
    messages."""
    family = model.config.get("family", "dit")
    name = name or getattr(model, "name", None) or f"the {family} model"
    path = os.fspath(path)
    if os.path.isdir(path):
        tensors = read_diffusers_folder(path, model.config, name)
    else:
        if family == "pixart" and os.path.isfile(path) and not path.endswith(".safetensors"):
            raise BlockcacheError(f"{path}: {name} loads from a diffusers transformer folder or a .safetensors "
                                  "file only (never from a pickle)")
        tensors = read_tensors(path)
    sd = state_dict_from(tensors, path, family)
    expected = model.state_dict()
    # fixed sin-cos: some exports leave it out (PixArt's table is no weight at all)
    if "pos_embed" in expected and "pos_embed" not in sd and not getattr(model, "learned_pos_embed", False):
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


# diffusers' model folders (`save_pretrained`; a pipeline's `transformer/`): the weights are safetensors
# only, one file or shards listed by an index; the pickled `.bin` of older exports is refused.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = WEIGHTS_FILE + ".index.json"
MAX_JSON_BYTES = 16 << 20  # an index of a 28-block model is ~100 KiB
FOLDER_CLASSES = {"pixart": "PixArtTransformer2DModel", "dit": "DiTTransformer2DModel"}
# PixArtTransformer2DModel's constructor defaults (diffusers 0.42), for keys a config.json leaves out;
# use_additional_conditions and interpolation_scale None are resolved as its constructor resolves them.
PIXART_DEFAULTS = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                       cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2,
                       activation_fn="gelu-approximate", norm_type="ada_norm_single", norm_elementwise_affine=False,
                       norm_eps=1e-6, interpolation_scale=None, use_additional_conditions=None, caption_channels=None,
                       attention_type="default")


def _read_json(path: str, what: str) -> dict:
    """A JSON object from `path` (one value per key, at most MAX_JSON_BYTES); one-line errors."""
    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise BlockcacheError(f"{path}: key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
        return dict(items)

    try:
        if os.path.getsize(path) > MAX_JSON_BYTES:
            raise BlockcacheError(f"{path}: larger than a {what} ({MAX_JSON_BYTES >> 20} MiB)")
        with open(path, encoding="utf-8") as f:
            value = json.loads(f.read(), object_pairs_hook=pairs)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BlockcacheError(f"{path}: not a readable {what} ({one_line(e)[:160]})") from None
    if not isinstance(value, dict):
        raise BlockcacheError(f"{path}: a {what} is a JSON object, not a {type(value).__name__}")
    return value


def pixart_folder_config(found: dict) -> dict:
    """The blockcache PixArt config that a diffusers `PixArtTransformer2DModel` config.json describes,
    read as diffusers' constructor reads it; a setting blockcache's PixArt does not have raises
    ValueError(key, value, why)."""
    c = {**PIXART_DEFAULTS, **found}
    for key in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size", "patch_size",
                "caption_channels", "out_channels"):
        value = c[key]
        if (value is not None or key in ("caption_channels", "num_attention_heads")) and \
                (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(key, value, "a positive integer is expected" if value is not None
                             else "PixArt needs its T5 width")
    width = c["num_attention_heads"] * c["attention_head_dim"]
    fixed = dict(norm_type="ada_norm_single", cross_attention_dim=width, attention_bias=True,
                 activation_fn="gelu-approximate", norm_elementwise_affine=False, norm_eps=1e-6,
                 attention_type="default")
    for key, want in fixed.items():
        if c[key] != want:
            raise ValueError(key, c[key], f"blockcache's PixArt has {key} = {want!r}")
    out_channels = c["in_channels"] if c["out_channels"] is None else c["out_channels"]
    if out_channels not in (c["in_channels"], 2 * c["in_channels"]):
        raise ValueError("out_channels", out_channels, "it must be in_channels or, with learned sigma, twice that")
    size, extra, scale = c["sample_size"], c["use_additional_conditions"], c["interpolation_scale"]
    return dict(input_size=size, patch_size=c["patch_size"], in_channels=c["in_channels"], hidden_size=width,
                depth=c["num_layers"], num_heads=c["num_attention_heads"], learn_sigma=out_channels != c["in_channels"],
                caption_channels=c["caption_channels"],
                use_additional_conditions=(size == 128) if extra is None else extra,
                interpolation_scale=max(size // 64, 1) if scale is None else scale)


# blockcache config key → the diffusers config.json key that holds it (for messages)
_PIXART_KEYS = dict(input_size="sample_size", patch_size="patch_size", in_channels="in_channels",
                    hidden_size="num_attention_heads × attention_head_dim", depth="num_layers",
                    num_heads="num_attention_heads", learn_sigma="out_channels", caption_channels="caption_channels",
                    use_additional_conditions="use_additional_conditions",
                    interpolation_scale="interpolation_scale")


def check_folder_config(found: dict, config: dict, path: str, name: str) -> None:
    """Refuse, in one line naming the first differing value, a folder's config.json that does not
    describe the model `config` of zoo model `name` (e.g. a PixArt-Σ 1024 folder, without micro-
    conditions, for α 1024). The α and Σ configs at 512 px are the same: only their prompt lengths
    (no weight's shape) differ."""
    family = config.get("family", "dit")
    expected_class = FOLDER_CLASSES.get(family)
    if expected_class is None:
        raise BlockcacheError(f"{path}: {name} ({family}) has no diffusers folder form")
    found_class = found.get("_class_name", expected_class)
    if found_class != expected_class:
        raise BlockcacheError(f"{path}: holds a {found_class}, not the {expected_class} that {name} loads from")
    if family == "dit":  # the keys diffusers_config writes; a key the file leaves out is not checked
        for key, want in diffusers_config(config).items():
            if key in found and found[key] != want:
                raise BlockcacheError(f"{path}: {key} is {found[key]!r} but {name} has {want!r} (a folder of "
                                      "another model, or size options missing?)")
        return
    if config["mlp_ratio"] != 4:
        raise BlockcacheError(f"{name} has mlp_ratio {config['mlp_ratio']:g}; diffusers' PixArt block has a 4x MLP")
    try:
        described = pixart_folder_config(found)
    except ValueError as e:
        key, value, why = e.args
        raise BlockcacheError(f"{path}: {key} is {value!r}: {why}") from None
    for key, value in described.items():
        want = config[key]
        if value != want or isinstance(value, bool) != isinstance(want, bool):
            raw = {"hidden_size": value, "learn_sigma": found.get("out_channels", PIXART_DEFAULTS["out_channels"])}.get(
                key, found.get(_PIXART_KEYS[key], PIXART_DEFAULTS.get(_PIXART_KEYS[key])))
            shown = f"{raw!r}" + (f" (read as {value!r})" if key != "learn_sigma" and raw != value else "")
            raise BlockcacheError(f"{path}: {_PIXART_KEYS[key]} is {shown}, so it is not {name} ({key} "
                                  f"{want!r}; a folder of another model, or size options missing?)")


def read_diffusers_folder(folder: str, config: dict, name: str) -> dict:
    """The tensors of a diffusers model folder (a pipeline folder reads its `transformer/`), after its
    config.json is checked against `config`. Safetensors only: one file, or the shards its index lists
    (plain file names inside the folder), every listed key in its shard."""
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)) and os.path.isdir(os.path.join(folder, "transformer")):
        folder = os.path.join(folder, "transformer")  # a whole pipeline: model_index.json, transformer/, vae/, …
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise BlockcacheError(f"{folder}: no {CONFIG_FILE} (not a diffusers model folder)")
    check_folder_config(_read_json(config_path, "diffusers model config"), config, config_path, name)
    single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, WEIGHTS_INDEX)
    if os.path.isfile(single):
        return read_tensors(single)
    if not os.path.isfile(index):
        pickles = sorted(n for n in os.listdir(folder) if n.endswith(".bin"))
        raise BlockcacheError(f"{folder}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}" + (
            f" ({pickles[0]} is a pickle: blockcache reads safetensors only; save the model with "
            "safe_serialization=True)" if pickles else ""))
    weight_map = _read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise BlockcacheError(f"{index}: no weight_map of tensor names to shard files")
    shards = sorted(set(weight_map.values()))
    for shard in shards:  # confinement: the index names files of this folder, nothing else
        if os.path.basename(shard) != shard or shard in (".", "..") or not shard.endswith(".safetensors"):
            raise BlockcacheError(f"{index}: shard {shard!r} is not a .safetensors file name inside the folder")
    tensors = {}
    for shard in shards:
        if not os.path.isfile(os.path.join(folder, shard)):
            raise BlockcacheError(f"{index}: shard {shard} is missing from {folder}")
        part = read_tensors(os.path.join(folder, shard))
        listed = {k for k, v in weight_map.items() if v == shard}
        absent = sorted(listed - set(part))
        if absent:
            raise BlockcacheError(f"{os.path.join(folder, shard)}: has no {absent[0]}, which {WEIGHTS_INDEX} "
                                  "places there (truncated or mismatched shards?)")
        tensors.update(part)  # a key the index does not list is reported as unexpected by the loader
    return tensors
