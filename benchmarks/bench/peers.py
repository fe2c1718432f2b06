"""The tools a user would pick instead of blockcache, as `blockcache-bench --peers` rows: diffusers' cache
hooks, cache-dit's DBCache and `torch.compile`, all on blockcache's own weights in diffusers'
`DiTTransformer2DModel` (diffusers_dit.py), each set up the way its documentation shows.

A peer spec names one setting: `diffusers` (full compute, always measured: the peers' reference),
`compile`, `fbc:T`, `taylorseer:INTERVAL:ORDER`, `magcache:T`, `pab`, `fastercache`, `dbcache:PRESET`
(`F8B0`, `F1B0`, ... as cache-dit's docs name them; see DBCACHE_PRESETS), or `all`
(PEER_DEFAULTS). A peer whose package is missing is skipped in one line.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
from dataclasses import dataclass, field

import numpy as np

from schedules.cost import fixed_macs, unit_costs
from schedules.errors import BlockcacheError

from .measure import Skip

PEER_DEFAULTS = ("compile", "fbc:0.05", "fbc:0.1", "fbc:0.2", "taylorseer:3:1", "taylorseer:3:2", "taylorseer:5:1",
                 "taylorseer:5:2", "magcache:0.06", "magcache:0.12", "magcache:0.24", "pab", "fastercache",
                 "dbcache:F8B0", "dbcache:F1B0", "dbcache:F1B0-R0.2", "dbcache:F8B8")
# cache-dit's named DBCache settings, F<n>B<m>: the first n and last m blocks always computed, the others
# reused while the residual change stays under the threshold (the values its docs pair with each name;
# F8B0 at 0.08 is its default). Warm-up and limits keep cache-dit's defaults.
DBCACHE_PRESETS = {"F8B0": (8, 0, 0.08), "F1B0": (1, 0, 0.08), "F1B0-R0.2": (1, 0, 0.20), "F8B8": (8, 8, 0.12),
                   "F12B12": (12, 12, 0.20)}
# PAB's documented example values (diffusers docs, CogVideoX).
PAB_BLOCK_SKIP, PAB_TIMESTEPS = 2, (100, 800)
MAGCACHE_CALIBRATION_SEED_OFFSET = 1  # calibrated on other noise than the measured run's


@dataclass
class Peer:
    name: str  # the row's schedule column, e.g. "fbc0.1"
    label: str  # the row's method label
    package: str  # the module it needs
    kind: str  # full | compile | fbc | taylorseer | magcache | pab | fastercache | dbcache
    params: dict = field(default_factory=dict)

    @property
    def role(self) -> str:
        return "full" if self.kind in ("full", "compile") else "cached"


def parse_peer(spec: str) -> Peer:
    kind, _, rest = spec.partition(":")
    args = rest.split(":") if rest else []
    try:
        if kind == "diffusers" and not args:
            return Peer("diffusers", "diffusers eager", "diffusers", "full")
        if kind == "compile" and not args:
            return Peer("compile", "diffusers + torch.compile", "diffusers", "compile")
        if kind == "fbc" and len(args) == 1:
            t = _positive(args[0])
            return Peer(f"fbc{t:g}", "diffusers + FirstBlockCache", "diffusers", "fbc", {"threshold": t})
        if kind == "taylorseer" and len(args) == 2:
            interval, order = int(args[0]), int(args[1])
            if interval < 1 or order not in (1, 2):
                raise ValueError
            return Peer(f"taylorseer{interval}o{order}", "diffusers + TaylorSeer", "diffusers", "taylorseer",
                        {"interval": interval, "order": order})
        if kind == "magcache" and len(args) == 1:
            t = _positive(args[0])
            return Peer(f"magcache{t:g}", "diffusers + MagCache", "diffusers", "magcache", {"threshold": t})
        if kind == "pab" and not args:
            return Peer("pab", "diffusers + PyramidAttentionBroadcast", "diffusers", "pab")
        if kind == "fastercache" and not args:
            return Peer("fastercache", "diffusers + FasterCache", "diffusers", "fastercache")
        if kind == "dbcache" and len(args) == 1 and args[0] in DBCACHE_PRESETS:
            front, back, threshold = DBCACHE_PRESETS[args[0]]
            return Peer(f"dbcache-{args[0]}", "cache-dit DBCache", "cache_dit", "dbcache",
                        {"front": front, "back": back, "threshold": threshold})
    except ValueError:
        pass
    raise BlockcacheError(f"unknown peer {spec!r} (expected diffusers, compile, fbc:T, taylorseer:INTERVAL:ORDER "
                          f"with order 1 or 2, magcache:T, pab, fastercache, dbcache:{'|'.join(DBCACHE_PRESETS)} "
                          "or all)")


def _positive(text: str) -> float:
    value = float(text)
    if not np.isfinite(value) or value <= 0:
        raise ValueError
    return value


def parse_peers(specs) -> list[Peer]:
    """The peers of `specs` (`all` expands to PEER_DEFAULTS), diffusers' full compute first and each once."""
    expanded = []
    for spec in specs:
        expanded += PEER_DEFAULTS if spec == "all" else [spec]
    peers = {"diffusers": parse_peer("diffusers")}
    for spec in expanded:
        peer = parse_peer(spec)
        peers.setdefault(peer.name, peer)
    return list(peers.values())


