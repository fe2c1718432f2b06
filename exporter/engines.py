"""TensorRT engine stage: one engine per variant, added to a finished ONNX plan.

    manifest = export_with_engines(model, schedule, "plans/l2c20", EngineSettings(precision="fp16"))

A plan with engines is still a complete ONNX plan (ONNX Runtime runs it); it gains `engine_<k>.plan`
files, their checksums in `manifest["files"]`, and a `manifest["tensorrt"]` entry describing each
engine's I/O (runtime/bindings.py turns that into device addresses).

Weights are held once: engines take weights as inputs
-----------------------------------------------------
TensorRT cannot share weights between engines (NVIDIA/TensorRT issue 2024), and a refitted (or
weight-stripped then refitted) engine still keeps its own device copy of every weight, so with V
variants either mechanism holds the weights V times on the device (refit only saves disk). Instead every weight tensor of at least
`min_weight_bytes` becomes a graph *input* of each variant graph before the build; at run time all
engines bind the same device buffer per weight (one packed `weights` arena). Only the small tensors
(biases, norm constants, below the threshold) and Conv operands (the patch embedding's tiny kernel:
convolution with a run-time kernel is a restricted path in TensorRT) stay baked into each engine;
their size is recorded per engine
(`baked_bytes`) — about 1 MB per engine for DiT-XL/2 in fp16, against 1.35 GB of weights held once.
The cost: the builder sees no weight values, so nothing is constant-folded through weights, no
weight-specific rewrites (sparsity, weight-only quantisation, pre-transposed layouts) are possible,
and a GEMM whose best kernel wants another weight layout reformats it at run time (visible as
Reformat layers on weight inputs in the engine inspector; benchmarks/trt_smoke.py lists them).

Precision: builds are strongly typed, so each tensor has exactly the type of the ONNX graph, and the
ONNX graphs already say what stays fp32 (exporter --precision fp16: LayerNormalization, guidance and
the DDIM update in fp32, matmuls, softmax and the rest in fp16). bf16 engines are built from the fp16
graphs with every fp16 type retyped to bf16 (`retype`), except the ops that have no bf16 at the
graphs' opset (Conv of the patch embedding, Einsum of unpatchify), which run in fp32 between casts;
their weights are converted from the fp16 weights.bin at load (fp16 → bf16 keeps the range and drops 3
mantissa bits; values below fp16's normal range (6e-5) carry fp16's coarser rounding). fp32 engines
are built without TF32 unless asked (EngineSettings.tf32).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from runtime.backends.tensorrt import import_tensorrt
from runtime.plan import Plan, names
from runtime.plan.manifest import Engine
from runtime.plan.staging import write_manifest
from runtime.plan.files import plan_corrections, read_weights
from runtime.plan.graphs import graph_io
from schedules.errors import BlockcacheError, ParameterError, one_line

MIN_WEIGHT_BYTES = 16 * 1024
# Operands TensorRT wants as build-time constants (ONNX op, input index): never made engine inputs.
CONSTANT_OPERANDS = {("Conv", 1), ("Conv", 2), ("ConvTranspose", 1), ("ConvTranspose", 2)}
OPT_LEVELS = range(0, 6)  # IBuilderConfig.builder_optimization_level: 0…5, TensorRT's default 3


@dataclass(frozen=True)
class EngineSettings:
    precision: str = "fp16"
    workspace: int | None = None  # bytes; None: TensorRT's default (the device's memory)
    timing_cache: str | None = None  # path, read if present and written after every engine
    opt_level: int | None = None
    tf32: bool = False  # only meaningful for fp32 engines
    min_weight_bytes: int = MIN_WEIGHT_BYTES

    def __post_init__(self):
        if self.precision not in names.PRECISIONS:
            raise ParameterError("precision", f"{{name}} {self.precision!r} is not supported by the tensorrt "
                                 f"backend (available: {', '.join(names.PRECISIONS)})")
        if self.workspace is not None and (not isinstance(self.workspace, int) or self.workspace <= 0):
            raise ParameterError("workspace", f"{{name}} must be a positive size, got {self.workspace!r}")
        if self.opt_level is not None and self.opt_level not in OPT_LEVELS:
            raise ParameterError("opt_level", f"{{name}} must be 0…5, got {self.opt_level}")
        if self.timing_cache is not None:
            if os.path.isdir(self.timing_cache):
                raise ParameterError("timing_cache", f"{{name}} {self.timing_cache} is a folder; give a file path")
            if not os.path.isdir(os.path.dirname(os.path.abspath(self.timing_cache))):
                raise ParameterError("timing_cache", f"{{name}} {self.timing_cache}: its folder does not exist")

    @property
    def onnx_precision(self) -> str:
        return names.ENGINE_SOURCE[self.precision]


def parse_size(text: str | None) -> int | None:
    """'4G', '512M', '1.5GiB', '1000000' → bytes (binary units)."""
    if text is None:
        return None
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in units else ""
    try:
        value = float(s[: len(s) - len(unit)])
    except ValueError:
        raise ParameterError("workspace", f"{{name}} {text!r} is not a size (e.g. 4G, 512M)") from None
    if not np.isfinite(value) or value <= 0:
        raise ParameterError("workspace", f"{{name}} must be a positive size, got {text!r}")
    return int(value * units[unit])


def config_kwargs(settings: EngineSettings, trt) -> dict:
    """Keyword arguments for polygraphy's CreateConfig (`trt`: the tensorrt module).

    With a strongly typed network the types come from the graph, so no FP16/BF16 builder flag is set
    (TensorRT rejects them on strongly typed networks); TF32 is on by default in TensorRT and cleared
    here unless asked for (polygraphy clears it when tf32=False)."""
    kwargs = {"tf32": settings.tf32 and settings.precision == "fp32",
              # layer names and tactics in the engine inspector (smoke script: reformats of weight inputs)
              "profiling_verbosity": trt.ProfilingVerbosity.DETAILED}
    if settings.workspace is not None:
        kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: settings.workspace}
    if settings.opt_level is not None:
        kwargs["builder_optimization_level"] = settings.opt_level
    return kwargs


# ---------------------------------------------------------------------------------------------------
# Graph preparation (onnx only, tested everywhere)
# ---------------------------------------------------------------------------------------------------

def prepare_graph(model, blob: np.ndarray, *, min_weight_bytes: int = MIN_WEIGHT_BYTES,
                  weights: set[str] | None = None, precision: str = "fp32"):
    """The variant graph as TensorRT gets it: large weights turned into graph inputs (same names),
    every other initializer inlined from `blob` (weights.bin), fp16 retyped to bf16 for bf16.

    `model` is the variant ModelProto loaded without external data; `weights` the names stored in
    weights.bin that may become inputs (default: all external ones). Returns (model, weight input
    names, baked bytes)."""
    import onnx

    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    constant_uses = {name for node in model.graph.node for i, name in enumerate(node.input)
                     if (node.op_type, i) in CONSTANT_OPERANDS}
    keep, inputs, baked = [], [], 0
    for init in model.graph.initializer:
        external = init.data_location == onnx.TensorProto.EXTERNAL
        if external:
            info = {e.key: e.value for e in init.external_data}
            offset, length = int(info.get("offset", 0)), int(info["length"])
            if offset + length > blob.size:
                raise BlockcacheError(f"initializer {init.name} lies outside the weights file (truncated plan?)")
        else:
            length = len(init.raw_data) if init.HasField("raw_data") else 0
        candidate = external and (weights is None or init.name in weights)
        if (candidate and init.data_type in float_types and length >= min_weight_bytes
                and init.name not in constant_uses):
            inputs.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            continue
        if external:
            init.raw_data = blob[offset: offset + length].tobytes()
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
        baked += length
        keep.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.input.extend(inputs)
    if precision == "bf16":
        _run_in_fp32(model)
        retype(model, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return model, [i.name for i in inputs], baked


def _run_in_fp32(model) -> None:
    """Nodes whose op has no bfloat16 in the graph's opset (ONNX schemas; here the patch embedding's
    Conv and the unpatchify Einsum) but compute in fp16 are made to compute in fp32 instead: their fp16
    initializers become fp32, other fp16 inputs get a Cast, and fp16 outputs are cast back under their
    old names — so that retyping fp16 → bf16 leaves a valid graph. Both are a negligible share of the
    work."""
    import onnx
    from onnx import numpy_helper

    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 20)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    inits = {t.name: t for t in model.graph.initializer}
    types.update({name: t.data_type for name, t in inits.items()})

    def lacks_bf16(node):
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        return not any("tensor(bfloat16)" in c.allowed_type_strs for c in schema.type_constraints)

    nodes = []
    for node in model.graph.node:
        if not (any(types.get(o) == fp16 for o in node.output) and lacks_bf16(node)):
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if types.get(name) != fp16:
                continue
            if name in inits:
                inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float32),
                                                             name))
            else:
                cast = f"{name}.fp32_for_{node.name}"
                nodes.append(onnx.helper.make_node("Cast", [name], [cast], to=fp32, name=f"{node.name}.cast_in{i}"))
                node.input[i] = cast
        nodes.append(node)
        for i, out in enumerate(node.output):
            if types.get(out) == fp16:
                node.output[i] = f"{out}.fp32"
                nodes.append(onnx.helper.make_node("Cast", [node.output[i]], [out], to=fp16,
                                                   name=f"{node.name}.cast_out{i}"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _convert_raw(tensor, dst: int) -> None:
    """Re-encode a (float16) TensorProto's values in place as `dst` (BFLOAT16 or FLOAT)."""
    import onnx
    from onnx import numpy_helper

    from runtime.bindings import to_bfloat16

    values = numpy_helper.to_array(tensor).astype(np.float32)
    for name in ("raw_data", "int32_data", "float_data"):
        tensor.ClearField(name)
    tensor.data_type = dst
    if dst == onnx.TensorProto.BFLOAT16:
        tensor.raw_data = to_bfloat16(values).tobytes()
    elif dst == onnx.TensorProto.FLOAT:
        tensor.raw_data = values.tobytes()
    else:
        raise ValueError(f"unsupported retype target {dst}")


