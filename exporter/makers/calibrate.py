"""Run-time caches frozen into static schedules: `blockcache-schedule calibrate --method M --threshold T`.

Each method's own decision rule runs on the eager model over calibration inputs (one run per seed, the
labels as one batch, with the guidance the plan will use), exactly as its reference implementation
takes it at run time; the per-step decisions are recorded and frozen into a schedule of span reuse
(`s`, docs/ARCHITECTURE.md "Caching semantics"), which then compiles and replays without any run-time
decision. Runs are combined per step: with `any` (default) a step is computed if any run computed it,
with `most` if more than half did.

- `first-block`: FirstBlockCache (ParaAttention; diffusers `hooks/first_block_cache.py`). The first
  block always runs; its residual r = block₀(h) − h is compared with that of the last step that ran
  every block, δ = mean|r − r_prev| / mean|r_prev| over the whole batch; δ > T runs the other blocks
  (refreshing r_prev and the tail residual), otherwise blocks 1… are one span.
- `magcache`: MagCache (Zehong-Ma/MagCache; diffusers `hooks/mag_cache.py`). Per step, the magnitude
  ratio of the whole stack's residual to the previous step's (mean over tokens of ‖r_s‖ / ‖r_{s−1}‖,
  measured on full-compute calibration runs and averaged over them); after the first `retention` share
  of steps the ratios multiply into an accumulated ratio and |1 − ratio| into an error; a step is
  skipped (every block one span) while the error stays ≤ T and at most `max_skip` steps in a row are,
  otherwise it runs and the accumulators reset. Its decisions depend on the ratios alone.
- `teacache`: TeaCache (ali-vilab/TeaCache). The indicator is the relative L1 change of the first
  block's timestep-modulated input, modulate(norm1(h), shift, scale), between consecutive steps, mapped
  through a polynomial (TeaCache fits one per model; here degree 4, fitted on the calibration runs'
  full compute against the relative L1 change of the blocks' output) and accumulated; while the sum
  stays below T every block is one span (the whole stack's residual), otherwise all run and the sum
  resets. The first and last steps always run.
"""

from __future__ import annotations

import numpy as np
import torch

from runtime.nn.units import UnitPolicy
from schedules import BlockcacheError, Schedule
from schedules.sampling import check_labels, check_seeds

from ..reference import Denoiser, check_schedule, seeded_batch

METHODS = ("first-block", "magcache", "teacache")
AGGREGATES = ("any", "most")
MAGCACHE_MAX_SKIP, MAGCACHE_RETENTION = 3, 0.2  # diffusers' MagCacheConfig defaults
TEACACHE_DEGREE = 4


class _Run:
    """What a rule keeps across the steps of one calibration run."""

    def __init__(self):
        self.computed = []  # per step: did it run every block
        self.residual = self.head = self.tail = None
        self.accumulated = 0.0
        self.previous_input = None


class FirstBlockRule(UnitPolicy):
    """FirstBlockCache's rule for one evaluation of a run (`state` carries across evaluations)."""

    def __init__(self, state: _Run, threshold: float, blocks: list[str]):
        self.state, self.threshold = state, threshold
        self.first, self.second, self.last = blocks[0], blocks[1], blocks[-1]
        self.compute = True

    def block(self, name, x, run):
        st = self.state
        if name == self.first:
            out = run(x)
            r = out - x
            if st.residual is not None:
                delta = float((r - st.residual).abs().mean() / st.residual.abs().mean())
                self.compute = delta > self.threshold
            st.computed.append(self.compute)
            if self.compute:
                st.residual, st.head = r, out
            return out
        if not self.compute:
            return x + st.tail if name == self.second else x
        out = run(x)
        if name == self.last:
            st.tail = out - st.head
        return out


class _StackRecorder(UnitPolicy):
    """Full compute that records the stack's input and output (MagCache's ratios, TeaCache's fit)."""

    def __init__(self, blocks: list[str], model, conditioning):
        self.first, self.last, self.model, self.conditioning = blocks[0], blocks[-1], model, conditioning
        self.inputs, self.outputs, self.modulated = [], [], []

    def block(self, name, x, run):
        if name == self.first:
            self.inputs.append(x)
            self.modulated.append(_modulated_input(self.model, x, self.conditioning.c))
        out = run(x)
        if name == self.last:
            self.outputs.append(out)
        return out


