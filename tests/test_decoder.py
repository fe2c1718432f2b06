"""Images, not latents: the autoencoder's decoder in the plan, checked against diffusers' AutoencoderKL
(a tiny random one built from its config, no hub), loaded from a diffusers folder and from latent
diffusion's single-file layout (written here by an independent key mapping)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import TINY_FLAGS, assert_one_line_error, run_cli, tiny_model, tiny_vae
from schedules import BlockcacheError, Schedule
from schedules.sampling import initial_noise

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install '.[bench]')")

pytestmark = pytest.mark.usefixtures("single_thread")

LABELS, SEEDS = [1, 2, 3], [4, 5, 6]


def _ldm_state(vae) -> dict:
    """diffusers' AutoencoderKL keys → latent diffusion's (`ldm/modules/diffusionmodules/model.py`): the
    mapping diffusers' converter inverts, written out here on its own."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}", k)
        k = re.sub(r"(decoder\.up\.\d+)\.resnets\.(\d+)", r"\1.block.\2", k)
        k = re.sub(r"(decoder\.up\.\d+)\.upsamplers\.0", r"\1.upsample", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m.group(1)) + 1}", k)
        k = k.replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
        for theirs, ours in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k = k.replace(f"mid_block.attentions.0.{theirs}", f"mid.attn_1.{ours}")
        if ".attn_1." in k and k.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # latent diffusion's attention projections are 1×1 convolutions
        out[k] = value.clone()
    return out


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    vae = tiny_vae()
    vae.save_pretrained(folder / "diffusers")
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in _ldm_state(vae).items()}},
               folder / "autoencoder_kl.pth")
    return vae, folder


def _diffusers_images(vae, latents, scaling_factor=0.18215):
    """AutoencoderKL.decode and diffusers' image processor's uint8 conversion: (float in [0, 1], uint8)."""
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(latents) / scaling_factor).sample
    unit = (decoded / 2 + 0.5).clamp(0, 1)
    return (decoded / 2 + 0.5).numpy(), (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_original_layout_loads_the_same_decoder_as_the_diffusers_folder(vae_files):
    from exporter.vae import load_vae

    _, folder = vae_files
    a, scale_a = load_vae(folder / "diffusers")
    b, scale_b = load_vae(folder / "autoencoder_kl.pth")
    assert scale_a == scale_b == 0.18215
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unsafe_or_foreign_autoencoder_files_are_refused_in_one_line(tmp_path, vae_files):
    from exporter.vae import load_vae

    (tmp_path / "x.txt").write_text("hi")
    torch.save({"decoder.conv_in.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    for path, message in ((tmp_path / "x.txt", "not an autoencoder file"), (tmp_path / "missing", "not found"),
                          (tmp_path / "partial.pth", "latent diffusion's layout"),
                          (tmp_path / "folder", "not an AutoencoderKL config")):
        with pytest.raises(BlockcacheError, match=message):
            load_vae(path)


def _export(tmp_path, vae_path, batch_size=2, **kw):
    from exporter.export import export_plan
    from exporter.vae import load_decoder

    model = tiny_model()
    schedule = Schedule.uniform(model.unit_names, 6, 2)
    path = str(tmp_path / "plan")
    export_plan(model, schedule, path, batch_size=batch_size, guidance_scale=4.0,
                decoder=load_decoder(vae_path), **kw)
    return model, schedule, path


def test_plan_images_equal_diffusers_decode(tmp_path, vae_files):
    """ONNX Runtime and torch plans: the decoded image within 1e-4 relative of AutoencoderKL.decode
    before quantisation, uint8 within one level; latents unchanged by the decoder."""
    import onnx
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    from exporter.reference import sample
    from runtime import Sampler
    from runtime.plan import load_plan

    vae, folder = vae_files
    model, schedule, path = _export(tmp_path, folder / "diffusers")
    noise = np.concatenate([initial_noise((1, 4, 8, 8), s) for s in SEEDS])
    latents = sample(model, schedule, LABELS, noise, guidance_scale=4.0)
    want_float, want = _diffusers_images(vae, latents)
    for backend in ("onnxruntime", "torch"):
        with Sampler(path, backend=backend) as sampler:
            images = sampler(LABELS, seeds=SEEDS)
            got_latents = sampler(LABELS, seeds=SEEDS, output="latents")
        assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 3)
        assert np.abs(images.astype(int) - want.astype(int)).max() <= 1, backend
        assert np.abs(got_latents - latents).max() <= 1e-5 * np.abs(latents).max(), backend
    assert len(np.unique(want)) > 50  # a varied image, not a flat one
    # before quantisation: the graph's own value feeding its clamp, exposed as an output
    plan = load_plan(path)
    graph = gs.import_onnx(onnx.load(plan.path(plan.program.decoder.file), load_external_data=False))
    clip = next(n for n in graph.nodes if n.op == "Clip")
    graph.outputs = [clip.inputs[0]]
    probe = tmp_path / "plan" / "probe.onnx"
    onnx.save(gs.export_onnx(graph), probe)
    x = np.concatenate([latents, latents[:1]])[:2]
    got_float = ort.InferenceSession(str(probe)).run(None, {"latents": x})[0]
    np.testing.assert_allclose(got_float, want_float[:2], rtol=1e-4, atol=1e-4 * np.abs(want_float).max())


def test_mismatched_latent_channels_are_refused_in_one_line(tmp_path):
    folder = tmp_path / "vae8"
    tiny_vae(latent_channels=8).save_pretrained(folder)
    Schedule.full(tiny_model().unit_names, 4).save(tmp_path / "s.yaml")
    r = run_cli("exporter.export_cli", "--model", "dit-s2", *TINY_FLAGS, "--random-init", "--schedule",
                tmp_path / "s.yaml", "--out", tmp_path / "plan", "--vae", folder)
    assert "8 latent channels" in assert_one_line_error(r.stderr) and r.returncode != 0
    assert not (tmp_path / "plan").exists()


def test_plans_without_a_decoder_yield_latents_and_refuse_images(tmp_path):
    from exporter.export import export_plan
    from runtime import Sampler

    model = tiny_model()
    export_plan(model, Schedule.full(model.unit_names, 2), str(tmp_path / "plan"), batch_size=1)
    with Sampler(str(tmp_path / "plan")) as sampler:
        assert sampler([1]).dtype == np.float32
        with pytest.raises(BlockcacheError, match="no decoder"):
            sampler([1], output="images")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["decoder_graph"]["output"].update(shape=[2, 8, 8, 3]), "not uint8"),
    (lambda d: d.pop("decoder_graph"), "every program needs its graph"),
    (lambda d: d["decoder"]["config"].update(latent_channels=8), "latent channels"),
])
def test_damaged_decoder_manifests_are_refused_in_one_line(tmp_path, vae_files, edit, message):
    from runtime.plan import load_plan
    from runtime.plan.manifest import manifest_seal

    _, _, path = _export(tmp_path, vae_files[1] / "diffusers")
    manifest = tmp_path / "plan" / "plan.json"
    doc = json.loads(manifest.read_text())
    edit(doc)
    doc["seal"] = manifest_seal(doc)
    manifest.write_text(json.dumps(doc))
    with pytest.raises(BlockcacheError, match=message):
        load_plan(path)


