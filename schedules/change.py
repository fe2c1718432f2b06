"""The change-statistics file that `blockcache-schedule analyze` writes and `derive` reads (.npz).

    change       float64 (steps, units): unit u's relative L1 change between steps s−1 and s,
                 ‖o_s − o_{s−1}‖₁ / ‖o_s‖₁ of its raw branch output, averaged over every image of the
                 network batch (conditions × seeds, both CFG halves); row 0 is NaN (no earlier step)
    unit_names   the model's units, in order
    timesteps    the model timestep of each sampling step
    sampler      JSON: {name, steps, spacing}
    config       JSON: the model's constructor config (for the cost model)
    model        the model's name
    labels, seeds, guidance_scale   what was sampled

Plain arrays only: it is read with `allow_pickle=False`, so a file can never run code.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from .errors import BlockcacheError
from .files import atomic_output

VERSION = 1
FIELDS = ("version", "change", "unit_names", "timesteps", "sampler", "config", "model", "labels", "seeds",
          "guidance_scale")


def save_change(path, *, change, unit_names, timesteps, sampler: dict, config: dict, model: str | None, labels,
                seeds, guidance_scale: float) -> None:
    """Write atomically: an existing file is only replaced by a complete new one."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise BlockcacheError(f"change statistics must be written to a .npz file, got {path!r}")
    with atomic_output(path, ".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, version=np.int64(VERSION), change=np.asarray(change, dtype=np.float64),
                 unit_names=np.asarray(unit_names, dtype=str), timesteps=np.asarray(timesteps, dtype=np.int64),
                 sampler=np.asarray(json.dumps(sampler)), config=np.asarray(json.dumps(config)),
                 model=np.asarray(model or ""), labels=np.asarray(labels, dtype=np.int64),
                 seeds=np.asarray(seeds, dtype=np.int64), guidance_scale=np.float64(guidance_scale))


def load_change(path) -> dict:
    """The file's fields (sampler and config as dicts, unit_names as a tuple); one-line errors."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in FIELDS if k not in f.files]
            if missing:
                raise BlockcacheError(f"{path} is not a blockcache change-statistics file (no {missing[0]!r})")
            data = {k: f[k] for k in FIELDS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise BlockcacheError(f"cannot read change statistics {path}: {str(e).splitlines()[0] if str(e) else e}") \
            from None
    try:
        return _fields(path, data)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # fields of the wrong kind
        raise BlockcacheError(f"{path}: damaged change statistics ({type(e).__name__}: {str(e)[:100]})") from None


def _fields(path, data: dict) -> dict:
    def scalar(name, kind):
        value = data[name]
        if value.shape != () or value.dtype.kind not in kind:
            raise BlockcacheError(f"{path}: {name} must be a single {'integer' if kind == 'iu' else 'number'}")
        return value.item()

    if scalar("version", "iu") != VERSION:
        raise BlockcacheError(f"{path}: change-statistics version {int(data['version'])} is not supported "
                              f"(this blockcache reads version {VERSION})")
    change = data["change"]
    if change.dtype.kind != "f":
        raise BlockcacheError(f"{path}: change must be floating-point, not {change.dtype}")
    out = {"change": change.astype(np.float64), "unit_names": tuple(str(u) for u in data["unit_names"]),
           "timesteps": data["timesteps"], "model": str(data["model"]) or None,
           "labels": data["labels"].astype(np.int64), "seeds": data["seeds"].astype(np.int64),
           "guidance_scale": float(scalar("guidance_scale", "iuf"))}
    try:
        out["sampler"], out["config"] = json.loads(str(data["sampler"])), json.loads(str(data["config"]))
    except ValueError:
        raise BlockcacheError(f"{path}: damaged sampler or config entry") from None
    if not isinstance(out["sampler"], dict) or not isinstance(out["config"], dict):
        raise BlockcacheError(f"{path}: sampler and config must be JSON mappings")
    if change.ndim != 2 or change.shape != (len(out["timesteps"]), len(out["unit_names"])):
        raise BlockcacheError(f"{path}: change has shape {change.shape}, expected (steps, units) = "
                              f"({len(out['timesteps'])}, {len(out['unit_names'])})")
    from .zoo import check_config, unit_names

    try:
        check_config(out["config"])  # bounds the model before its units are listed
        expected = unit_names(out["config"])
    except (BlockcacheError, KeyError, TypeError) as e:
        raise BlockcacheError(f"{path}: the model config is not valid ({e})") from None
    if expected != out["unit_names"]:
        raise BlockcacheError(f"{path}: its units do not match its model config ({len(out['unit_names'])} vs "
                              f"{len(expected)})")
    if out["sampler"].get("steps") != change.shape[0]:
        raise BlockcacheError(f"{path}: sampler has {out['sampler'].get('steps')} steps but change has "
                              f"{change.shape[0]} rows")
    return out
