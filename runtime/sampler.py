"""`runtime.Sampler`: sample from an exported plan, from any number of threads.

    with Sampler("plans/l2c", contexts=4) as sampler:               # e.g. in a web service's thread pool
        latents = sampler([207, 360, 387], seeds=[1, 2, 3], steps=50)  # (N, C, H, W); image i from seed i alone
        latents = sampler([207], seed=0, steps=20)                   # the plan's 20-step schedule
        images = sampler([207], seed=0)       # a plan exported with --vae: uint8 (N, H, W, 3); output="latents" too

Concurrency: a Sampler may be called from any number of threads at once. The plan's heavy state
(weights, sessions or engines, the network) is loaded once and shared; what a call writes (latents,
labels, cache buffers, bindings, captured graphs) lives in one of `contexts` execution contexts, and
a call waits for a free one. Each call's result is bit-identical to the same call made alone: no two
calls ever share a context, and a context's state is written before it is read in every call.
Memory grows by one set of buffers per context, never by the weights. A call interrupted (an
exception, KeyboardInterrupt) returns its context, and the next call on it is correct.

Batching: N images run as batches of the plan's batch sizes for the chosen schedule, the ones that
cover N with the least padded work (9 images on a plan of 1, 2, 4 and 8: 8 + 1, no padding), the
padding filled with zeros and dropped. Where a run's time is far from proportional to its batch (a
small model on a CPU), `batch_costs` (measured latencies per batch size) makes the split the one of
least time instead. The split depends only on N and the costs, never on timing or load.

Noise: `seeds` (one per image) makes image i's starting noise from seed i alone, so an image does
not depend on what it is batched with: bit-identical inside any batch of the same size, and across
batch sizes equal up to the GEMMs' rounding (benchmarks/runtime_cpu.py measures it). `seed` (one for
the call) and `noise` keep their meaning.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from schedules.errors import BlockcacheError, ParameterError
from schedules.prompts import check_conditioning, check_prompt_inputs
from schedules.sampling import (check_finite_result, check_guidance_scale, check_labels, check_noise, guidance_needed,
                                initial_noise, neutral_guidance_scale)
from schedules.zoo import takes_prompt

from .backends import make_backend
from .plan import load_plan, names

MAX_CONTEXTS = 64


def split_batches(n: int, sizes, costs=None) -> list[int]:
    """The batch sizes (largest first) that cover `n` images at the least total cost, and among those
    the fewest runs. A run's cost is `costs[b]`, by default `b` itself, the padded work: 9 of
    (1, 2, 4, 8) → [8, 1]; 3 of (2, 8) → [2, 2]; 3 of (8,) → [8]."""
    sizes = sorted(set(sizes))
    costs = costs or {b: b for b in sizes}
    best = [(0, 0, ())] + [None] * n  # images covered → (cost, runs, batches)
    for m in range(1, n + 1):
        options = []
        for b in sizes:
            cost, runs, batches = best[max(0, m - b)]
            options.append((cost + costs[b], runs + 1, batches + (b,)))
        best[m] = min(options)
    return sorted(best[n][2], reverse=True)


def check_batch_costs(costs, sizes) -> dict | None:
    """`batch_costs` of a Sampler: a positive finite cost for each of the plan's batch sizes, or None."""
    if costs is None:
        return None
    if not isinstance(costs, dict) or set(costs) != set(sizes) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") for v in costs.values()):
        raise ParameterError("batch_costs", f"{{name}} must map each of the plan's batch sizes "
                             f"({', '.join(map(str, sorted(sizes)))}) to a positive number, got {costs!r}"[:300])
    return {int(b): float(v) for b, v in costs.items()}