def test_sample_cli_writes_grids_pngs_and_arrays_eager_and_plan_alike(tmp_path, vae_files):
    _, folder = vae_files
    vae = folder / "autoencoder_kl.pth"
    schedule = tmp_path / "s.yaml"
    Schedule.uniform(tiny_model().unit_names, 6, 2).save(schedule)
    r = run_cli("exporter.export_cli", "--model", "dit-s2", *TINY_FLAGS, "--random-init", "--schedule", schedule,
                "--out", tmp_path / "plan", "--batch-size", "2", "--vae", vae, "--verify", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "decoder graphs against the PyTorch decoder" in r.stdout
    plan = ["--plan", tmp_path / "plan", "--labels", ",".join(map(str, LABELS)), "--seeds", ",".join(map(str, SEEDS))]
    for out, wrote in (("grid.png", "grid.png: 3 images"), ("images/", "3 PNGs in"), ("images.npy", "images.npy: 3 images")):
        r = run_cli("exporter.sample_cli", *plan, "--out", f"{tmp_path}/{out}")  # (a Path would drop the folder's slash)
        assert r.returncode == 0, r.stderr
        assert wrote in r.stderr.strip().splitlines()[-1]  # the report names what was written
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["0-1-4.png", "1-2-5.png", "2-3-6.png"]
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_cli("exporter.sample_cli", "--model", "dit-s2", *TINY_FLAGS, "--random-init", "--schedule", schedule,
                "--labels", "1,2,3", "--seeds", "4,5,6", "--vae", vae, "--guidance-scale", "4", "--out",
                tmp_path / "eager.npy", "--quiet")
    assert r.returncode == 0, r.stderr
    eager, planned = np.load(tmp_path / "eager.npy"), np.load(tmp_path / "images.npy")
    assert eager.dtype == planned.dtype == np.uint8
    assert np.abs(eager.astype(int) - planned.astype(int)).max() <= 1
    # a folder of PNGs needs images
    r = run_cli("exporter.sample_cli", "--model", "dit-s2", *TINY_FLAGS, "--random-init", "--steps", "2",
                "--labels", "1", "--out", f"{tmp_path}/latents/", "--quiet")
    assert "needs images" in assert_one_line_error(r.stderr)


def test_uvit_plan_yields_the_same_images_as_its_decoded_eager_latents(tmp_path, vae_files):
    """U-ViT (DPM-Solver-2, its own guidance form) decodes through the same decoder graph."""
    from exporter.export import export_plan
    from exporter.models import load_model
    from exporter.reference import sample
    from exporter.vae import load_decoder
    from runtime import Sampler

    vae, folder = vae_files
    model = load_model("uvit-h2", random_init=True, seed=1, depth=4, hidden_size=32, num_heads=2, input_size=8)
    schedule = Schedule.uniform(model.unit_names, 6, 2, sampler="dpm-solver-2")
    path = str(tmp_path / "plan")
    export_plan(model, schedule, path, batch_size=2, decoder=load_decoder(folder / "autoencoder_kl.pth"))
    noise = np.concatenate([initial_noise((1, 4, 8, 8), s) for s in SEEDS[:2]])
    _, want = _diffusers_images(vae, sample(model, schedule, LABELS[:2], noise, guidance_scale=0.4))
    with Sampler(path, backend="onnxruntime") as sampler:
        got = sampler(LABELS[:2], seeds=SEEDS[:2])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
