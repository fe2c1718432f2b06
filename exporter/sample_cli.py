"""`blockcache-sample`: sample with the eager cached reference (`--model …`) or with an exported plan
(`--plan DIR`, no torch needed). Writes images where there is a decoder (a plan exported with --vae, or
--vae here): OUT.png a labelled grid, DIR/ one PNG per image, OUT.npy the uint8 array; else the final
latents (OUT.npy, or OUT.png for models whose latents are images)."""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

from schedules.errors import BlockcacheError, cli_main
from schedules.files import check_output
from schedules.images import is_folder_output, save_images, save_samples
from schedules.options import ArgumentParser, add_model_args, add_weights_args, model_overrides, parse_labels, parse_numbers
from schedules.sampling import GUIDANCE_CHANNELS, SPACINGS, initial_noise
from schedules.schedule import Schedule
from schedules.zoo import family_of

DEFAULT_STEPS = 50


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="blockcache-sample", description=__doc__)
    add_model_args(p, required=False)
    add_weights_args(p)
    plan = p.add_argument_group("plan (instead of --model)")
    plan.add_argument("--plan", metavar="DIR", help="an exported plan folder")
    plan.add_argument("--backend", default="auto", help="auto, onnxruntime, torch or tensorrt")
    plan.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s = p.add_argument_group("sampling")
    s.add_argument("--schedule", metavar="F", help="caching schedule YAML (default: full compute)")
    s.add_argument("--steps", type=int, help=f"full-compute steps when no schedule is given (default {DEFAULT_STEPS}); "
                   "with --plan, which of the plan's schedules to run")
    s.add_argument("--spacing", choices=SPACINGS, help="DDIM respacing for --steps (default linspace)")
    cond = s.add_mutually_exclusive_group(required=True)
    cond.add_argument("--labels", help="comma-separated class labels, e.g. 1,2,3 (class-conditional models)")
    cond.add_argument("--prompt-embeds", metavar="E.npz", help="text-to-image models: the prompts' embeddings "
                      "(blockcache-encode-prompts), one image per prompt, guided by the file's negative prompt")
    noise = s.add_mutually_exclusive_group()
    noise.add_argument("--seed", type=int, help="noise seed for the whole call (default 0)")
    noise.add_argument("--seeds", help="comma-separated noise seeds, one per label or prompt: image i's noise from seed i alone "
                       "(the same image whatever it is batched with)")
    noise.add_argument("--noise", metavar="Z.npy", help="starting noise (N, C, H, W) for the N labels")
    s.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default: the family's "
                   "for eager runs, 4.0 DiT / 0.4 U-ViT in its form; the plan's scale with --plan)")
    s.add_argument("--vae", metavar="PATH", help="eager runs: decode with this autoencoder (a diffusers folder or "
                   "one latent-diffusion file, as blockcache-export --vae takes)")
    s.add_argument("--guidance-channels", choices=GUIDANCE_CHANNELS,
                   help="guidance form: first three channels (official DiT), all (diffusers) or uvit "
                        "(cond + s·(cond − uncond)); default: the model family's")
    p.add_argument("--out", required=True, help="OUT.png (grid), DIR/ (one PNG per image: <index>-<label>-<seed>.png) "
                   "or OUT.npy; without a decoder, latents: OUT.npy, or OUT.png for 1- or 3-channel models")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _load_noise(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise BlockcacheError(f"cannot read noise {path}: {' '.join(str(e).split())[:160]}") from None


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    prompts = None
    if args.prompt_embeds:
        from schedules.prompts import PromptInputs, load_prompt_embeds

        e = load_prompt_embeds(args.prompt_embeds)
        prompts = PromptInputs(e["prompt_embeds"], e["prompt_mask"], e["negative_embeds"], e["negative_mask"])
        labels = list(range(len(prompts)))  # images are named by prompt index
    else:
        labels = parse_labels(args.labels)
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise BlockcacheError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    folder = is_folder_output(args.out)
    if folder:  # made now: a folder that cannot be made is refused before sampling
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            raise BlockcacheError(f"--out {args.out}: cannot make the folder ({e.strerror or e})") from None
    else:
        check_output(args.out, (".npy", ".png"), "--out")  # before sampling, not after
    noise = _load_noise(args.noise) if args.noise else None
    seeds = parse_numbers(args.seeds, "--seeds") if args.seeds else None
    if seeds is not None and len(seeds) != len(labels):
        what = "prompt" if prompts is not None else "label"
        raise BlockcacheError(f"--seeds has {len(seeds)} seeds for {len(labels)} {what}s: give one per {what}")
    seed = 0 if args.seed is None else args.seed
    names = ["noise"] * len(labels) if noise is not None else seeds if seeds is not None else [seed] * len(labels)
    start = time.perf_counter()
    if args.plan:
        if args.model or args.checkpoint or args.random_init or args.schedule or args.spacing or args.vae:
            raise BlockcacheError("--plan carries its model, schedules and decoder: drop --model/--checkpoint/"
                                  "--schedule/--spacing/--vae (--steps chooses among the plan's schedules)")
        from runtime import Sampler

        given = {"noise": noise} if noise is not None else {"seeds": seeds} if seeds is not None else {"seed": seed}
        with Sampler(args.plan, backend=args.backend, device=args.device) as sampler:
            _check_images_out(args.out, folder, sampler.plan.decoder is not None, sampler.latent_shape[0])
            what = f"plan {args.plan} on {sampler.backend_name}"
            conditioning = {"class_labels": labels} if prompts is None else {
                "prompt_embeds": prompts.embeds, "prompt_mask": prompts.mask,
                "negative_embeds": prompts.negative_embeds, "negative_mask": prompts.negative_mask}
            out = sampler(**conditioning, guidance_scale=args.guidance_scale, steps=args.steps, **given)
    else:
        if not args.model:
            raise BlockcacheError("give --model (eager reference) or --plan (exported plan)")
        if args.schedule and args.steps is not None:
            raise BlockcacheError("give --schedule or --steps, not both")
        from .models import load_model
        from .reference import sample

        model = load_model(args.model, args.checkpoint, random_init=args.random_init, seed=args.init_seed,
                           **model_overrides(args))
        family = family_of(model.config)
        schedule = (Schedule.load(args.schedule) if args.schedule
                    else Schedule.full(model.unit_names, DEFAULT_STEPS if args.steps is None else args.steps,
                                       args.spacing, model=args.model, sampler=family.samplers[0]))
        decoder = None
        if args.vae:
            from .export import check_decoder
            from .vae import load_decoder

            decoder = load_decoder(args.vae)
            check_decoder(model, decoder)
        c, size = model.in_channels, model.config["input_size"]
        _check_images_out(args.out, folder, decoder is not None, c)
        if noise is None and seeds is not None:  # as runtime.Sampler: image i from seed i alone
            noise = np.concatenate([initial_noise((1, c, size, size), s) for s in seeds])
        elif noise is None:
            noise = initial_noise((len(labels), c, size, size), seed)
        scale, _ = family.guidance_settings(args.guidance_scale)
        out = sample(model, schedule, None if prompts is not None else labels, noise, prompts=prompts,
                     guidance_scale=scale, guidance_channels=args.guidance_channels, progress=not args.quiet)
        if decoder is not None:
            import torch

            with torch.no_grad():
                out = decoder(torch.from_numpy(out)).numpy()
        what = f"eager {args.model}, {schedule.num_steps} steps ({schedule.source or 'schedule'}), guidance {scale}"
    if out.dtype == np.uint8:
        written = save_images(out, args.out, labels, names)
    else:
        save_samples(out, args.out)
        written = [args.out]
    if not args.quiet:
        where = args.out if len(written) == 1 else f"{len(written)} PNGs in {args.out}"
        kind = "images" if out.dtype == np.uint8 else "latents"
        print(f"wrote {where}: {out.shape[0]} {kind}, {what}, {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


def _check_images_out(out: str, folder: bool, images: bool, channels: int) -> None:
    """Refuse, before sampling, an output that the run cannot fill: one PNG per image without images, or
    a PNG grid of latents that are not images."""
    if folder and not images:
        raise BlockcacheError(f"--out {out}: one PNG per image needs images, and this run yields latents (a plan "
                              "exported with --vae, or --vae for eager runs); write .npy")
    if not images and channels not in (1, 3) and out.lower().endswith(".png"):
        raise BlockcacheError(f"{channels}-channel latents are not images (no decoder here): write .npy or give --vae")


if __name__ == "__main__":
    raise SystemExit(main())
