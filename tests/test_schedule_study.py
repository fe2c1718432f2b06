"""The schedule study's method names (reuse options on cached methods) and its per-budget summary."""

from __future__ import annotations

import pytest

from benchmarks.schedule_study import check_methods, markdown
from schedules import BlockcacheError


def test_methods_take_reuse_options_on_cached_methods_only():
    assert check_methods(["fewer-steps", "block-caching+f1", "uniform+span+f2", "learn-l2c+auto"])
    for bad in (["fewer-steps+f1"], ["block-caching+f3"], ["nope"], []):
        with pytest.raises(BlockcacheError, match="--methods"):
            check_methods(bad)


def test_summary_names_the_best_cached_schedule_per_budget():
    def row(method, target, psnr):
        return {"method": method, "steps": 20, "target": target, "ideal_speedup": target or 1.0, "psnr_db": psnr,
                "class_accuracy": 1.0, "digits_fd": 1.0, "source": method}

    results = {"date": "today", "samples": 100, "guidance_scale": 4.0, "rows": [
        row("full", None, float("inf")), row("fewer-steps", 2.0, 30.0), row("block-caching", 2.0, 28.0),
        row("block-caching+f1", 2.0, 33.5), row("fewer-steps", 3.0, 25.0), row("uniform", 3.0, 21.0)]}
    text = markdown(results)
    assert "| DDIM-20 | 2x | 30.0 | block-caching+f1 | 33.5 | +3.5 |" in text
    assert "| DDIM-20 | 3x | 25.0 | uniform | 21.0 | -4.0 |" in text
