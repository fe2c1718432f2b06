"""The plan manifest (`plan.json`) as a typed, validated object: `Plan`.

`Plan.parse(document, directory)` checks the manifest once, for every backend alike:
- types, and the shape and dtype of every graph input and cache buffer against the model config,
  the batch size, guidance and the stored precision;
- the model's units against its config; every variant's split of the units into computed and read,
  its writes within its computes and its corrections within its reads, a cache buffer for each;
- every step's variant, and its timestep and coefficients against the ones the recorded sampler
  derives (so a plan cannot run another schedule than it says); its latent buffers: each step reads
  the previous step's output, and its carry buffer holds the latent its solver step started from;
- that each read of the cache follows a step that wrote the unit;
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
from dataclasses import dataclass

import numpy as np

from schedules.errors import BlockcacheError
from schedules.sampling import GUIDANCE_CHANNELS, MAX_GUIDANCE_SCALE, make_sampler, model_timesteps
from schedules.zoo import check_config, family_of, num_labels, unit_names

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
    reads: tuple[str, ...]  # units taken from their cache buffer
    writes: tuple[str, ...]  # computed units whose value a later step reads (graph outputs)
    adjusts: tuple[str, ...]  # read units corrected by Block Caching scale-shift inputs
    weights: tuple[str, ...]  # stored tensors the graph uses
    macs_per_image: int | None


@dataclass(frozen=True)
class Step:
    """One model evaluation: its variant, its constants and its latent buffers (input, carry, output)."""
    variant: int
    timestep: float
    a: float
    b: float
    c: float | None  # the carry coefficient (solvers with a carry term), None otherwise
    latents: tuple[int, int, int]


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
class Plan:
    directory: str
    document: dict  # the manifest as stored
    model_name: str | None
    config: dict  # the model's zoo config (with its family)
    unit_names: tuple[str, ...]
    num_labels: int
    sampler: dict
    guidance: Guidance
    batch_size: int
    precision: str
    inputs: dict  # step-graph input name → TensorSpec
    cache: dict  # unit → TensorSpec of its cache buffer
    weights: Weights
    variants: tuple[Variant, ...]
    steps: tuple[Step, ...]
    scale_shift_file: str | None
    files: dict  # file name → FileEntry
    engines: tuple[Engine, ...] | None  # TensorRT engines, one per variant
    tensorrt: dict | None  # the manifest's TensorRT entry (build settings, versions)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def family(self) -> str:
        return self.config["family"]

    @property
    def has_carry(self) -> bool:
        return names.X_CARRY in self.inputs

    @property
    def num_latents(self) -> int:
        return 1 + max(max(step.latents) for step in self.steps)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.inputs[names.X].shape[1:]

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
        check.mapping(doc, "the manifest", ("model", "sampler", "guidance", "batch_size", "inputs", "buffers",
                                            "weights", "variants", "steps", "files"))
        files = _files(check, doc["files"])
        if names.SCHEDULE not in files:  # the exporter always writes it: its absence means an edited list
            check.fail("files", f"lack {names.SCHEDULE!r}, the schedule the plan was made from")
        model = check.mapping(doc["model"], "model", ("config",))
        config = {"family": model.get("family", "dit"), **check.mapping(model["config"], "model.config")}
        try:
            check_config(config)
            units = unit_names(config)
        except (BlockcacheError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise BlockcacheError(f"{check.where}: model.config is not a valid model config ({e})") from None
        if check.names(model.get("unit_names", list(units)), "model.unit_names") != units:
            check.fail("model.unit_names", "do not match the model config")
        labels = check.integer(model.get("num_labels", num_labels(config)), "model.num_labels", low=1)
        if labels > num_labels(config):
            check.fail("model.num_labels", f"is {labels}, more than the model's {num_labels(config)} classes")
        batch = check.integer(doc["batch_size"], "batch_size", low=1)
        precision = doc.get("precision", "fp32")
        if precision not in names.STORED_PRECISIONS:
            check.fail("precision", f"must be one of {', '.join(names.STORED_PRECISIONS)}, not {precision!r}")
        guidance = _guidance(check, doc["guidance"])
        if abs(guidance.scale) > MAX_GUIDANCE_SCALE:
            check.fail("guidance.scale", f"is {guidance.scale}, beyond the ±{MAX_GUIDANCE_SCALE:g} a plan may sample with")
        sampler = _sampler(check, doc["sampler"])
        inputs = _inputs(check, doc["inputs"], batch, config, sampler)
        cache = _cache(check, doc["buffers"], units, (batch * (2 if guidance.enabled else 1),
                                                      _tokens(config), config["hidden_size"]),
                       PRECISION_DTYPE[precision])
        weights = _weights(check, doc["weights"], files, PRECISION_DTYPE[precision])
        variants = tuple(_variant(check, v, f"variants[{k}]", units, cache, weights, files)
                         for k, v in enumerate(check.sequence(doc["variants"], "variants", nonempty=True)))
        steps = tuple(_step(check, s, f"steps[{i}]", i, len(variants), names.X_CARRY in inputs)
                      for i, s in enumerate(check.sequence(doc["steps"], "steps", nonempty=True)))
        _check_constants(check, steps, sampler)
        _check_latents(check, steps, sampler.carry_source)
        _check_cache_flow(check, variants, steps)
        scale_shift = doc.get("scale_shift")
        scale_shift_file = None
        if scale_shift is not None:
            scale_shift_file = check.file_name(check.mapping(scale_shift, "scale_shift", ("file",))["file"],
                                               "scale_shift.file", files)
        elif any(v.adjusts for v in variants):
            check.fail("variants", "correct cache reads but the plan has no scale-shift file")
        tensorrt = doc.get("tensorrt")
        engines = None if tensorrt is None else _engines(check, tensorrt, len(variants), files)
        return cls(directory=directory, document=doc, model_name=model.get("name"), config=config,
                   unit_names=units, num_labels=labels, sampler=doc["sampler"], guidance=guidance, batch_size=batch,
                   precision=precision, inputs=inputs, cache=cache, weights=weights, variants=variants, steps=steps,
                   scale_shift_file=scale_shift_file, files=files, engines=engines, tensorrt=tensorrt)


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


def _sampler(check: _Check, value):
    """The sampler the manifest records (schedules.sampling.make_sampler), or one line why not."""
    value = check.mapping(value, "sampler", ("name", "steps"))
    spacing = value.get("spacing")
    try:
        return make_sampler(check.text(value["name"], "sampler.name"), check.integer(value["steps"], "sampler.steps", 1),
                            None if spacing is None else check.text(spacing, "sampler.spacing"))
    except BlockcacheError as e:
        raise BlockcacheError(f"{check.where}: sampler: {e}") from None


def _files(check: _Check, value) -> dict:
    out = {}
    for name, entry in check.mapping(value, "files").items():
        if not plain_file_name(name) or name == names.MANIFEST:
            check.fail("files", f"lists {name!r}, which is not a file of the plan folder")
        entry = check.mapping(entry, f"files[{name!r}]", ("size", "sha256"))
        out[name] = FileEntry(check.integer(entry["size"], f"files[{name!r}].size", low=0),
                              check.text(entry["sha256"], f"files[{name!r}].sha256"))
    return out


def _inputs(check: _Check, value, batch: int, config: dict, sampler) -> dict:
    """The step graph's inputs, each pinned: what every backend writes into them is fixed."""
    inputs = {name: check.spec(spec, f"inputs[{name!r}]") for name, spec in check.mapping(value, "inputs").items()}
    carry = bool(np.any(sampler.carry_coefficients()))
    size, channels = config["input_size"], config["in_channels"]
    time_dtype = model_timesteps(sampler).dtype.name
    expected = {names.X: TensorSpec((batch, channels, size, size), "float32"), names.Y: TensorSpec((batch,), "int64"),
                names.TIMESTEP: TensorSpec((1,), time_dtype), names.A: TensorSpec((1,), "float32"),
                names.B: TensorSpec((1,), "float32"), names.GUIDANCE_SCALE: TensorSpec((1,), "float32")}
    if carry:  # the solver's intermediate evaluations need the latent their step started from
        expected.update({names.C: TensorSpec((1,), "float32"), names.X_CARRY: expected[names.X]})
    for name in sorted(expected.keys() | inputs.keys()):
        if name not in inputs:
            check.fail("inputs", f"lack {name!r}, which a {sampler.name} plan's graphs take")
        if name not in expected:
            check.fail("inputs", f"have {name!r}, which no {sampler.name} plan's graph takes")
        if inputs[name] != expected[name]:
            check.fail(f"inputs[{name!r}]", f"is {inputs[name].dtype}{list(inputs[name].shape)}, not "
                       f"{expected[name].dtype}{list(expected[name].shape)}")
    return inputs


