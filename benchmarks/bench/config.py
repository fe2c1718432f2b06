"""What a benchmark run measures: `BenchConfig`, checked in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from runtime.plan.names import PRECISIONS, STORED_PRECISIONS
from schedules.errors import BlockcacheError
from schedules.sampling import SPACINGS, check_guidance_scale

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
METHODS = ("eager", "compile", "torch", "torch-inductor", "onnxruntime", "tensorrt")
PLAN_METHODS = ("torch", "torch-inductor", "onnxruntime", "tensorrt")
FIDELITY_REFERENCE = "eager PyTorch fp32 full compute, same sampler, noise and labels"


@dataclass
class BenchConfig:
    model: str
    overrides: dict = field(default_factory=dict)
    checkpoint: str | None = None
    random_init: bool = False
    init_seed: int = 0
    schedules: list = field(default_factory=lambda: ["l2c20"])
    steps: int = 20  # for uniform:K specs
    spacing: str = "linspace"
    methods: list = field(default_factory=lambda: ["eager", "torch", "onnxruntime"])
    precisions: list = field(default_factory=lambda: ["fp32"])
    device: str = "auto"
    batch_size: int = 2
    labels: list | None = None
    seed: int = 0
    guidance_scale: float = 4.0
    repeats: int = 5
    warmup: int = 1
    fewer_steps: bool = True
    compile_mode: str = "max-autotune"
    compile_backend: str = "inductor"
    bf16_plan: str = "fp32"  # the stored precision a bf16 torch-backend run casts from
    plans_dir: str | None = None  # keep exported plans there and reuse them; default: a temporary folder
    threads: int | None = None
    progress: bool = True
    peers: list = field(default_factory=list)  # peer specs (peers.py); their rows run `steps` DDIM steps
    matched: list = field(default_factory=lambda: ["uniform", "block-caching", "l2c"])  # makers (matched.py)

    def check(self) -> None:
        if not self.schedules and not self.peers:
            raise BlockcacheError("give at least one schedule or peer")
        if self.peers:
            from .matched import check_makers
            from .peers import parse_peers

            parse_peers(self.peers)  # one line for an unknown spec, before anything runs
            check_makers(self.matched)
        for m in self.methods:
            if m not in METHODS:
                raise BlockcacheError(f"unknown method {m!r} (expected some of {', '.join(METHODS)})")
        if not self.methods:
            raise BlockcacheError("give at least one method (--backends)")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise BlockcacheError(f"unknown precision {p!r} (expected some of {', '.join(PRECISIONS)})")
        if not self.precisions:
            raise BlockcacheError("give at least one precision")
        if self.bf16_plan not in STORED_PRECISIONS:
            raise BlockcacheError(f"bf16 plans cast from fp32 or fp16 plans, not {self.bf16_plan!r}")
        for name, value, low in (("batch size", self.batch_size, 1), ("repeats", self.repeats, 1),
                                 ("warm-up", self.warmup, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BlockcacheError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise BlockcacheError(f"threads must be a positive integer, got {self.threads!r}")
        if check_guidance_scale(self.guidance_scale) < 0:
            raise BlockcacheError(f"guidance scale must be a finite non-negative number, got {self.guidance_scale}")
        if self.spacing not in SPACINGS:
            raise BlockcacheError(f"unknown spacing {self.spacing!r} (expected one of {', '.join(SPACINGS)})")
        if self.labels is not None and len(self.labels) != self.batch_size:
            raise BlockcacheError(f"{len(self.labels)} labels given for a batch of {self.batch_size}")
