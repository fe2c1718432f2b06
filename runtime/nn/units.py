"""The unit policy: how a network evaluates its cacheable units (docs/ARCHITECTURE.md, "Caching semantics").

A network calls `policy(name, compute)` once for every cacheable unit, in execution order; `compute()`
evaluates the unit's raw branch output (before any gate and residual add) and the policy returns the
value the network continues with. Any callable of that shape is a policy; `UnitPolicy` is the named
protocol with two hooks, and the classes here are the policies blockcache itself uses:

- `UnitPolicy()`: compute every unit (the official forward; what a network does without a policy).
- `CachePolicy`: blockcache's caching semantics for one model evaluation: reused units return their
  cached value, corrected by Block Caching's scale-shift where the schedule has one; computed units
  are stored for later evaluations. The eager reference, the torch backend, `--verify` and the
  schedule makers all run through it (subclasses change only where a fresh value is kept).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, MutableMapping


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


COMPUTE = UnitPolicy()  # the policy of a network called without one


class CachePolicy(UnitPolicy):
    """One model evaluation under a caching schedule.

    `cache` maps unit names to cached values (read and updated in place); units in `reads` return
    `cache[name]`, corrected by `corrections[name]` = (scale, shift) where present; every other unit is
    computed, and those in `writes` (default: all computed units) are stored with `store`."""

    def __init__(self, cache: MutableMapping, reads: Collection[str] = (), writes: Collection[str] | None = None,
                 corrections: Mapping | None = None):
        self.cache = cache
        self.reads = frozenset(reads)
        self.writes = None if writes is None else frozenset(writes)
        self.corrections = corrections or {}

    def reuse(self, name: str):
        if name not in self.reads:
            return None
        value = self.cache[name]
        pair = self.corrections.get(name)
        return value if pair is None else correct(value, *pair)

    def computed(self, name: str, value):
        if self.writes is None or name in self.writes:
            self.store(name, value)
        return value

    def store(self, name: str, value) -> None:
        self.cache[name] = value