def _cache(check: _Check, value, units, shape: tuple, dtype: str) -> dict:
    """unit → its cache buffer, which holds the raw branch output of the (doubled) batch at the plan's precision."""
    cache = {}
    for name, spec in check.mapping(value, "buffers").items():
        unit = name.removeprefix(names.CACHE_PREFIX)
        path = f"buffers[{name!r}]"
        if not name.startswith(names.CACHE_PREFIX) or unit not in units:
            check.fail(path, "is not the cache buffer of a model unit")
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
    parameters = {}
    for name, source in check.mapping(value.get("parameters") or {}, "weights.parameters").items():
        path = f"weights.parameters[{name!r}]"
        source = check.mapping(source, path, ("tensor",))
        if not isinstance(source["tensor"], str) or source["tensor"] not in tensors:
            check.fail(path, "points to a tensor the weights file does not hold")
        if tensors[source["tensor"]].dtype != parameter_dtype:
            check.fail(path, f"is stored as {tensors[source['tensor']].dtype}, not the plan's {parameter_dtype}")
        parameters[name] = ParameterSource(source["tensor"], check.flag(source.get("transposed", False),
                                                                        path + ".transposed"))
    return Weights(file, tensors, parameters)


def _variant(check: _Check, value, path: str, units, cache, weights: Weights, files) -> Variant:
    value = check.mapping(value, path, ("file", "computes", "reads", "writes", "weights"))
    computes, reads = check.names(value["computes"], path + ".computes"), check.names(value["reads"], path + ".reads")
    writes, adjusts = check.names(value["writes"], path + ".writes"), check.names(value.get("adjusts", []), path + ".adjusts")
    if set(computes) & set(reads) or set(computes) | set(reads) != set(units) or len(computes) + len(reads) != len(units):
        check.fail(path, "does not split the model's units into computed and read")
    if not set(writes) <= set(computes):
        check.fail(path, "writes a unit it does not compute")
    if not set(adjusts) <= set(reads):
        check.fail(path, "corrects a unit it does not read")
    for unit in reads + writes:
        if unit not in cache:
            check.fail(path, f"uses unit {unit} but the plan has no cache buffer for it")
    used = check.names(value["weights"], path + ".weights")
    for name in used:
        if name not in weights.tensors:
            check.fail(path + ".weights", f"names {name!r}, which the weights file does not hold")
    macs = value.get("macs_per_image")
    return Variant(check.file_name(value["file"], path + ".file", files), computes, reads, writes, adjusts, used,
                   None if macs is None else check.integer(macs, path + ".macs_per_image", 0))


