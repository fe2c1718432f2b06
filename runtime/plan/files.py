"""Reading a plan folder: the sealed manifest, checksums, the graphs against the manifest, weights and
scale-shift vectors (runtime/plan/staging.py writes one).

What a loaded plan guarantees (docs/ARCHITECTURE.md, "What a plan guarantees"): the manifest is read
only from a regular file of bounded size, parsed strictly (no duplicate keys, no NaN or infinity), and
its seal matches; every file it names is a plain, regular, non-symlinked file of the plan folder whose size and
SHA-256 match; every variant graph matches the manifest (runtime/plan/graphs.py). Every reader turns
OS errors into one line; nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat

import numpy as np

from schedules.errors import BlockcacheError, ParameterError
from schedules.schedule import scale_shift_key

from . import names
from .graphs import verify_graphs
from .manifest import Plan, Program, manifest_seal

MAX_MANIFEST_BYTES = 64 << 20  # a DiT-XL/2 manifest is about 0.3 MB


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str) -> dict:
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def regular_file(path: str, what: str = "plan file") -> os.stat_result:
    """`path`'s status if it is a regular file (not a symbolic link, device or folder); one line otherwise."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise BlockcacheError(f"{what} missing: {path}") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise BlockcacheError(f"cannot read {what} {path!r}: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISLNK(info.st_mode):
        raise BlockcacheError(f"{what} {path} is a symbolic link: a plan's files must lie in its folder")
    if not stat.S_ISREG(info.st_mode):
        raise BlockcacheError(f"{what} {path} is not a regular file")
    return info


# -- reading ----------------------------------------------------------------------------------------

def read_document(plan_dir) -> dict:
    """The manifest of `plan_dir` as stored: read from a regular file of at most MAX_MANIFEST_BYTES and
    parsed strictly (duplicate keys, NaN and infinities refused), not yet validated."""
    if not isinstance(plan_dir, (str, os.PathLike)):
        raise ParameterError("plan_dir", f"{{name}} must be a folder path, not {type(plan_dir).__name__}")
    if not os.path.isdir(plan_dir):
        raise BlockcacheError(f"plan folder not found: {plan_dir}")
    path = os.path.join(plan_dir, names.MANIFEST)
    if not os.path.lexists(path):
        raise BlockcacheError(f"{plan_dir} is not a plan: {names.MANIFEST} is missing")
    if regular_file(path, "manifest").st_size > MAX_MANIFEST_BYTES:
        raise BlockcacheError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a plan's")
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8")
    except UnicodeDecodeError:
        raise BlockcacheError(f"{path}: truncated or corrupted manifest (not UTF-8 text)") from None
    except OSError as e:
        raise BlockcacheError(f"cannot read {path}: {e.strerror}") from None
    return strict_json(text, path)


def strict_json(text: str, where: str):
    """JSON with one value per key and finite numbers only; one line for anything else."""
    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise BlockcacheError(f"{where}: key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
        return dict(items)

    def constant(name):
        raise BlockcacheError(f"{where}: {name} is not a number a plan may hold")

    def finite(text):
        value = float(text)
        if not math.isfinite(value):  # 1e999 reads as inf
            constant(text)
        return value

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant, parse_float=finite)
    except json.JSONDecodeError as e:
        raise BlockcacheError(f"{where}: truncated or corrupted manifest ({e})") from None
    except RecursionError:
        raise BlockcacheError(f"{where}: nested too deeply to be a plan manifest") from None
    except ValueError as e:  # an integer of thousands of digits
        raise BlockcacheError(f"{where}: not a plan manifest ({str(e)[:100]})") from None


def load_plan(plan_dir, verify: bool = True) -> Plan:
    """The validated plan in `plan_dir`. The manifest's seal is always checked; with `verify`, also
    every listed file's size and checksum and every graph against the manifest. A version-1 plan (no
    seal) is refused: `blockcache-plan upgrade` seals one after checking everything else."""
    if not isinstance(verify, bool):
        raise ParameterError("verify", f"{{name}} must be true or false, not {verify!r}")
    document = read_document(plan_dir)
    path = os.path.join(plan_dir, names.MANIFEST)
    version = document.get("version") if isinstance(document, dict) else None
    if version == names.VERSION and not isinstance(version, bool):
        if document.get("seal") != manifest_seal(document):
            raise BlockcacheError(f"{path}: the manifest fails its seal (corrupted or edited)")
    elif version in names.READABLE_VERSIONS and not isinstance(version, bool):
        raise BlockcacheError(f"{path}: plan version {version} has no seal, so damage to its manifest could go "
                              f"unnoticed: check and seal it with `blockcache-plan upgrade {plan_dir}`, or re-export it")
    return parse_and_verify(document, os.fspath(plan_dir), verify)