def retype(model, src: int, dst: int):
    """Every `src`-typed tensor of the graph becomes `dst`: inputs, outputs, value_info, initializers,
    Cast targets and constant attributes. (The fp16 graphs have no subgraphs; they are not visited.)"""
    import onnx

    graph = model.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == src:
            value.type.tensor_type.elem_type = dst
    for init in graph.initializer:
        if init.data_type == src:
            _convert_raw(init, dst)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype") and attr.i == src:
                attr.i = dst
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == src:
                _convert_raw(attr.t, dst)
    return model


# ---------------------------------------------------------------------------------------------------
# The TensorRT build (the only part that needs TensorRT)
# ---------------------------------------------------------------------------------------------------

def build_engine_bytes(onnx_path: str, settings: EngineSettings, timing_cache: str) -> bytes:
    """Serialized engine for one prepared ONNX graph: polygraphy's NetworkFromOnnxPath(strongly_typed)
    → CreateConfig → EngineBytesFromNetwork, which loads `timing_cache` when it exists and merges the
    build's timings back into it, so later engines (and later exports) reuse earlier tactic timings."""
    trt = import_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    load_cache = timing_cache if os.path.exists(timing_cache) else None
    network = NetworkFromOnnxPath(onnx_path, strongly_typed=True)
    config = CreateConfig(load_timing_cache=load_cache, **config_kwargs(settings, trt))
    try:
        return bytes(EngineBytesFromNetwork(network, config, save_timing_cache=timing_cache)())
    except PolygraphyException as e:
        raise BlockcacheError(f"TensorRT could not build {os.path.basename(onnx_path)}: {one_line(e)[:300]}") from None


