"""The plan's graphs against its manifest: what each variant graph takes and gives (`variant_io`, from
the manifest alone), what an ONNX graph declares (`graph_io`), and `verify_graphs`, which checks every
variant graph of a plan folder against the manifest at load: its inputs and outputs, and every weight
it reads from the weights file at exactly the offset and length the manifest's weights table gives
(the torch backend reads the weights through that table, ONNX Runtime through the graphs)."""

from __future__ import annotations

import os

import numpy as np

from schedules.errors import BlockcacheError
from schedules.schedule import history_key

from . import names
from .manifest import Engine, Plan, Program, TensorSpec


def variant_io(program: Program) -> tuple[Engine, ...]:
    """Each variant graph's inputs and outputs as the manifest implies them (what ONNX Runtime binds),
    with no weight inputs: the weights live inside the graphs as external data."""
    x = program.inputs[names.X]
    out = []
    for v in program.variants:
        inputs = dict(program.inputs)  # the step inputs (with x_carry and c for solvers with a carry)
        for u in v.reads:  # a forecast reads its m + 1 newest values and their weights
            order = v.forecasts.get(u, 0)
            inputs.update({names.cache_input(history_key(u, i)): program.cache[u] for i in range(order + 1)})
            if order:
                inputs[names.forecast_input(u)] = TensorSpec((order + 1,), program.cache[u].dtype)
        for u in v.adjusts:
            vector = TensorSpec(program.cache[u].shape[-1:], program.cache[u].dtype)
            inputs.update({name: vector for name in names.correction_inputs(u)})
        outputs = {names.X_NEXT: x, **({names.CARRY_NEXT: x} if program.carry_output else {})}
        outputs.update({names.unit_output(u): program.cache[u] for u in v.writes})
        out.append(Engine(v.file, inputs, outputs, ()))
    return tuple(out)


def decoder_graph_io(program: Program) -> Engine:
    """The I/O of the program's decoder graph (weights inside the graph): the final latents in, the
    uint8 images out."""
    return Engine(program.decoder.file, {names.DECODER_INPUT: program.inputs[names.X]},
                  {names.DECODER_OUTPUT: program.decoder.output}, ())


def decoder_io(program: Program) -> Engine | None:
    """The program's decoder as an engine: its TensorRT engine, or for a plan without engines its
    graph's I/O (`decoder_graph_io`); None without a decoder."""
    if program.decoder is None:
        return None
    return program.decoder_engine or decoder_graph_io(program)


def prologue_io(program: Program) -> Engine | None:
    """The program's prologue as an engine: its TensorRT engine, or its graph's I/O (weights inside the
    graph); None for a plan without prologue."""
    if program.prologue is None:
        return None
    prologue = program.prologue
    return program.prologue_engine or Engine(prologue.file, dict(prologue.inputs), dict(prologue.outputs), ())


def dtype_name(elem_type: int) -> str:
    """The plan's dtype name of an ONNX element type."""
    import onnx

    if elem_type == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


def graph_io(model) -> dict:
    """{"inputs": {name: {shape, dtype}}, "outputs": {...}} of an ONNX graph (static shapes)."""
    def spec(value):
        t = value.type.tensor_type
        return {"shape": [d.dim_value for d in t.shape.dim], "dtype": dtype_name(t.elem_type)}

    return {"inputs": {v.name: spec(v) for v in model.graph.input},
            "outputs": {v.name: spec(v) for v in model.graph.output}}


def spec_text(spec: dict) -> str:
    """float32[2, 4, 8, 8] for {"shape": [2, 4, 8, 8], "dtype": "float32"}."""
    return f"{spec['dtype']}{spec['shape']}"


def verify_graphs(plan: Plan) -> None:
    """Every variant graph (and decoder and prologue graph) declares exactly the I/O its manifest entry implies and
    reads exactly the stored weights it lists, each at the manifest's offset and length; one line otherwise."""
    for program in plan.programs:
        _verify_program_graphs(plan, program)


def _verify_program_graphs(plan: Plan, program: Program) -> None:
    prefix = "" if len(plan.programs) == 1 else f"programs[{program.index}]."
    for k, (variant, expected) in enumerate(zip(program.variants, variant_io(program))):
        _verify_graph(plan, variant.file, f"{prefix}variants[{k}]", expected.inputs, expected.outputs, variant.weights)
    if program.decoder is not None:
        expected = decoder_graph_io(program)
        _verify_graph(plan, expected.file, f"{prefix}decoder_graph", expected.inputs, expected.outputs,
                      program.decoder.weights)
    if program.prologue is not None:
        prologue = program.prologue
        _verify_graph(plan, prologue.file, f"{prefix}prologue_graph", prologue.inputs, prologue.outputs,
                      prologue.weights)


def _verify_graph(plan: Plan, file: str, owner: str, inputs: dict, outputs: dict, weights) -> None:
    """The graph `file` declares exactly `inputs` and `outputs` and reads exactly `weights`, each at the
    manifest's offset and length."""
    import onnx

    path = plan.path(file)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf's own errors for a damaged file
        raise BlockcacheError(f"{path}: not a readable ONNX graph ({' '.join(str(e).split())[:200]})") from None
    io = graph_io(model)
    for direction, want in (("inputs", inputs), ("outputs", outputs)):
        want = {n: {"shape": list(s.shape), "dtype": s.dtype} for n, s in want.items()}
        if io[direction] != want:
            extra = sorted(set(io[direction]) ^ set(want))
            if extra:
                difference = f"{extra[0]!r} is in one of them only"
            else:
                name = sorted(n for n in want if io[direction][n] != want[n])[0]
                difference = f"{name!r} is {spec_text(io[direction][name])} in the graph, " \
                             f"{spec_text(want[name])} in the manifest"
            raise BlockcacheError(f"{path}: the graph's {direction} do not match the manifest's {owner} "
                                  f"({difference})")
    external = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            external[init.name] = (info.get("location"), int(info.get("offset", 0)), int(info.get("length", -1)))
    if set(external) != set(weights):
        name = sorted(set(external) ^ set(weights))[0]
        raise BlockcacheError(f"{path}: weight {name!r} is read by the graph or listed by the manifest, not both")
    for name, (location, offset, length) in external.items():
        stored = plan.weights.tensors[name]
        if os.path.basename(location or "") != location or location != plan.weights.file:
            raise BlockcacheError(f"{path}: weight {name!r} is read from {location!r}, not the plan's weights file")
        if (offset, length) != (stored.offset, stored.length):
            raise BlockcacheError(f"{path}: weight {name!r} lies at {offset} (+{length}) in the graph but at "
                                  f"{stored.offset} (+{stored.length}) in the manifest's weights table")