class Sampler:
    """Samples from a plan; safe to call from any number of threads at once, each call's result
    bit-identical to the same call made alone (the module docstring says how). `close()` or leaving a
    `with` block waits for the calls in progress and frees the backend."""

    def __init__(self, plan_dir: str, backend: str = "auto", device: str = "auto", verify: bool = True,
                 threads: int | None = None, contexts: int = 1, batch_costs: dict | None = None):
        """`backend`: auto, onnxruntime, torch or tensorrt; `device`: auto, cpu, cuda or cuda:N;
        `verify`: check every plan file's checksum at load; `threads`: intra-op threads of the ONNX
        Runtime backend (default: ORT's choice); `contexts`: how many calls run at once (others wait);
        `batch_costs`: {batch size: cost of one run} for splitting requests (default: the batch size,
        the padded work); measured latencies make the split the fastest for a lone request."""
        if isinstance(contexts, bool) or not isinstance(contexts, int) or not 1 <= contexts <= MAX_CONTEXTS:
            raise ParameterError("contexts", f"{{name}} must be an integer in 1…{MAX_CONTEXTS}, got {contexts!r}")
        self.plan = load_plan(plan_dir, verify=verify)
        self.batch_costs = check_batch_costs(batch_costs, {p.batch_size for p in self.plan.programs})
        self.backend = make_backend(backend, self.plan, device, **({} if threads is None else {"threads": threads}))
        try:
            while len(self.backend.contexts) < contexts:
                self.backend.new_context()
        except BaseException:
            self.backend.close()
            raise
        self._idle = list(self.backend.contexts[:contexts])  # the contexts no call holds
        self._pool = threading.Condition()
        self._closing = False
        self.contexts = contexts
        self.num_classes = self.plan.num_labels
        self.latent_shape = self.plan.latent_shape
        self.step_counts = self.plan.step_counts

    @property
    def manifest(self) -> dict:
        return self.plan.document

    @property
    def batch_size(self) -> int:
        """The largest batch the plan runs in one go."""
        return max(p.batch_size for p in self.plan.programs)

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def backend_name(self) -> str:
        return f"{self.backend.name} ({self.backend.device})"

    def __call__(self, class_labels=None, *, prompt_embeds=None, prompt_mask=None, negative_embeds=None,
                 negative_mask=None, noise=None, seed: int | None = None, seeds=None,
                 guidance_scale: float | None = None, steps: int | None = None, output: str | None = None):
        """Final latents (N, C, H, W) float32, or for a plan with a decoder uint8 images (N, H, W, 3);
        `output="latents"` or `"images"` chooses (default: images where the plan has a decoder).

        A text-to-image plan (PixArt) takes prompts instead of labels: `prompt_embeds` (N, L, D) float32
        and `prompt_mask` (N, L) of 1 and 0 (default all 1), and under guidance the negative prompt's
        `negative_embeds` (1, L, D) and `negative_mask` — what `schedules.prompts.load_prompt_embeds`
        reads from a `blockcache-encode-prompts` file."""
        conditioning, noise, scale, evaluations, images = self._request(
            class_labels, (prompt_embeds, prompt_mask, negative_embeds, negative_mask), noise, seed, seeds,
            guidance_scale, steps, output)
        batches = self.split(len(conditioning), evaluations)
        context = self._acquire()
        try:
            out, start = [], 0
            for b in batches:
                program = self.plan.find(b, evaluations)
                x = noise[start: start + b]
                real = len(x)
                if real < b:
                    x = np.concatenate([x, np.zeros((b - real,) + self.latent_shape, np.float32)])
                y = self._conditioning(conditioning, start, start + real, b)
                latents = check_finite_result(context.run(program, x, y, scale)[:real], scale)
                out.append(context.decode(program)[:real] if images else latents)  # decoded only if finite
                start += real
        finally:
            self._release(context)  # also after an interrupted call: every call writes all it reads
        return np.concatenate(out)

    def check(self, class_labels=None, *, prompt_embeds=None, prompt_mask=None, negative_embeds=None,
              negative_mask=None, seeds=None, guidance_scale: float | None = None, steps: int | None = None,
              output: str | None = None) -> None:
        """Refuse in one line what the same call would refuse, without sampling: a service checks each
        request alone before batching it with others, so one bad request cannot fail its batch."""
        self._request(class_labels, (prompt_embeds, prompt_mask, negative_embeds, negative_mask), None, None, seeds,
                      guidance_scale, steps, output)

    def split(self, n: int, steps: int | None = None) -> list[int]:
        """The batch sizes a call of `n` images with `steps` runs as (largest first), in image order."""
        evaluations = self._steps(steps)
        return split_batches(n, self.plan.batch_sizes(evaluations), self.batch_costs)

    def measure_batch_costs(self, repeats: int = 2) -> dict:
        """Time a run of each batch size (per model evaluation, on its shortest schedule, best of
        `repeats` after a warm-up run) and split requests by those costs from now on, as `batch_costs=`
        would; returns them. Call it before the Sampler is shared: a service does, so that 7 gathered
        images run as one batch of 8 where that is faster than 4 + 2 + 1."""
        costs, self.batch_costs = {}, None  # each timed call runs as one batch of its size
        for b in sorted({p.batch_size for p in self.plan.programs}):
            steps = min(p.evaluations for p in self.plan.programs if p.batch_size == b)
            times = []
            request = {"class_labels": [0] * b} if not self.takes_prompt else self._example_prompts(b)
            for _ in range(repeats + 1):
                start = time.perf_counter()
                self(**request, seeds=[0] * b, steps=steps, output="latents")
                times.append((time.perf_counter() - start) / steps)
            costs[b] = min(times[1:])
        self.batch_costs = check_batch_costs(costs, set(costs))
        return self.batch_costs

    @property
    def takes_prompt(self) -> bool:
        """Whether the plan's model is conditioned on prompt embeddings rather than class labels."""
        return takes_prompt(self.plan.config)

    def _request(self, class_labels, prompts, noise, seed, seeds, guidance_scale, steps, output):
        """A call's checked arguments: (labels or PromptInputs, starting noise, guidance scale, evaluations,
        images?)."""
        name = self.plan.model_name or "this plan's model"
        check_conditioning(self.plan.config, class_labels, prompts[0], name)
        images = self._output(output)
        evaluations = self._steps(steps)
        scale = self._guidance_scale(guidance_scale)
        if self.takes_prompt:  # under a neutral scale the unconditional rows do not matter: no negative needed
            conditioning = check_prompt_inputs(self.plan.config, *prompts,
                                               guidance=guidance_needed(scale, self.plan.guidance.channels),
                                               model_name=name)
        else:
            conditioning = check_labels(class_labels, self.num_classes)
        noise = self._noise(len(conditioning), noise, seed, seeds)
        return conditioning, noise, scale, evaluations, images

    def _conditioning(self, conditioning, start: int, stop: int, size: int):
        """A batch's `y` for `ExecutionContext.run`: labels padded with 0, or the network batch's prompt
        inputs, padded with copies of the last prompt (padded rows are dropped)."""
        if not self.takes_prompt:
            y = conditioning[start:stop]
            return np.concatenate([y, np.zeros(size - len(y), np.int64)])
        embeds, mask = conditioning.batch(start, stop, size).network(self.plan.guidance.enabled)
        return {names.PROMPT_EMBEDS: embeds, names.PROMPT_MASK: mask}

    def _example_prompts(self, n: int) -> dict:
        """Zero prompt embeddings of the plan's shape, every token counted (for timing runs)."""
        c = self.plan.config
        embeds = np.zeros((n, c["max_text_tokens"], c["caption_channels"]), np.float32)
        return {"prompt_embeds": embeds, "negative_embeds": embeds[:1]}

    def _output(self, output) -> bool:
        """Whether the call returns images (`output`: None, "images" or "latents")."""
        if output is None:
            return self.plan.decoder is not None
        if output not in ("images", "latents"):
            raise ParameterError("output", f"{{name}} must be 'images' or 'latents', got {output!r}")
        if output == "images" and self.plan.decoder is None:
            raise ParameterError("output", "this plan has no decoder, so it yields latents: re-export it with --vae "
                                 "for {name} 'images'")
        return output == "images"

    def _acquire(self):
        """A free execution context, waiting for one while all are busy."""
        with self._pool:
            while not self._idle and not self._closing:
                self._pool.wait()
            if self._closing:
                raise BlockcacheError("this Sampler was closed: make a new one to sample")
            return self._idle.pop()

    def _release(self, context) -> None:
        with self._pool:
            self._idle.append(context)
            self._pool.notify()

    def _steps(self, steps) -> int:
        """The schedule of the call: the plan's only one, or the one with `steps` model evaluations."""
        if steps is None:
            if len(self.step_counts) > 1:
                raise ParameterError("steps", f"this plan has schedules of {', '.join(map(str, self.step_counts))} "
                                     "steps: choose one with {name}")
            return self.step_counts[0]
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or int(steps) not in self.step_counts:
            raise ParameterError("steps", f"{{name}} {steps!r}: this plan has schedules of "
                                 f"{', '.join(map(str, self.step_counts))} steps")
        return int(steps)

    def _noise(self, n: int, noise, seed, seeds) -> np.ndarray:
        if sum(v is not None for v in (noise, seed, seeds)) > 1:
            raise BlockcacheError("give one of noise, seed or seeds")
        shape = (n,) + self.latent_shape
        if seeds is not None:
            try:
                seeds = list(seeds)
            except TypeError:
                raise ParameterError("seeds", "{name} must be a list of seeds, one per image") from None
            if len(seeds) != n:
                raise ParameterError("seeds", f"{{name}} has {len(seeds)} seeds for {n} images: give one per image")
            noise = np.concatenate([initial_noise((1,) + self.latent_shape, s) for s in seeds]) if n else None
        elif noise is None:
            noise = initial_noise(shape, 0 if seed is None else seed)
        return check_noise(noise, shape)

    def _guidance_scale(self, guidance_scale) -> float:
        """The scale the graphs are run with: the given one or the plan's; a plan made with guidance runs
        the doubled batch anyway, so 'no guidance' becomes the form's neutral scale (eps = cond)."""
        guidance = self.plan.guidance
        scale = guidance.scale if guidance_scale is None else check_guidance_scale(guidance_scale)
        if not guidance.enabled and guidance_needed(scale, guidance.channels):
            raise ParameterError("guidance_scale", "this plan was exported without guidance; re-export it with a "
                                 "guidance scale to sample with {name} " + f"{scale:g}")
        if guidance.enabled and not guidance_needed(scale, guidance.channels):
            scale = neutral_guidance_scale(guidance.channels)  # eps = cond (the doubled batch still runs)
        return scale

    def close(self) -> None:
        """Release the backend's memory (device memory first) once the calls in progress have finished;
        calls made or waiting afterwards are refused in one line."""
        with self._pool:
            self._closing = True
            self._pool.notify_all()
            while len(self._idle) < self.contexts:
                self._pool.wait()
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
