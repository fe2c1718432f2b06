"""A benchmark run's results as JSON, a markdown table and a latency-vs-fidelity plot."""

from __future__ import annotations

import json
import math
import os

import numpy as np


def method_label(method: str, role: str) -> str:
    if method == "eager":
        return {"full": "eager PyTorch", "cached": "eager PyTorch, Python-branch caching",
                "fewer-steps": "eager PyTorch"}[role]
    if method == "compile":
        return "torch.compile"
    if method == "torch-inductor":
        return "torch plan, inductor blocks"
    return f"{method} plan"


def _fmt(value, spec: str, none: str = "–") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "exact"
    return format(value, spec)


def _memory(peak, increase) -> str:
    """Process peak and, in brackets, what loading and running this configuration added to it."""
    if peak is None:
        return "–"
    return f"{peak:.0f} (+{max(increase, 0):.0f})" if increase is not None else f"{peak:.0f}"


def markdown(results: dict, title: str | None = None) -> str:
    m = results["model"]
    cfg = m["config"]
    head = title or "blockcache-bench"
    lines = [f"# {head}", "",
             f"{results['date']}, device `{results['device']}` ({results['machine'].get('gpu') or results['machine']['processor']}, "
             f"{results['machine']['cpu_count']} CPUs, torch {results['machine']['torch']}). Model `{m['name']}` "
             f"(depth {cfg['depth']}, hidden {cfg['hidden_size']}, {cfg['num_heads']} heads, latent "
             f"{cfg['input_size']}×{cfg['input_size']}, patch {cfg['patch_size']}, {m['parameters'] / 1e6:.1f} M "
             f"parameters, weights {m['weights']}); batch {results['batch_size']} images"
             + (f" with CFG (scale {results['guidance_scale']:g}, network batch {2 * results['batch_size']})"
                if results["guidance"] else " without guidance")
             + f"; latency = median of {results['repeats']} warm calls (min–max)"
             + (f"; load average at start {results['machine']['load_average'][0]:.1f} on "
                f"{results['machine']['cpu_count']} CPUs" if results["machine"].get("load_average") else "")
             + ".", "",
             f"Fidelity against {results['fidelity_reference']}; PSNR data range: {results['psnr_data_range']}.",
             ""]
    digits = any("class_accuracy" in r for r in results["rows"])
    header = ["precision", "method", "schedule", "steps", "latency s (min–max)", "speedup", "ideal", "efficiency",
              "compute share", "PSNR dB", "rel. error"]
    if digits:
        header += ["class acc.", "digits-FD"]
    header += ["peak host MB (+load/run)", "peak device MB (+load/run)", "notes"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results["rows"]:
        s = results["schedules"][r["schedule"]]
        sched = f"{r['schedule']} ({r['role']})"
        if r["status"] != "ok":
            cells = [r["precision"], r["label"], sched, str(s["steps"]), r["status"]] + ["–"] * (len(header) - 6) \
                + [r.get("reason", "")]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        lat = r["latency_s"]
        notes = []
        if r.get("cuda_graph"):
            notes.append("CUDA graph")
        if r.get("graph_error"):
            notes.append(f"no CUDA graph: {r['graph_error'][:80]}")
        if r.get("plan_precision") and r["plan_precision"] != r["precision"]:
            notes.append(f"cast from {r['plan_precision']} plan")
        if r.get("computed_steps") and r["role"] == "cached":
            notes.append(f"steps computed: {r['computed_steps']}")
        if s.get("matched_to"):
            notes.append(f"matched to {', '.join(s['matched_to'])}")
        cells = [r["precision"], r["label"], sched, str(s["steps"]),
                 f"{lat['median']:.4g} ({lat['min']:.4g}–{lat['max']:.4g})", _fmt(r["speedup"], ".3f"),
                 _fmt(r["ideal_speedup"], ".3f"), _fmt(r["efficiency"], ".2f"), _fmt(r.get("compute_share"), ".3f"),
                 _fmt(r.get("psnr_db"), ".1f"),
                 _fmt(r.get("relative_error"), ".2e")]
        if digits:
            cells += [_fmt(r.get("class_accuracy"), ".3f"), _fmt(r.get("digits_fd"), ".2f")]
        cells += [_memory(r.get("peak_host_mb"), r.get("host_increase_mb")),
                  _memory(r.get("peak_device_mb"), r.get("device_increase_mb")), "; ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("summary"):
        lines += summary_markdown(results["summary"])
    if results.get("notes"):
        lines += [""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict) -> list[str]:
    """The side-by-side summary (side_by_side.summary) as markdown lines."""
    lines = []
    for precision, s in summary.items():
        lines += ["", f"## Peers vs blockcache plans, {precision}", "",
                  f"At equal or better fidelity, fastest peer latency / fastest plan latency: median "
                  f"{_fmt(s['ratio_median'], '.2f')}x (min {_fmt(s['ratio_min'], '.2f')}x, max "
                  f"{_fmt(s['ratio_max'], '.2f')}x; > 1: the plan is faster).", "",
                  "| PSNR at least, dB | fastest peer | latency s | fastest plan | latency s | ratio |", "|---|---|---|---|---|---|"]
        for lv in s["at_equal_fidelity"]:
            lines.append(f"| {_fmt(lv['psnr_db'], '.1f')} | {lv['peer']} | {lv['peer_latency_s']:.4g} | "
                         f"{lv['plan'] or 'none'} | {_fmt(lv['plan_latency_s'], '.4g')} | {_fmt(lv['ratio'], '.2f')} |")
        lines += ["", "| latency at most, s | most faithful peer | PSNR dB | most faithful plan | PSNR dB |",
                  "|---|---|---|---|---|"]
        for b in s["at_equal_latency"]:
            lines.append(f"| {b['latency_s']:.4g} | {b['peer']} | {_fmt(b['peer_psnr_db'], '.1f')} | "
                         f"{b['plan'] or 'none'} | {_fmt(b['plan_psnr_db'], '.1f')} |")
    return lines


def plot(results: dict, path: str) -> None:
    """Latency (x, log) against fidelity (PSNR, y); exact matches are drawn at the top edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results["rows"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(10.5, 5.5))
    finite = [r["psnr_db"] for r in ok if math.isfinite(r["psnr_db"])]
    top = (max(finite) + 10) if finite else 100.0
    markers = {"fp32": "o", "fp16": "s", "bf16": "^"}
    colours = {}
    for r in ok:
        key = r["label"]
        colour = colours.setdefault(key, f"C{len(colours) % 10}")
        y = r["psnr_db"] if math.isfinite(r["psnr_db"]) else top
        ax.scatter(r["latency_s"]["median"], y, marker=markers.get(r["precision"], "o"), color=colour,
                   label=f"{key}, {r['precision']}")
        ax.annotate(r["schedule"], (r["latency_s"]["median"], y), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    if ok:
        ax.set_xscale("log")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("warm latency per batch, s (median)")
    ax.set_ylabel("PSNR vs full compute, dB (top edge = exact)")
    ax.set_title(f"{results['model']['name']} on {results['device']}: latency vs fidelity", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict, out_dir: str, tag: str, title: str | None = None) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{tag}.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=json_default)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(results, title))
    plot(results, paths["png"])
    return paths


def json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
