"""Peers side by side: blockcache's DiT in diffusers' DiTTransformer2DModel (both directions), the
compute that each run-time cache really spent, counted against hand-worked schedules, and the bench
rows that compare them with matched plans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install '.[bench]')")

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 6  # DDIM-6, linspace: timesteps 999, 799, 599, 400, 200, 0


def _random_diffusers_dit(depth=3, seed=0):
    """A diffusers DiT built directly from its class, random everywhere (its adaLN starts at zero)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    net = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                                num_layers=depth, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
        emb = net.transformer_blocks[0].norm1.emb  # diffusers keeps identical embedders in every block
        for block in net.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(emb.state_dict())
    return net.eval()


def test_converter_round_trips_blockcache_weights():
    from exporter.checkpoints import from_diffusers, to_diffusers

    model = tiny_model(depth=3)
    sd = model.state_dict()
    back = from_diffusers(to_diffusers(sd, 3))
    assert set(back) == set(sd)
    for key in sd:
        assert torch.equal(back[key], sd[key]), key


def test_diffusers_forward_on_converted_weights_matches_the_directly_built_model(tmp_path):
    """diffusers DiT → state dict → blockcache (the existing import) → diffusers again: the same forward."""
    from safetensors.torch import save_file

    from benchmarks.bench.diffusers_dit import diffusers_dit
    from exporter.models import load_model

    direct = _random_diffusers_dit()
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in direct.state_dict().items()}, str(path))
    model = load_model("dit-s2", checkpoint=str(path), depth=3, hidden_size=64, num_heads=4, input_size=8,
                       num_classes=10)
    converted = diffusers_dit(model)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([999, 500, 20, 0]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        want = direct(x, timestep=t, class_labels=y).sample
        got = converted(x, timestep=t, class_labels=y).sample
    # DiT's sin-cos table (made in float64) replaces diffusers' float32 one: rounding-level differences only
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), float((got - want).abs().max())


def test_models_diffusers_cannot_hold_are_refused():
    from exporter.checkpoints import diffusers_config
    from schedules.errors import BlockcacheError

    with pytest.raises(BlockcacheError, match="4x MLP"):
        diffusers_config({**tiny_model().config, "mlp_ratio": 2.0})


def _counted(spec_or_peer, depth=3, steps=STEPS, guidance=4.0):
    """(rows counted by ComputeCounter, latents) of one sampling call of a tiny model under a peer."""
    from benchmarks.bench.diffusers_dit import ComputeCounter, DiffusersLoop, diffusers_dit
    from benchmarks.bench.peers import install, parse_peer
    from schedules import Schedule
    from schedules.sampling import initial_noise

    peer = parse_peer(spec_or_peer) if isinstance(spec_or_peer, str) else spec_or_peer
    model = tiny_model(depth=depth)
    net = diffusers_dit(model, cache_mixin=peer.package == "diffusers")
    sampler = Schedule.full(model.unit_names, steps).make_sampler()
    loop = DiffusersLoop(net, model.config, sampler, guidance)
    labels = np.array([1, 7])
    install(peer, net, loop, initial_noise((2, 4, 8, 8), 1), labels, "default")
    loop.counter = ComputeCounter(net, model.unit_names, steps, 4 if guidance > 1 else 2)
    out = loop(initial_noise((2, 4, 8, 8), 0), labels)
    return loop.counter.rows.copy(), out


def _rows(attn, mlp, depth=3):
    """(steps, units) from per-step fractions of every block's attention and MLP (units interleaved)."""
    return np.stack([np.array([attn[s], mlp[s]] * depth, dtype=float) for s in range(len(attn))])


def test_full_compute_counts_every_unit():
    rows, _ = _counted("diffusers")
    np.testing.assert_array_equal(rows, np.ones((STEPS, 6)))


def test_first_block_cache_counts_the_head_block_only_when_it_skips():
    # threshold far above any change: step 0 computes all; every later step only the first block
    rows, _ = _counted("fbc:1e9")
    want = np.zeros((STEPS, 6))
    want[0] = 1
    want[1:, :2] = 1  # blocks.0.attn, blocks.0.mlp
    np.testing.assert_array_equal(rows, want)


def test_taylorseer_computes_its_warm_up_steps_and_every_interval():
    # diffusers' rule: step < disable_cache_before_step (3), or (step − 3 − 1) % interval == 0
    rows, _ = _counted("taylorseer:3:1")
    full = [1, 1, 1, 0, 1, 0]
    np.testing.assert_array_equal(rows, _rows(full, full))


