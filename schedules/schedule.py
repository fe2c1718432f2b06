"""The `Schedule`: for each sampling step and cacheable unit, compute or reuse.

File format (YAML, version 1), one line per step so that a person can read and diff it:

    version: 1
    model: dit-xl2                       # what it was made for (informational)
    sampler: {name: ddim, steps: 20, spacing: linspace}
    units: [blocks.0.attn, blocks.0.mlp, blocks.1.attn, ...]
    source: import-l2c DDIM20_router.pt threshold=0.1
    steps:                               # sampling order: the first row is the noisiest step
    - "xx xx xx ..."                     # step 0, t=999
    - ".. x. .. ..."                     # step 1, t=946

Each row has one character per unit in `units` order: `x` computes the unit, `.` reuses its
cached output from the last step that computed it. Spaces are ignored (the writer puts one between
blocks). Step 0 must compute everything: nothing is cached yet.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import yaml

from .errors import BlockcacheError
from .sampling import SAMPLERS, SPACINGS, make_sampler

VERSION = 1
COMPUTE, REUSE = "x", "."


@dataclass
class Schedule:
    unit_names: tuple[str, ...]
    compute: np.ndarray  # bool (num_steps, num_units), row 0 = first sampling step
    sampler: dict = field(default_factory=lambda: {"name": "ddim", "steps": 0, "spacing": "linspace"})
    model: str | None = None
    source: str | None = None

    def __post_init__(self):
        self.unit_names = tuple(self.unit_names)
        self.compute = np.asarray(self.compute, dtype=bool)
        self.sampler = dict(self.sampler)
        self.validate()

    # -- shape -------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.compute.shape[0]

    @property
    def num_units(self) -> int:
        return self.compute.shape[1]

    def validate(self) -> None:
        if self.compute.ndim != 2 or self.compute.shape[1] != len(self.unit_names):
            raise BlockcacheError(
                f"schedule rows must have {len(self.unit_names)} entries (one per unit), got shape {self.compute.shape}")
        if len(set(self.unit_names)) != len(self.unit_names):
            raise BlockcacheError("schedule lists a unit twice")
        if self.num_steps == 0:
            raise BlockcacheError("schedule has no steps")
        if not self.compute[0].all():
            missing = [u for u, c in zip(self.unit_names, self.compute[0]) if not c]
            raise BlockcacheError(f"step 0 must compute every unit (nothing is cached yet); it reuses {missing[0]}"
                                  + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        name, steps, spacing = (self.sampler.get(k) for k in ("name", "steps", "spacing"))
        if name not in SAMPLERS:
            raise BlockcacheError(f"unknown sampler {name!r} (expected one of {', '.join(SAMPLERS)})")
        if spacing not in SPACINGS:
            raise BlockcacheError(f"unknown spacing {spacing!r} (expected one of {', '.join(SPACINGS)})")
        if steps != self.num_steps:
            raise BlockcacheError(f"sampler has {steps} steps but the schedule has {self.num_steps} rows")

    def make_sampler(self):
        return make_sampler(self.sampler["name"], self.sampler["steps"], self.sampler["spacing"])

    def check_units(self, model_units, model_name: str = "the model") -> None:
        """Refuse a schedule made for other units than the model has (one line)."""
        model_units = tuple(model_units)
        if self.unit_names == model_units:
            return
        unknown = [u for u in self.unit_names if u not in model_units]
        if unknown:
            raise BlockcacheError(f"schedule names unit {unknown[0]!r}, which {model_name} does not have "
                                  f"({len(model_units)} units: {model_units[0]} … {model_units[-1]})")
        raise BlockcacheError(f"schedule covers {self.num_units} units but {model_name} has {len(model_units)}")

    # -- caching structure ---------------------------------------------------------------------
    def reused(self, step: int) -> tuple[str, ...]:
        """Units read from the cache at `step`."""
        return tuple(u for u, c in zip(self.unit_names, self.compute[step]) if not c)

    def live_after(self, step: int) -> tuple[str, ...]:
        """Units computed at `step` whose value a later step reuses before recomputing it (liveness)."""
        live = []
        for j, u in enumerate(self.unit_names):
            if not self.compute[step, j]:
                continue
            for later in range(step + 1, self.num_steps):
                if self.compute[later, j]:
                    break
                live.append(u)
                break
        return tuple(live)

    # -- file format -------------------------------------------------------------------------
    def row_string(self, step: int) -> str:
        chars = [COMPUTE if c else REUSE for c in self.compute[step]]
        groups, current, prefix = [], [], None
        for u, ch in zip(self.unit_names, chars):
            block = u.rsplit(".", 1)[0]
            if current and block != prefix:
                groups.append("".join(current))
                current = []
            prefix = block
            current.append(ch)
        groups.append("".join(current))
        return " ".join(groups)

    def to_yaml(self) -> str:
        timesteps = None
        try:
            timesteps = self.make_sampler().timesteps
        except BlockcacheError:
            pass
        lines = [f"version: {VERSION}"]
        if self.model:
            lines.append(f"model: {_scalar(self.model)}")
        s = self.sampler
        lines.append(f"sampler: {{name: {s['name']}, steps: {s['steps']}, spacing: {s['spacing']}}}")
        lines.append("units: [" + ", ".join(self.unit_names) + "]")
        if self.source:
            lines.append(f"source: {_scalar(self.source)}")
        lines.append(f"# one row per sampling step (first = noisiest); '{COMPUTE}' compute, '{REUSE}' reuse")
        lines.append("steps:")
        for i in range(self.num_steps):
            note = f"step {i}" + (f", t={timesteps[i]}" if timesteps is not None else "")
            lines.append(f'- "{self.row_string(i)}"  # {note}')
        return "\n".join(lines) + "\n"

    def save(self, path) -> None:
        """Write atomically: an existing file is replaced only by a complete new one."""
        atomic_write_text(path, self.to_yaml())

    @classmethod
    def from_yaml(cls, text: str, where: str = "schedule") -> "Schedule":
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise BlockcacheError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(doc, dict):
            raise BlockcacheError(f"{where}: expected a YAML mapping with version, sampler, units and steps")
        version = doc.get("version")
        if version != VERSION:
            raise BlockcacheError(f"{where}: unsupported schedule version {version!r} (this blockcache reads {VERSION})")
        for key in ("sampler", "units", "steps"):
            if key not in doc:
                raise BlockcacheError(f"{where}: missing '{key}'")
        units, rows, sampler = doc["units"], doc["steps"], doc["sampler"]
        if not isinstance(units, list) or not all(isinstance(u, str) for u in units) or not units:
            raise BlockcacheError(f"{where}: 'units' must be a non-empty list of unit names")
        if not isinstance(sampler, dict):
            raise BlockcacheError(f"{where}: 'sampler' must be a mapping with name, steps and spacing")
        if not isinstance(rows, list) or not rows:
            raise BlockcacheError(f"{where}: 'steps' must be a non-empty list of rows")
        compute = np.zeros((len(rows), len(units)), dtype=bool)
        for i, row in enumerate(rows):
            if not isinstance(row, str):
                raise BlockcacheError(f"{where}: step {i} must be a quoted string of '{COMPUTE}' and '{REUSE}'")
            chars = row.replace(" ", "")
            bad = set(chars) - {COMPUTE, REUSE}
            if bad:
                raise BlockcacheError(f"{where}: step {i} has character {sorted(bad)[0]!r} (only '{COMPUTE}' and '{REUSE}')")
            if len(chars) != len(units):
                raise BlockcacheError(f"{where}: step {i} has {len(chars)} entries but there are {len(units)} units")
            compute[i] = [ch == COMPUTE for ch in chars]
        sampler = {"name": sampler.get("name", "ddim"), "steps": sampler.get("steps", len(rows)),
                   "spacing": sampler.get("spacing", "linspace")}
        try:
            return cls(tuple(units), compute, sampler, model=doc.get("model"), source=doc.get("source"))
        except BlockcacheError as e:
            raise BlockcacheError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path) -> "Schedule":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise BlockcacheError(f"{path}: not a text file") from None
        except OSError as e:
            raise BlockcacheError(f"cannot read schedule {path}: {e.strerror}") from None
        return cls.from_yaml(text, where=path)

    # -- makers --------------------------------------------------------------------------------
    @classmethod
    def full(cls, unit_names, steps: int, spacing: str = "linspace", model: str | None = None) -> "Schedule":
        make_sampler("ddim", steps, spacing)  # validates steps/spacing in one line
        compute = np.ones((steps, len(unit_names)), dtype=bool)
        return cls(unit_names, compute, {"name": "ddim", "steps": steps, "spacing": spacing}, model, source="full")

    @classmethod
    def uniform(cls, unit_names, steps: int, interval: int, spacing: str = "linspace",
                model: str | None = None) -> "Schedule":
        """DeepCache / FORA: every unit recomputed at every `interval`-th step, reused in between."""
        if not isinstance(interval, int) or interval < 1:
            raise BlockcacheError(f"interval must be a positive integer, got {interval!r}")
        make_sampler("ddim", steps, spacing)
        compute = np.zeros((steps, len(unit_names)), dtype=bool)
        compute[::interval] = True
        return cls(unit_names, compute, {"name": "ddim", "steps": steps, "spacing": spacing}, model,
                   source=f"uniform interval={interval}")


def _scalar(text: str) -> str:
    """A YAML scalar that round-trips any string on one line."""
    return yaml.safe_dump(text, default_style=None, width=1 << 16).strip().removesuffix("\n...").strip()


def atomic_write_text(path, text: str) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
