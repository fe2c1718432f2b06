"""PixArt plans end to end: prompts in, cached plans out.

Tiny random PixArt-α-1024-like (micro-conditions) and Σ-like configs; every plan's latents are
compared with the eager cached reference (`exporter.reference.sample`), which tests/test_pixart_model.py
and tests/test_pixart_sampling.py tie to diffusers. The prologue is proven used by an independent
count: the multiply-accumulates of every MatMul and Gemm in the plan's ONNX graphs, read off the graphs
with ONNX shape inference (not from blockcache's cost model), summed over the steps the manifest runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import cli_error, tiny_vae

from exporter.export import export_plan, export_plans
from exporter.models import load_model
from exporter.reference import sample
from runtime import Sampler
from runtime.nn.units import CachePolicy
from runtime.plan import load_plan, names
from runtime.plan.manifest import manifest_seal
from schedules import BlockcacheError, Schedule
from schedules.blockcaching import delta_schedule
from schedules.cost import prologue_macs
from schedules.prompts import PromptInputs

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(input_size=8, hidden_size=48, depth=2, num_heads=4, caption_channels=40, max_text_tokens=7)
STEPS = 8
RTOL = 1e-5


@pytest.fixture(scope="module")
def alpha():
    """α-1024-like: the resolution and aspect-ratio micro-conditions on."""
    return load_model("pixart-alpha-1024", random_init=True, seed=3, **TINY)


@pytest.fixture(scope="module")
def sigma():
    """Σ-like: a longer prompt (11 tokens), no micro-conditions."""
    return load_model("pixart-sigma-512", random_init=True, seed=4, **{**TINY, "max_text_tokens": 11})


def prompts_for(model, n: int, seed: int = 0) -> PromptInputs:
    """n random prompts of the model's shape with padded masks (1…L tokens), and a padded negative."""
    rng = np.random.default_rng(seed)
    length, width = model.config["max_text_tokens"], model.config["caption_channels"]
    tokens = rng.integers(1, length + 1, n)
    mask = (np.arange(length)[None] < tokens[:, None]).astype(np.int64)
    return PromptInputs(rng.standard_normal((n, length, width)).astype(np.float32), mask,
                        rng.standard_normal((1, length, width)).astype(np.float32),
                        (np.arange(length)[None] < 2).astype(np.int64))


def noise_for(model, n: int, seed: int = 1) -> np.ndarray:
    c, size = model.in_channels, model.config["input_size"]
    return np.random.default_rng(seed).standard_normal((n, c, size, size)).astype(np.float32)


def call(sampler, prompts: PromptInputs, **kwargs):
    return sampler(prompt_embeds=prompts.embeds, prompt_mask=prompts.mask, negative_embeds=prompts.negative_embeds,
                   negative_mask=prompts.negative_mask, **kwargs)


