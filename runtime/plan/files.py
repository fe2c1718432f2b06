"""The plan folder on disk: reading it (manifest, checksums, weights, scale-shift vectors) and writing
it (the manifest writer and the staging folder that replaces a plan atomically).

Every reader turns OS errors into one line; nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from schedules.errors import BlockcacheError, ParameterError
from schedules.schedule import scale_shift_key

from . import names
from .manifest import Plan


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str) -> dict:
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


# -- reading ----------------------------------------------------------------------------------------

def read_document(plan_dir: str) -> dict:
    """The manifest of `plan_dir` as stored (parsed JSON, not yet validated)."""
    if not os.path.isdir(plan_dir):
        raise BlockcacheError(f"plan folder not found: {plan_dir}")
    path = os.path.join(plan_dir, names.MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BlockcacheError(f"{plan_dir} is not a plan: {names.MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BlockcacheError(f"{path}: truncated or corrupted manifest ({e})") from None
    except OSError as e:
        raise BlockcacheError(f"cannot read {path}: {e.strerror}") from None


def load_plan(plan_dir: str, verify: bool = True) -> Plan:
    """The validated plan in `plan_dir`; with `verify`, every listed file's size and checksum too."""
    plan = Plan.parse(read_document(plan_dir), plan_dir)
    if verify:
        verify_files(plan)
    return plan


def load_manifest(plan_dir: str, verify: bool = True) -> dict:
    """The manifest document of `plan_dir` (plain JSON data), validated as `load_plan` does."""
    return load_plan(plan_dir, verify).document


def verify_files(plan: Plan) -> None:
    for name, entry in plan.files.items():
        path = plan.path(name)
        if not os.path.isfile(path):
            raise BlockcacheError(f"plan file missing: {path}")
        size = os.path.getsize(path)
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


def plan_corrections(plan: Plan) -> list[dict]:
    """Per step, {unit: (scale, shift)} float32 vectors for every unit its variant corrects (`adjusts`);
    zeros where the schedule has no correction for that step. Empty dicts for a plan without
    scale-shift. Read with safetensors' numpy loader: plain tensors, no code runs."""
    if plan.scale_shift_file is None:
        return [{} for _ in plan.steps]
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = plan.path(plan.scale_shift_file)
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise BlockcacheError(f"cannot read the plan's scale-shift file {path}: {e}") from None
    out, used = [], set()
    for s, step in enumerate(plan.steps):
        adjust = {}
        for unit in plan.variants[step.variant].adjusts:
            width = plan.cache[unit].shape[-1]
            keys = [scale_shift_key(kind, s, unit) for kind in ("scale", "shift")]
            used.update(keys)
            pair = tuple(tensors.get(key, np.zeros(width, np.float32)).astype(np.float32) for key in keys)
            if any(v.shape != (width,) for v in pair):
                raise BlockcacheError(f"{path}: scale-shift for step {s}, unit {unit} is not {width} channels")
            adjust[unit] = pair
        out.append(adjust)
    unused = sorted(set(tensors) - used)
    if unused:
        raise BlockcacheError(f"{path} holds {unused[0]!r}, which no step of the plan corrects (not this plan's file?)")
    return out


# -- writing ----------------------------------------------------------------------------------------

def write_manifest(plan_dir: str, document: dict, added: list[str] | None = None) -> dict:
    """Validate `document` and write it as the manifest of `plan_dir` (by rename, so a reader sees the
    old manifest or the new one); returns the document written. Its `files` are every file of a freshly
    written `plan_dir`, each checksummed; with `added`, the document's own `files` plus those files."""
    document = dict(document)
    if added is None:
        listed = sorted(name for name in os.listdir(plan_dir) if name != names.MANIFEST and not name.startswith("."))
        document["files"] = {name: file_entry(os.path.join(plan_dir, name)) for name in listed}
    else:
        document["files"] = {**document["files"], **{name: file_entry(os.path.join(plan_dir, name)) for name in added}}
    Plan.parse(document, plan_dir)  # the writer never writes a manifest the runtime would refuse
    fd, tmp = tempfile.mkstemp(dir=plan_dir, prefix=".manifest-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=1)
        os.replace(tmp, os.path.join(plan_dir, names.MANIFEST))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return document


def check_destination(out_dir: str) -> None:
    """Refuse to replace a folder that is not a plan: the user's other files are never deleted."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ParameterError("out_dir", f"{{name}} {out_dir} exists and is not a folder")
        if os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, names.MANIFEST)):
            raise ParameterError("out_dir", f"{{name}} {out_dir} is a non-empty folder that is not a plan; "
                                 "choose another")


@contextlib.contextmanager
def staging(out_dir: str):
    """A new folder beside `out_dir` to write a plan into. When the block ends without error the folder
    replaces `out_dir` (an existing plan is removed only after the swap); otherwise it is removed and
    `out_dir` stays as it was."""
    check_destination(out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-")
    try:
        yield tmp
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: str, out_dir: str) -> None:
    """Swap the finished folder `new` into place; an existing `out_dir` is removed only after the swap."""
    old = None
    if os.path.exists(out_dir):
        old = f"{new}.old"
        os.rename(out_dir, old)
    try:
        os.rename(new, out_dir)
    except BaseException:
        if old:
            os.rename(old, out_dir)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
