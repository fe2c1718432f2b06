"""Analytic cost model: multiply-accumulates (MACs) per image for a model config and a schedule.

Counts the matrix products (linear layers, patch embedding, attention scores and values); the
element-wise work (norms, softmax, GELU, modulation) is left out, as in the papers' GMAC figures.
DiT-XL/2 at 256 px gives 118.6 GMACs per image, the published number; U-ViT-H/2 at 256 px gives
133.2 (its paper lists 133 GFLOPs, counting a multiply-add as one). PixArt's units add the
cross-attention over the prompt's `max_text_tokens` tokens (the pipelines pad every prompt to that
length and mask the padding, so the products run over all of them).
"""

from __future__ import annotations

import numpy as np

from .errors import BlockcacheError
from .schedule import Schedule
from .zoo import family_of, unit_names


def unit_macs(config: dict, prologue: bool = False) -> dict[str, int]:
    """MACs per image of one unit of each kind: {"attn": …, "mlp": …} (PixArt: {"attn1", "attn2", "ff"}).
    `prologue`: a text model's prompt work runs once per call (`prologue_macs`), not in the units."""
    d = config["hidden_size"]
    t = (config["input_size"] // config["patch_size"]) ** 2 + family_of(config).extra_tokens
    hidden = int(d * config["mlp_ratio"])
    if family_of(config).name == "pixart":
        prompt = config["max_text_tokens"]
        attn1 = t * d * 3 * d + 2 * t * t * d + t * d * d  # as DiT's attention
        # q and out projections over the patches, q·kᵀ and softmax·v against the prompt, and the k and v
        # projections of the prompt tokens. Those depend on the prompt only: once a prologue computes
        # them once per call, they move to fixed_macs (divided by the steps) and attn2 keeps the rest.
        attn2 = 2 * t * d * d + 2 * t * prompt * d + (0 if prologue else prompt * d * 2 * d)
        return {"attn1": attn1, "attn2": attn2, "ff": 2 * t * d * hidden}
    attn = t * d * 3 * d + 2 * t * t * d + t * d * d  # qkv, q·kᵀ and softmax·v, proj
    mlp = 2 * t * d * hidden
    return {"attn": attn, "mlp": mlp}


def fixed_macs(config: dict) -> int:
    """MACs per image of one step outside the cacheable units (always computed). A text model's caption
    projection is not among them: it runs once per call in a prologue, or without one in the steps
    that compute a cross-attention (`step_macs`)."""
    d, p, c = config["hidden_size"], config["patch_size"], config["in_channels"]
    t = (config["input_size"] // p) ** 2
    embed = t * c * p * p * d
    if family_of(config).name == "pixart":
        return embed + pixart_fixed_macs(config, t)
    if family_of(config).name == "uvit":
        t_all = t + family_of(config).extra_tokens
        time_mlp = 2 * d * 4 * d if config["mlp_time_embed"] else 0
        skips = config["depth"] // 2 * t_all * 2 * d * d  # skip_linear of every out block
        decoder = t_all * d * p * p * c
        conv = 9 * c * c * config["input_size"] ** 2 if config["conv"] else 0
        return embed + time_mlp + skips + decoder + conv
    out = c * (2 if config["learn_sigma"] else 1)
    t_mlp = 256 * d + d * d
    ada = config["depth"] * 6 * d * d + 2 * d * d
    final = t * d * p * p * out
    return embed + t_mlp + ada + final


def pixart_fixed_macs(config: dict, t: int) -> int:
    """PixArt outside its units and patch embedding: the timestep MLP (and the micro-conditions' three
    MLPs of width d/3), one shared adaLN-single projection to 6·d (not one per block) and the final layer."""
    d, p, c = config["hidden_size"], config["patch_size"], config["in_channels"]
    out = c * (2 if config["learn_sigma"] else 1)
    t_mlp = 256 * d + d * d
    size = d // 3
    micro = 3 * (256 * size + size * size) if config["use_additional_conditions"] else 0  # resolution (2), aspect ratio
    ada = d * 6 * d
    final = t * d * p * p * out
    return t_mlp + micro + ada + final


def caption_macs(config: dict) -> int:
    """The caption projection of every prompt token (T5 width → d → d)."""
    d = config["hidden_size"]
    return config["max_text_tokens"] * (config["caption_channels"] * d + d * d)


def prologue_macs(config: dict) -> int:
    """MACs per image of a text model's prologue, once per call: the caption projection and every
    block's cross-attention keys and values of the prompt tokens (0 for class models)."""
    if family_of(config).conditioning != "prompt":
        return 0
    d = config["hidden_size"]
    return caption_macs(config) + config["depth"] * config["max_text_tokens"] * d * 2 * d


def unit_costs(config: dict, prologue: bool = False) -> list[int]:
    """MACs per image of each unit, in `unit_names(config)` order."""
    per = unit_macs(config, prologue)
    return [per[u.rsplit(".", 1)[1]] for u in unit_names(config)]


def step_macs(config: dict, compute_row, prologue: bool = False) -> int:
    """MACs per image of one step computing the units of `compute_row`. Without a prologue, a text
    model's step that computes a cross-attention also projects the caption (the graphs of steps that
    reuse every cross-attention have no caption projection left)."""
    units = sum(m for m, c in zip(unit_costs(config, prologue), compute_row) if c)
    caption = 0
    if not prologue and family_of(config).conditioning == "prompt":
        cross = [u.endswith(".attn2") for u in unit_names(config)]
        caption = caption_macs(config) if any(c and x for c, x in zip(compute_row, cross)) else 0
    return fixed_macs(config) + units + caption


def schedule_macs(config: dict, schedule: Schedule, prologue: bool = False) -> tuple[int, int]:
    """(full, scheduled) MACs per image over the whole sampling run (one model evaluation per step,
    per image; guidance doubles both equally). `prologue`: a text model's prompt work once per call
    instead of in every step (what its plans do)."""
    once = prologue_macs(config) if prologue else 0
    full = step_macs(config, np.ones(schedule.num_units, bool), prologue) * schedule.num_steps + once
    scheduled = sum(step_macs(config, row, prologue) for row in schedule.compute) + once
    return full, scheduled


def stats(config: dict | None, schedule: Schedule) -> dict:
    """Share of units skipped (overall, in cached steps, per unit kind) and the MAC-ideal speedup."""
    skipped = ~schedule.compute
    cached_steps = skipped.any(axis=1)
    kinds = sorted({u.rsplit(".", 1)[1] for u in schedule.unit_names})
    result = {
        "steps": schedule.num_steps,
        "units": schedule.num_units,
        "sampler": dict(schedule.sampler),
        "cached_steps": int(cached_steps.sum()),
        "distinct_rows": len({row.tobytes() for row in schedule.compute}),
        "skipped_share": float(skipped.mean()),
        "skipped_share_in_cached_steps": float(skipped[cached_steps].mean()) if cached_steps.any() else 0.0,
        "skipped_share_by_kind": {k: float(skipped[:, [u.endswith("." + k) for u in schedule.unit_names]].mean())
                                  for k in kinds},
        "span_share": float(schedule.span.mean()),  # units skipped inside spans (their residual added)
        "spans": sum(len(schedule.spans(s)) for s in range(schedule.num_steps)),
        "forecast_order": schedule.forecast,
        # reuses that are forecasts from more than one value (the first reuses after step 0 have one)
        "forecast_reads": sum(len(steps) > 1 for uses in schedule.history() for steps in uses.values()),
    }
    if config is not None:
        full, scheduled = schedule_macs(config, schedule)
        result.update(macs_per_image_full=full, macs_per_image_scheduled=scheduled, ideal_speedup=full / scheduled)
        if family_of(config).conditioning == "prompt":  # the prompt's work once per call, as plans run it
            hoisted, hoisted_scheduled = schedule_macs(config, schedule, prologue=True)
            result.update(prologue_macs_per_image=prologue_macs(config),
                          macs_per_image_scheduled_with_prologue=hoisted_scheduled,
                          prologue_saving=scheduled / hoisted_scheduled,
                          ideal_speedup_with_prologue=full / hoisted_scheduled)
    return result


def ideal_speedup(config: dict, schedule: Schedule) -> float:
    full, scheduled = schedule_macs(config, schedule)
    return full / scheduled


def search_speedup(make, low: float, high: float, target: float, config: dict, what: str = "parameter",
                   iterations: int = 60) -> Schedule:
    """`make(p)` for the smallest p in [low, high] whose ideal speedup reaches `target`, by bisection;
    the speedup must not fall as p grows (δ for Block Caching, θ for a router threshold).
    BlockcacheError when even `make(high)` falls short."""
    if not np.isfinite(target) or target < 1:
        raise BlockcacheError(f"target speedup must be >= 1, got {target}")
    best = make(high)
    if ideal_speedup(config, best) < target * (1 - 1e-9):
        raise BlockcacheError(f"no {what} reaches a {target:.3f}x ideal speedup: the most, at {what} {high:.4g}, is "
                              f"{ideal_speedup(config, best):.3f}x")
    schedule = make(low)
    if ideal_speedup(config, schedule) >= target:
        return schedule
    for _ in range(iterations):  # invariant: speedup(low) < target <= speedup(high)
        mid = (low + high) / 2
        if ideal_speedup(config, make(mid)) >= target:
            high = mid
        else:
            low = mid
    return make(high)


def spread_for_speedup(unit_names, steps: int, config: dict, target: float, spacing: str | None = None,
                       model: str | None = None) -> Schedule:
    """The all-or-nothing schedule (`Schedule.spread`) with the most full steps whose ideal speedup
    reaches `target`."""
    for full_steps in range(steps, 0, -1):
        schedule = Schedule.spread(unit_names, steps, full_steps, spacing, model)
        if ideal_speedup(config, schedule) >= target:
            return schedule
    raise BlockcacheError(f"no all-or-nothing schedule of {steps} steps reaches {target:.3f}x")
