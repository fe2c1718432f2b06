"""The conditions a maker calibrates on: class labels, or a text-to-image model's prompts.

A calibration batch is every (condition, seed) pair, seed-major: seed k's noise
`initial_noise((N, C, H, W), k)` for all N conditions, then seed k + 1's. Class labels are tiled the
same way (`reference.seeded_batch`); prompts too: every prompt of the embeddings file with every seed,
in the file's order (so a file of 4 prompts and seeds 0,1 calibrates on 8 images, each prompt under
both noises), with the file's negative prompt as the unconditional rows under guidance. Makers keep
the conditions undoubled (`y`: labels (B,) or `PromptInputs` of B rows) and hand the network
`network_conditioning(step, y, rows)`: the labels, or the encoded prompt of those rows' network batch
(their negative rows included), which a plan's prologue computes the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from schedules import BlockcacheError
from schedules.prompts import PromptInputs, check_conditioning, check_prompts
from schedules.sampling import check_labels, check_seeds, initial_noise
from schedules.zoo import takes_prompt

from ..reference import encoded_prompt, seeded_batch


def calibration_batch(model, step, labels, seeds, prompts: PromptInputs | None = None):
    """(noise (B, C, H, W), conditions y) for every (condition, seed) pair, seed-major; `step`: the
    `DenoisingStep` the batch will run with (its guidance decides whether the negative prompt is needed)."""
    name = getattr(model, "name", None) or "the model"
    check_conditioning(model.config, labels, None if prompts is None else prompts.embeds, name)
    seeds = check_seeds(seeds)
    if not takes_prompt(model.config):
        return seeded_batch(model, check_labels(labels, model.num_classes), seeds)
    if prompts is None:
        raise BlockcacheError(f"{name} is a text-to-image model: it calibrates on prompts (prompt embeddings)")
    prompts = check_prompts(model.config, prompts, step.guidance, name)
    c, size = model.in_channels, model.config["input_size"]
    x = np.concatenate([initial_noise((len(prompts), c, size, size), int(seed)) for seed in seeds])
    k = len(seeds)
    tiled = PromptInputs(np.tile(prompts.embeds, (k, 1, 1)), np.tile(prompts.mask, (k, 1)),
                         prompts.negative_embeds, prompts.negative_mask)
    return torch.from_numpy(x), tiled


def network_conditioning(step, y, rows: slice = slice(None)):
    """What `Denoiser` calls take for rows `rows` of the conditions `y`: labels, or the encoded prompt
    of those rows' network batch."""
    if not isinstance(y, PromptInputs):
        return y[rows]
    with torch.no_grad():  # the prompt's work never trains (the model is frozen in every maker)
        return encoded_prompt(step, PromptInputs(y.embeds[rows], y.mask[rows], y.negative_embeds, y.negative_mask))
