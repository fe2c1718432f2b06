"""`blockcache-bench`: how fast and how faithful caching schedules are, per backend and precision.

    blockcache-bench --model dit-s2 --depth 28 --random-init --schedule l2c20 --schedule uniform:3 \\
        --backends eager,torch,onnxruntime --precision fp32 --out benchmarks/results

For every precision, method and schedule it measures warm latency (median, min, max and standard
deviation over `--repeats` timed calls after `--warmup` untimed ones, one batch of `--batch-size`
images, guidance doubling the network batch), the speedup over the same method's full-compute run with
the same sampler, the ideal speedup from MACs (schedules/cost.py) and efficiency = speedup / ideal,
peak host memory (process RSS, polled during load and warm-up) and peak device memory (PyTorch's
allocator; ONNX Runtime's CUDA memory is not visible to it), and fidelity to full compute.

Methods:
- `eager`: PyTorch, the official forward for full compute, and for a cached schedule the schedule
  applied by one Python branch per unit (exporter/reference.py's policy, as the papers' code runs).
- `compile`: `torch.compile` of the full denoising step (`--compile-mode`, default max-autotune);
  full-compute schedules only.
- `torch`, `onnxruntime`, `tensorrt`: an exported plan replayed by that runtime backend.
- `torch-inductor`: the torch backend with each DiT block compiled by inductor (`--compile-mode`,
  without inductor's CUDA graphs: the backend captures the whole loop itself).

Peers (`--peers all` or a list; bench/peers.py): diffusers' full compute (eager, and `compile`),
FirstBlockCache, TaylorSeer, MagCache (calibrated on one run), PyramidAttentionBroadcast, FasterCache and
cache-dit's DBCache presets, on the same weights in diffusers' `DiTTransformer2DModel`, each compared with
diffusers' own full compute; their compute share is what their first call really ran. For each peer,
blockcache schedules with the same ideal speedup (`--matched`: uniform, block-caching, l2c) run as plans,
and a summary compares the fastest peer and plan at each fidelity (bench/side_by_side.py).

Schedules: for each cached schedule the harness adds its sampler's full-compute run (`full<N>`) and a
fewer-steps DDIM run with about the same MACs (`ddim<M>`, M = round(N / ideal speedup)). Specs:
`l2c20` / `l2c50` (committed L2C imports for 28-block DiTs), `uniform:K` (every K-th step, `--steps`),
a schedule YAML path, or an L2C router file (`.pt`/`.pth`).

Fidelity: each run's final latents against eager PyTorch fp32 full compute with the same sampler,
noise and labels: PSNR (data range = the reference's max − min; for `dit-digits` images, 2 as in
benchmarks/digits_metric.py) and relative error ‖run − ref‖₂ / ‖ref‖₂. For `dit-digits` also class
accuracy and digits-FD (benchmarks/digits_metric.py; FD is biased at small N: compare equal N).

Output: `<out>/<tag>.json`, `<out>/<tag>.md` (table) and `<out>/<tag>.png` (latency vs fidelity).
Timings on a shared machine are noisy; no test asserts one.

Modules: `config` (BenchConfig), `cases` (schedule specs → cases), `plans` (exported plans, one trace
per step settings), `runners` (eager, compiled and plan runners), `memory` (peak memory), `measure`
(timing, fidelity), `harness` (the measurement loop), `diffusers_dit` (the weights in diffusers' DiT,
its loop, the compute counter), `peers` (peer settings), `matched` (schedules matched to a peer's
compute), `side_by_side` (peer rows, matched cases, summary), `report` (JSON, markdown, plot), `cli`
(`blockcache-bench`).
"""
from .cases import build_cases
from .cli import main
from .config import RESULTS, BenchConfig
from .harness import derive, run_benchmark, torch_device
from .memory import MemoryMonitor
from .plans import PlanStore
from .report import json_default, markdown, write_results

__all__ = ["BenchConfig", "MemoryMonitor", "PlanStore", "RESULTS", "build_cases", "derive", "json_default", "main",
           "markdown", "run_benchmark", "torch_device", "write_results"]
