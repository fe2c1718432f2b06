"""Pictures and text views of a schedule (matplotlib imported lazily)."""

from __future__ import annotations

from .schedule import Schedule


def text_view(schedule: Schedule) -> str:
    """A compact step × block view: one line per step, two characters per block."""
    timesteps = schedule.make_sampler().timesteps
    width = len(str(schedule.num_steps - 1))
    lines = [f"{schedule.num_steps} steps × {schedule.num_units} units ('x' compute, '.' reuse"
             + (", 's' skip in a span" if schedule.span.any() else "")
             + (f"; every reuse a TaylorSeer forecast of order {schedule.forecast}" if schedule.forecast else "")
             + ")"]
    for s in range(schedule.num_steps):
        n = int(schedule.compute[s].sum())
        lines.append(f"{s:>{width}} t={timesteps[s]:>3}  {schedule.row_string(s)}  {n}/{schedule.num_units}")
    return "\n".join(lines)


def heatmap(schedule: Schedule, path, title: str | None = None) -> None:
    """A step × unit heatmap (computed dark, reused light) written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, schedule.num_units * 0.14), max(3, schedule.num_steps * 0.18)))
    ax.imshow(schedule.compute, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("unit (blocks.i.attn, blocks.i.mlp, …)")
    ax.set_ylabel("sampling step (0 = noisiest)")
    ax.set_title(title or f"{schedule.source or 'schedule'}: dark = compute, light = reuse")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def change_heatmap(change, path, title: str = "relative L1 change of each unit's output from the previous step") -> None:
    """A step × unit heatmap of `analyze`'s change statistics (log colour scale; step 0 blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    change = np.asarray(change, dtype=np.float64)
    shown = np.where(change > 0, change, np.nan)
    finite = shown[np.isfinite(shown)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
    fig, ax = plt.subplots(figsize=(max(6, change.shape[1] * 0.14), max(3, change.shape[0] * 0.18)))
    im = ax.imshow(shown, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    fig.colorbar(im, ax=ax)
    ax.set_xlabel("unit (blocks.i.attn, blocks.i.mlp, …)")
    ax.set_ylabel("sampling step (0 = noisiest)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
