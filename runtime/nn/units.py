"""The unit policy: how a network evaluates its cacheable units (docs/ARCHITECTURE.md, "Caching semantics").

A network calls `policy(name, compute)` once for every cacheable unit, in execution order; `compute()`
evaluates the unit's raw branch output (before any gate and residual add) and the policy returns the
value the network continues with. Any callable of that shape is a policy; `UnitPolicy` is the named
protocol with two hooks, and the classes here are the policies blockcache itself uses:

- `UnitPolicy()`: compute every unit (the official forward; what a network does without a policy).
- `CachePolicy`: blockcache's caching semantics for one model evaluation: reused units return their
  cached value, corrected by Block Caching's scale-shift where the schedule has one; computed units
  are stored for later evaluations; a skipped span of blocks adds its cached residual; a forecast
  read is a fixed linear combination of the value's history (schedules/forecast.py). The eager
  reference, the torch backend, `--verify` and the schedule makers all run through it (subclasses
  change only where a fresh value is kept).

Blocks: a network whose blocks form one chain runs each through `run_block(policy, name, x, run)`, so
that a policy with a `block` hook can replace a span of blocks by a residual; any other policy just
runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, MutableMapping

from schedules.schedule import history_key, span_key


def correct(value, scale, shift):
    """Block Caching's scale-shift of a reused value: v·(1 + scale) + shift, per channel (last axis).
    The exported graphs build the same expression (exporter/surgery.py)."""
    return value * (1 + scale) + shift


class UnitPolicy:
    """Compute every unit. Subclasses decide per unit through two hooks:

    - `reuse(name)`: the value to use *instead of* computing the unit, or None to compute it;
    - `computed(name, value)`: sees every freshly computed value and returns what the network uses.
    """

    def __call__(self, name: str, compute: Callable):
        cached = self.reuse(name)
        if cached is not None:
            return cached
        return self.computed(name, compute())

    def reuse(self, name: str):
        return None

    def computed(self, name: str, value):
        return value

    def block(self, name: str, x, run):
        """Block `name` on hidden state `x`: `run(x)` is the block's output."""
        return run(x)


COMPUTE = UnitPolicy()  # the policy of a network called without one


def run_block(policy, name: str, x, run):
    """`run(x)`, or what the policy's `block` hook makes of it (a plain callable policy has none)."""
    hook = getattr(policy, "block", None)
    return run(x) if hook is None else hook(name, x, run)


class CachePolicy(UnitPolicy):
    """One model evaluation under a caching schedule.

    `cache` maps unit names to cached values (read and updated in place); units in `reads` return
    `cache[name]`, corrected by `corrections[name]` = (scale, shift) where present; every other unit is
    computed, and those in `writes` (default: all computed units) are stored with `store`.

    `spans`: the (first block, last block) spans this evaluation skips: at `first` the hidden state
    becomes x + cache[span_key(first, last)] and the span's blocks do not run. `span_writes`: the spans
    whose residual (hidden state after `last` minus before `first`) this evaluation records.

    `forecasts`: {read name: weights w, newest first}: that read (a unit or a span's residual) is
    Σ_i w_i · cache[history_key(name, i)] instead of cache[name] (before any correction)."""

    def __init__(self, cache: MutableMapping, reads: Collection[str] = (), writes: Collection[str] | None = None,
                 corrections: Mapping | None = None, spans=(), span_writes=(), forecasts: Mapping | None = None):
        self.cache = cache
        self.forecasts = forecasts or {}
        self.reads = frozenset(reads)
        self.writes = None if writes is None else frozenset(writes)
        self.corrections = corrections or {}
        self.skips = {first: last for first, last in spans}
        self.records = {}  # last block → [first blocks of the spans ending there]
        for first, last in span_writes:
            self.records.setdefault(last, []).append(first)
        self.starts = {first for first, _ in span_writes}
        self._inside = None  # the last block of the span being skipped
        self._before = {}  # first block → hidden state before it, for the spans being recorded

    def reuse(self, name: str):
        if name not in self.reads:
            return None
        value = self.read(name)
        pair = self.corrections.get(name)
        return value if pair is None else correct(value, *pair)

    def read(self, name: str):
        """The cached value of a unit or span residual `name` (a forecast where `forecasts` has weights)."""
        weights = self.forecasts.get(name)
        if weights is None:
            return self.cache[name]
        value = weights[0] * self.cache[name]
        for i in range(1, len(weights)):  # left to right, as the graphs add (exporter/surgery.py)
            value = value + weights[i] * self.cache[history_key(name, i)]
        return value

    def computed(self, name: str, value):
        if self.writes is None or name in self.writes:
            self.store(name, value)
        return value

    def store(self, name: str, value) -> None:
        self.cache[name] = value

    def block(self, name: str, x, run):
        if self._inside is not None:  # a later block of a skipped span: its residual is already in x
            if name == self._inside:
                self._inside = None
            return x
        if name in self.skips:
            last = self.skips[name]
            self._inside = None if last == name else last
            return x + self.read(span_key(name, last))
        if name in self.starts:
            self._before[name] = x
        out = run(x)
        for first in self.records.get(name, ()):
            self.store(span_key(first, name), out - self._before[first])
        return out
