"""A small client of `blockcache-serve`'s HTTP API (serve/api.py), on the standard library and numpy:
no Ray, so any process can call a service.

    client = Client("http://127.0.0.1:8000")
    client.wait_ready(timeout=120)
    out = client.samples([207, 360], seeds=[1, 2], steps=20)   # out.array, out.seeds, out.run_sizes
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message

import numpy as np

from schedules.errors import BlockcacheError

from . import api


class ServiceError(BlockcacheError):
    """The service answered with an error: its HTTP status and one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


@dataclass(frozen=True)
class Samples:
    array: np.ndarray | None  # what Sampler returned (format npy), else None
    png: bytes | None  # the grid (format png), else None
    seeds: tuple[int, ...]  # per image: its seed (the service draws them where none were given)
    run_sizes: tuple[int, ...]  # per image: the compiled batch size it ran at
    batch_images: tuple[int, ...]  # per image: images its Serve batch gathered
    replica: str
    seconds: float  # request to response, on this side


def _ints(header: str | None) -> tuple[int, ...]:
    return tuple(int(v) for v in header.split(",")) if header else ()


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 300.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def request(self, method: str, route: str, body: bytes | None = None) -> tuple[int, Message, bytes]:
        """(status, headers (case-insensitive), body) of one HTTP exchange; the service's errors are
        returned, not raised."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        req = urllib.request.Request(self.url + route, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def _json(self, method: str, route: str, body: bytes | None = None) -> dict:
        status, _, data = self.request(method, route, body)
        self._check(status, data)
        return json.loads(data)

    @staticmethod
    def _check(status: int, data: bytes) -> None:
        if status >= 400:
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = data[:200].decode("utf-8", "replace")
            raise ServiceError(status, message)

    def plans(self) -> list[dict]:
        return self._json("GET", "/v1/plans")["plans"]

    def healthz(self) -> dict:
        return self._json("GET", "/healthz")

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> dict:
        """Poll /healthz until ready; ServiceError (or the connection's error) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.healthz()
            except (ServiceError, OSError):
                if time.monotonic() > deadline:
                    raise
            time.sleep(interval)

    def samples(self, labels, *, seeds=None, plan: str | None = None, guidance_scale: float | None = None,
                steps: int | None = None, format: str = "npy") -> Samples:
        doc = {"labels": [int(v) for v in labels], "format": format}
        for key, value in (("seeds", seeds), ("plan", plan), ("guidance_scale", guidance_scale), ("steps", steps)):
            if value is not None:
                doc[key] = [int(v) for v in value] if key == "seeds" else value
        start = time.perf_counter()
        status, headers, data = self.request("POST", "/v1/samples", json.dumps(doc).encode())
        seconds = time.perf_counter() - start
        self._check(status, data)
        return Samples(api.decode_npy(data) if format == "npy" else None, data if format == "png" else None,
                       _ints(headers.get(api.HEADER_SEEDS)), _ints(headers.get(api.HEADER_RUN_SIZES)),
                       _ints(headers.get(api.HEADER_BATCH_IMAGES)), headers.get(api.HEADER_REPLICA, ""), seconds)
