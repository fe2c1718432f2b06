"""A Learning-to-Cache router learner (Ma et al., NeurIPS 2024), for any model and step count.

    schedule = Schedule.full(model.unit_names, 20)
    xs, carries, y = trajectory(model, schedule, labels=[0, 1, …], seeds=[0, 1], guidance_scale=4.0)
    logits, history = learn_router(model, schedule, xs, y, lam=1e-6, carries=carries)

(`schedule` may be of any sampler the model samples: DDIM, DPM-Solver++ 2M, DPM-Solver-2; see below.)

The router is input-invariant and timestep-variant: one logit per (step, unit), score β = sigmoid.
For a step s ≥ 1 and an input x_s, the *student* runs step s with every unit's output replaced by
`cache·(1 − β) + fresh·β`, where `cache` is that unit's output at step s − 1 (on x_{s−1}) and
`fresh` its output now; the *teacher* is the full model's step s on the same x_s. The loss is
MSE(student, teacher) on the step's output (the next latent, guidance included) + λ·Σ_u β. Only the
router trains (Adam); the model is frozen. Thresholding β at θ gives the schedule.

Training inputs (x_{s−1}, x_s) come either from the model's own full-compute trajectories from
seeded noise (`data="trajectories"`: no dataset needed) or, for a model with a data set such as
`dit-digits`, from noised real images (`data="digits"`: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with one ε per
image for both steps).

With `forecast` K ≥ 1 (schedules that reuse TaylorSeer forecasts), `cache` is instead the order-K
forecast at step s from the unit's outputs at steps s − 1 … s − 1 − K (fewer near step 0), each on
that step's own input, with the weights `schedules.forecast.taylor_weights` gives: the value a reuse
right after K + 1 computed steps takes. The schedule made from the router carries the order.

Unlike the published code, every step s ≥ 1 gets a router, so units may be reused on consecutive
steps. Training always blends with the *previous* step's output; a unit reused twice in a row reads a
value two steps old at sampling time, which training did not see: λ and θ trade that error for speed.

Samplers with a carry (docs/ARCHITECTURE.md, "Caching semantics", "Carries"): an evaluation's update
`x_next = a·x + b·eps + c·x_carry` also reads a carry, so a trajectory records per step s both x_s
and the carry the teacher's step s receives (`trajectory`: `Denoiser.carry`'s bookkeeping, as
`Denoiser.run` samples). DPM-Solver++ 2M (PixArt's default, DiT's too): the previous step's
`carry_next = p·x + q·eps`, its data prediction; step 0 carries its own input (c = 0). DPM-Solver-2
(U-ViT): the input of evaluation `carry_source[s]`, the latent its solver step started from; its rows
are model evaluations, each with a router, reusing from the evaluation before it. Teacher *and*
student of step s take the teacher trajectory's carry, as both take the teacher's x_s: the student
differs from the teacher only in its unit outputs, so the loss measures what reuse at step s alone
does. The loss stays MSE on the step's output latent x_next; carry_next (DPM-Solver++ 2M) is not
added. Student and teacher share x and x_carry, so both errors are the same guided-eps error δ
scaled by the step's constants: x_next is off by b_s·δ, carry_next by q_s·δ, and what the carry's
error does at sampling time, c_{s+1}·q_s·δ in the next step's output, is about as large as the
output's own error b_s·δ (|c_{s+1}·q_s / b_s| ≤ 0.73 at 20 steps, ≤ 1.12 at 8), while q_s itself is
up to 250 × b_s at the noisiest step: minimising the output's error minimises the carry's, and adding
the raw carry error would only reweight the steps, badly, and make λ mean something else than for DDIM. `data="digits"` noises real images to each timestep
independently, which gives no carry: it is for DDIM schedules only.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from runtime.nn.units import CachePolicy, UnitPolicy
from schedules import BlockcacheError, Schedule
from schedules.forecast import MAX_ORDER, taylor_weights
from schedules.sampling import initial_noise

from ..reference import Denoiser
from .conditioning import calibration_batch, network_conditioning

# dit-digits DDIM-20: 1.24x ideal speedup at 46 dB PSNR to full compute (README); L2C used 1e-6…5e-6 for DiT.
DEFAULT_LAMBDA = 1e-6


class _Blend(UnitPolicy):
    """`cache·(1 − β) + fresh·β` per unit, β one row of the router's scores."""

    def __init__(self, index, cache, beta):
        self.index, self.cache, self.beta = index, cache, beta

    def computed(self, name, value):
        b = self.beta[self.index[name]]
        return self.cache[name] * (1 - b) + value * b