def parse_and_verify(document, plan_dir: str, verify: bool = True) -> Plan:
    """`Plan.parse`, then (with `verify`) the files' checksums and the graphs. A manifest of a shape no
    check anticipated is still refused in one line."""
    try:
        plan = Plan.parse(document, plan_dir)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, UnicodeError) as e:
        raise BlockcacheError(f"{os.path.join(plan_dir, names.MANIFEST)}: malformed manifest "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    if verify:
        verify_files(plan)
        verify_graphs(plan)
    return plan


def load_manifest(plan_dir, verify: bool = True) -> dict:
    """The manifest document of `plan_dir` (plain JSON data), validated as `load_plan` does."""
    return load_plan(plan_dir, verify).document


def verify_files(plan: Plan) -> None:
    for name, entry in plan.files.items():
        path = plan.path(name)
        size = regular_file(path).st_size
        if size != entry.size:
            raise BlockcacheError(f"plan file {path} has {size} bytes, expected {entry.size} (truncated or replaced)")
        try:
            digest = sha256_file(path)
        except OSError as e:
            raise BlockcacheError(f"cannot read plan file {path}: {e.strerror}") from None
        if digest != entry.sha256:
            raise BlockcacheError(f"plan file {path} fails its checksum (corrupted or edited)")


def read_weights(plan: Plan) -> np.ndarray:
    """The plan's weights file as one uint8 array (every stored tensor is a view into it)."""
    path = plan.path(plan.weights.file)
    try:
        blob = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise BlockcacheError(f"cannot read plan weights {path}: {e.strerror}") from None
    expected = plan.files[plan.weights.file].size
    if blob.size != expected:
        raise BlockcacheError(f"plan weights {path} has {blob.size} bytes, expected {expected} "
                              f"({'too short: truncated plan?' if blob.size < expected else 'replaced?'})")
    return blob


def stored_array(blob: np.ndarray, plan: Plan, name: str) -> np.ndarray:
    """Stored tensor `name` as a typed view of `blob` (read_weights); bfloat16 as its uint16 bits."""
    t = plan.weights.tensors[name]  # its length was checked against its shape and dtype by Plan.parse
    dtype = np.dtype(np.uint16) if t.dtype == "bfloat16" else np.dtype(t.dtype)
    return blob[t.offset: t.offset + t.length].view(dtype).reshape(t.shape)


def plan_corrections(plan: Plan, program: Program) -> list[dict]:
    """Per step of `program`, {unit: (scale, shift)} float32 vectors for every unit its variant
    corrects (`adjusts`); zeros where the schedule has no correction for that step. Empty dicts for a
    program without scale-shift. Read with safetensors' numpy loader: plain tensors, no code runs."""
    if program.scale_shift_file is None:
        return [{} for _ in program.steps]
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = plan.path(program.scale_shift_file)
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise BlockcacheError(f"cannot read the plan's scale-shift file {path}: {e}") from None
    out, used = [], set()
    for s, step in enumerate(program.steps):
        adjust = {}
        for unit in program.variants[step.variant].adjusts:
            width = program.cache[unit].shape[-1]
            keys = [scale_shift_key(kind, s, unit) for kind in ("scale", "shift")]
            used.update(keys)
            pair = tuple(tensors.get(key, np.zeros(width, np.float32)) for key in keys)
            if any(v.shape != (width,) or v.dtype != np.float32 or not np.isfinite(v).all() for v in pair):
                raise BlockcacheError(f"{path}: scale-shift for step {s}, unit {unit} is not {width} finite float32 "
                                      "values")
            adjust[unit] = pair
        out.append(adjust)
    unused = sorted(set(tensors) - used)
    if unused:
        raise BlockcacheError(f"{path} holds {unused[0]!r}, which no step of the plan corrects (not this plan's file?)")
    return out


