"""Checkpoint round trips in every supported layout, and refusal of bad or malicious files."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY, tiny_model
from exporter.checkpoints import load_state_dict, read_tensors
from exporter.models import load_model
from schedules.errors import BlockcacheError

pytestmark = pytest.mark.usefixtures("single_thread")

DEPTH = TINY["depth"]


def _inputs():
    g = torch.Generator().manual_seed(42)
    x = torch.randn(3, 4, 8, 8, generator=g)
    return x, torch.tensor([999, 421, 0]), torch.tensor([5, 1000, 17])


def _outputs(model):
    x, t, y = _inputs()
    with torch.no_grad():
        return model(x, t, y)


def _plain(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def to_diffusers(sd: dict, depth: int, with_pos_embed: bool = False) -> dict:
    """DiTTransformer2DModel keys, mapped here independently from the reference facts in
    docs/ARCHITECTURE.md (every tensor its own copy, as safetensors requires)."""
    c = lambda v: v.detach().clone().contiguous()  # noqa: E731
    out = {"pos_embed.proj.weight": c(sd["x_embedder.proj.weight"]),
           "pos_embed.proj.bias": c(sd["x_embedder.proj.bias"])}
    if with_pos_embed:
        out["pos_embed.pos_embed"] = c(sd["pos_embed"])
    for i in range(depth):
        b, o = f"transformer_blocks.{i}", f"blocks.{i}"
        emb = f"{b}.norm1.emb"
        for suffix in ("weight", "bias"):
            out[f"{emb}.timestep_embedder.linear_1.{suffix}"] = c(sd[f"t_embedder.mlp.0.{suffix}"])
            out[f"{emb}.timestep_embedder.linear_2.{suffix}"] = c(sd[f"t_embedder.mlp.2.{suffix}"])
            out[f"{b}.norm1.linear.{suffix}"] = c(sd[f"{o}.adaLN_modulation.1.{suffix}"])
            q, k, v = sd[f"{o}.attn.qkv.{suffix}"].chunk(3, dim=0)
            out[f"{b}.attn1.to_q.{suffix}"], out[f"{b}.attn1.to_k.{suffix}"], out[f"{b}.attn1.to_v.{suffix}"] = \
                c(q), c(k), c(v)
            out[f"{b}.attn1.to_out.0.{suffix}"] = c(sd[f"{o}.attn.proj.{suffix}"])
            out[f"{b}.ff.net.0.proj.{suffix}"] = c(sd[f"{o}.mlp.fc1.{suffix}"])
            out[f"{b}.ff.net.2.{suffix}"] = c(sd[f"{o}.mlp.fc2.{suffix}"])
        out[f"{emb}.class_embedder.embedding_table.weight"] = c(sd["y_embedder.embedding_table.weight"])
    for suffix in ("weight", "bias"):
        out[f"proj_out_1.{suffix}"] = c(sd[f"final_layer.adaLN_modulation.1.{suffix}"])
        out[f"proj_out_2.{suffix}"] = c(sd[f"final_layer.linear.{suffix}"])
    return out


@pytest.fixture(scope="module")
def source():
    return tiny_model(seed=11)


def _assert_same_model(loaded, source):
    assert not loaded.training
    src, got = source.state_dict(), loaded.state_dict()
    assert src.keys() == got.keys()
    for key in src:
        assert torch.equal(src[key], got[key]), key
    assert torch.equal(_outputs(loaded), _outputs(source))


def _write(layout: str, sd: dict, path):
    if layout == "pt-plain":
        torch.save(sd, path)
    elif layout == "pt-legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif layout == "pt-ema":
        torch.save({"ema": sd}, path)
    elif layout == "pt-training":
        decoy = {k: torch.zeros_like(v) for k, v in sd.items()}  # "model" must not be taken over "ema"
        torch.save({"model": decoy, "ema": sd,
                    "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "weight_decay": 0, "params": [0, 1]}]},
                    "args": argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000, epochs=1400)},
                   path)
    elif layout == "pt-ddp":
        torch.save({"module." + k: v for k, v in sd.items()}, path)
    elif layout == "safetensors":
        save_file(sd, str(path))
    else:
        raise AssertionError(layout)


LAYOUTS = {"pt-plain": "m.pt", "pt-legacy": "m.pt", "pt-ema": "ema.pt", "pt-training": "0400000.pt",
           "pt-ddp": "ddp.pt", "safetensors": "m.safetensors"}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_official_layouts_round_trip(layout, source, tmp_path):
    path = tmp_path / LAYOUTS[layout]
    _write(layout, _plain(source), path)
    loaded = load_model("dit-s2", path, **TINY)
    _assert_same_model(loaded, source)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("with_pos_embed", [False, True])
def test_diffusers_state_dict_round_trip(fmt, with_pos_embed, source, tmp_path):
    sd = to_diffusers(_plain(source), DEPTH, with_pos_embed)
    assert not any(k.startswith(("blocks.", "x_embedder", "final_layer")) for k in sd)
    path = tmp_path / f"diffusion_pytorch_model.{fmt}"
    if fmt == "bin":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    loaded = load_model("dit-s2", str(path), **TINY)
    _assert_same_model(loaded, source)


def test_loaded_model_differs_from_another_seed(source, tmp_path):
    """The round-trip checks are not vacuous: another model's weights give other outputs."""
    path = tmp_path / "other.pt"
    torch.save(_plain(tiny_model(seed=12)), path)
    assert not torch.allclose(_outputs(load_model("dit-s2", path, **TINY)), _outputs(source))


