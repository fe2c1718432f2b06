"""blockcache schedules matched to the peers' measured compute: for each peer setting's ideal speedup
(the MACs its run really spent), one schedule per maker reaching at least that speedup, made from the
model's own statistics on calibration inputs the measured run does not use.

Makers: `uniform` (all-or-nothing steps spread evenly), `block-caching` (Block Caching's δ rule on
`analyze` change statistics, the smallest δ that reaches the target), `l2c` (one router learned on
the model's trajectories, thresholded at the θ that reaches it), and the calibrated static versions of
the run-time caches (`first-block`, `magcache`, `teacache`: their rules frozen into span schedules on
the calibration inputs, exporter/makers/calibrate.py, at the smallest threshold that reaches it).

A maker's name may carry reuse options, `+span` (wholly reused blocks reuse their spans' residual),
`+f1` / `+f2` (TaylorSeer forecasts of that order) or `+auto` (the mode and order closest to full
compute on the calibration inputs, exporter/makers/choose.py): e.g. `block-caching+f1`,
`uniform+span+f2`. None of them changes the compute pattern, so the target is met alike.
"""

from __future__ import annotations

import numpy as np

from schedules.errors import BlockcacheError

MAKERS = ("uniform", "block-caching", "l2c", "first-block", "magcache", "teacache")
OPTIONS = ("span", "f1", "f2", "auto")
CALIBRATED = ("first-block", "magcache", "teacache")
CALIBRATION_SEEDS = (1, 2)  # the measured run's noise is seed cfg.seed (0 by default): not among these
L2C_LAMBDA = 1e-5


def check_makers(makers) -> None:
    """Refuse, in one line, a maker name that is not one of MAKERS with some of OPTIONS."""
    unknown = [m for m in makers if m.split("+")[0] not in MAKERS or not set(m.split("+")[1:]) <= set(OPTIONS)]
    if unknown:
        raise BlockcacheError(f"unknown matched maker {unknown[0]!r} (expected some of {', '.join(MAKERS)}, each "
                              f"optionally with +{', +'.join(OPTIONS)})")


class MatchedMaker:
    """Makes the matched schedules of one model and sampler (the statistics and the router are
    computed once, on first use)."""

    def __init__(self, model, full, guidance_scale: float, conditions, makers=MAKERS, seeds=CALIBRATION_SEEDS,
                 lam: float = L2C_LAMBDA):
        check_makers(makers)
        self.model, self.full, self.scale = model, full, guidance_scale
        self.conditions, self.makers, self.seeds = np.asarray(conditions), tuple(makers), tuple(seeds)
        self.lam = lam
        self._change = self._router = self._stack = None
        self._made = {}  # (maker, target) → its schedule
        self.seconds = {}  # what making the shared statistics took: "analyze", "learn-l2c", "stack"

    def schedules(self, target: float) -> list[tuple[str, object]]:
        """[(maker, Schedule)] reaching ideal speedup `target`; a maker that cannot is left out."""
        out = []
        for maker in self.makers:
            try:
                out.append((maker, self.make(maker, target)))
            except BlockcacheError:
                continue  # e.g. no all-or-nothing schedule is that fast
        return out

    def make(self, maker: str, target: float):
        """`maker`'s schedule at ideal speedup `target` or just above, with the maker's reuse options;
        BlockcacheError where it cannot."""
        base, *options = maker.split("+")
        if (base, target) not in self._made:  # a maker's options share its search
            self._made[base, target] = self._make(base, target)
        schedule = self._made[base, target]
        if "auto" in options:
            from exporter.makers.choose import choose_reuse

            return choose_reuse(self.model, schedule, self.conditions, self.seeds, self.scale)[0]
        order = 2 if "f2" in options else 1 if "f1" in options else None
        return schedule.with_reuse("span" if "span" in options else "unit", order) if options else schedule

    def _make(self, maker: str, target: float):
        from schedules.cost import search_speedup, spread_for_speedup

        units, config, name = self.model.unit_names, self.model.config, getattr(self.model, "name", None)
        n, spacing = self.full.num_steps, self.full.sampler["spacing"]
        if maker == "uniform":
            return spread_for_speedup(units, n, config, target, spacing, name)
        if maker in CALIBRATED:
            from exporter.makers.calibrate import search_threshold, stack_statistics

            if maker != "first-block" and self._stack is None:
                import time

                start = time.perf_counter()
                self._stack = stack_statistics(self.model, self.full, self.conditions, self.seeds, self.scale)
                self.seconds["stack"] = time.perf_counter() - start
            return search_threshold(self.model, self.full, maker, target, self.conditions, self.seeds,
                                    guidance_scale=self.scale, statistics=self._stack)
        if maker == "block-caching":
            from schedules.blockcaching import search_delta

            return search_delta(self._statistics(), config, units, self.full.sampler, target_speedup=target, model=name)
        from schedules.l2c import schedule_from_l2c

        logits = self._learned_router()
        return search_speedup(lambda theta: schedule_from_l2c(logits, units, n, threshold=theta, every_step=True,
                                                              spacing=spacing, model=name,
                                                              source=f"learn-l2c lambda={self.lam:g} threshold={theta:.6g}"),
                              1e-6, 1 - 1e-6, target, config, what="threshold")

    def _statistics(self):
        if self._change is None:
            import time

            from exporter.makers.analyze import measure_change

            start = time.perf_counter()
            self._change = measure_change(self.model, self.full, self.conditions, self.seeds,
                                          guidance_scale=self.scale)
            self.seconds["analyze"] = time.perf_counter() - start
        return self._change

    def _learned_router(self):
        if self._router is None:
            import time

            from exporter.makers.learn_l2c import learn_router, router_logits, trajectory_inputs

            start = time.perf_counter()
            xs, y = trajectory_inputs(self.model, self.full, self.conditions, self.seeds, self.scale)
            logits, _ = learn_router(self.model, self.full, xs, y, lam=self.lam, guidance_scale=self.scale)
            self._router = router_logits(logits)
            self.seconds["learn-l2c"] = time.perf_counter() - start
        return self._router
