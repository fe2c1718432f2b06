"""Peak process RSS (polled) and peak PyTorch device memory over a span of a benchmark run."""

from __future__ import annotations

import os
import threading


def current_rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryMonitor:
    """Peak process RSS (polled every few ms) and peak PyTorch device memory over a span."""

    def __init__(self, device: str, interval: float = 0.003):
        self.device, self.interval = device, interval
        self.base_rss = self.peak_rss = None
        self.base_device = self.peak_device = None

    def __enter__(self):
        self.base_rss = self.peak_rss = current_rss()
        self._stop = threading.Event()
        if self.base_rss is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_device = torch.cuda.memory_allocated(self.device)
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            rss = current_rss()
            if rss is not None and rss > self.peak_rss:
                self.peak_rss = rss

    def __exit__(self, *exc):
        self._stop.set()
        if self.base_rss is not None:
            self._thread.join()
            rss = current_rss()
            if rss is not None:
                self.peak_rss = max(self.peak_rss, rss)
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            self.peak_device = torch.cuda.max_memory_allocated(self.device)
        return False

    def report(self) -> dict:
        mb = 1 << 20
        out = {"peak_host_mb": None, "host_increase_mb": None, "peak_device_mb": None, "device_increase_mb": None}
        if self.peak_rss is not None:
            out["peak_host_mb"] = self.peak_rss / mb
            out["host_increase_mb"] = (self.peak_rss - self.base_rss) / mb
        if self.peak_device is not None:
            out["peak_device_mb"] = self.peak_device / mb
            out["device_increase_mb"] = (self.peak_device - self.base_device) / mb
        return out
