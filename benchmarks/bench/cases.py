"""The cases a benchmark run measures: each cached schedule, its sampler's full-compute run and an
equal-MACs fewer-steps DDIM run, from schedule specs (`l2c20`, `uniform:K`, a YAML file, a router file)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from schedules.errors import BlockcacheError
from schedules.schedule import Schedule

from .config import ROOT, BenchConfig

PRESETS = {"l2c20": os.path.join(ROOT, "schedules", "presets", "dit-xl2-l2c-ddim20.yaml"),
           "l2c50": os.path.join(ROOT, "schedules", "presets", "dit-xl2-l2c-ddim50.yaml")}


@dataclass
class Case:
    name: str
    schedule: Schedule
    role: str  # full | cached | fewer-steps
    group: str  # the full-compute case whose latency and latents this case is compared with


def resolve_schedule(spec: str, units, steps: int, spacing: str) -> tuple[str, Schedule]:
    """(case name, Schedule) for a schedule spec (see the module docstring)."""
    if spec in PRESETS:
        schedule = Schedule.load(PRESETS[spec])
        schedule.check_units(units, "the benchmark model (the L2C presets need 28 blocks)")
        return spec, schedule
    if spec.startswith("uniform:"):
        try:
            interval = int(spec.split(":", 1)[1])
        except ValueError:
            raise BlockcacheError(f"schedule {spec!r}: uniform:K needs an integer K") from None
        return f"uniform{interval}@{steps}", Schedule.uniform(units, steps, interval, spacing)
    if spec in ("full",) or spec.startswith("full:"):
        raise BlockcacheError("full compute is always measured; give cached schedules only")
    if spec.endswith((".pt", ".pth")):
        from schedules.l2c import import_l2c, read_router_logits

        n = len(read_router_logits(spec))
        name = os.path.splitext(os.path.basename(spec))[0]
        return name, import_l2c(spec, units, n, spacing=spacing)
    if spec.endswith((".yaml", ".yml")):
        schedule = Schedule.load(spec)
        schedule.check_units(units, "the benchmark model")
        return os.path.splitext(os.path.basename(spec))[0], schedule
    raise BlockcacheError(f"unknown schedule {spec!r} (expected l2c20, l2c50, uniform:K, a .yaml file or an "
                          "L2C router .pt)")


def group_name(schedule: Schedule) -> str:
    """The name of the full-compute case that runs `schedule`'s sampler (`full20`, `full50-ddim`)."""
    spacing = schedule.sampler["spacing"]
    return f"full{schedule.num_steps}" + ("" if spacing == "linspace" else f"-{spacing}")


def build_cases(cfg: BenchConfig, units, config: dict, extra=()) -> list[Case]:
    """Full-compute cases first (one per sampler), then each cached schedule (`cfg.schedules`, then the
    already made (name, Schedule) pairs of `extra`) and its fewer-steps run."""
    from schedules.cost import schedule_macs

    fulls, pairs = {}, []
    given = [(spec, None) for spec in cfg.schedules] + [(name, schedule) for name, schedule in extra]
    for spec, made in given:
        name, schedule = (spec, made) if made is not None else resolve_schedule(spec, units, cfg.steps, cfg.spacing)
        if schedule.sampler["name"] != "ddim":  # its eager and compiled loops and fewer-steps runs are DDIM's
            raise BlockcacheError(f"schedule {spec!r} is a {schedule.sampler['name']} schedule: blockcache-bench "
                                  "compares DDIM schedules only (sample and time other plans with runtime.Sampler)")
        if schedule.compute.all():
            raise BlockcacheError(f"schedule {spec!r} computes every unit at every step: nothing to compare")
        if any(c.name == name for c, _ in pairs):
            raise BlockcacheError(f"schedule {spec!r} is given twice")
        n, spacing = schedule.num_steps, schedule.sampler["spacing"]
        suffix = "" if spacing == "linspace" else f"-{spacing}"
        group = group_name(schedule)
        fulls.setdefault(group, Schedule.full(units, n, spacing))
        fewer = None
        if cfg.fewer_steps:
            full_macs, macs = schedule_macs(config, schedule)
            m = max(1, min(n - 1, round(n * macs / full_macs)))
            seen = {f.name: f.group for _, f in pairs if f is not None}
            fname = f"ddim{m}{suffix}"
            if seen.get(fname, group) != group:  # the same run compared with another sampler's full one
                fname = f"ddim{m}of{n}{suffix}"
            if fname not in seen:
                fewer = Case(fname, Schedule.full(units, m, spacing), "fewer-steps", group)
        pairs.append((Case(name, schedule, "cached", group), fewer))
    cases = [Case(g, s, "full", g) for g, s in fulls.items()]
    for cached, fewer in pairs:
        cases += [cached] + ([fewer] if fewer is not None else [])
    return cases