def missing_package(peer: Peer) -> str | None:
    """One line saying why `peer` cannot run here, or None."""
    for package in dict.fromkeys(["diffusers", peer.package]):
        if importlib.util.find_spec(package) is None:
            pip = {"cache_dit": "cache-dit"}.get(package, package)
            return f"{pip} is not installed (pip install '.[bench]')"
    return None


def counted_macs(config: dict, rows: np.ndarray) -> float:
    """MACs per image of a run whose unit j computed the fraction rows[s, j] of the batch at step s."""
    costs = np.array(unit_costs(config), dtype=np.float64)
    return float(fixed_macs(config) * len(rows) + (rows @ costs).sum())


# -- setting peers up ---------------------------------------------------------------------------------

def install(peer: Peer, net, loop, calibration_noise, labels, compile_mode: str):
    """Put `peer` on the diffusers DiT `net` run by `loop` (a DiffusersLoop), as its docs show."""
    import torch

    if peer.kind == "full":
        return
    if peer.kind == "compile":
        loop.transformer = torch.compile(net, mode=compile_mode)
        return
    if peer.kind == "dbcache":
        return _install_dbcache(peer, net, loop)
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                                 PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)

    timestep = lambda: loop.current_timestep  # noqa: E731 (the hooks' `current_timestep_callback`)
    if peer.kind == "fbc":
        config = FirstBlockCacheConfig(threshold=peer.params["threshold"])
    elif peer.kind == "taylorseer":
        # DiT's branches are `attn1` and `ff` of each block (the default patterns name other models' modules)
        config = TaylorSeerCacheConfig(cache_interval=peer.params["interval"], max_order=peer.params["order"],
                                       taylor_factors_dtype=torch.float32,
                                       cache_identifiers=[r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"])
    elif peer.kind == "magcache":
        config = MagCacheConfig(threshold=peer.params["threshold"], num_inference_steps=loop.num_steps,
                                mag_ratios=calibrate_magcache(net, loop, calibration_noise, labels))
    elif peer.kind == "pab":
        config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=PAB_BLOCK_SKIP,
                                                 spatial_attention_timestep_skip_range=PAB_TIMESTEPS,
                                                 current_timestep_callback=timestep)
    elif peer.kind == "fastercache":
        if not loop.guided:
            raise Skip("FasterCache approximates the unconditional branch: it needs guidance")
        # the documented example's values (diffusers docs, CogVideoX); DiT's outputs are (B, C, H, W) and its
        # conditioning input is `class_labels`, which the unconditional-branch skip must halve too
        config = FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            low_frequency_weight_update_timestep_range=(99, 641),
            high_frequency_weight_update_timestep_range=(-1, 301), spatial_attention_block_identifiers=["transformer_blocks"],
            attention_weight_callback=lambda _: 0.3, current_timestep_callback=timestep, tensor_format="BCHW",
            _unconditional_conditional_input_kwargs_identifiers=["hidden_states", "timestep", "class_labels"])
    else:  # pragma: no cover - parse_peer makes no other kinds
        raise AssertionError(peer.kind)
    net.enable_cache(config)


def calibrate_magcache(net, loop, noise, labels) -> list[float]:
    """MagCache's magnitude ratios for this model and sampler, from one calibration run (calibrate=True),
    read from what the hook prints for the user to copy (its documented way)."""
    from diffusers.hooks import MagCacheConfig

    net.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=loop.num_steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            loop(noise, labels)
    finally:
        net.disable_cache()
    text = printed.getvalue()
    start = text.rfind("[")
    ratios = ast.literal_eval(text[start:text.index("]", start) + 1]) if start >= 0 else None
    if not isinstance(ratios, list) or len(ratios) != loop.num_steps:
        raise RuntimeError(f"MagCache calibration printed no ratios for {loop.num_steps} steps")
    return [float(r) for r in ratios]


def _install_dbcache(peer: Peer, net, loop):
    """cache-dit's transformer-only interface (its CACHE_API docs): a BlockAdapter over DiT's blocks with
    cache-dit's own DiT forward patch. The doubled CFG batch is one call per step (no separate CFG)."""
    import cache_dit
    from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern
    from cache_dit.caching.patch_functors import DiTPatchFunctor

    front, back, threshold = peer.params["front"], peer.params["back"], peer.params["threshold"]
    depth = len(net.transformer_blocks)
    if front + back >= depth:
        raise Skip(f"DBCache F{front}B{back} always computes {front + back} blocks; this model has {depth}")
    cache_dit.enable_cache(
        BlockAdapter(transformer=net, blocks=net.transformer_blocks, forward_pattern=ForwardPattern.Pattern_3,
                     patch_functor=DiTPatchFunctor()),
        cache_config=DBCacheConfig(Fn_compute_blocks=front, Bn_compute_blocks=back, residual_diff_threshold=threshold,
                                   enable_separate_cfg=False, num_inference_steps=loop.num_steps))
    # cache-dit's own reset at the step count fires one call late (the first step of the next call still
    # sees the last call's cache): its refresh_context before every call is what makes calls independent
    loop.before_call = lambda: cache_dit.refresh_context(net, num_inference_steps=loop.num_steps)