def tensorrt_version() -> str:
    return import_tensorrt().__version__


# ---------------------------------------------------------------------------------------------------
# Plan bookkeeping
# ---------------------------------------------------------------------------------------------------

# The engines a program has beside its variants' (entry → its graph's Program attribute, file name, precision):
# the decoder's is fp32 at every precision (as its graph is), a text model's prologue at the plan's (None).
SIDE_ENGINES = {"decoder_engine": ("decoder", names.decoder_engine_file, "fp32"),
                "prologue_engine": ("prologue", names.prologue_engine_file, None)}


def build_engines(plan_dir: str, manifest: dict, settings: EngineSettings, *, builder=None,
                  version: str | None = None, progress: bool = False) -> dict:
    """Build one engine per variant of every program of the plan in `plan_dir` (and one per batch size
    for its decoder and for a text model's prologue) and add them to it;
    returns the new manifest. Engines are built in a private folder and moved in only when all are
    built; the manifest is replaced last, by rename. `builder(onnx_path, settings, timing_cache) ->
    bytes` and `version` are for tests; by default TensorRT builds."""
    import onnx
    from tqdm.auto import tqdm

    from runtime.bindings import plan_bindings, weights_arena
    from runtime.plan.manifest import program_entries

    plan = Plan.parse(manifest, plan_dir)
    if plan.precision != settings.onnx_precision:
        raise BlockcacheError(f"{settings.precision} engines are built from a {settings.onnx_precision} plan; "
                              f"this plan is {plan.precision}")
    builder = builder or build_engine_bytes
    version = version or tensorrt_version()
    blob = read_weights(plan)
    work = tempfile.mkdtemp(dir=plan_dir, prefix=".engines-")
    single = len(plan.programs) == 1
    engines = [[] for _ in plan.programs]  # per program
    side = {kind: {} for kind in SIDE_ENGINES}  # kind → batch size → that engine's entry

    def built() -> list[dict]:
        return [e for program_engines in engines for e in program_engines] + [
            e for by_size in side.values() for e in by_size.values()]

    try:
        cache = settings.timing_cache or os.path.join(work, "timing.cache")
        todo = [(p, k, v) for p in plan.programs for k, v in enumerate(p.variants)]
        for kind, (graph, _, _) in SIDE_ENGINES.items():  # one engine per batch size
            todo += list({p.batch_size: (p, kind, getattr(p, graph)) for p in plan.programs
                          if getattr(p, graph) is not None}.values())
        for program, k, v in tqdm(todo, desc="engines", disable=not progress, leave=False):
            if isinstance(k, str):  # a decoder or prologue engine
                _, file_name, precision = SIDE_ENGINES[k]
                name, precision = file_name(program.batch_size), precision or settings.precision
            else:
                name, precision = names.engine_file(k, None if single else program.index), settings.precision
            model = onnx.load(plan.path(v.file), load_external_data=False)
            model, weight_inputs, baked = prepare_graph(model, blob, min_weight_bytes=settings.min_weight_bytes,
                                                        weights=set(plan.weights.tensors), precision=precision)
            path = os.path.join(work, f"{os.path.splitext(v.file)[0]}.trt.onnx")
            onnx.save(model, path)
            start = time.perf_counter()
            data = builder(path, settings, cache)
            with open(os.path.join(work, name), "wb") as f:
                f.write(data)
            entry = {"file": name, **graph_io(model), "weight_inputs": weight_inputs, "baked_bytes": baked,
                     "build_seconds": round(time.perf_counter() - start, 3)}
            if isinstance(k, str):
                side[k][program.batch_size] = entry
            else:
                engines[program.index].append({"variant": k, **entry})

        def side_entries(batch_size: int) -> dict:
            return {kind: by_size[batch_size] for kind, by_size in side.items() if batch_size in by_size}

        # the engines must agree with each other and with the plan before they are moved in
        with_engines = replace(plan, programs=tuple(
            replace(p, engines=tuple(Engine.parse(e) for e in engines[j]),
                    **{kind: Engine.parse(e) for kind, e in side_entries(p.batch_size).items()})
            for j, p in enumerate(plan.programs)))
        arena = weights_arena(with_engines)
        for program in with_engines.programs:
            plan_bindings(program, corrections=plan_corrections(plan, program), weights=arena)
        new = dict(manifest)
        new["tensorrt"] = {
            "precision": settings.precision,
            "built_with": version,
            "strongly_typed": True,
            "settings": {k: v for k, v in asdict(settings).items() if k != "timing_cache"},
            "weights_bytes": arena.nbytes,
        }
        if single:
            new["tensorrt"]["engines"] = engines[0]
            new.update(side_entries(plan.programs[0].batch_size))
        else:
            new["programs"] = [dict(entry, engines=engines[j], **side_entries(entry["batch_size"]))
                               for j, (_, entry) in enumerate(program_entries(manifest))]
        files = [e["file"] for e in built()]
        for name in files:
            os.replace(os.path.join(work, name), os.path.join(plan_dir, name))
        new = write_manifest(plan_dir, new, added=files)
    except BaseException:
        # engines moved in before a failure are not listed anywhere: remove them
        for e in built():
            path = os.path.join(plan_dir, e["file"])
            if os.path.exists(path) and e["file"] not in manifest["files"]:
                os.remove(path)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return new


def engine_stage(settings: EngineSettings, *, builder=None, version: str | None = None, progress: bool = False,
                 then=None):
    """An `export_plan(finish=…)` stage that builds the engines into the staged plan, then runs `then`
    (e.g. verification) on it."""
    def add_engines(folder: str, manifest: dict) -> dict:
        manifest = build_engines(folder, manifest, settings, builder=builder, version=version, progress=progress)
        return manifest if then is None else then(folder, manifest)

    return add_engines


def export_with_engines(model, schedule, out_dir: str, settings: EngineSettings, *, builder=None,
                        version: str | None = None, progress: bool = False, finish=None, **export_kwargs) -> dict:
    """export_plan + build_engines (+ `finish`, e.g. verification), with `out_dir` replaced only when all
    succeed."""
    from .export import export_plan

    return export_plan(model, schedule, out_dir, precision=settings.onnx_precision, progress=progress,
                       finish=engine_stage(settings, builder=builder, version=version, progress=progress, then=finish),
                       **export_kwargs)