def trajectory(model, schedule: Schedule, labels, seeds, guidance_scale: float, *,
               prompts=None) -> tuple[torch.Tensor, torch.Tensor | None, object]:
    """(x for every step (steps, B, C, H, W), the carry each step receives (the same shape; None for a
    sampler without a carry term such as DDIM), the conditions: labels (B,) or, for a text-to-image model
    given `prompts`, PromptInputs of B rows): full-compute sampling from seeded noise, as `Denoiser.run`."""
    denoiser = Denoiser(model, schedule, guidance_scale)
    x, y = calibration_batch(model, denoiser.step, labels, seeds, prompts)
    conditioning = network_conditioning(denoiser.step, y)
    xs, carries, carried = [], [], {}
    with torch.no_grad():
        for s in range(len(denoiser)):
            xs.append(x)
            x_carry = denoiser.carry(carried, s, x)
            carries.append(x_carry)
            x = denoiser(s, x, conditioning, None, x_carry, carried)
    return torch.stack(xs), (torch.stack(carries) if denoiser.has_carry else None), y


def trajectory_inputs(model, schedule: Schedule, labels, seeds, guidance_scale: float, *,
                      prompts=None) -> tuple[torch.Tensor, object]:
    """(x for every step (steps, B, C, H, W), the conditions): `trajectory` without the carries (all
    a DDIM schedule needs)."""
    xs, _, y = trajectory(model, schedule, labels, seeds, guidance_scale, prompts=prompts)
    return xs, y


def image_inputs(schedule: Schedule, images: np.ndarray, labels, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x for every step, labels): real images noised to each step's timestep with one ε per image."""
    sampler = schedule.make_sampler()
    x0 = torch.from_numpy(np.asarray(images, dtype=np.float32))
    eps = torch.from_numpy(initial_noise(tuple(x0.shape), seed))
    ac = torch.from_numpy(sampler.alphas_cumprod.astype(np.float32)).view(-1, 1, 1, 1, 1)
    return ac.sqrt() * x0 + (1 - ac).sqrt() * eps, torch.as_tensor(np.asarray(labels, dtype=np.int64))


def reused_values(denoiser, s: int, xs, yb, sl, forecast: int, carries=None) -> dict:
    """Every unit's value that a reuse at step s blends with: its output at step s − 1, or the order-
    `forecast` TaylorSeer forecast from its outputs at the steps before s (each on that step's input
    and carry)."""
    history = list(range(s - 1, max(-1, s - 2 - forecast), -1))  # newest first
    weights = taylor_weights(history, s)
    cache = {}
    for k, w in zip(history, weights):
        record = CachePolicy({})  # every unit computed and kept
        denoiser(k, xs[k][sl], yb, record, None if carries is None else carries[k][sl])
        for name, value in record.cache.items():
            cache[name] = value * float(w) if name not in cache else cache[name] + value * float(w)
    return cache


def student_and_teacher(denoiser, s: int, xs, carries, yb, sl, index: dict, beta, forecast: int = 0):
    """(student, teacher) outputs of step s ≥ 1 for rows `sl`: the full step (no gradient) and the step
    whose units blend with their reused values by `beta` (a score per unit, in `index`'s order); both on
    the trajectory's x_s and its carry (`carries[s]`, None without a carry term)."""
    x_now = xs[s][sl]
    x_carry = None if carries is None else carries[s][sl]
    with torch.no_grad():
        cached = reused_values(denoiser, s, xs, yb, sl, forecast, carries)
        teacher = denoiser(s, x_now, yb, None, x_carry)
    student = denoiser(s, x_now, yb, _Blend(index, cached, beta), x_carry)
    return student, teacher


