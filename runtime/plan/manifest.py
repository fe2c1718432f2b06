"""The plan manifest (`plan.json`) as a typed, validated object: `Plan`, with its `Program`s.

(One module over 400 lines on purpose: it is the format's one validator, every check in one place.)

A plan holds one or more programs, each a compiled sampling loop for one batch size and one schedule
(at most one schedule per step count); the weights are shared by all. A manifest with one program
keeps the program's entries at the top level (as every plan before multi-program plans did); one
with several lists them under `programs`.

`Plan.parse(document, directory)` checks the manifest once, for every backend alike, per program:
- types, and the shape and dtype of every graph input and cache buffer against the model config,
  the batch size, guidance and the stored precision;
- the model's units against its config; every variant's split of the units into computed and read,
  its writes within its computes and its corrections within its reads, a cache buffer for each;
- every step's variant, and its timestep and coefficients against the ones the recorded sampler
  derives (so a plan cannot run another schedule than it says); its latent buffers: each step reads
  the previous step's output, and its carry buffer holds the latent its solver step started from
  or, where the carry is the previous step's output (DPM-Solver++ 2M), the carry that step wrote;
- that each read of the cache follows a step that wrote the unit; that a forecast's values were all
  written, fit its buffers, and that its weights are TaylorSeer's for the steps they came from;
- that every file the manifest names is a plain name listed among its checksummed files, every
  stored tensor lies inside the weights file with the length its shape and dtype give, and every
  PyTorch parameter is stored at the plan's precision.
A manifest that fails any check is refused in one line naming what is wrong, so a backend never
meets an inconsistent plan. `Plan.document` is the manifest as stored; the exporter builds one and
writes it with `runtime.plan.files.write_manifest`. Treat a `Plan` as read-only.

Older version-1 manifests lack some entries; they mean: `model.family` "dit", `model.num_labels` the
config's labels (`schedules.zoo.num_labels`), `precision` "fp32", a step's `latents` the DDIM
ping-pong, a variant's `adjusts` none, `weights.parameters` none (the torch backend then asks for a
re-export).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice

import numpy as np

from schedules.errors import BlockcacheError
from schedules.sampling import GUIDANCE_CHANNELS, MAX_GUIDANCE_SCALE, carry_term, make_sampler, model_timesteps
from schedules.forecast import MAX_ORDER, taylor_weights
from schedules.schedule import history_key, span_blocks, unit_blocks
from schedules.zoo import check_config, family_of, num_labels, takes_prompt, unit_names

from . import names

PRECISION_DTYPE = {"fp32": "float32", "fp16": "float16"}  # the dtype of weights and caches per stored precision
# How close a step's constants must be to the ones its sampler derives (they are written from them).
COEFFICIENT_RTOL = 1e-9


class _Check:
    """Reads one manifest with one-line errors that say where (`steps[3].variant`)."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, message: str):
        raise BlockcacheError(f"{self.where}: {path} {message}")

    def mapping(self, value, path: str, required=()) -> dict:
        if not isinstance(value, dict):
            self.fail(path, "must be a mapping")
        for key in required:
            if key not in value:
                self.fail(path, f"lacks '{key}'")
        return value

    def sequence(self, value, path: str, nonempty: bool = False) -> list:
        if not isinstance(value, list) or (nonempty and not value):
            self.fail(path, "must be a " + ("non-empty " if nonempty else "") + "list")
        return value

    def integer(self, value, path: str, low: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            self.fail(path, f"must be an integer{'' if low is None else f' >= {low}'}, not {value!r}")
        return value

    def number(self, value, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(path, f"must be a finite number, not {value!r}")
        return float(value)

    def text(self, value, path: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(path, "must be a non-empty string")
        return value

    def names(self, value, path: str) -> tuple[str, ...]:
        items = self.sequence(value, path)
        if not all(isinstance(v, str) for v in items) or len(set(items)) != len(items):
            self.fail(path, "must be a list of distinct names")
        return tuple(items)

    def flag(self, value, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, not {value!r}")
        return value

    def file_name(self, value, path: str, files) -> str:
        name = self.text(value, path)
        if not plain_file_name(name):
            self.fail(path, f"names a file outside the plan: {name!r}")
        if name not in files:
            self.fail(path, f"names {name!r}, which is not one of the plan's checksummed files")
        return name

    def spec(self, value, path: str) -> "TensorSpec":
        value = self.mapping(value, path, ("shape", "dtype"))
        shape = self.sequence(value["shape"], path + ".shape")  # [] for a scalar
        for i, d in enumerate(shape):
            self.integer(d, f"{path}.shape[{i}]", low=1)
        if not isinstance(value["dtype"], str) or value["dtype"] not in names.DTYPE_SIZES:
            self.fail(path + ".dtype", f"must be one of {', '.join(names.DTYPE_SIZES)}, not {value['dtype']!r}")
        return TensorSpec(tuple(shape), value["dtype"])


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name, or "bfloat16"


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class StoredTensor:
    """A tensor in the weights file: `length` bytes at `offset`."""
    offset: int
    length: int
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ParameterSource:
    """Where a PyTorch parameter sits among the stored tensors (the ONNX exporter stores linear
    weights transposed and renamed)."""
    tensor: str
    transposed: bool


@dataclass(frozen=True)
class Weights:
    file: str
    tensors: dict  # name → StoredTensor
    parameters: dict  # PyTorch parameter name → ParameterSource (empty in plans older than the torch backend)


@dataclass(frozen=True)
class Variant:
    """A distinct set of computed units: one graph (`file`) shared by every step that computes them."""
    file: str
    computes: tuple[str, ...]
    reads: tuple[str, ...]  # units taken from their cache buffer, and the residuals of the skipped spans
    writes: tuple[str, ...]  # computed units and span residuals a later step reads (graph outputs)
    adjusts: tuple[str, ...]  # read units corrected by Block Caching scale-shift inputs
    weights: tuple[str, ...]  # stored tensors the graph uses
    macs_per_image: int | None
    skips: tuple[str, ...] = ()  # spans of blocks replaced by their residual (`span_key` names)
    forecasts: dict = field(default_factory=dict)  # read name → forecast order ≥ 1 (over order + 1 values)

    @property
    def spans(self) -> list[tuple[str, str]]:
        """(first block, last block) of each skipped span (CachePolicy's `spans`)."""
        return [span_blocks(name) for name in self.skips]

    @property
    def span_records(self) -> list[tuple[str, str]]:
        """(first block, last block) of each span whose residual the variant writes (`span_writes`)."""
        return [span_blocks(name) for name in self.writes if span_blocks(name) is not None]


@dataclass(frozen=True)
class Step:
    """One model evaluation: its variant, its constants and its latent buffers (input, carry, output, and
    where the carry is a step's output the buffer the step writes it to)."""
    variant: int
    timestep: float
    a: float
    b: float
    c: float | None  # the carry coefficient (solvers with a carry term), None otherwise
    latents: tuple[int, ...]
    forecast: dict = field(default_factory=dict)  # read name → its forecast weights, newest value first
    p: float | None = None  # carry_next = p·x + q·eps where the carry is a step's output, None otherwise
    q: float | None = None


@dataclass(frozen=True)
class Decoder:
    """The autoencoder decoder a plan turns its final latents into images with."""
    scaling_factor: float
    config: dict  # diffusers' AutoencoderKL config
    parameters: dict  # PyTorch parameter of runtime.nn.decoder.ImageDecoder → ParameterSource (float32)
    image_size: int  # the images' height and width


@dataclass(frozen=True)
class DecoderGraph:
    """A program's decoder graph: input `latents` (the program's latent spec), output `image`."""
    file: str
    weights: tuple[str, ...]  # stored tensors the graph uses
    output: TensorSpec  # uint8 (batch, H, W, 3)


@dataclass(frozen=True)
class PrologueGraph:
    """A text model's prologue graph at one batch size: the network batch's prompt embeddings and mask
    in, every block's cross-attention keys and values and the mask's bias out, once per call."""
    file: str
    weights: tuple[str, ...]  # stored tensors the graph uses
    inputs: dict  # name → TensorSpec (names.PROMPT_INPUTS)
    outputs: dict  # name → TensorSpec (names.prologue_outputs), the step graphs' conditioning inputs


@dataclass(frozen=True)
class Guidance:
    enabled: bool  # the graphs run the doubled CFG batch
    scale: float  # the default scale
    channels: str  # the guidance form (schedules.sampling.GUIDANCE_CHANNELS)


@dataclass(frozen=True)
class Engine:
    """A TensorRT engine of one variant and the I/O it was built with."""
    file: str
    inputs: dict  # name → TensorSpec
    outputs: dict
    weight_inputs: tuple[str, ...]  # stored weights the engine takes as inputs

    @classmethod
    def parse(cls, value, path: str = "engine", check: "_Check | None" = None) -> "Engine":
        """An engine entry of the manifest's `tensorrt.engines` (its file is checked by `Plan.parse`)."""
        check = check or _Check("engine")
        value = check.mapping(value, path, ("file", "inputs", "outputs"))
        io = {d: {n: check.spec(s, f"{path}.{d}[{n!r}]") for n, s in check.mapping(value[d], f"{path}.{d}").items()}
              for d in ("inputs", "outputs")}
        return cls(check.text(value["file"], path + ".file"), io["inputs"], io["outputs"],
                   check.names(value.get("weight_inputs", []), path + ".weight_inputs"))


@dataclass(frozen=True)
class Program:
    """One compiled sampling loop of a plan: a batch size and a schedule, with its graphs and steps."""
    index: int
    batch_size: int
    sampler: dict  # {name, steps, spacing}: the schedule's sampler
    schedule_file: str  # the schedule (YAML) the program was made from, a file of the plan
    inputs: dict  # step-graph input name → TensorSpec
    cache: dict  # unit → TensorSpec of its cache buffer
    variants: tuple[Variant, ...]
    steps: tuple[Step, ...]
    scale_shift_file: str | None
    engines: tuple[Engine, ...] | None  # TensorRT engines, one per variant
    decoder: DecoderGraph | None = None  # the plan's decoder at this batch size
    decoder_engine: Engine | None = None  # its TensorRT engine (TensorRT plans with a decoder)
    prologue: PrologueGraph | None = None  # a text model's prompt work once per call
    prologue_engine: Engine | None = None  # its TensorRT engine (TensorRT plans of text models)

    @property
    def call_inputs(self) -> dict:
        """name → TensorSpec of the conditioning a call writes: the labels `y`, or a text model's prompt
        embeddings and mask of the network batch (the prologue's inputs, or the step graphs')."""
        if self.prologue is not None:
            return dict(self.prologue.inputs)
        return {n: self.inputs[n] for n in (names.Y, *names.PROMPT_INPUTS) if n in self.inputs}

    @property
    def takes_prompt(self) -> bool:
        return names.Y not in self.inputs

    @property
    def evaluations(self) -> int:
        """Model evaluations per sample (the schedule's rows): what `steps=` selects a program by."""
        return len(self.steps)

    @property
    def has_carry(self) -> bool:
        return names.X_CARRY in self.inputs

    @property
    def carry_output(self) -> bool:
        """Whether each step writes the next one's carry (`carry_next`, to its fourth latent buffer)."""
        return names.P in self.inputs

    @property
    def num_latents(self) -> int:
        return 1 + max(max(step.latents) for step in self.steps)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.inputs[names.X].shape[1:]

    @cached_property
    def cache_slots(self) -> tuple[tuple[dict, dict], ...]:
        """Per step, (reads, writes): {history_key(name, i): buffer} for the cache values its variant
        reads and {name: buffer} for those it writes. A unit or span with R buffers rotates through
        them: its w-th write (from 0) goes to buffer w mod R, so after c writes its i-th newest value is
        in buffer (c − 1 − i) mod R. Values stay where they were written; only the binding moves."""
        depth = {}
        for buffer in self.cache:
            name, _ = names.ring_of(buffer)
            depth[name] = depth.get(name, 0) + 1
        written, out = {}, []
        for step in self.steps:
            variant = self.variants[step.variant]
            reads = {}
            for name in variant.reads:
                c, r = written.get(name, 0), depth[name]
                for i in range(variant.forecasts.get(name, 0) + 1):
                    reads[history_key(name, i)] = names.ring_buffer(name, (c - 1 - i) % r)
            writes = {name: names.ring_buffer(name, written.get(name, 0) % depth[name]) for name in variant.writes}
            for name in variant.writes:
                written[name] = written.get(name, 0) + 1
            out.append((reads, writes))
        return tuple(out)


@dataclass(frozen=True)
class Plan:
    directory: str
    document: dict  # the manifest as stored
    model_name: str | None
    config: dict  # the model's zoo config (with its family)
    unit_names: tuple[str, ...]
    num_labels: int
    guidance: Guidance
    precision: str
    weights: Weights
    programs: tuple[Program, ...]  # at most one per (batch size, evaluations); one schedule per evaluations
    files: dict  # file name → FileEntry
    tensorrt: dict | None  # the manifest's TensorRT entry (build settings, versions)
    decoder: Decoder | None = None  # decodes final latents to uint8 images; None: the plan yields latents

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def family(self) -> str:
        return self.config["family"]

    @property
    def program(self) -> Program:
        """The plan's program, for a plan with one."""
        if len(self.programs) != 1:
            raise BlockcacheError(f"this plan has {len(self.programs)} programs (batch sizes × schedules): choose one")
        return self.programs[0]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.programs[0].latent_shape

    @property
    def step_counts(self) -> tuple[int, ...]:
        """The evaluations of the plan's schedules, ascending."""
        return tuple(sorted({p.evaluations for p in self.programs}))

    def batch_sizes(self, evaluations: int) -> tuple[int, ...]:
        """The batch sizes the plan has for the schedule of `evaluations` steps, ascending."""
        return tuple(sorted(p.batch_size for p in self.programs if p.evaluations == evaluations))

    def find(self, batch_size: int, evaluations: int) -> Program:
        for p in self.programs:
            if p.batch_size == batch_size and p.evaluations == evaluations:
                return p
        raise BlockcacheError(f"this plan has no program for batch {batch_size} with {evaluations} steps")

    @classmethod
    def parse(cls, document, directory: str) -> "Plan":
        """The validated plan of manifest `document` for the plan folder `directory`."""
        check = _Check(os.path.join(directory, names.MANIFEST))
        doc = check.mapping(document, "the manifest")
        if doc.get("format") != names.FORMAT:
            raise BlockcacheError(f"{check.where}: not a blockcache plan manifest")
        if isinstance(doc.get("version"), bool) or doc.get("version") not in names.READABLE_VERSIONS:
            raise BlockcacheError(f"{check.where}: plan version {doc.get('version')!r} is not supported (this "
                                  f"runtime reads versions {', '.join(map(str, names.READABLE_VERSIONS))}); "
                                  "re-export the plan")
        check.mapping(doc, "the manifest", ("model", "guidance", "weights", "files"))
        files = _files(check, doc["files"])
        model = check.mapping(doc["model"], "model", ("config",))
        config = {"family": model.get("family", "dit"), **check.mapping(model["config"], "model.config")}
        try:
            check_config(config)
            units = unit_names(config)
        except (BlockcacheError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise BlockcacheError(f"{check.where}: model.config is not a valid model config ({e})") from None
        if check.names(model.get("unit_names", list(units)), "model.unit_names") != units:
            check.fail("model.unit_names", "do not match the model config")
        labels = check.integer(model.get("num_labels", num_labels(config)), "model.num_labels",
                               low=0 if takes_prompt(config) else 1)
        if labels > num_labels(config):
            check.fail("model.num_labels", f"is {labels}, more than the model's {num_labels(config)} classes")
        precision = doc.get("precision", "fp32")
        if precision not in names.STORED_PRECISIONS:
            check.fail("precision", f"must be one of {', '.join(names.STORED_PRECISIONS)}, not {precision!r}")
        guidance = _guidance(check, doc["guidance"])
        if abs(guidance.scale) > MAX_GUIDANCE_SCALE:
            check.fail("guidance.scale", f"is {guidance.scale}, beyond the ±{MAX_GUIDANCE_SCALE:g} a plan may sample with")
        weights = _weights(check, doc["weights"], files, PRECISION_DTYPE[precision])
        tensorrt = doc.get("tensorrt")
        if tensorrt is not None:
            check.mapping(tensorrt, "tensorrt")
        decoder = _decoder(check, doc.get("decoder"), config, weights)
        entries = program_entries(doc)
        programs = tuple(_program(check, entry, path, j, config, units, guidance, precision, weights, files,
                                  tensorrt is not None, decoder)
                         for j, (path, entry) in enumerate(entries))
        _check_programs(check, programs)
        return cls(directory=directory, document=doc, model_name=model.get("name"), config=config, unit_names=units,
                   num_labels=labels, guidance=guidance, precision=precision, weights=weights, programs=programs,
                   files=files, tensorrt=tensorrt, decoder=decoder)


PROGRAM_KEYS = ("batch_size", "sampler", "schedule", "schedule_source", "inputs", "output", "buffers", "variants",
                "steps", "scale_shift", "macs_per_image", "engines", "decoder_graph", "decoder_engine",
                "prologue_graph", "prologue_engine")


def program_entries(doc: dict) -> list[tuple[str, dict]]:
    """(where, entry) of each program of a manifest: `programs[j]`, or for a plan with one program its
    entries at the top level (its TensorRT engines then under `tensorrt.engines`)."""
    if "programs" in doc:
        programs = doc["programs"]
        if not isinstance(programs, list) or not programs or any(k in doc for k in PROGRAM_KEYS):
            raise BlockcacheError("the manifest's programs must be a non-empty list, with no program entries "
                                  "beside it")
        return [(f"programs[{j}].", p) for j, p in enumerate(programs)]
    entry = {k: doc[k] for k in PROGRAM_KEYS if k in doc}
    entry.setdefault("schedule", names.SCHEDULE)
    if isinstance(doc.get("tensorrt"), dict) and "engines" in doc["tensorrt"]:
        entry["engines"] = doc["tensorrt"]["engines"]
    return [("", entry)]


def _program(check: _Check, value, where: str, index: int, config: dict, units, guidance: Guidance, precision: str,
             weights: Weights, files: dict, tensorrt: bool, decoder: Decoder | None = None) -> Program:
    if not isinstance(value, dict):
        check.fail(where.rstrip(".") or "the manifest", "must be a mapping")
    for key in ("batch_size", "sampler", "inputs", "buffers", "variants", "steps"):
        if key not in value:
            check.fail(where.rstrip(".") or "the manifest", f"lacks '{key}'")
    batch = check.integer(value["batch_size"], where + "batch_size", low=1)
    schedule_file = check.file_name(value.get("schedule"), where + "schedule", files)
    sampler = _sampler(check, value["sampler"], where)
    prologue = _prologue(check, value.get("prologue_graph"), where, batch, config, guidance, precision, weights,
                         files)
    inputs = _inputs(check, value["inputs"], batch, config, sampler, where, _conditioning(batch, config, guidance,
                                                                                          prologue))
    cache = _cache(check, value["buffers"], units, (batch * (2 if guidance.enabled else 1), _tokens(config),
                                                     config["hidden_size"]), PRECISION_DTYPE[precision], where)
    variants = tuple(_variant(check, v, f"{where}variants[{k}]", units, cache, weights, files, family_of(config).spans)
                     for k, v in enumerate(check.sequence(value["variants"], where + "variants", nonempty=True)))
    steps = tuple(_step(check, s, f"{where}steps[{i}]", i, len(variants), names.X_CARRY in inputs,
                        names.P in inputs)
                  for i, s in enumerate(check.sequence(value["steps"], where + "steps", nonempty=True)))
    _check_constants(check, steps, sampler, where)
    _check_latents(check, steps, sampler, where)
    _check_cache_flow(check, variants, steps, units, where)
    scale_shift = value.get("scale_shift")
    scale_shift_file = None
    if scale_shift is not None:
        scale_shift_file = check.file_name(check.mapping(scale_shift, where + "scale_shift", ("file",))["file"],
                                           where + "scale_shift.file", files)
    elif any(v.adjusts for v in variants):
        check.fail(where + "variants", "correct cache reads but the plan has no scale-shift file")
    engines = None
    if tensorrt:
        engines = _engines(check, value.get("engines"), len(variants), files, where)
    elif value.get("engines") is not None:
        check.fail(where + "engines", "are listed but the plan has no tensorrt entry")
    decoder_graph = _decoder_graph(check, value.get("decoder_graph"), where, batch, decoder, weights, files)
    decoder_engine = _side_engine(check, value, where, "decoder_engine", tensorrt and decoder_graph is not None,
                                  "a TensorRT plan with a decoder has an engine for it", files)
    prologue_engine = _side_engine(check, value, where, "prologue_engine", tensorrt and prologue is not None,
                                   "a TensorRT plan of a text model has an engine for its prologue", files)
    return Program(index, batch, value["sampler"], schedule_file, inputs, cache, variants, steps, scale_shift_file,
                   engines, decoder_graph, decoder_engine, prologue, prologue_engine)


def _side_engine(check: _Check, value: dict, where: str, key: str, needed: bool, why: str, files) -> "Engine | None":
    """A program's engine beside its variants' (`decoder_engine`, `prologue_engine`): required where
    `needed` (a TensorRT plan with that graph), refused otherwise."""
    if not needed:
        if value.get(key) is not None:
            check.fail(where + key, f"is listed but the plan has no {key.split('_')[0]} graph or no tensorrt entry")
        return None
    if value.get(key) is None:
        check.fail(where + key, f"is missing: {why}")
    engine = Engine.parse(value[key], where + key, check)
    check.file_name(engine.file, where + key + ".file", files)
    return engine


def _check_programs(check: _Check, programs) -> None:
    """One program per (batch size, evaluations); the programs of one step count run one schedule."""
    seen, schedules, counts = set(), {}, {}
    for p in programs:
        key = (p.batch_size, p.evaluations)
        if key in seen:
            check.fail("programs", f"have two programs for batch {p.batch_size} with {p.evaluations} steps")
        seen.add(key)
        if schedules.setdefault(p.evaluations, p.schedule_file) != p.schedule_file:
            check.fail("programs", f"run two schedules of {p.evaluations} steps ({schedules[p.evaluations]} and "
                       f"{p.schedule_file}): a plan holds one schedule per step count")
        if counts.setdefault(p.schedule_file, p.evaluations) != p.evaluations:
            check.fail("programs", f"run {p.schedule_file} with {counts[p.schedule_file]} and with {p.evaluations} "
                       "steps: a schedule has one step count")


def plain_file_name(name) -> bool:
    """A name a plan's file may have: one printable ASCII path component, not `.` or `..`."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and name.isascii() and name.isprintable()
            and os.path.basename(name) == name and "/" not in name and "\\" not in name and name not in (".", ".."))


def manifest_seal(document: dict) -> str:
    """The manifest's seal: SHA-256 of its canonical JSON (sorted keys, no spaces) without the seal
    itself. Any change to a value changes it; layout does not. Not a signature: whoever can write the
    folder can reseal a consistent forgery."""
    body = {k: v for k, v in document.items() if k != "seal"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _tokens(config: dict) -> int:
    """Tokens a block sees: the patches plus the family's extra tokens (U-ViT: label and time)."""
    return (config["input_size"] // config["patch_size"]) ** 2 + family_of(config).extra_tokens


def _guidance(check: _Check, value) -> Guidance:
    value = check.mapping(value, "guidance", ("enabled", "scale", "channels"))
    check.flag(value["enabled"], "guidance.enabled")
    if not isinstance(value["channels"], str) or value["channels"] not in GUIDANCE_CHANNELS:
        check.fail("guidance.channels", f"must be one of {', '.join(GUIDANCE_CHANNELS)}, not {value['channels']!r}")
    return Guidance(value["enabled"], check.number(value["scale"], "guidance.scale"), value["channels"])


def _sampler(check: _Check, value, where: str = ""):
    """The sampler the manifest records (schedules.sampling.make_sampler), or one line why not."""
    value = check.mapping(value, where + "sampler", ("name", "steps"))
    spacing = value.get("spacing")
    try:
        return make_sampler(check.text(value["name"], where + "sampler.name"),
                            check.integer(value["steps"], where + "sampler.steps", 1),
                            None if spacing is None else check.text(spacing, where + "sampler.spacing"))
    except BlockcacheError as e:
        raise BlockcacheError(f"{check.where}: {where}sampler: {e}") from None


def _files(check: _Check, value) -> dict:
    out = {}
    for name, entry in check.mapping(value, "files").items():
        if not plain_file_name(name) or name == names.MANIFEST:
            check.fail("files", f"lists {name!r}, which is not a file of the plan folder")
        entry = check.mapping(entry, f"files[{name!r}]", ("size", "sha256"))
        out[name] = FileEntry(check.integer(entry["size"], f"files[{name!r}].size", low=0),
                              check.text(entry["sha256"], f"files[{name!r}].sha256"))
    return out


def _prompt_specs(batch: int, config: dict, guidance: Guidance, precision: str) -> tuple[dict, dict]:
    """(the prompt inputs, the prologue outputs) of a text model's network batch, pinned by the config
    (tokens, T5 width, heads), the batch size, guidance and the stored precision."""
    rows, length = batch * (2 if guidance.enabled else 1), config["max_text_tokens"]
    heads = config["num_heads"]
    inputs = {names.PROMPT_EMBEDS: TensorSpec((rows, length, config["caption_channels"]), "float32"),
              names.PROMPT_MASK: TensorSpec((rows, length), "int64")}
    kv = TensorSpec((rows, heads, length, config["hidden_size"] // heads), PRECISION_DTYPE[precision])
    outputs = {name: kv for name in names.prologue_outputs(config["depth"])}
    outputs[names.PROMPT_BIAS] = TensorSpec((rows, 1, 1, length), PRECISION_DTYPE[precision])
    return inputs, outputs


def _conditioning(batch: int, config: dict, guidance: Guidance, prologue: "PrologueGraph | None") -> dict:
    """The step graph's conditioning inputs: labels, a text model's prompt inputs, or its prologue's outputs."""
    if not takes_prompt(config):
        return {names.Y: TensorSpec((batch,), "int64")}
    if prologue is not None:
        return dict(prologue.outputs)
    return _prompt_specs(batch, config, guidance, "fp32")[0]


def _prologue(check: _Check, value, where: str, batch: int, config: dict, guidance: Guidance, precision: str,
              weights: "Weights", files: dict) -> "PrologueGraph | None":
    """A program's `prologue_graph` (text models only): its file, the weights it reads, its pinned I/O."""
    if value is None:
        return None
    if not takes_prompt(config):
        check.fail(where + "prologue_graph", "is given but the model takes class labels, not prompts")
    value = check.mapping(value, where + "prologue_graph", ("file", "weights", "inputs", "outputs"))
    used = _graph_weights(check, value, where + "prologue_graph", weights)
    want = dict(zip(("inputs", "outputs"), _prompt_specs(batch, config, guidance, precision)))
    io = {}
    for direction, expected in want.items():
        got = {n: check.spec(spec, f"{where}prologue_graph.{direction}[{n!r}]")
               for n, spec in check.mapping(value[direction], f"{where}prologue_graph.{direction}").items()}
        if got != expected:
            wrong = next((n for n in expected if got.get(n) != expected[n]), None) or sorted(got.keys() - expected)[0]
            check.fail(f"{where}prologue_graph.{direction}", f"do not match the model config at batch size {batch}: "
                       f"{wrong!r} is {got.get(wrong)}, expected {expected.get(wrong)}")
        io[direction] = got
    return PrologueGraph(check.file_name(value["file"], where + "prologue_graph.file", files), used, io["inputs"],
                         io["outputs"])


def _graph_weights(check: _Check, value: dict, path: str, weights: "Weights") -> tuple[str, ...]:
    """The stored tensors a graph entry (variant, decoder or prologue graph) at `path` says it reads, each
    one the weights file holds."""
    used = check.names(value["weights"], path + ".weights")
    for name in used:
        if name not in weights.tensors:
            check.fail(path + ".weights", f"names {name!r}, which the weights file does not hold")
    return used


def _inputs(check: _Check, value, batch: int, config: dict, sampler, where: str, conditioning: dict) -> dict:
    """The step graph's inputs, each pinned: what every backend writes into them is fixed.
    `conditioning`: the labels' or the prompt's inputs (`_conditioning`)."""
    inputs = {name: check.spec(spec, f"{where}inputs[{name!r}]")
              for name, spec in check.mapping(value, where + "inputs").items()}
    carry = carry_term(sampler)
    size, channels = config["input_size"], config["in_channels"]
    time_dtype = model_timesteps(sampler).dtype.name
    expected = {names.X: TensorSpec((batch, channels, size, size), "float32"),
                **conditioning,
                names.TIMESTEP: TensorSpec((1,), time_dtype), names.A: TensorSpec((1,), "float32"),
                names.B: TensorSpec((1,), "float32"), names.GUIDANCE_SCALE: TensorSpec((1,), "float32")}
    if carry:  # the latent an earlier step started from, or the carry the previous step wrote
        expected.update({names.C: TensorSpec((1,), "float32"), names.X_CARRY: expected[names.X]})
    if carry == "output":  # carry_next = p·x + q·eps
        expected.update({names.P: TensorSpec((1,), "float32"), names.Q: TensorSpec((1,), "float32")})
    for name in sorted(expected.keys() | inputs.keys()):
        if name not in inputs:
            check.fail(where + "inputs", f"lack {name!r}, which a {sampler.name} plan's graphs take")
        if name not in expected:
            check.fail(where + "inputs", f"have {name!r}, which no {sampler.name} plan's graph takes")
        if inputs[name] != expected[name]:
            check.fail(f"{where}inputs[{name!r}]", f"is {inputs[name].dtype}{list(inputs[name].shape)}, not "
                       f"{expected[name].dtype}{list(expected[name].shape)}")
    return inputs


def _cache(check: _Check, value, units, shape: tuple, dtype: str, where: str = "") -> dict:
    """unit → its cache buffer, which holds the raw branch output of the (doubled) batch at the plan's precision."""
    cache = {}
    blocks = _blocks(units)
    for name, spec in check.mapping(value, where + "buffers").items():
        unit = name.removeprefix(names.CACHE_PREFIX) if isinstance(name, str) else name
        path = f"{where}buffers[{name!r}]"
        base, r = names.ring_of(unit) if isinstance(unit, str) else (unit, 0)
        if not name.startswith(names.CACHE_PREFIX) or (base not in units and _span_members(base, blocks) is None):
            check.fail(path, "is not the cache buffer of a model unit or span of blocks")
        if r is None or r > MAX_ORDER or (r and names.cache_input(names.ring_buffer(base, r - 1)) not in value):
            check.fail(path, f"is not one of the 1…{MAX_ORDER + 1} buffers of {base}'s history")
        cache[unit] = check.spec(spec, path)
        if cache[unit] != TensorSpec(shape, dtype):
            check.fail(path, f"is {cache[unit].dtype}{list(cache[unit].shape)}, not {dtype}{list(shape)}")
    return cache


def _weights(check: _Check, value, files, parameter_dtype: str) -> Weights:
    value = check.mapping(value, "weights", ("file", "tensors"))
    file = check.file_name(value["file"], "weights.file", files)
    size = files[file].size
    tensors = {}
    for name, t in check.mapping(value["tensors"], "weights.tensors").items():
        path = f"weights.tensors[{name!r}]"
        t = check.mapping(t, path, ("offset", "length", "shape", "dtype"))
        spec = check.spec({"shape": t["shape"], "dtype": t["dtype"]}, path)
        offset, length = check.integer(t["offset"], path + ".offset", 0), check.integer(t["length"], path + ".length", 0)
        if offset + length > size:
            check.fail(path, f"lies outside {file} ({offset} + {length} > {size} bytes)")
        if length != math.prod(spec.shape) * names.DTYPE_SIZES[spec.dtype]:
            check.fail(path, f"has {length} bytes, not those of a {list(spec.shape)} {spec.dtype} tensor")
        tensors[name] = StoredTensor(offset, length, spec.shape, spec.dtype)
    return Weights(file, tensors, _parameters(check, value.get("parameters") or {}, "weights.parameters", tensors,
                                              parameter_dtype, "the plan's"))


def _parameters(check: _Check, value, where: str, tensors: dict, dtype: str, whose: str) -> dict:
    """PyTorch parameter name → ParameterSource: each a stored tensor of `dtype` (`whose` dtype, in errors)."""
    parameters = {}
    for name, source in check.mapping(value, where).items():
        path = f"{where}[{name!r}]"
        source = check.mapping(source, path, ("tensor",))
        if not isinstance(source["tensor"], str) or source["tensor"] not in tensors:
            check.fail(path, "points to a tensor the weights file does not hold")
        if tensors[source["tensor"]].dtype != dtype:
            check.fail(path, f"is stored as {tensors[source['tensor']].dtype}, not {whose} {dtype}")
        parameters[name] = ParameterSource(source["tensor"], check.flag(source.get("transposed", False),
                                                                        path + ".transposed"))
    return parameters


def _decoder(check: _Check, value, config: dict, weights: Weights) -> "Decoder | None":
    """The manifest's `decoder`: scaling factor, AutoencoderKL config (its latent channels the model's),
    the decoder's PyTorch parameters (stored in float32 at every plan precision)."""
    if value is None:
        return None
    value = check.mapping(value, "decoder", ("scaling_factor", "config", "parameters"))
    scale = check.number(value["scaling_factor"], "decoder.scaling_factor")
    if not 0 < scale < 1e3:
        check.fail("decoder.scaling_factor", f"is {scale}, not a positive scaling factor")
    vae = check.mapping(value["config"], "decoder.config", ("latent_channels", "block_out_channels"))
    if vae["latent_channels"] != config["in_channels"]:
        check.fail("decoder.config", f"has {vae['latent_channels']!r} latent channels, the model samples "
                   f"{config['in_channels']}")
    levels = check.sequence(vae["block_out_channels"], "decoder.config.block_out_channels", nonempty=True)
    size = config["input_size"] * 2 ** (len(levels) - 1)  # every level but the last upsamples by 2
    return Decoder(scale, dict(vae), _parameters(check, value["parameters"], "decoder.parameters",
                                                 weights.tensors, "float32", "the decoder's"), size)


def _decoder_graph(check: _Check, value, where: str, batch: int, decoder: "Decoder | None", weights: Weights,
                   files) -> "DecoderGraph | None":
    """A program's `decoder_graph`: its file, the weights it reads, its uint8 (batch, H, W, 3) output."""
    if (value is None) != (decoder is None):
        check.fail(where + "decoder_graph", "is given without the manifest's decoder entry" if decoder is None else
                   "is missing: the plan has a decoder, so every program needs its graph")
    if value is None:
        return None
    value = check.mapping(value, where + "decoder_graph", ("file", "weights", "output"))
    used = _graph_weights(check, value, where + "decoder_graph", weights)
    output = check.spec(value["output"], where + "decoder_graph.output")
    want = TensorSpec((batch, decoder.image_size, decoder.image_size, 3), "uint8")
    if output != want:
        check.fail(where + "decoder_graph.output", f"is {output.dtype}{list(output.shape)}, not "
                   f"{want.dtype}{list(want.shape)}")
    return DecoderGraph(check.file_name(value["file"], where + "decoder_graph.file", files), used, output)


def _blocks(units) -> dict[str, tuple[str, ...]]:
    """{block: its units}, in execution order (schedules.schedule.unit_blocks)."""
    units = tuple(units)
    return {block: tuple(units[j] for j in columns) for block, columns in unit_blocks(units).items()}


def _span_members(name: str, blocks: dict) -> tuple[str, ...] | None:
    """The blocks of span residual `name` in order, None if it names no span of consecutive blocks."""
    span = span_blocks(name)
    order = list(blocks)
    if span is None or span[0] not in blocks or span[1] not in blocks or order.index(span[0]) > order.index(span[1]):
        return None
    return tuple(order[order.index(span[0]):order.index(span[1]) + 1])


def _variant(check: _Check, value, path: str, units, cache, weights: Weights, files, spans_allowed: bool) -> Variant:
    value = check.mapping(value, path, ("file", "computes", "reads", "writes", "weights"))
    computes, reads = check.names(value["computes"], path + ".computes"), check.names(value["reads"], path + ".reads")
    writes, adjusts = check.names(value["writes"], path + ".writes"), check.names(value.get("adjusts", []), path + ".adjusts")
    skips = check.names(value.get("skips", []), path + ".skips")
    blocks = _blocks(units)
    skipped_blocks = []
    for name in skips + tuple(n for n in writes if span_blocks(n) is not None):
        if not spans_allowed:
            check.fail(path, f"uses span {name}, but this model family's blocks do not form one chain")
        if _span_members(name, blocks) is None:
            check.fail(path, f"names {name!r}, which is not a span of the model's consecutive blocks")
    for name in skips:
        skipped_blocks += _span_members(name, blocks)
        if name not in reads:
            check.fail(path, f"skips span {name} but does not read its residual")
    if len(set(skipped_blocks)) != len(skipped_blocks):
        check.fail(path, "skips overlapping spans")
    skipped = {u for b in skipped_blocks for u in blocks[b]}
    unit_reads = tuple(u for u in reads if span_blocks(u) is None)
    if set(reads) - set(unit_reads) != set(skips):
        check.fail(path, "reads a span residual it does not skip")
    if (set(computes) & set(unit_reads) or set(computes) & skipped or set(unit_reads) & skipped
            or set(computes) | set(unit_reads) | skipped != set(units)
            or len(computes) + len(unit_reads) + len(skipped) != len(units)):
        check.fail(path, "does not split the model's units into computed, read and skipped in spans")
    for name in writes:
        members = _span_members(name, blocks) if span_blocks(name) is not None else None
        if members is None and name not in computes:
            check.fail(path, f"writes a unit it does not compute ({name})")
        if members is not None and set(members) & set(skipped_blocks):
            check.fail(path, f"writes span {name}, whose blocks it skips")
    if not set(adjusts) <= set(unit_reads):
        check.fail(path, "corrects a unit it does not read")
    for unit in reads + writes:
        if unit not in cache:
            check.fail(path, f"uses unit {unit} but the plan has no cache buffer for it")
    forecasts = check.mapping(value.get("forecasts", {}), path + ".forecasts")
    for name, order in forecasts.items():
        if name not in reads:
            check.fail(path + ".forecasts", f"forecasts {name!r}, which the variant does not read")
        check.integer(order, f"{path}.forecasts[{name!r}]", 1)
        if order > MAX_ORDER or names.ring_buffer(name, order) not in cache:
            check.fail(f"{path}.forecasts[{name!r}]", f"is {order}: more history than the plan's {MAX_ORDER} "
                       f"at most, or than {name}'s buffers hold")
    used = _graph_weights(check, value, path, weights)
    macs = value.get("macs_per_image")
    return Variant(check.file_name(value["file"], path + ".file", files), computes, reads, writes, adjusts, used,
                   None if macs is None else check.integer(macs, path + ".macs_per_image", 0), skips, dict(forecasts))


def _step(check: _Check, value, path: str, index: int, num_variants: int, carry: bool,
          carry_output: bool) -> Step:
    value = check.mapping(value, path, ("variant", "timestep", "a", "b") + (("c",) if carry else ())
                          + (("p", "q") if carry_output else ()))
    variant = check.integer(value["variant"], path + ".variant", 0)
    if variant >= num_variants:
        check.fail(path + ".variant", f"is {variant} but the plan has {num_variants} variants")
    latents = value.get("latents", [index % 2, index % 2, (index + 1) % 2])  # older plans: DDIM's ping-pong
    count = 4 if carry_output else 3  # the buffers it reads (input, carry), then those it writes
    if (not isinstance(latents, list) or len(latents) != count
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < count for v in latents)
            or set(latents[2:]) & set(latents[:2]) or len(set(latents[2:])) != count - 2):
        roles = "input, carry, output" + (", carry output" if carry_output else "")
        check.fail(path + ".latents", f"are not {'four' if carry_output else 'three'} buffer numbers ({roles}) in "
                   f"0…{count - 1}: {latents!r}")
    if not carry and "c" in value:
        check.fail(path + ".c", "is given but the plan's graphs have no carry input")
    for key in ("p", "q"):
        if not carry_output and key in value:
            check.fail(f"{path}.{key}", "is given but the plan's graphs hand on no carry")
    forecast = {name: tuple(check.number(w, f"{path}.forecast[{name!r}]")
                            for w in check.sequence(weights, f"{path}.forecast[{name!r}]"))
                for name, weights in check.mapping(value.get("forecast", {}), path + ".forecast").items()}
    p, q = (check.number(value[k], f"{path}.{k}") for k in "pq") if carry_output else (None, None)
    return Step(variant, check.number(value["timestep"], path + ".timestep"), check.number(value["a"], path + ".a"),
                check.number(value["b"], path + ".b"), check.number(value["c"], path + ".c") if carry else None,
                tuple(latents), forecast, p, q)


def _check_constants(check: _Check, steps, sampler, where: str = "") -> None:
    """Each step's timestep and coefficients are the ones the recorded sampler derives for it."""
    evaluations = len(sampler.timesteps)
    if len(steps) != evaluations:
        check.fail(where + "steps", f"are {len(steps)}, but the {sampler.name} sampler makes {evaluations} model evaluations")
    a, b = sampler.coefficients()
    expected = {"timestep": model_timesteps(sampler).astype(np.float64), "a": a, "b": b,
                "c": sampler.carry_coefficients()}
    if carry_term(sampler) == "output":
        expected["p"], expected["q"] = sampler.carry_output_coefficients()
    for s, step in enumerate(steps):
        for name, values in expected.items():
            got = getattr(step, name)
            if got is not None and not math.isclose(got, float(values[s]), rel_tol=COEFFICIENT_RTOL, abs_tol=1e-12):
                check.fail(f"{where}steps[{s}].{name}", f"is {got!r}, but the recorded sampler derives {float(values[s])!r}")


def _check_latents(check: _Check, steps, sampler, where: str = "") -> None:
    """Each step reads the latent the previous step wrote, and carries, from a buffer no later step has
    overwritten, the input of evaluation `carry_source[s]` or, where the carry is the previous step's
    output, the carry that step wrote (the first step, whose c is 0, its own input; exporter/export.py:
    latent_buffers, carry_output_buffers)."""
    output = carry_term(sampler) == "output"
    source = sampler.carry_source if carry_term(sampler) == "input" else range(len(steps))
    holds = {steps[0].latents[0]: ("input", 0)}  # buffer → ("input" | "carry", the evaluation it is for)
    for s, step in enumerate(steps):
        latent, carry, *written = step.latents
        if holds.get(latent) != ("input", s):
            check.fail(f"{where}steps[{s}].latents", "do not start from the previous step's output buffer")
        if output and s:
            if holds.get(carry) != ("carry", s):
                check.fail(f"{where}steps[{s}].latents", f"carry buffer {carry} does not hold the carry step {s - 1} "
                           "wrote")
        elif holds.get(carry) != ("input", int(source[s])):
            check.fail(f"{where}steps[{s}].latents", f"carry buffer {carry} does not hold the input of evaluation "
                       f"{int(source[s])}")
        holds = {buffer: held for buffer, held in holds.items() if buffer not in written}
        holds.update(zip(written, (("input", s + 1), ("carry", s + 1))))


def _check_cache_flow(check: _Check, variants, steps, units, where: str = "") -> None:
    """Every value a step reads was made by the last step that computed the unit (or ran all of the
    span's blocks) and written to the cache; a forecast of order m reads the last m + 1 such values, all
    written, with TaylorSeer's weights for the steps they came from (schedules.forecast.taylor_weights)."""
    blocks = _blocks(units)
    computed = {}  # unit → the steps that computed it
    skipped_at = []  # per step, the blocks it skipped in spans
    for s, step in enumerate(steps):
        variant = variants[step.variant]
        here = f"{where}steps[{s}]"
        if set(step.forecast) != set(variant.forecasts):
            check.fail(here + ".forecast", "does not give weights for exactly the variant's forecast reads")
        for name in variant.reads:
            order = variant.forecasts.get(name, 0)  # the read uses the last order + 1 values made
            if span_blocks(name) is None:
                made = computed.get(name, [])[-(order + 1):][::-1]
                what = f"unit {name} from the cache before any step computed it"
            else:
                members = set(_span_members(name, blocks))
                made = list(islice((k for k in range(s - 1, -1, -1) if not members & skipped_at[k]), order + 1))
                what = f"span {name} before any step ran its blocks"
            if len(made) < order + 1:
                check.fail(here, f"reads {what}" if not made else f"forecasts {name} from {order + 1} values, but "
                           f"only {len(made)} were made before")
            for r in made:
                if name not in variants[steps[r].variant].writes:
                    check.fail(here, f"reads {name}, which step {r} made but did not write to the cache")
            if order:
                want = taylor_weights(made, s)
                got = step.forecast[name]
                if len(got) != order + 1 or not np.allclose(got, want, rtol=1e-9, atol=1e-12):
                    check.fail(f"{here}.forecast[{name!r}]", f"are {list(got)}, not TaylorSeer's weights "
                               f"{[float(w) for w in want]} for steps {made}")
        for unit in variant.computes:
            computed.setdefault(unit, []).append(s)
        skipped_at.append({b for name in variant.skips for b in _span_members(name, blocks)})


def _engines(check: _Check, entries, num_variants: int, files, where: str = "") -> tuple[Engine, ...]:
    path = f"{where}engines" if where else "tensorrt.engines"
    entries = check.sequence(entries, path)
    if len(entries) != num_variants:
        check.fail(path, f"has {len(entries)} engines for {num_variants} variants")
    engines = tuple(Engine.parse(e, f"{path}[{k}]", check) for k, e in enumerate(entries))
    for k, e in enumerate(engines):
        check.file_name(e.file, f"{path}[{k}].file", files)
    return engines