def rel_error(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def block_caching_schedule(model, prompts, noise) -> Schedule:
    """A Block Caching schedule made here from scratch: each unit's relative L1 change between
    consecutive evaluations of a full-compute run (the paper's measure), the δ rule, and random
    scale-shift vectors on some reused units."""
    full = Schedule.full(model.unit_names, STEPS, sampler="dpm-solver++-2m")
    outputs = {}

    class Recorder(CachePolicy):
        def __init__(self, s):
            super().__init__({})
            self.s = s

        def store(self, name, value):
            outputs[self.s, name] = value.double()

    from exporter.reference import Denoiser, encoded_prompt

    denoiser = Denoiser(model, full)
    with torch.no_grad():
        denoiser.run(torch.from_numpy(noise), encoded_prompt(denoiser.step, prompts), lambda s: Recorder(s))
    change = np.zeros((STEPS, len(model.unit_names)))
    for s in range(1, STEPS):
        for j, u in enumerate(model.unit_names):
            before, now = outputs[s - 1, u], outputs[s, u]
            change[s, j] = float((now - before).abs().mean() / before.abs().mean())
    schedule = delta_schedule(change, float(np.quantile(change[1:], 0.6)), model.unit_names, full.sampler)
    assert 0.2 < (~schedule.compute).mean() < 0.8, change  # a real mix of computed and reused units
    rng = np.random.default_rng(5)
    width = model.config["hidden_size"]
    reused = [(s, u) for s in range(STEPS) for j, u in enumerate(model.unit_names) if not schedule.compute[s, j]]
    return dataclasses.replace(schedule, scale_shift={key: (rng.normal(0, 0.05, width).astype(np.float32),
                                                            rng.normal(0, 0.05, width).astype(np.float32))
                                                      for key in reused[::2]})


@pytest.fixture(scope="module")
def plans(alpha, sigma, tmp_path_factory):
    """Plans of α (full with and without prologue at batch sizes 1 and 2, uniform, Block Caching) and Σ
    (uniform DDIM), with the latents the eager reference gives for the same prompts and noise."""
    root = tmp_path_factory.mktemp("pixart")
    prompts, noise = prompts_for(alpha, 3), noise_for(alpha, 3)
    schedules = {
        "full": Schedule.full(alpha.unit_names, STEPS, sampler="dpm-solver++-2m"),
        "uniform": Schedule.uniform(alpha.unit_names, STEPS, 3, sampler="dpm-solver++-2m"),
        "block-caching": block_caching_schedule(alpha, prompts, noise),
    }
    out = {}
    for name, schedule in schedules.items():
        folder = str(root / name)
        export_plans(alpha, [schedule], folder, batch_sizes=[1, 2] if name == "full" else [2])
        out[name] = (folder, schedule)
    export_plans(alpha, [schedules["full"]], str(root / "inline"), batch_sizes=[1, 2], prologue=False)
    out["inline"] = (str(root / "inline"), schedules["full"])
    sigma_schedule = Schedule.uniform(sigma.unit_names, STEPS, 2, sampler="ddim")
    export_plan(sigma, sigma_schedule, str(root / "sigma"), batch_size=2)
    out["sigma"] = (str(root / "sigma"), sigma_schedule)
    return out


@pytest.mark.parametrize("name", ["full", "uniform", "block-caching", "inline"])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_plan_equals_the_eager_reference(alpha, plans, name, backend):
    folder, schedule = plans[name]
    prompts, noise = prompts_for(alpha, 3), noise_for(alpha, 3)
    want = sample(alpha, schedule, None, noise, prompts=prompts)
    full = sample(alpha, plans["full"][1], None, noise, prompts=prompts)
    with Sampler(folder, backend=backend) as sampler:
        got = call(sampler, prompts, noise=noise)  # 3 prompts: batches of 2 + 1 (or 2 + 2 padded)
    assert got.shape == want.shape == (3, 4, 8, 8)
    assert rel_error(got, want) <= RTOL
    if name != "full" and name != "inline":  # the caching really changed the computation
        assert rel_error(want, full) > 10 * RTOL


def test_sigma_plan_with_ddim_and_longer_prompts(sigma, plans):
    folder, schedule = plans["sigma"]
    prompts, noise = prompts_for(sigma, 2, seed=7), noise_for(sigma, 2, seed=8)
    want = sample(sigma, schedule, None, noise, prompts=prompts)
    with Sampler(folder) as sampler:
        assert rel_error(call(sampler, prompts, noise=noise), want) <= RTOL


def graph_macs(path: str) -> int:
    """Multiply-accumulates of the MatMul and Gemm nodes of an ONNX graph, from ONNX shape inference."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a, b = shapes[node.input[0]], shapes[node.input[1]]
            assert a and b and all(a) and all(b), (node.name, a, b)  # static shapes everywhere
            if node.op_type == "Gemm":
                transposed = any(att.name == "transB" and att.i for att in node.attribute)
                n = b[0] if transposed else b[1]
                total += a[0] * a[1] * n
            else:
                batch = math.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))) if len(a) > 2 or len(b) > 2 else 1
                total += batch * a[-2] * a[-1] * b[-1]
    return total


def run_macs(folder: str, batch_size: int) -> tuple[int, int]:
    """(MACs of one call of the program of `batch_size`, of its prologue graph) counted in the graphs."""
    plan = load_plan(folder)
    program = next(p for p in plan.programs if p.batch_size == batch_size)
    per_variant = [graph_macs(plan.path(v.file)) for v in program.variants]
    prologue = graph_macs(plan.path(program.prologue.file)) if program.prologue else 0
    return sum(per_variant[s.variant] for s in program.steps) + prologue, prologue


def test_the_prologue_is_used_the_same_result_with_less_work(alpha, plans):
    """A plan without the prologue samples the same latents and does more MACs: the difference is the
    prologue's work done again in every step after the first, as counted in the graphs."""
    prompts, noise = prompts_for(alpha, 2), noise_for(alpha, 2)
    results = {}
    for name in ("full", "inline"):
        with Sampler(plans[name][0]) as sampler:
            results[name] = call(sampler, prompts, noise=noise)
    assert rel_error(results["full"], results["inline"]) <= RTOL
    hoisted, prologue = run_macs(plans["full"][0], 2)
    inline, none = run_macs(plans["inline"][0], 2)
    assert none == 0 and prologue > 0
    assert inline - hoisted == (STEPS - 1) * prologue
    rows = 2 * 2  # the batch of 2, doubled for guidance
    assert prologue == rows * prologue_macs(alpha.config)  # the cost model counts what the graph does
    plan = load_plan(plans["full"][0])
    for program in plan.programs:
        for variant in program.variants:  # no step graph holds the caption projection (T5 width → width)
            import onnx

            graph = onnx.load(plan.path(variant.file), load_external_data=False)
            projection = sorted((alpha.config["caption_channels"], alpha.config["hidden_size"]))
            assert not any(sorted(t.dims) == projection for t in graph.graph.initializer), variant.file
    macs = plan.document["programs"][1]["macs_per_image"]
    assert macs["prologue"] == prologue_macs(alpha.config)


def test_same_prompt_and_seed_same_bytes_whatever_the_batch(alpha, plans):
    """Per-image seeds: a (prompt, seed) gives the same bytes at any position of a batch of the same
    size, and close to it at another batch size."""
    prompts = prompts_for(alpha, 2)
    swapped = PromptInputs(prompts.embeds[::-1].copy(), prompts.mask[::-1].copy(), prompts.negative_embeds,
                           prompts.negative_mask)
    with Sampler(plans["full"][0], contexts=2) as sampler:
        pair = call(sampler, prompts, seeds=[11, 12])
        reverse = call(sampler, swapped, seeds=[12, 11])
        alone = call(sampler, PromptInputs(prompts.embeds[1:], prompts.mask[1:], prompts.negative_embeds,
                                           prompts.negative_mask), seeds=[12])
    assert np.array_equal(pair, reverse[::-1])
    assert rel_error(alone[0], pair[1]) <= RTOL  # batch 1 against batch 2: GEMM rounding only


def test_guidance_scale_one_needs_no_negative_prompt(alpha, plans):
    prompts, noise = prompts_for(alpha, 1), noise_for(alpha, 1)
    want = sample(alpha, plans["full"][1], None, noise, prompts=PromptInputs(prompts.embeds, prompts.mask),
                  guidance_scale=1.0)
    with Sampler(plans["full"][0]) as sampler:
        got = sampler(prompt_embeds=prompts.embeds, prompt_mask=prompts.mask, noise=noise, guidance_scale=1.0)
    assert rel_error(got, want) <= RTOL


@pytest.mark.parametrize("change, message", [
    (dict(prompt_embeds=np.zeros((1, 7, 16), np.float32)), "are 16 wide but"),
    (dict(prompt_embeds=np.zeros((1, 5, 40), np.float32), prompt_mask=np.ones((1, 5), np.int64)), "have 5 tokens"),
    (dict(prompt_mask=np.ones((1, 6), np.int64)), "mask has shape (1, 6)"),
    (dict(prompt_mask=np.zeros((1, 7), np.int64)), "row 0 of the mask has no token"),
    (dict(prompt_embeds=np.full((1, 7, 40), np.nan, np.float32)), "not finite"),
    (dict(negative_embeds=None, negative_mask=None), "guidance needs the negative prompt"),
    (dict(negative_embeds=np.zeros((2, 7, 40), np.float32), negative_mask=np.ones((2, 7), np.int64)),
     "negative_embeds must be one prompt"),
    (dict(class_labels=[1]), "text-to-image model: it takes prompt_embeds, not class labels"),
    (dict(prompt_embeds=None), "text-to-image model: give prompt_embeds"),
])
def test_bad_prompts_are_refused_in_one_line(plans, change, message):
    good = dict(prompt_embeds=np.zeros((1, 7, 40), np.float32), prompt_mask=np.ones((1, 7), np.int64),
                negative_embeds=np.zeros((1, 7, 40), np.float32), negative_mask=np.ones((1, 7), np.int64))
    with Sampler(plans["full"][0]) as sampler:
        with pytest.raises(BlockcacheError, match=None) as error:
            sampler(**{**good, **change}, seed=0)
        assert message in str(error.value) and "\n" not in str(error.value)
        with pytest.raises(BlockcacheError):
            sampler.check(**{**good, **change})
        assert sampler(**good, seed=0).shape == (1, 4, 8, 8)  # and the sampler still samples


def test_prompts_given_to_a_class_model_are_refused(tmp_path):
    model = load_model("dit-s2", random_init=True, input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=4)
    export_plan(model, Schedule.full(model.unit_names, 2), str(tmp_path / "dit"))
    with Sampler(str(tmp_path / "dit")) as sampler:
        with pytest.raises(BlockcacheError, match="class-conditional: it takes class labels, not prompt_embeds"):
            sampler([1], prompt_embeds=np.zeros((1, 7, 40), np.float32))
    with pytest.raises(BlockcacheError, match="class-conditional"):
        sample(model, Schedule.full(model.unit_names, 2), [1], noise_for(model, 1),
               prompts=PromptInputs(np.zeros((1, 7, 40), np.float32), np.ones((1, 7), np.int64)))


def reseal(folder: str, edit) -> None:
    path = os.path.join(folder, names.MANIFEST)
    with open(path) as f:
        doc = json.load(f)
    edit(doc)
    doc["seal"] = manifest_seal(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["programs"][0]["prologue_graph"]["outputs"]["prompt.bias"].update(shape=[2, 1, 1, 6]),
     "prologue_graph.outputs do not match the model config"),
    (lambda d: d["programs"][0]["prologue_graph"]["inputs"]["prompt_embeds"].update(dtype="float16"),
     "prologue_graph.inputs do not match"),
    (lambda d: d["programs"][0]["prologue_graph"].update(file="../x.onnx"), "prologue_graph.file"),
    (lambda d: d["programs"][0]["inputs"].pop("prompt.keys.1"), "inputs lack 'prompt.keys.1'"),
    (lambda d: d["programs"][0].pop("prologue_graph"), "have 'prompt.bias', which no"),
])
def test_a_damaged_prologue_entry_is_refused(plans, tmp_path, edit, message):
    import shutil

    folder = str(tmp_path / "plan")
    shutil.copytree(plans["full"][0], folder)
    reseal(folder, edit)
    with pytest.raises(BlockcacheError, match=None) as error:
        load_plan(folder)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_blockcache_serve_refuses_a_text_plan_before_starting_ray(plans, capsys):
    pytest.importorskip("ray")
    from serve.cli import main

    line = cli_error(main, [f"px={plans['full'][0]}"], capsys)
    assert "text-to-image plan" in line and "runtime.Sampler" in line


