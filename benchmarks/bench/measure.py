"""What every benchmark row shares: timing a runner's calls, and fidelity against a reference run."""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

from .memory import MemoryMonitor


class Skip(Exception):
    """A method that does not apply to this precision or machine (recorded, not an error)."""


def is_digits(model) -> bool:
    return getattr(model, "name", None) == "dit-digits" and model.in_channels == 1 and \
        model.config["input_size"] % 8 == 0


def fidelity(run: np.ndarray, ref: np.ndarray, digits: bool, labels) -> dict:
    run64, ref64 = run.astype(np.float64), ref.astype(np.float64)
    if digits:
        from benchmarks import digits_metric as dm

        out = {"psnr_db": dm.psnr(run, ref), "relative_error": dm.relative_error(run, ref)}
        out["class_accuracy"] = dm.class_accuracy(run, labels)
        out["digits_fd"] = dm.frechet_distance(run) if len(run) >= 2 else None
        return out
    mse = float(np.mean((run64 - ref64) ** 2))
    data_range = float(ref64.max() - ref64.min())
    psnr = float("inf") if mse == 0 else 10 * math.log10(data_range ** 2 / mse)
    rel = float(np.linalg.norm(run64 - ref64) / np.linalg.norm(ref64))
    return {"psnr_db": psnr, "relative_error": rel}


def time_calls(runner, noise, labels, warmup: int, repeats: int, monitor: MemoryMonitor):
    """(latents of the first call, its seconds, timed seconds); memory is watched during warm-up only
    (the timed calls repeat the same work, and a polling thread would disturb them)."""
    with monitor:
        start = time.perf_counter()
        output = runner(noise, labels)  # first (warm-up) call: its latents are the ones compared
        first = time.perf_counter() - start
        for _ in range(warmup - 1):
            runner(noise, labels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(noise, labels)
        times.append(time.perf_counter() - start)
    return output, first, times


def latency_summary(times) -> dict:
    """A row's `latency_s`: median, min, max, standard deviation and every timed call (seconds)."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "std": statistics.stdev(times) if len(times) > 1 else 0.0, "all": times}