def test_load_state_dict_into_existing_model(source, tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_plain(source), str(path))
    target = tiny_model(seed=99)
    load_state_dict(target, path)
    _assert_same_model(target.eval(), source)


# ---------------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------------

def _error(path, **overrides) -> str:
    with pytest.raises(BlockcacheError) as e:
        load_model("dit-s2", path, **{**TINY, **overrides})
    message = str(e.value)
    assert "\n" not in message and message.strip() == message
    return message


@pytest.mark.parametrize("layout", ["pt-plain", "pt-legacy", "safetensors"])
def test_truncated_checkpoint(layout, source, tmp_path):
    path = tmp_path / LAYOUTS[layout]
    _write(layout, _plain(source), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert str(path) in _error(path)


def test_garbage_and_empty_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all" * 10)
    _error(junk)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _error(empty)
    _error(tmp_path)  # a folder, not a file


def test_missing_file(tmp_path):
    message = _error(tmp_path / "nope.pt")
    assert "nope.pt" in message and "not found" in message


class _Payload:
    """Unpickling this runs `exec`, which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's note about the raw pickle's protocol
@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_malicious_pickle_is_refused_without_running(container, source, tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {**_plain(source), "extra": _Payload(marker)}
    if container == "torch-zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    _error(path)
    with pytest.raises(BlockcacheError):
        read_tensors(path)
    assert not marker.exists(), "loading the checkpoint ran pickled code"
    # The payload is real: an unsafe load would have run it.
    if container == "torch-zip":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists()


def test_wrong_shape_names_the_key(source, tmp_path):
    sd = _plain(source)
    sd["blocks.1.mlp.fc1.bias"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    assert "blocks.1.mlp.fc1.bias" in _error(path)


def test_wrong_model_size_names_a_mismatched_key(tmp_path):
    path = tmp_path / "ten_classes.safetensors"
    save_file(_plain(tiny_model(num_classes=10)), str(path))
    assert "y_embedder.embedding_table.weight" in _error(path)


def test_missing_and_unexpected_keys(source, tmp_path):
    sd = _plain(source)
    del sd["blocks.1.attn.proj.weight"]
    path = tmp_path / "missing.pt"
    torch.save(sd, path)
    assert "blocks.1.attn.proj.weight" in _error(path)
    # A deeper checkpoint: blocks.2 is unexpected for a depth-2 model.
    path = tmp_path / "deeper.pt"
    torch.save(_plain(tiny_model(depth=3)), path)
    assert "blocks.2." in _error(path)
    # A shallower one: blocks.2 is missing for a depth-3 model.
    path2 = tmp_path / "shallow.pt"
    torch.save(_plain(source), path2)
    assert "blocks.2." in _error(path2, depth=3)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], path)
    assert "state dict" in _error(path)
    path = tmp_path / "mixed.pt"
    torch.save({"a": torch.zeros(1), "b": 3}, path)
    assert "state dict" in _error(path)
