"""Train the embedded `dit-digits` model: a small class-conditional DiT on scikit-learn's 8×8 digits.

    python -m exporter.train_digits [--steps N] [--batch-size B] [--seed S] [--threads T]
                                    [--out PATH.safetensors] [--loss-png PATH] [--quiet]

Training is DiT's: epsilon-prediction MSE on the linear-beta DDPM process with 1000 timesteps (t
uniform), labels dropped to the null class with probability 0.1 so that one network serves
classifier-free guidance, AdamW, and an exponential moving average of the weights, which is what gets
saved (fp32, the model's own state-dict keys), plus a loss-curve PNG.

The defaults are exactly what produced the shipped `exporter/weights/dit-digits.safetensors` (2
threads, 23.7 min on this project's 2-core CPU). A rerun with the same thread count reproduces the
weights bit for bit; another thread count changes the order of float sums (about 4e-6 apart after 30
steps), so the weights differ slightly while training the same way. Use `--threads 1` when other
work shares the CPU: with more torch threads than free cores, every one of the thousands of small
parallel regions per step waits for a descheduled thread and a step becomes 10-20x slower.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

from schedules.errors import BlockcacheError, cli_main
from schedules.files import atomic_output, check_output
from schedules.sampling import NUM_TRAIN_TIMESTEPS, linear_betas

# torch is imported inside the functions: a mistyped argument is answered in a second, not after
# torch has loaded.

MODEL = "dit-digits"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "exporter", "weights", "dit-digits.safetensors")
DEFAULT_LOSS_PNG = os.path.join(ROOT, "benchmarks", "results", "dit-digits-loss.png")
DEFAULT_STEPS = 7000
DEFAULT_BATCH_SIZE = 64
DEFAULT_SEED = 0
LEARNING_RATE = 1e-3
WARMUP_STEPS = 200
EMA_DECAY = 0.999
LABEL_DROPOUT = 0.1
THREADS = 2


def initialize_weights(model) -> None:
    """The official DiT initialisation (adaLN-Zero): every block starts as the identity, which is
    what lets a deep DiT train quickly. Call after seeding torch."""
    import torch.nn as nn

    def _basic_init(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    model.apply(_basic_init)
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


def learning_rate(step: int, steps: int, peak: float = LEARNING_RATE) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak: a short run still ends settled."""
    warmup = min(WARMUP_STEPS, max(1, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = DEFAULT_SEED,
          progress: bool = True, threads: int = THREADS, **config_overrides) -> tuple[dict, list[float]]:
    """Train from scratch; returns (EMA state dict, per-step training losses)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from runtime.nn.build import build_model
    from schedules.zoo import model_config

    from .digits import load_digits_images

    # Subnormal numbers are flushed to zero (a few Adam moments get there: softmax makes the key
    # biases' gradients ~0). The shipped weights were trained this way, so a rerun needs it to match
    # them bit for bit. Set before the thread count so that worker threads inherit it.
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model(model_config(MODEL, **config_overrides))
    initialize_weights(model)
    model.train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]  # pos_embed is frozen
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)

    images, labels = load_digits_images(model.config["input_size"])
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    ac = torch.from_numpy(np.cumprod(1.0 - linear_betas())).float()
    g = torch.Generator().manual_seed(seed)

    losses, order, pos = [], torch.randperm(len(x_all), generator=g), 0
    bar = tqdm(range(steps), desc="training dit-digits", disable=not progress)
    for step in bar:
        if pos + batch_size > len(order):  # a fresh permutation per epoch; the remainder is dropped
            order, pos = torch.randperm(len(x_all), generator=g), 0
        idx = order[pos:pos + batch_size] if batch_size <= len(order) else torch.randint(len(x_all), (batch_size,), generator=g)
        pos += batch_size
        x0, y = x_all[idx], y_all[idx].clone()
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        y[torch.rand(len(y), generator=g) < LABEL_DROPOUT] = model.num_classes  # null class for CFG
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(x_t, t, y), noise)

        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # EMA with a warm-up so that a short run's average is not dominated by the random start.
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return ema, losses


def save_weights(state_dict: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors, written atomically: an existing file is only replaced by a complete new one."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().contiguous() for k, v in state_dict.items()}
    with atomic_output(path, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})


def plot_loss(losses, path: str, title: str = "dit-digits training loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.asarray(losses, dtype=np.float64)
    window = max(1, min(100, len(losses) // 10))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(len(losses)), losses, lw=0.5, alpha=0.35, label="per step")
    ax.plot(np.arange(window - 1, len(losses)), smooth, lw=1.5, label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("epsilon MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _integer(low: int):
    """An argparse type: a positive (`low` 1) or non-negative (`low` 0) integer."""
    what = "a positive integer" if low == 1 else "a non-negative integer"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through cli_main instead of argparse's usage block
        raise BlockcacheError(message)


@cli_main
def main(argv=None):
    parser = _Parser(prog="python -m exporter.train_digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=_integer(1), default=DEFAULT_STEPS, help="optimizer steps")
    parser.add_argument("--batch-size", type=_integer(1), default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--seed", type=_integer(0), default=DEFAULT_SEED)
    parser.add_argument("--threads", type=_integer(1), default=THREADS,
                        help="torch CPU threads (default 2, as for the shipped weights; another count changes float rounding)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="weights file (.safetensors)")
    parser.add_argument("--loss-png", default=DEFAULT_LOSS_PNG, help="loss curve plot (.png)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    out = check_output(args.out, (".safetensors",), "output weights")
    loss_png = check_output(args.loss_png, (".png",), "loss plot")

    start = time.perf_counter()
    ema, losses = train(args.steps, args.batch_size, args.seed, progress=not args.quiet, threads=args.threads)
    minutes = (time.perf_counter() - start) / 60
    save_weights(ema, out, metadata={"model": MODEL, "steps": args.steps, "batch_size": args.batch_size,
                                     "seed": args.seed, "ema_decay": EMA_DECAY, "lr": LEARNING_RATE})
    plot_loss(losses, loss_png)
    if not args.quiet:
        print(f"trained {args.steps} steps in {minutes:.1f} min; final loss (mean of last 100) "
              f"{np.mean(losses[-100:]):.4f}; wrote {out} and {loss_png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
