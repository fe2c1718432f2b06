"""What the decoder costs beside the sampling loop, on this CPU (ONNX Runtime plan, one thread).

    python -m benchmarks.decoder_cpu [--out benchmarks/results] [--repeats 3]

Model: DiT-XL/2's depth and token count (28 blocks, 32×32 latents for 256 px, patch 2) at width 256
(4 heads), random weights, 1 image with CFG, DDIM-20: the full-compute plan and the published L2C
DDIM-20 schedule where `../shared/data/l2c/DDIM20_router.pt` is present. Decoder: the Stable Diffusion
autoencoder's real decoder shape (`SD_VAE`: widths 128, 256, 512, 512, two blocks per level, 4 latent
channels, as `sd-vae-ft-ema`'s config.json), random weights, decoding to 256×256 uint8. Reports per
image the latency of the sampling call without decoding (`output="latents"`) and with it, and the
process CPU time on one thread of each (insensitive to other load); the decoder's share is their
difference.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

from benchmarks import write_json

MODEL = dict(name="dit-xl2", hidden_size=256, num_heads=4)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256)
ROUTER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "l2c", "DDIM20_router.pt")


def _calls(sampler, output: str, repeats: int) -> dict:
    sampler([1], seed=0, output=output)  # warm-up
    wall, cpu = [], []
    for r in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        sampler([1], seed=r, output=output)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import torch
    from diffusers import AutoencoderKL

    from exporter.export import export_plan
    from exporter.models import load_model
    from runtime import Sampler
    from runtime.nn.decoder import ImageDecoder
    from schedules import Schedule
    from schedules.l2c import import_l2c

    torch.manual_seed(0)
    model = load_model(MODEL["name"], random_init=True, hidden_size=MODEL["hidden_size"], num_heads=MODEL["num_heads"])
    decoder = ImageDecoder(AutoencoderKL(**SD_VAE).eval(), 0.18215)
    schedules = {"full": Schedule.full(model.unit_names, 20)}
    if os.path.exists(ROUTER):
        schedules["l2c20"] = import_l2c(ROUTER, model.unit_names, 20)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d"), "model": MODEL, "sampler": "ddim, 20 steps",
               "batch": "1 image with CFG 4 (graph batch 2)", "threads": 1,
               "decoder": {"config": SD_VAE, "weights": "random", "shape": "32x32x4 -> 256x256x3"},
               "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, schedule in schedules.items():
            path = os.path.join(tmp, name)
            export_plan(model, schedule, path, batch_size=1, guidance_scale=4.0, decoder=decoder)
            with Sampler(path, backend="onnxruntime", device="cpu", threads=1) as sampler:
                latents = _calls(sampler, "latents", args.repeats)
                images = _calls(sampler, "images", args.repeats)
            row = {"schedule": name, "latents": latents, "images": images,
                   "decoder_wall_s": images["wall_s"] - latents["wall_s"],
                   "decoder_cpu_s": images["cpu_s"] - latents["cpu_s"]}
            row["decoder_share_cpu"] = row["decoder_cpu_s"] / images["cpu_s"]
            results["rows"].append(row)
            print(f"{name}: loop {latents['cpu_s']:.2f} s CPU ({latents['wall_s']:.2f} s wall), with decoder "
                  f"{images['cpu_s']:.2f} s CPU ({images['wall_s']:.2f} s wall): decoder {row['decoder_cpu_s']:.2f} s "
                  f"= {row['decoder_share_cpu']:.0%} of the call", flush=True)
    print("wrote", write_json(args.out, results['date'] + "-decoder-cpu", results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