def _step(check: _Check, value, path: str, index: int, num_variants: int, carry: bool) -> Step:
    value = check.mapping(value, path, ("variant", "timestep", "a", "b") + (("c",) if carry else ()))
    variant = check.integer(value["variant"], path + ".variant", 0)
    if variant >= num_variants:
        check.fail(path + ".variant", f"is {variant} but the plan has {num_variants} variants")
    latents = value.get("latents", [index % 2, index % 2, (index + 1) % 2])  # older plans: DDIM's ping-pong
    if (not isinstance(latents, list) or len(latents) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 3 for v in latents)
            or latents[2] in latents[:2]):
        check.fail(path + ".latents", f"are not three buffer numbers (input, carry, output) in 0…2: {latents!r}")
    if not carry and "c" in value:
        check.fail(path + ".c", "is given but the plan's graphs have no carry input")
    return Step(variant, check.number(value["timestep"], path + ".timestep"), check.number(value["a"], path + ".a"),
                check.number(value["b"], path + ".b"), check.number(value["c"], path + ".c") if carry else None,
                tuple(latents))


def _check_constants(check: _Check, steps, sampler) -> None:
    """Each step's timestep and coefficients are the ones the recorded sampler derives for it."""
    evaluations = len(sampler.timesteps)
    if len(steps) != evaluations:
        check.fail("steps", f"are {len(steps)}, but the {sampler.name} sampler makes {evaluations} model evaluations")
    a, b = sampler.coefficients()
    expected = {"timestep": model_timesteps(sampler).astype(np.float64), "a": a, "b": b,
                "c": sampler.carry_coefficients()}
    for s, step in enumerate(steps):
        for name, values in expected.items():
            got = getattr(step, name)
            if got is not None and not math.isclose(got, float(values[s]), rel_tol=COEFFICIENT_RTOL, abs_tol=1e-12):
                check.fail(f"steps[{s}].{name}", f"is {got!r}, but the recorded sampler derives {float(values[s])!r}")