def test_a_text_plan_with_a_decoder_yields_the_images_diffusers_decodes(alpha, tmp_path):
    """Prompts in, images out: the plan's images equal diffusers' `AutoencoderKL.decode` of the eager
    latents with its image processor's uint8 rounding, within one level of 255. (The random model's
    latents are large: the autoencoder's scaling factor is set so that the images are not clipped.)"""
    from exporter.vae import load_decoder

    vae = tiny_vae()
    scaling = 500.0
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(tmp_path / "vae")
    schedule = Schedule.uniform(alpha.unit_names, STEPS, 2, sampler="dpm-solver++-2m")
    export_plan(alpha, schedule, str(tmp_path / "plan"), batch_size=2, decoder=load_decoder(str(tmp_path / "vae")))
    prompts, noise = prompts_for(alpha, 2), noise_for(alpha, 2)
    with Sampler(str(tmp_path / "plan")) as sampler:
        images = call(sampler, prompts, noise=noise)
    latents = sample(alpha, schedule, None, noise, prompts=prompts)
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(latents) / scaling).sample
    want = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert images.dtype == np.uint8 and images.shape == want.shape == (2, 16, 16, 3)
    assert np.abs(images.astype(int) - want.astype(int)).max() <= 1
    assert 0.05 < ((want > 0) & (want < 255)).mean() and want.std() > 5  # images, not saturation


