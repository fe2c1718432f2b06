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
cached output from the last step that computed it, `s` skips it inside a *span*: a run of
consecutive blocks whose units are all `s` is replaced by its total residual (hidden state after the
span minus before it) from the last step that ran those blocks, added to the current input of the span
(FirstBlockCache / TeaCache / MagCache's reuse; docs/ARCHITECTURE.md, "Caching semantics"). Spaces are
ignored (the writer puts one between blocks). Step 0 must compute everything: nothing is cached yet.

`forecast: K` (0, 1 or 2; default 0) makes every reuse, of a unit (`.`) or of a span's residual (`s`), a
TaylorSeer forecast of order K from the last K + 1 values computed (schedules/forecast.py) instead of
the last value alone.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from itertools import islice

import numpy as np
import yaml

from .errors import BlockcacheError
from .files import atomic_output
from .forecast import MAX_ORDER, taylor_weights
from .sampling import SAMPLER_SPACINGS, SAMPLERS, default_spacing, make_sampler

VERSION = 1
COMPUTE, REUSE, SPAN = "x", ".", "s"
REUSE_MODES = ("unit", "span")  # each unit's raw output, or a span of whole blocks' total residual
MAX_BYTES = 2 << 20  # a DiT-XL/2 schedule of 1000 steps is about 0.1 MB
MAX_ROWS = 2000  # no sampler makes more model evaluations (1000 DDIM steps, 1000 DPM-Solver-2 steps)
MAX_DEPTH = 8  # the format nests three levels deep


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors or aliases (a few bytes could expand to gigabytes), with
    bounded nesting and one value per key: a schedule file is plain data."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.composer.ComposerError(None, None, "anchors and aliases are not allowed in a schedule",
                                              event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=True) for k, _ in node.value]
        for key_node, key in zip((k for k, _ in node.value), keys):
            if keys.count(key) > 1:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
        return super().construct_mapping(node, deep)