def _check_latents(check: _Check, steps, carry_source) -> None:
    """Each step reads the latent the previous step wrote, and carries the input of evaluation
    `carry_source[s]` from a buffer no later step has overwritten (exporter/export.py:latent_buffers)."""
    holds = {steps[0].latents[0]: 0}  # buffer → the evaluation whose input it holds
    for s, step in enumerate(steps):
        latent, carry, out = step.latents
        if holds.get(latent) != s:
            check.fail(f"steps[{s}].latents", "do not start from the previous step's output buffer")
        if holds.get(carry) != int(carry_source[s]):
            check.fail(f"steps[{s}].latents", f"carry buffer {carry} does not hold the input of evaluation "
                       f"{int(carry_source[s])}")
        holds = {buffer: e for buffer, e in holds.items() if buffer != out}
        holds[out] = s + 1


def _check_cache_flow(check: _Check, variants, steps) -> None:
    """Every unit a step reads was last computed by a step that wrote it to the cache."""
    last_computed = {}  # unit → index of the last step that computed it
    for s, step in enumerate(steps):
        variant = variants[step.variant]
        for unit in variant.reads:
            r = last_computed.get(unit)
            if r is None:
                check.fail(f"steps[{s}]", f"reads unit {unit} from the cache before any step computed it")
            if unit not in variants[steps[r].variant].writes:
                check.fail(f"steps[{s}]", f"reads unit {unit}, which step {r} computed but did not write to the cache")
        for unit in variant.computes:
            last_computed[unit] = s


def _engines(check: _Check, value, num_variants: int, files) -> tuple[Engine, ...]:
    value = check.mapping(value, "tensorrt", ("engines",))
    entries = check.sequence(value["engines"], "tensorrt.engines")
    if len(entries) != num_variants:
        check.fail("tensorrt.engines", f"has {len(entries)} engines for {num_variants} variants")
    engines = tuple(Engine.parse(e, f"tensorrt.engines[{k}]", check) for k, e in enumerate(entries))
    for k, e in enumerate(engines):
        check.file_name(e.file, f"tensorrt.engines[{k}].file", files)
    return engines
