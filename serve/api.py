"""The HTTP API of `blockcache-serve`, without Ray: what a request may say, how a plan is described,
and how a result is encoded. The deployments (serve/app.py) call these; tests call them directly.

    POST /v1/samples  {"plan": "l2c", "labels": [207, 360], "seeds": [1, 2], "guidance_scale": 4.0,
                       "steps": 20, "format": "npy"}      → application/x-npy or image/png
    GET  /v1/plans    → {"plans": [{"name", "model", "family", "batch_sizes", "steps", "guidance", …}]}
    GET  /healthz     → 200 {"status": "ready", …} once every replica has loaded its plan, else 503

Every refusal is a 4xx with `{"error": "<one line>"}`. A response's headers say, per image, its seed
(`X-Blockcache-Seeds`, drawn by the service where the request gave none, so any image can be asked
for again), the compiled batch size it ran at (`X-Blockcache-Run-Sizes`) and how many images its
Serve batch gathered (`X-Blockcache-Batch-Images`); `X-Blockcache-Replica` names the replica.
"""

from __future__ import annotations

import io
import json
import math
import re
import secrets
from dataclasses import dataclass

import numpy as np

from schedules.errors import BlockcacheError
from schedules.images import write_images_png, write_samples_png

MAX_LABELS = 256  # images one request may ask for (a larger one is refused: split it)
MAX_BODY_BYTES = 64 * 1024  # a request body of MAX_LABELS labels and seeds needs under 12 KiB
MAX_SEED = 2 ** 63 - 1
FORMATS = {"npy": "application/x-npy", "png": "image/png"}
FIELDS = ("plan", "labels", "seeds", "guidance_scale", "steps", "format")
PLAN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HEADER_SEEDS, HEADER_RUN_SIZES, HEADER_BATCH_IMAGES, HEADER_REPLICA = (
    "X-Blockcache-Seeds", "X-Blockcache-Run-Sizes", "X-Blockcache-Batch-Images", "X-Blockcache-Replica")


class RequestError(Exception):
    """A request the service refuses: an HTTP status and a one-line message for `{"error": …}`."""

    def __init__(self, status: int, message: str):
        super().__init__(" ".join(str(message).split())[:300])
        self.status = status

    def body(self) -> bytes:
        return error_body(str(self))


def error_body(message: str) -> bytes:
    return json.dumps({"error": " ".join(str(message).split())[:300]}).encode()


def describe(name: str, plan) -> dict:
    """What `GET /v1/plans` says of a plan (a runtime `Plan`), and what a request is checked against.
    A text-to-image plan is refused in one line: the API takes class labels (prompt embeddings, about
    5 MB per Σ prompt in float32, would need an API of their own)."""
    if plan.num_labels == 0:
        raise BlockcacheError(f"plan {name} is a text-to-image plan ({plan.model_name or plan.family}): "
                              "blockcache-serve samples class labels only for now; use runtime.Sampler")
    images = plan.decoder is not None
    size = plan.decoder.image_size if images else None
    channels = plan.latent_shape[0]
    return {"name": name, "model": plan.model_name, "family": plan.family, "labels": plan.num_labels,
            "batch_sizes": sorted({p.batch_size for p in plan.programs}), "steps": list(plan.step_counts),
            "guidance": {"enabled": plan.guidance.enabled, "scale": plan.guidance.scale,
                         "channels": plan.guidance.channels},
            "precision": plan.precision, "output": "images" if images else "latents",
            "shape": [size, size, 3] if images else list(plan.latent_shape),
            "formats": ["npy", "png"] if images or channels in (1, 3) else ["npy"]}


def check_plan_name(name: str) -> str:
    if not isinstance(name, str) or not PLAN_NAME.fullmatch(name):
        raise ValueError(f"plan name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit")
    return name


@dataclass(frozen=True)
class SampleRequest:
    """A checked `POST /v1/samples`: the plan's name, one seed per label (drawn where none was given)."""
    plan: str
    labels: tuple[int, ...]
    seeds: tuple[int, ...]
    guidance_scale: float | None
    steps: int | None
    format: str


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_constant(name: str):
    raise RequestError(400, f"the body is not valid JSON: {name} is not a number JSON allows")


def parse_sample_request(body: bytes, plans: dict) -> SampleRequest:
    """The request in `body` checked against `plans` ({name: describe(…)}); RequestError otherwise.
    Labels are checked here against the plan's range; the replica's Sampler checks the rest (steps,
    guidance) before the request joins a batch."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"the body has {len(body)} bytes, more than {MAX_BODY_BYTES}")
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(doc, dict):
        raise RequestError(400, "the body must be a JSON object such as {\"labels\": [1, 2]}")
    unknown = [k for k in doc if k not in FIELDS]
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0][:40]!r} (fields: {', '.join(FIELDS)})")
    name = doc.get("plan")
    if name is None:
        if len(plans) != 1:
            raise RequestError(400, f"this service has {len(plans)} plans: name one with \"plan\" "
                               f"({', '.join(sorted(plans))})")
        name = next(iter(plans))
    if not isinstance(name, str) or name not in plans:
        raise RequestError(404, f"unknown plan {str(name)[:64]!r} (plans: {', '.join(sorted(plans))})")
    info = plans[name]

    labels = doc.get("labels")
    if not isinstance(labels, list) or not labels or not all(_integer(v) for v in labels):
        raise RequestError(400, "\"labels\" must be a non-empty list of integers")
    if len(labels) > MAX_LABELS:
        raise RequestError(413, f"{len(labels)} labels: a request may ask for at most {MAX_LABELS} images")
    bad = [v for v in labels if not 0 <= v < info["labels"]]
    if bad:
        raise RequestError(400, f"label {bad[0]} is out of range 0…{info['labels'] - 1} for plan {name!r}")

    seeds = doc.get("seeds")
    if seeds is None:
        seeds = [secrets.randbelow(2 ** 31) for _ in labels]
    elif not isinstance(seeds, list) or not all(_integer(v) and 0 <= v <= MAX_SEED for v in seeds):
        raise RequestError(400, f"\"seeds\" must be a list of integers in 0…{MAX_SEED}, one per label")
    elif len(seeds) != len(labels):
        raise RequestError(400, f"{len(seeds)} seeds for {len(labels)} labels: give one seed per label")

    scale = doc.get("guidance_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise RequestError(400, "\"guidance_scale\" must be a finite number")
    steps = doc.get("steps")
    if steps is not None and not _integer(steps):
        raise RequestError(400, "\"steps\" must be an integer")
    fmt = doc.get("format", "npy")
    if fmt not in FORMATS:
        raise RequestError(400, f"\"format\" must be one of {', '.join(FORMATS)}, got {str(fmt)[:40]!r}")
    if fmt not in info["formats"]:
        raise RequestError(400, f"plan {name!r} yields {info['shape'][0]}-channel latents, not images: ask for npy")
    return SampleRequest(name, tuple(labels), tuple(seeds), None if scale is None else float(scale), steps, fmt)


def encode(array: np.ndarray, fmt: str, labels, seeds) -> bytes:
    """A result's bytes: the `.npy` file of the array as the Sampler returned it, or a PNG grid."""
    buffer = io.BytesIO()
    if fmt == "npy":
        np.save(buffer, array, allow_pickle=False)
    elif array.dtype == np.uint8:
        write_images_png(array, buffer, labels, seeds)
    else:
        write_samples_png(array, buffer)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """The array of a `.npy` response (never a pickle)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def header_list(values) -> str:
    return ",".join(str(int(v)) for v in values)