def test_an_fp16_plan_stays_within_the_fp16_tolerance(alpha, tmp_path):
    """fp16 weights, caches, keys and values (norms, guidance and the update in fp32) against the fp32
    eager reference, on both backends: within verify's fp16 tolerance."""
    from exporter.verify import DEFAULT_TOLERANCE

    schedule = Schedule.uniform(alpha.unit_names, STEPS, 2, sampler="dpm-solver++-2m")
    export_plan(alpha, schedule, str(tmp_path / "fp16"), batch_size=2, precision="fp16")
    prompts, noise = prompts_for(alpha, 2), noise_for(alpha, 2)
    want = sample(alpha, schedule, None, noise, prompts=prompts)
    plan = load_plan(str(tmp_path / "fp16"))
    assert plan.programs[0].prologue.outputs["prompt.keys.0"].dtype == "float16"
    for backend in ("onnxruntime", "torch"):
        with Sampler(str(tmp_path / "fp16"), backend=backend) as sampler:
            error = rel_error(call(sampler, prompts, noise=noise), want)
        assert 0 < error <= DEFAULT_TOLERANCE["fp16"], backend  # rounded, and not by much


def write_embeddings(path, prompts: PromptInputs) -> str:
    """An embeddings file in blockcache-encode-prompts' layout (schedules/prompts.py)."""
    n, length = prompts.mask.shape
    np.savez(path, prompt_embeds=prompts.embeds, prompt_mask=prompts.mask, negative_embeds=prompts.negative_embeds,
             negative_mask=prompts.negative_mask, prompts=np.array([f"prompt {i}" for i in range(n)]),
             max_length=np.int64(length))
    return str(path)


def test_blockcache_sample_takes_prompt_embeddings(alpha, plans, tmp_path, capsys):
    """`blockcache-sample --plan P --prompt-embeds E.npz` writes what the Sampler gives for the file's
    prompts and seeds; labels are refused for the text plan in one line."""
    from exporter.sample_cli import main

    prompts = prompts_for(alpha, 3, seed=9)
    embeddings = write_embeddings(tmp_path / "e.npz", prompts)
    out = tmp_path / "x.npy"
    assert main(["--plan", plans["full"][0], "--prompt-embeds", embeddings, "--seeds", "4,5,6", "--out", str(out)]) == 0
    with Sampler(plans["full"][0]) as sampler:
        want = call(sampler, prompts, seeds=[4, 5, 6])
    assert np.array_equal(np.load(out), want)
    assert "3 latents" in capsys.readouterr().err
    assert "text-to-image model" in cli_error(main, ["--plan", plans["full"][0], "--labels", "1", "--out",
                                                     str(tmp_path / "y.npy")], capsys)
    assert "--seeds has 2 seeds for 3 prompts" in cli_error(
        main, ["--plan", plans["full"][0], "--prompt-embeds", embeddings, "--seeds", "1,2", "--out",
               str(tmp_path / "z.npy")], capsys)
