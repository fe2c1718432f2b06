"""The peers' rows of a benchmark run, the blockcache schedules matched to them, and the summary that
compares the two at equal fidelity and at equal latency.

Every peer row runs diffusers' DiT on the benchmark model's weights (diffusers_dit.py) and is compared
with that loop's own full compute (eager fp32), as every blockcache row is compared with blockcache's:
the numeric differences between the two implementations cancel. A peer's ideal speedup and compute
share are what its first call really computed (ComputeCounter), not what its settings promise.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from schedules.cost import schedule_macs
from schedules.errors import one_line
from schedules.sampling import initial_noise
from schedules.schedule import Schedule

from .cases import group_name
from .config import PLAN_METHODS, BenchConfig
from .measure import Skip, fidelity, latency_summary, time_calls
from .memory import MemoryMonitor

PEER_METHOD = "diffusers"  # the rows' method column: diffusers' DiT runs them all
EXACT_DB = 100.0  # fp32 rounding differences between two runs of the same work stay above this


class CountedOnce:
    """A DiffusersLoop whose first call (the one compared) is counted by `counter`; the hooks are then
    removed, so that the timed calls carry no counting overhead."""

    def __init__(self, loop, counter):
        self.loop, self.counter = loop, counter
        loop.counter = counter

    def __call__(self, noise, labels):
        out = self.loop(noise, labels)
        if self.loop.counter is not None:
            self.counter.remove()
            self.loop.counter = None
        return out


def peer_sampler_schedule(cfg: BenchConfig, units) -> Schedule:
    return Schedule.full(units, cfg.steps, cfg.spacing)


def run_peers(cfg: BenchConfig, model, device: str, noise, labels, digits: bool, results: dict, progress=None):
    """Measure every peer of `cfg` at every precision into `results` (rows and schedules). Returns the
    fp32 (or first precision's) cached peer rows, whose ideal speedups the matched schedules meet."""
    import torch

    from runtime.nn.precision import exact_fp32, torch_dtype

    from .diffusers_dit import ComputeCounter, DiffusersLoop, diffusers_dit
    from .peers import counted_macs, install, missing_package, parse_peers

    units, config = model.unit_names, model.config
    full = peer_sampler_schedule(cfg, units)
    sampler, group = full.make_sampler(), group_name(full)
    full_macs = schedule_macs(config, full)[0]
    calibration = initial_noise(noise.shape, cfg.seed + 1)
    batch = len(labels) * 2 if cfg.guidance_scale > 1 else len(labels)

    reference = None
    try:
        base = diffusers_dit(model).to(device)
        with exact_fp32():
            reference = DiffusersLoop(base, config, sampler, cfg.guidance_scale, device)(noise, labels)
        del base
    except ImportError as e:
        results["notes"].append(f"peers skipped: {one_line(e)} (pip install '.[bench]')")
    matched_to = []
    for precision in cfg.precisions:
        for peer in parse_peers(cfg.peers):
            name = group if peer.kind == "full" else peer.name
            row = {"precision": precision, "method": PEER_METHOD, "label": peer.label, "schedule": name,
                   "role": peer.role, "status": "ok", "peer": peer.name}
            start = time.perf_counter()
            try:
                reason = missing_package(peer) if reference is not None else "diffusers is not installed"
                if reason:
                    raise Skip(reason)
                monitor = MemoryMonitor(device)
                with monitor:
                    net = diffusers_dit(model, cache_mixin=peer.package == "diffusers").to(device)
                    if precision != "fp32":
                        net = net.to(torch_dtype(precision))
                    loop = DiffusersLoop(net, config, sampler, cfg.guidance_scale, device)
                    install(peer, net, loop, calibration, labels, cfg.compile_mode)
                setup = time.perf_counter() - start
                counter = None if peer.kind == "compile" else ComputeCounter(net, units, len(loop.timesteps), batch)
                output, first, times = time_calls(CountedOnce(loop, counter), noise, labels, cfg.warmup, cfg.repeats, monitor)
                computed = np.ones_like(full.compute, dtype=np.float64) if counter is None else counter.rows.copy()
                macs = counted_macs(config, computed)
                row.update(monitor.report())
                row.update(setup_s=setup, first_call_s=first, compute_share=float(computed.mean()),
                           counted_ideal_speedup=full_macs / macs, computed_steps=_step_pattern(computed),
                           latency_s=latency_summary(times))
                row.update(fidelity(output, reference, digits, labels))
            except Skip as e:
                row.update(status="skipped", reason=str(e))
            except Exception as e:  # one failing peer must not lose the others
                row.update(status="error", reason=f"{type(e).__name__}: {one_line(e)[:300]}")
            finally:
                net = loop = None
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            row["elapsed_s"] = time.perf_counter() - start
            results["rows"].append(row)
            if name not in results["schedules"]:
                results["schedules"][name] = {
                    "role": peer.role, "compared_with": group, "steps": full.num_steps,
                    "spacing": full.sampler["spacing"], "source": f"{peer.label} {peer.params or ''}".strip(),
                    "macs_per_image": None, "ideal_speedup": None, "distinct_variants": None}
            if progress is not None:
                progress(row)
            if row["status"] == "ok" and peer.role == "cached" and precision == cfg.precisions[0]:
                matched_to.append(row)
    return matched_to


def _step_pattern(computed: np.ndarray) -> str:
    """One character per step: F every unit computed in full, - none, p part of them (or part of the batch)."""
    return "".join("F" if (r >= 1).all() else "-" if not r.any() else "p" for r in computed)


def matched_schedules(cfg: BenchConfig, model, peer_rows, labels) -> list[tuple[str, Schedule, list]]:
    """(case name, Schedule, the peers it matches) per maker and peer row, at the peer's counted ideal
    speedup; a schedule equal to an earlier one is not repeated (its entry lists every peer it matches)."""
    from .matched import MatchedMaker

    if not cfg.matched or not peer_rows:
        return []
    full = peer_sampler_schedule(cfg, model.unit_names)
    maker = MatchedMaker(model, full, cfg.guidance_scale, labels, cfg.matched)
    out, seen = [], {}
    for row in peer_rows:
        for kind, schedule in maker.schedules(row["counted_ideal_speedup"]):
            key = (schedule.compute.tobytes(), schedule.span.tobytes(), schedule.forecast)
            if schedule.compute.all():
                continue  # the peer saved (next to) nothing: full compute is measured anyway
            if key not in seen:
                short = {"block-caching": "bc", "first-block": "fbc-static", "magcache": "mag-static",
                         "teacache": "tea-static"}.get(kind, kind)
                seen[key] = (f"{short}~{row['peer']}", schedule, [])
                out.append(seen[key])
            seen[key][2].append(row["peer"])
    return out


def summary(results: dict) -> dict | None:
    """At each peer row's fidelity, the fastest peer and the fastest blockcache plan at least as
    faithful (ratio > 1: the plan is faster); at each peer row's latency, the best fidelity of each
    within it. Per precision; None without peer and plan rows."""
    out = {}
    for precision in dict.fromkeys(r["precision"] for r in results["rows"]):
        ok = [r for r in results["rows"] if r["status"] == "ok" and r["precision"] == precision]
        peers = [r for r in ok if r["method"] == PEER_METHOD]
        # caching plans and full-compute plans; fewer-steps runs are left out (any tool can take fewer steps)
        plans = [r for r in ok if r["method"] in PLAN_METHODS and r["role"] != "fewer-steps"]
        if not peers or not plans:
            continue
        lat = lambda r: r["latency_s"]["median"]  # noqa: E731

        def fastest(rows, psnr):
            return min((r for r in rows if _level(r["psnr_db"]) >= psnr), key=lat, default=None)

        def best(rows, latency):
            return max((r for r in rows if lat(r) <= latency), key=lambda r: r["psnr_db"], default=None)

        levels = []
        for psnr in sorted({_level(r["psnr_db"]) for r in peers if r["role"] == "cached"}):
            p, b = fastest(peers, psnr), fastest(plans, psnr)
            levels.append({"psnr_db": psnr, "peer": _who(p), "peer_latency_s": lat(p), "plan": _who(b),
                           "plan_latency_s": lat(b) if b else None,
                           "ratio": lat(p) / lat(b) if b else None})
        budgets = []
        for latency in sorted({lat(r) for r in peers if r["role"] == "cached"}):
            p, b = best(peers, latency), best(plans, latency)
            budgets.append({"latency_s": latency, "peer": _who(p), "peer_psnr_db": p["psnr_db"],
                            "plan": _who(b), "plan_psnr_db": b["psnr_db"] if b else None})
        ratios = [lv["ratio"] for lv in levels if lv["ratio"] is not None]
        out[precision] = {"at_equal_fidelity": levels, "at_equal_latency": budgets,
                          "ratio_median": statistics.median(ratios) if ratios else None,
                          "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None}
    return out or None


def _level(psnr: float) -> float:
    """PSNR as a fidelity level: anything past EXACT_DB is fp32 rounding, as good as exact."""
    return min(psnr, EXACT_DB)


def _who(row) -> str | None:
    if row is None:
        return None
    return f"{row['label']} {row['schedule']}"