def test_pyramid_attention_broadcast_skips_attention_inside_its_timestep_range():
    # PAB (100, 800), every 2nd call: timesteps 999, 799, 599, 400, 200, 0 → attention at calls 0, 2, 4 and at
    # t = 0 (outside the range); the MLP always runs
    rows, _ = _counted("pab")
    np.testing.assert_array_equal(rows, _rows([1, 0, 1, 0, 1, 1], [1] * 6))


def test_faster_cache_drops_the_unconditional_half_and_approximates_attention():
    # unconditional half skipped where −1 < t < 641 and call % 5 ≠ 0: calls 2, 3, 4 (t 599, 400, 200);
    # there attention runs on the conditional half at even calls (2, 4) and is approximated at call 3
    rows, _ = _counted("fastercache")
    np.testing.assert_array_equal(rows, _rows([1, 1, 0.5, 0, 0.5, 1], [1, 1, 0.5, 0.5, 0.5, 1]))


def test_dbcache_warm_up_then_front_blocks_only():
    pytest.importorskip("cache_dit", reason="cache-dit is not installed (pip install '.[bench]')")
    from benchmarks.bench.peers import Peer

    # F1B0 with a threshold nothing reaches: cache-dit's default 8 warm-up steps compute all, later steps
    # only block 0
    peer = Peer("dbcache-test", "cache-dit DBCache", "cache_dit", "dbcache", {"front": 1, "back": 0, "threshold": 1e9})
    rows, first = _counted(peer, steps=10)
    want = np.zeros((10, 6))
    want[:8] = 1
    want[8:, :2] = 1
    np.testing.assert_array_equal(rows, want)
    again, second = _counted(peer, steps=10)
    np.testing.assert_array_equal(again, want)
    np.testing.assert_array_equal(first, second)


def test_counted_macs_matches_the_cost_model_for_whole_units():
    from benchmarks.bench.peers import counted_macs
    from schedules import Schedule
    from schedules.cost import schedule_macs

    model = tiny_model(depth=3)
    schedule = Schedule.uniform(model.unit_names, STEPS, 3)
    assert counted_macs(model.config, schedule.compute.astype(float)) == schedule_macs(model.config, schedule)[1]


def test_a_missing_peer_package_is_skipped_in_one_line(monkeypatch):
    import importlib.util

    from benchmarks.bench import peers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cache_dit" else real(name, *a))
    reason = peers.missing_package(peers.parse_peer("dbcache:F1B0"))
    assert reason == "cache-dit is not installed (pip install '.[bench]')"
    assert peers.missing_package(peers.parse_peer("fbc:0.1")) is None


@pytest.mark.parametrize("spec", ["fbc", "fbc:-1", "taylorseer:3:3", "dbcache:F9B9", "magcache:nan", "nope"])
def test_unknown_peer_specs_are_refused(spec):
    from benchmarks.bench.peers import parse_peer
    from schedules.errors import BlockcacheError

    with pytest.raises(BlockcacheError, match="unknown peer"):
        parse_peer(spec)


def test_bench_runs_peers_and_matched_plans_side_by_side(tmp_path, monkeypatch):
    import importlib.util

    from benchmarks.bench import BenchConfig, run_benchmark

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cache_dit" else real(name, *a))
    cfg = BenchConfig(model="dit-s2", schedules=[], peers=["fbc:1e9", "taylorseer:3:1", "dbcache:F1B0"],
                      matched=["uniform", "block-caching", "first-block"], steps=STEPS, methods=["onnxruntime"], batch_size=2,
                      repeats=1, progress=False, fewer_steps=False)
    results = run_benchmark(cfg, model=tiny_model(depth=3))
    rows = {(r["method"], r["schedule"]): r for r in results["rows"]}
    assert rows[("diffusers", "full6")]["psnr_db"] == float("inf")  # diffusers' own full compute is the reference
    fbc = rows[("diffusers", "fbc1e+09")]
    assert fbc["compute_share"] == pytest.approx((6 + 5 * 2) / 36)
    assert fbc["computed_steps"] == "Fppppp"
    assert rows[("diffusers", "dbcache-F1B0")]["status"] == "skipped"
    assert "cache-dit is not installed" in rows[("diffusers", "dbcache-F1B0")]["reason"]
    # a matched plan exists for each peer, at least as cheap as the peer's counted compute
    for peer in ("fbc1e+09", "taylorseer3o1"):
        matched = [r for r in results["rows"] if peer in results["schedules"][r["schedule"]].get("matched_to", [])]
        assert matched, peer
        for r in matched:
            assert r["method"] == "onnxruntime" and r["status"] == "ok", r
            assert r["ideal_speedup"] >= rows[("diffusers", peer)]["ideal_speedup"] * (1 - 1e-9)
    assert results["summary"]["fp32"]["at_equal_fidelity"]
