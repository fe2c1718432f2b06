"""Pictures and text views of a schedule (matplotlib imported lazily)."""

from __future__ import annotations

from .schedule import Schedule


def text_view(schedule: Schedule) -> str:
    """A compact step × block view: one line per step, two characters per block."""
    timesteps = schedule.make_sampler().timesteps
    width = len(str(schedule.num_steps - 1))
    lines = [f"{schedule.num_steps} steps × {schedule.num_units} units ('x' compute, '.' reuse)"]
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
