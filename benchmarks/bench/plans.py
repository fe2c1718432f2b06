"""The plans a benchmark run measures: exported on demand, with one trace of the model per step
settings (batch, guidance, precision) for all its schedules, and kept in a folder for later runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time

from .cases import Case
from .config import BenchConfig


class PlanStore:
    """Exports plans on demand into a folder, reusing one whose key (model weights, schedule, batch,
    guidance, precision) matches a previous export there. Tracing is what makes exports of large
    models slow, so every plan with the same step settings is made from one traced step graph."""

    def __init__(self, folder: str | None, model, cfg: BenchConfig):
        self.temporary = folder is None
        self.folder = tempfile.mkdtemp(prefix="blockcache-bench-") if folder is None else folder
        os.makedirs(self.folder, exist_ok=True)
        self.model, self.cfg = model, cfg
        self._digest = None
        self._traces = {}  # StepSettings → TracedStep
        self._plans = {}
        self.export_seconds = {}

    def key(self, case: Case, precision: str) -> str:
        from exporter.trace import weights_digest
        from runtime.plan.names import VERSION

        if self._digest is None:
            self._digest = weights_digest(self.model)
        text = json.dumps([VERSION, self._digest, case.schedule.to_yaml(), self.cfg.batch_size,
                           self.cfg.guidance_scale, precision])
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, case: Case, precision: str) -> str:
        from exporter.export import export_plan, plan_settings
        from exporter.trace import trace_step
        from runtime.plan.names import MANIFEST

        path = os.path.join(self.folder, f"{case.name}-{precision}")
        key_file = path + ".key"
        key = self.key(case, precision)
        if os.path.exists(os.path.join(path, MANIFEST)) and os.path.exists(key_file):
            with open(key_file) as f:
                if f.read().strip() == key:
                    return path
        self._plans.pop(path, None)
        start = time.perf_counter()
        options = dict(batch_size=self.cfg.batch_size, guidance_scale=self.cfg.guidance_scale, precision=precision)
        settings, _ = plan_settings(self.model, case.schedule, **options)
        if settings not in self._traces:
            self._traces[settings] = trace_step(self.model, settings)
        export_plan(self.model, case.schedule, path, traced=self._traces[settings], **options)
        self.export_seconds[f"{case.name}-{precision}"] = time.perf_counter() - start
        with open(key_file, "w") as f:
            f.write(key + "\n")
        return path

    def plan(self, path: str):
        """The plan in `path` (runtime.plan.Plan); files are checksummed on the first load in this run only."""
        from runtime.plan import load_plan

        if path not in self._plans:
            self._plans[path] = load_plan(path)
        return self._plans[path]

    def close(self):
        self._traces.clear()
        if self.temporary:
            shutil.rmtree(self.folder, ignore_errors=True)