class TeaCacheRule(UnitPolicy):
    """TeaCache's rule for one evaluation s of `steps` (`state` carries across evaluations)."""

    def __init__(self, state: _Run, threshold: float, blocks: list[str], model, conditioning, rescale, s: int,
                 steps: int):
        self.state, self.threshold, self.model, self.rescale = state, threshold, model, rescale
        self.conditioning = conditioning
        self.first, self.last = blocks[0], blocks[-1]
        self.s, self.steps = s, steps
        self.compute = True

    def block(self, name, x, run):
        st = self.state
        if name == self.first:
            modulated = _modulated_input(self.model, x, self.conditioning.c)
            if 0 < self.s < self.steps - 1:
                change = float((modulated - st.previous_input).abs().mean() / st.previous_input.abs().mean())
                st.accumulated += float(self.rescale(change))
                self.compute = st.accumulated >= self.threshold
            if self.compute:
                st.accumulated = 0.0
            st.previous_input = modulated
            st.computed.append(self.compute)
            if not self.compute:
                return x + st.tail
            st.head = x
        elif not self.compute:
            return x
        out = run(x)
        if name == self.last:
            st.tail = out - st.head
        return out


def _modulated_input(model, x, c):
    """modulate(norm1(x), shift_msa, scale_msa) of the first block under conditioning c."""
    block = model.blocks[0]
    shift, scale = block.adaLN_modulation(c).chunk(6, dim=1)[:2]
    return block.norm1(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _Conditioning:
    """`c` = t_embedder(t) + y_embedder(y) of the evaluation being run (DiT's block conditioning, which
    TeaCache's indicator needs before the first block runs), kept by forward hooks while in use."""

    def __init__(self, model):
        self.parts, self.handles, self.c = {}, [], None
        for name in ("t_embedder", "y_embedder"):
            self.handles.append(getattr(model, name).register_forward_hook(self._keep(name)))

    def _keep(self, name):
        def hook(module, args, output):
            self.parts[name] = output
            if len(self.parts) == 2:
                self.c = self.parts.pop("t_embedder") + self.parts.pop("y_embedder")
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def _check(model, full: Schedule, method: str, labels, seeds):
    from schedules.zoo import family_of

    if method not in METHODS:
        raise BlockcacheError(f"unknown calibration method {method!r} (expected one of {', '.join(METHODS)})")
    check_schedule(model, full)
    if not family_of(model.config).spans:
        raise BlockcacheError(f"{method} reuses a span of blocks, which a {family_of(model.config).name} model's "
                              "long skips do not allow (calibrate DiT models)")
    if len(model.blocks) < 2:
        raise BlockcacheError(f"{method} needs at least 2 blocks")
    seeds = check_seeds(seeds)
    return check_labels(labels, model.num_classes), seeds


def _blocks(schedule: Schedule) -> list[str]:
    return list(schedule.blocks())


@torch.no_grad()
def stack_statistics(model, full: Schedule, labels, seeds, guidance_scale=None, guidance_channels=None) -> dict:
    """Per seed run of full compute: the stack residual's magnitude ratios (MagCache) and the
    (modulated-input change, stack-output change) pairs of consecutive steps (TeaCache's fit)."""
    blocks = _blocks(full)
    ratios, pairs = [], []
    for seed in seeds:
        x, y = seeded_batch(model, labels, [seed])
        denoiser = Denoiser(model, full, guidance_scale, guidance_channels)
        with _Conditioning(model) as conditioning:
            recorder = _StackRecorder(blocks, model, conditioning)
            denoiser.run(x, y, lambda s: recorder)
        residuals = [o - i for i, o in zip(recorder.inputs, recorder.outputs)]
        run = [1.0]  # diffusers logs 1.0 for the first step
        for prev, cur in zip(residuals, residuals[1:]):
            run.append(float((torch.linalg.norm(cur.float(), dim=-1) / (torch.linalg.norm(prev.float(), dim=-1)
                                                                          + 1e-8)).mean()))
        ratios.append(run)
        for s in range(1, len(residuals)):
            m0, m1 = recorder.modulated[s - 1], recorder.modulated[s]
            o0, o1 = recorder.outputs[s - 1], recorder.outputs[s]
            pairs.append((float((m1 - m0).abs().mean() / m0.abs().mean()), float((o1 - o0).abs().mean() / o0.abs().mean())))
    return {"mag_ratios": np.mean(ratios, axis=0), "teacache_pairs": np.array(pairs)}


def magcache_decisions(ratios, threshold: float, max_skip: int = MAGCACHE_MAX_SKIP,
                       retention: float = MAGCACHE_RETENTION) -> list[bool]:
    """MagCache's per-step compute decisions for magnitude ratios `ratios` (one per step)."""
    steps = len(ratios)
    retention_step = int(retention * steps + 0.5)
    out, accumulated_ratio, accumulated_steps, accumulated_err = [], 1.0, 0, 0.0
    for s, ratio in enumerate(ratios):
        compute = True
        if s >= retention_step:
            accumulated_ratio *= float(ratio)
            accumulated_steps += 1
            accumulated_err += abs(1.0 - accumulated_ratio)
            if s > 0 and accumulated_err <= threshold and accumulated_steps <= max_skip:
                compute = False
            else:
                accumulated_ratio, accumulated_steps, accumulated_err = 1.0, 0, 0.0
        out.append(compute)
    return out


@torch.no_grad()
def _rule_runs(model, full, method, threshold, labels, seeds, guidance_scale, guidance_channels, rescale=None):
    blocks = _blocks(full)
    runs = []
    for seed in seeds:
        x, y = seeded_batch(model, labels, [seed])
        state = _Run()
        denoiser = Denoiser(model, full, guidance_scale, guidance_channels)
        n = len(denoiser)
        if method == "first-block":
            policy = lambda s: FirstBlockRule(state, threshold, blocks)  # noqa: E731
            denoiser.run(x, y, policy)
        else:
            with _Conditioning(model) as conditioning:
                denoiser.run(x, y, lambda s: TeaCacheRule(state, threshold, blocks, model, conditioning, rescale, s, n))
        runs.append(state.computed)
    return runs


def calibrated_schedule(model, full: Schedule, method: str, threshold: float, labels, seeds, *,
                        guidance_scale: float | None = None, guidance_channels: str | None = None,
                        aggregate: str = "any", statistics: dict | None = None) -> tuple[Schedule, list]:
    """(the frozen span schedule, each calibration run's per-step decisions) of `method` at
    `threshold` on `full`'s sampler. `statistics` (from `stack_statistics`) is reused where given."""
    labels, seeds = _check(model, full, method, labels, seeds)
    if aggregate not in AGGREGATES:
        raise BlockcacheError(f"unknown aggregation {aggregate!r} (expected {' or '.join(AGGREGATES)})")
    if not np.isfinite(threshold) or threshold < 0:
        raise BlockcacheError(f"threshold must be a finite non-negative number, got {threshold}")
    if method != "first-block" and statistics is None:
        statistics = stack_statistics(model, full, labels, seeds, guidance_scale, guidance_channels)
    if method == "magcache":
        runs = [magcache_decisions(statistics["mag_ratios"], threshold)]
    else:
        rescale = None
        if method == "teacache":
            pairs = statistics["teacache_pairs"]
            rescale = np.poly1d(np.polyfit(pairs[:, 0], pairs[:, 1], min(TEACACHE_DEGREE, len(pairs) - 1)))
        runs = _rule_runs(model, full, method, threshold, labels, seeds, guidance_scale, guidance_channels, rescale)
    votes = np.mean(np.array(runs, dtype=float), axis=0)
    computed = votes > 0 if aggregate == "any" else votes > 0.5
    computed[0] = True
    return freeze(full, method, computed, f"calibrate {method} threshold={threshold:g} aggregate={aggregate} "
                  f"seeds={','.join(map(str, seeds))}"), runs


def freeze(full: Schedule, method: str, computed, source: str) -> Schedule:
    """The span schedule that runs every block at the steps in `computed` and, at the others, skips
    blocks 1… (first-block) or every block (magcache, teacache) as one span."""
    compute = np.ones_like(full.compute)
    span = np.zeros_like(full.compute)
    first_block = full.blocks()[_blocks(full)[0]]
    for s, c in enumerate(computed):
        if c:
            continue
        compute[s] = False
        span[s] = True
        if method == "first-block":
            compute[s, first_block] = True
            span[s, first_block] = False
    return Schedule(full.unit_names, compute, full.sampler, full.model, source=source, span=span)


def search_threshold(model, full: Schedule, method: str, target_speedup: float, labels, seeds, **options):
    """The smallest threshold whose frozen schedule reaches `target_speedup` (ideal, MACs), by
    bisection over [0, high] with high grown until it reaches it."""
    from schedules.cost import ideal_speedup, search_speedup

    labels, seeds = _check(model, full, method, labels, seeds)
    if method != "first-block" and options.get("statistics") is None:
        options["statistics"] = stack_statistics(model, full, labels, seeds, options.get("guidance_scale"),
                                                 options.get("guidance_channels"))
    cache = {}

    def make(threshold):
        if threshold not in cache:
            cache[threshold] = calibrated_schedule(model, full, method, threshold, labels, seeds, **options)[0]
        return cache[threshold]

    high = 1.0
    while ideal_speedup(model.config, make(high)) < target_speedup and high < 1e6:
        high *= 4
    return search_speedup(make, 0.0, high, target_speedup, model.config, what="threshold", iterations=24)