@dataclass
class Schedule:
    unit_names: tuple[str, ...]
    compute: np.ndarray  # bool (num_steps, num_units), row 0 = first sampling step
    sampler: dict = field(default_factory=lambda: {"name": "ddim", "steps": 0, "spacing": "linspace"})
    model: str | None = None
    source: str | None = None
    # Block Caching's correction of reused values: {(step, unit): (scale, shift)}, float32 vectors over
    # the unit's channels; a reused value v becomes v·(1 + scale) + shift. Stored beside the YAML.
    scale_shift: dict = field(default_factory=dict)
    # bool like `compute`: True where a reused unit is skipped inside a span (`s`) rather than reused
    # alone (`.`); None: no spans
    span: np.ndarray | None = None
    # TaylorSeer order of every reuse (0: the last computed value itself)
    forecast: int = 0

    def __post_init__(self):
        self.unit_names = tuple(self.unit_names)
        self.compute = np.asarray(self.compute, dtype=bool)
        self.span = np.zeros_like(self.compute) if self.span is None else np.asarray(self.span, dtype=bool)
        self.sampler = dict(self.sampler)
        self.scale_shift = {(int(k[0]), str(k[1])): tuple(np.asarray(a, dtype=np.float32) for a in v)
                            for k, v in self.scale_shift.items()}
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
        if spacing not in SAMPLER_SPACINGS[name]:
            raise BlockcacheError(f"sampler {name} has no spacing {spacing!r} (its spacings: "
                                  f"{', '.join(SAMPLER_SPACINGS[name])})")
        if steps != self.num_steps:
            raise BlockcacheError(f"sampler has {steps} steps but the schedule has {self.num_steps} rows")
        if isinstance(self.forecast, bool) or not isinstance(self.forecast, int) or \
                not 0 <= self.forecast <= MAX_ORDER:
            raise BlockcacheError(f"forecast order must be an integer in 0…{MAX_ORDER}, got {self.forecast!r}")
        self._validate_scale_shift()
        self._validate_spans()

    def _validate_spans(self) -> None:
        if self.span.shape != self.compute.shape:
            raise BlockcacheError(f"span marks have shape {self.span.shape}, not the schedule's {self.compute.shape}")
        both = self.span & self.compute
        if both.any():
            step, j = np.argwhere(both)[0]
            raise BlockcacheError(f"step {step} both computes and span-skips {self.unit_names[j]}")
        blocks = self.blocks()
        for step in range(self.num_steps):
            for block, columns in blocks.items():
                marks = self.span[step, columns]
                if marks.any() and not marks.all():
                    raise BlockcacheError(f"step {step} span-skips only part of {block}: a span skips whole blocks "
                                          f"(every unit of {block} 's', or none)")
        for (step, unit) in self.scale_shift:
            if self.span[step, self.unit_names.index(unit)]:
                raise BlockcacheError(f"scale-shift for step {step} unit {unit}, which that step span-skips (a span "
                                      "adds its residual uncorrected)")

    def _validate_scale_shift(self) -> None:
        index = {u: j for j, u in enumerate(self.unit_names)}
        sizes = set()
        for (step, unit), pair in self.scale_shift.items():
            if unit not in index or not 0 <= step < self.num_steps:
                raise BlockcacheError(f"scale-shift for step {step} unit {unit!r}, which the schedule does not have")
            if self.compute[step, index[unit]]:
                raise BlockcacheError(f"scale-shift for step {step} unit {unit}, which that step computes (it "
                                      "only corrects reused values)")
            if len(pair) != 2 or any(a.ndim != 1 or not np.isfinite(a).all() for a in pair) or \
                    pair[0].shape != pair[1].shape:
                raise BlockcacheError(f"scale-shift for step {step} unit {unit} must be two finite vectors of "
                                      "one length")
            sizes.add(pair[0].shape[0])
        if len(sizes) > 1:
            raise BlockcacheError(f"scale-shift vectors have different lengths {sorted(sizes)}")

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
        """Units read from the cache at `step`, each alone (`.`)."""
        return tuple(u for u, c, s in zip(self.unit_names, self.compute[step], self.span[step]) if not c and not s)

    def blocks(self) -> dict[str, list[int]]:
        """{block: its unit columns}, blocks in execution order (`unit_blocks`)."""
        return unit_blocks(self.unit_names)

    def spans(self, step: int) -> list[tuple[str, str]]:
        """The spans `step` skips, as (first block, last block): maximal runs of consecutive span-skipped
        blocks."""
        out, start, previous = [], None, None
        for block, columns in self.blocks().items():
            if self.span[step, columns[0]]:
                start = start or block
                previous = block
            elif start is not None:
                out.append((start, previous))
                start = None
        if start is not None:
            out.append((start, previous))
        return out

    def history(self) -> list[dict[str, tuple[int, ...]]]:
        """Per step, {what it reuses: the steps whose values the reuse uses, newest first}: for a unit
        reused alone (`.`) its last computations, for a skipped span (`span_key`) the last steps that ran
        all of its blocks; `forecast` + 1 of them where there are that many (one pass over the schedule)."""
        depth = self.forecast + 1
        columns = self.blocks()
        order = list(columns)
        computed = {u: [] for u in self.unit_names}  # unit → the steps that computed it, so far
        out = []
        for s in range(self.num_steps):
            uses = {u: tuple(computed[u][-depth:][::-1])
                    for u, c, sp in zip(self.unit_names, self.compute[s], self.span[s]) if not c and not sp}
            for first, last in self.spans(s):
                members = [columns[b][0] for b in order[order.index(first):order.index(last) + 1]]
                ran = (k for k in range(s - 1, -1, -1) if not self.span[k, members].any())  # step 0 ran all
                uses[span_key(first, last)] = tuple(islice(ran, depth))
            for u, c in zip(self.unit_names, self.compute[s]):
                if c:
                    computed[u].append(s)
            out.append(uses)
        return out

    def writes(self) -> list[tuple[str, ...]]:
        """Per step, the values it keeps for a later reuse: computed units (in unit order), then span
        residuals (`span_key`) (liveness: what no later step reuses is not kept)."""
        kept = [set() for _ in range(self.num_steps)]
        for uses in self.history():
            for name, steps in uses.items():
                for k in steps:
                    kept[k].add(name)
        return [tuple(u for u in self.unit_names if u in names) + tuple(sorted(n for n in names if n not in
                                                                               self.unit_names)) for names in kept]

    def forecast_weights(self) -> list[dict[str, np.ndarray]]:
        """Per step, {reused name: TaylorSeer weights over its history values, newest first} for every
        reuse with more than one history value (`taylor_weights`)."""
        return [{name: taylor_weights(steps, s) for name, steps in uses.items() if len(steps) > 1}
                for s, uses in enumerate(self.history())]

    # -- file format -------------------------------------------------------------------------
    def row_string(self, step: int) -> str:
        chars = [COMPUTE if c else SPAN if sp else REUSE for c, sp in zip(self.compute[step], self.span[step])]
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

    def scale_shift_tensors(self) -> dict[str, np.ndarray]:
        """The sidecar file's tensors: `scale/<step>/<unit>` and `shift/<step>/<unit>` (`scale_shift_key`)."""
        out = {}
        for (step, unit), (scale, shift) in sorted(self.scale_shift.items()):
            out[scale_shift_key("scale", step, unit)], out[scale_shift_key("shift", step, unit)] = scale, shift
        return out

    def scale_shift_digest(self) -> str | None:
        """SHA-256 over the scale-shift tensors (names and bytes), None without them."""
        if not self.scale_shift:
            return None
        h = hashlib.sha256()
        for name, value in self.scale_shift_tensors().items():
            h.update(name.encode() + b"\0" + np.ascontiguousarray(value, dtype="<f4").tobytes())
        return h.hexdigest()

    def to_yaml(self, scale_shift_file: str | None = None) -> str:
        """The YAML text; with scale-shift it names the sidecar file (default `<name>.scaleshift.safetensors`
        as `save` writes it) and the digest of its tensors."""
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
        if self.forecast:
            lines.append(f"forecast: {self.forecast}  # every reuse a TaylorSeer forecast of this order")
        if self.scale_shift:
            lines.append(f"scale_shift: {{file: {_scalar(scale_shift_file or 'scaleshift.safetensors')}, "
                         f"sha256: {self.scale_shift_digest()}}}")
        lines.append(f"# one row per sampling step (first = noisiest); '{COMPUTE}' compute, '{REUSE}' reuse"
                     + (f", '{SPAN}' skip inside a span (its residual reused)" if self.span.any() else ""))
        lines.append("steps:")
        for i in range(self.num_steps):
            note = f"step {i}" + (f", t={timesteps[i]:.6g}" if timesteps is not None else "")
            lines.append(f'- "{self.row_string(i)}"  # {note}')
        return "\n".join(lines) + "\n"

    def save(self, path) -> None:
        """Write atomically: an existing file is replaced only by a complete new one. Scale-shift
        tensors go to `<path stem>.scaleshift.safetensors` beside it, written first."""
        path = os.fspath(path)
        sidecar = None
        if self.scale_shift:
            from safetensors.numpy import save_file

            sidecar = scale_shift_file(os.path.basename(path))
            with atomic_output(os.path.join(os.path.dirname(os.path.abspath(path)), sidecar), ".safetensors") as tmp:
                save_file(self.scale_shift_tensors(), tmp)
        with atomic_output(path, ".yaml") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_yaml(sidecar))

    @classmethod
    def from_yaml(cls, text: str, where: str = "schedule", base_dir: str | None = None) -> "Schedule":
        """Parse schedule YAML; a `scale_shift` entry is read from its file relative to `base_dir`."""
        if not isinstance(text, str):
            raise BlockcacheError(f"{where}: a schedule is YAML text, not {type(text).__name__}")
        if len(text) > MAX_BYTES:
            raise BlockcacheError(f"{where}: larger than {MAX_BYTES >> 20} MiB, not a schedule")
        if text.count("\n") > MAX_ROWS + 64:  # refused before parsing: one line per row plus a header
            raise BlockcacheError(f"{where}: more lines than a schedule of at most {MAX_ROWS} rows has")
        try:
            doc = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise BlockcacheError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        except ValueError as e:  # e.g. an integer of thousands of digits
            raise BlockcacheError(f"{where}: not a schedule ({str(e)[:100]})") from None
        if not isinstance(doc, dict):
            raise BlockcacheError(f"{where}: expected a YAML mapping with version, sampler, units and steps")
        version = doc.get("version")
        if version != VERSION or isinstance(version, bool):
            raise BlockcacheError(f"{where}: unsupported schedule version {version!r} (this blockcache reads {VERSION})")
        for key in ("sampler", "units", "steps"):
            if key not in doc:
                raise BlockcacheError(f"{where}: missing '{key}'")
        for key in ("model", "source"):
            if doc.get(key) is not None and not isinstance(doc[key], str):
                raise BlockcacheError(f"{where}: '{key}' must be a text, not {type(doc[key]).__name__}")
        units, rows, sampler = doc["units"], doc["steps"], doc["sampler"]
        if not isinstance(units, list) or not all(isinstance(u, str) for u in units) or not units:
            raise BlockcacheError(f"{where}: 'units' must be a non-empty list of unit names")
        if not isinstance(sampler, dict):
            raise BlockcacheError(f"{where}: 'sampler' must be a mapping with name, steps and spacing")
        for key, kind in (("name", str), ("steps", int), ("spacing", str)):
            value = sampler.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise BlockcacheError(f"{where}: sampler {key} must be {'an integer' if kind is int else 'a name'}, "
                                      f"not {value!r}")
        if not isinstance(rows, list) or not rows:
            raise BlockcacheError(f"{where}: 'steps' must be a non-empty list of rows")
        if len(rows) > MAX_ROWS:
            raise BlockcacheError(f"{where}: {len(rows)} rows, more than any sampler's {MAX_ROWS} model evaluations")
        compute = np.zeros((len(rows), len(units)), dtype=bool)
        span = np.zeros_like(compute)
        for i, row in enumerate(rows):
            if not isinstance(row, str):
                raise BlockcacheError(f"{where}: step {i} must be a quoted string of '{COMPUTE}', '{REUSE}' and "
                                      f"'{SPAN}'")
            chars = row.replace(" ", "")
            bad = set(chars) - {COMPUTE, REUSE, SPAN}
            if bad:
                raise BlockcacheError(f"{where}: step {i} has character {sorted(bad)[0]!r} (only '{COMPUTE}', "
                                      f"'{REUSE}' and '{SPAN}')")
            if len(chars) != len(units):
                raise BlockcacheError(f"{where}: step {i} has {len(chars)} entries but there are {len(units)} units")
            compute[i] = [ch == COMPUTE for ch in chars]
            span[i] = [ch == SPAN for ch in chars]
        name = sampler.get("name", "ddim")
        sampler = {"name": name, "steps": sampler.get("steps", len(rows)),
                   "spacing": sampler.get("spacing", SAMPLER_SPACINGS.get(name, ("linspace",))[0])}
        scale_shift = _read_scale_shift(doc["scale_shift"], where, base_dir) if doc.get("scale_shift") else {}
        try:
            schedule = cls(tuple(units), compute, sampler, model=doc.get("model"), source=doc.get("source"),
                           scale_shift=scale_shift, span=span, forecast=doc.get("forecast", 0))
        except BlockcacheError as e:
            raise BlockcacheError(f"{where}: {e}") from None
        if scale_shift and schedule.scale_shift_digest() != doc["scale_shift"].get("sha256"):
            raise BlockcacheError(f"{where}: scale-shift tensors do not match the digest in the schedule")
        return schedule

    @classmethod
    def load(cls, path) -> "Schedule":
        if not isinstance(path, (str, os.PathLike)):
            raise BlockcacheError(f"a schedule path is a file path, not {type(path).__name__}")
        path = os.fspath(path)
        try:
            if os.path.getsize(path) > MAX_BYTES:
                raise BlockcacheError(f"{path}: larger than {MAX_BYTES >> 20} MiB, not a schedule")
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_BYTES + 1)
        except UnicodeDecodeError:
            raise BlockcacheError(f"{path}: not a text file") from None
        except (OSError, ValueError) as e:  # ValueError: a NUL in the path
            raise BlockcacheError(f"cannot read schedule {path!r}: {getattr(e, 'strerror', None) or e}") from None
        return cls.from_yaml(text, where=path, base_dir=os.path.dirname(os.path.abspath(path)))

    def with_reuse(self, reuse: str = "unit", forecast: int | None = None) -> "Schedule":
        """This schedule with another reuse mode: `span` turns every block a step reuses entirely (all its
        units `.`) into a span skip, so runs of such blocks reuse their total residual; `unit` keeps the
        rows. `forecast`: the TaylorSeer order of every reuse (None keeps the schedule's)."""
        if reuse not in REUSE_MODES:
            raise BlockcacheError(f"reuse mode must be one of {', '.join(REUSE_MODES)}, got {reuse!r}")
        span = self.span.copy()
        if reuse == "span":
            for columns in self.blocks().values():
                whole = ~self.compute[:, columns].any(axis=1)
                span[np.ix_(whole, columns)] = True
        scale_shift = {k: v for k, v in self.scale_shift.items() if not span[k[0], self.unit_names.index(k[1])]}
        source = self.source or "schedule"
        extras = ([] if reuse == "unit" else [f"reuse={reuse}"]) + (
            [] if forecast in (None, self.forecast) else [f"forecast={forecast}"])
        return replace(self, span=span, scale_shift=scale_shift,
                                   forecast=self.forecast if forecast is None else forecast,
                                   source=" ".join([source] + extras))

    # -- makers --------------------------------------------------------------------------------
    @classmethod
    def full(cls, unit_names, steps: int, spacing: str | None = None, model: str | None = None,
             sampler: str = "ddim") -> "Schedule":
        """Every unit at every model evaluation (`steps` evaluations of `sampler`)."""
        spacing = spacing or default_spacing(sampler)
        make_sampler(sampler, steps, spacing)  # validates steps/spacing in one line
        compute = np.ones((steps, len(unit_names)), dtype=bool)
        return cls(unit_names, compute, {"name": sampler, "steps": steps, "spacing": spacing}, model, source="full")

    @classmethod
    def uniform(cls, unit_names, steps: int, interval: int, spacing: str | None = None,
                model: str | None = None, sampler: str = "ddim", warmup: int = 0) -> "Schedule":
        """DeepCache / FORA: every unit recomputed at every `interval`-th evaluation, reused in between.
        With `warmup` N ≥ 1, diffusers' TaylorSeer rule instead (`TaylorSeerCacheConfig(
        disable_cache_before_step=N, cache_interval=interval)`): the first N evaluations, then evaluation
        N + 1 and every `interval`-th after it."""
        if not isinstance(interval, int) or interval < 1:
            raise BlockcacheError(f"interval must be a positive integer, got {interval!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= steps:
            raise BlockcacheError(f"warm-up must be an integer in 0…{steps}, got {warmup!r}")
        spacing = spacing or default_spacing(sampler)
        make_sampler(sampler, steps, spacing)
        compute = np.zeros((steps, len(unit_names)), dtype=bool)
        if warmup:
            s = np.arange(steps)
            compute[(s < warmup) | ((s - warmup - 1) % interval == 0)] = True
        else:
            compute[::interval] = True
        return cls(unit_names, compute, {"name": sampler, "steps": steps, "spacing": spacing}, model,
                   source=f"uniform interval={interval}" + (f" warmup={warmup}" if warmup else ""))

    @classmethod
    def spread(cls, unit_names, steps: int, full_steps: int, spacing: str | None = None,
               model: str | None = None) -> "Schedule":
        """All-or-nothing DDIM steps (FORA / DeepCache generalised to any budget): `full_steps` steps,
        step 0 among them, spread as evenly as rounding allows; every unit reused at the others."""
        spacing = spacing or default_spacing("ddim")
        make_sampler("ddim", steps, spacing)
        if not isinstance(full_steps, int) or not 1 <= full_steps <= steps:
            raise BlockcacheError(f"full steps must be an integer in 1…{steps}, got {full_steps!r}")
        compute = np.zeros((steps, len(unit_names)), dtype=bool)
        compute[np.unique(np.round(np.linspace(0, steps, full_steps, endpoint=False)).astype(int))] = True
        return cls(unit_names, compute, {"name": "ddim", "steps": steps, "spacing": spacing}, model,
                   source=f"uniform spread full_steps={full_steps}")


def unit_blocks(unit_names) -> dict[str, list[int]]:
    """{block: the indices of its units}, blocks in execution order: a unit `<block>.<branch>` belongs
    to `<block>` (schedules, plans and traced graphs all group units so)."""
    out = {}
    for j, u in enumerate(unit_names):
        out.setdefault(u.rsplit(".", 1)[0], []).append(j)
    return out


SPAN_PREFIX = "span:"


def span_key(first: str, last: str) -> str:
    """The name of a span's residual (blocks `first` … `last`) wherever caches are named: the eager
    cache, a plan's buffers (`cache.span:<first>:<last>`) and graph outputs (`unit.span:…`)."""
    return f"{SPAN_PREFIX}{first}:{last}"


def history_key(name: str, i: int) -> str:
    """The name of the i-th newest history value of a reused unit or span (`name` itself for i = 0),
    wherever a forecast's inputs are named: the unit policy's cache and a graph's `cache.<key>` inputs."""
    return name if i == 0 else f"{name}~{i}"


def span_blocks(name: str) -> tuple[str, str] | None:
    """(first, last) of a span's residual name, None for a unit's name."""
    if not name.startswith(SPAN_PREFIX):
        return None
    parts = name[len(SPAN_PREFIX):].split(":")
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None


def scale_shift_file(schedule_file: str) -> str:
    """The name of the scale-shift sidecar that `Schedule.save` writes beside `schedule_file`."""
    return os.path.splitext(schedule_file)[0] + ".scaleshift.safetensors"


def scale_shift_key(kind: str, step: int, unit: str) -> str:
    """The sidecar's tensor name for `kind` ("scale" or "shift") of (step, unit)."""
    return f"{kind}/{step}/{unit}"


def _read_scale_shift(entry, where: str, base_dir: str | None) -> dict:
    """{(step, unit): (scale, shift)} from the sidecar safetensors file (plain tensors: no code runs)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise BlockcacheError(f"{where}: 'scale_shift' must be a mapping with file and sha256")
    if base_dir is None:
        raise BlockcacheError(f"{where}: has scale-shift tensors in {entry['file']}; load it from its file")
    path = os.path.join(base_dir, entry["file"])
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise BlockcacheError(f"{where}: cannot read scale-shift tensors {path}: {str(e).splitlines()[0]}") from None
    pairs = {}
    for name, value in tensors.items():
        if value.dtype != np.float32:  # what Schedule.save writes; a cast could overflow to inf
            raise BlockcacheError(f"{where}: scale-shift tensor {name!r} in {path} is {value.dtype}, not float32")
        kind, _, rest = name.partition("/")
        step, _, unit = rest.partition("/")
        if kind not in ("scale", "shift") or not re.fullmatch("[0-9]{1,6}", step) or not unit:
            raise BlockcacheError(f"{where}: unexpected scale-shift tensor {name!r} in {path}")
        pairs.setdefault((int(step), unit), {})[kind] = value
    for key, pair in pairs.items():
        if set(pair) != {"scale", "shift"}:
            raise BlockcacheError(f"{where}: step {key[0]} unit {key[1]} has a scale without a shift or the reverse")
    return {key: (pair["scale"], pair["shift"]) for key, pair in pairs.items()}


def _scalar(text: str) -> str:
    """A YAML scalar that round-trips any string on one line."""
    return yaml.safe_dump(text, default_style=None, width=1 << 16).strip().removesuffix("\n...").strip()