def learn_router(model, schedule: Schedule, xs: torch.Tensor, y: torch.Tensor, *, lam: float = DEFAULT_LAMBDA,
                 guidance_scale: float | None = None, epochs: int = 20, lr: float = 0.05,
                 batch_size: int = 64, seed: int = 0, progress: bool = False,
                 forecast: int = 0, carries: torch.Tensor | None = None) -> tuple[np.ndarray, dict]:
    """(logits (steps, units) float32 with row 0 unused, per-epoch means {"loss": …, "mse": …}).
    `xs`: the inputs of every step (steps, B, C, H, W); `y`: their labels (or prompts, as
    `trajectory` gives them); `carries`: the carry every step receives, as `trajectory` gives it
    (needed where the schedule's sampler has a carry term); `forecast`: the TaylorSeer order the
    schedule will reuse with (0–2)."""
    if not np.isfinite(lam) or lam < 0:
        raise BlockcacheError(f"lambda must be a finite non-negative number, got {lam}")
    if isinstance(forecast, bool) or forecast not in range(MAX_ORDER + 1):
        raise BlockcacheError(f"forecast order must be an integer in 0…{MAX_ORDER}, got {forecast!r}")
    if epochs < 1 or batch_size < 1:
        raise BlockcacheError("epochs and batch size must be positive")
    schedule.check_units(model.unit_names, getattr(model, "name", "the model"))
    units = model.unit_names
    index = {u: j for j, u in enumerate(units)}
    n = schedule.num_steps
    model = model.eval().requires_grad_(False)
    denoiser = Denoiser(model, schedule, guidance_scale)
    if denoiser.has_carry and carries is None:
        raise BlockcacheError(f"a {schedule.sampler['name']} schedule's steps read a carry: give the carries "
                              "of the trajectory (learn_l2c.trajectory)")
    if not denoiser.has_carry:
        carries = None
    # L2C initialises routers so that every unit starts fully computed (β ≈ 1).
    logits = torch.full((n, len(units)), 3.0, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    g = torch.Generator().manual_seed(seed)
    starts = range(0, len(y), batch_size)
    conditions = {start: network_conditioning(denoiser.step, y, slice(start, start + batch_size)) for start in starts}
    history = {"loss": [], "mse": []}
    bar = tqdm(range(epochs), desc="learn-l2c", disable=not progress)
    for _ in bar:
        totals, count = np.zeros(2), 0
        for s in torch.randperm(n - 1, generator=g).tolist():
            s += 1
            for start in starts:
                sl = slice(start, start + batch_size)
                yb = conditions[start]  # the encoded prompts made once, above
                beta = torch.sigmoid(logits[s])
                student, teacher = student_and_teacher(denoiser, s, xs, carries, yb, sl, index, beta, forecast)
                mse = torch.mean((student - teacher) ** 2)
                loss = mse + lam * beta.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                totals += np.array([loss.item(), mse.item()]) * len(student)
                count += len(student)
        for key, value in zip(("loss", "mse"), totals / count):
            history[key].append(float(value))
        mean_score = float(torch.sigmoid(logits[1:].detach()).mean())
        bar.set_postfix(loss=f"{history['loss'][-1]:.2e}", mean_score=f"{mean_score:.3f}")
    return logits.detach().numpy(), history


def router_logits(logits: np.ndarray) -> dict[int, np.ndarray]:
    """{respaced index i: float64 logits} as stored (float32) in the router file: step s is i = N−1−s."""
    n = len(logits)
    return {n - 1 - s: np.asarray(logits[s], dtype=np.float32).astype(np.float64) for s in range(n)}


def router_state(logits: np.ndarray) -> dict:
    """The published file layout: {"routers": {"{i}.prob": float32 logits}}, readable by import-l2c."""
    return {"routers": {f"{i}.prob": torch.from_numpy(v.astype(np.float32)) for i, v in router_logits(logits).items()}}
