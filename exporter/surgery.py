"""Graph surgery: derive each variant's graph from the master step graph (onnx-graphsurgeon).

A variant is the set of units a step computes. For every unit it does *not* compute, the unit's output
tensor is detached from its producer and becomes a graph input `cache.<unit>`; `cleanup()` then
drops the now-dead subgraph (the attention or MLP and whatever fed only it). A computed unit whose
value some later step reuses stays a graph output `unit.<unit>`; the others are dropped.

Block Caching's scale-shift: for a read unit listed in `adjust`, the cache value is corrected inside
the graph, `cache.<u>·(1 + scale.<u>) + shift.<u>`, with the per-channel vectors as graph inputs, so
steps with the same computed units still share one graph (a step without a correction feeds zeros).

Forecasts: a read of order m ≥ 1 (unit or span residual) is Σ_i forecast.<u>[i] · cache.<u~i> over
its m + 1 history inputs, the weights a per-step input, so steps at any distance share the graph.
"""

from __future__ import annotations

import numpy as np

from runtime.plan import names
from schedules.schedule import history_key, span_key

from .trace import IR_VERSION


class WeightsFile:
    """The plan's weights file as it is built: the large initializers of every traced step graph, each
    stored once. A graph's initializer goes to the file and becomes external data pointing at its
    offset; an identical one (same name, same bytes) of another graph, e.g. the same weight traced at
    another batch size, reuses the stored copy; one whose name is taken by other bytes (a constant that
    depends on the batch size) is renamed in its graph before it is stored."""

    ALIGNMENT = 64  # so the runtime can map tensors without copying

    def __init__(self):
        self.chunks, self.index, self.size = [], {}, 0
        self._digests = {}  # name → digest of its stored bytes

    def add(self, master, keep: set[str] = frozenset(), min_bytes: int = 1024) -> None:
        """Move every initializer of `master` named in `keep` or of at least `min_bytes` (in place)."""
        import onnx
        from onnx import external_data_helper

        renamed = {}
        for tensor in master.graph.initializer:
            if not tensor.HasField("raw_data") or (len(tensor.raw_data) < min_bytes and tensor.name not in keep):
                continue
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).name
            name = self.store(tensor.name, tensor.raw_data, list(tensor.dims), dtype)
            if name != tensor.name:
                renamed[tensor.name] = name
                tensor.name = name
            entry = self.index[name]
            external_data_helper.set_external_data(tensor, names.WEIGHTS, offset=entry["offset"], length=entry["length"])
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
        for node in master.graph.node:  # readers of a renamed initializer read it by its new name
            for i, name in enumerate(node.input):
                if name in renamed:
                    node.input[i] = renamed[name]

    def store(self, name: str, data: bytes, shape: list[int], dtype: str) -> str:
        """Store a tensor's bytes under `name` (or, where other bytes hold that name, `name.<k>`) unless
        the same bytes are stored under it already; returns the name it is stored under."""
        import hashlib

        digest = hashlib.blake2b(data, digest_size=16).digest() + str(list(shape)).encode()
        stored, k = name, 1
        while stored in self._digests and self._digests[stored] != digest:
            k += 1
            stored = f"{name}.{k}"
        if stored not in self._digests:
            pad = (-self.size) % self.ALIGNMENT
            self.chunks += [b"\0" * pad, data]
            self.size += pad
            self.index[stored] = {"offset": self.size, "length": len(data), "shape": list(shape), "dtype": dtype}
            self._digests[stored] = digest
            self.size += len(data)
        return stored

    def write(self, path: str) -> None:
        with open(path, "wb") as f:
            for chunk in self.chunks:
                f.write(chunk)


def stored_weights(graph) -> list[str]:
    """The initializers of `graph` read from the plan's weights file (external data), sorted; a small
    constant kept inline is not one, even where a tensor of its name is stored for another graph."""
    import onnx

    return sorted(t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)


def parameter_sources(master, state_dict) -> dict[str, dict]:
    """{model parameter: {"tensor": initializer name, "transposed": bool}}: where each PyTorch weight
    sits among the master graph's initializers (the ONNX exporter stores linear weights transposed
    and renamed). Lets the torch backend rebuild the model from the plan's one copy of the weights."""
    import hashlib

    def digest(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=16).digest()

    # by bytes and shape: parameters with equal values (a norm's ones) may be stored in several shapes
    initializers = {(digest(t.raw_data), tuple(t.dims)): t.name for t in master.graph.initializer
                    if t.HasField("raw_data")}
    sources = {}
    for name, value in state_dict.items():
        array = value.detach().cpu().contiguous().numpy()
        for transposed, candidate in ((False, array), (True, array.T if array.ndim == 2 else None)):
            if candidate is None:
                continue
            found = initializers.get((digest(np.ascontiguousarray(candidate).tobytes()), candidate.shape))
            if found:
                sources[name] = {"tensor": found, "transposed": transposed}
                break
    return sources


def _cached(graph, name: str, like, order: int, out=None):
    """The cached value of unit or span `name` as the graph reads it (like `like`): the input
    `cache.<name>`, or for a forecast of order m, Σ_i forecast.<name>[i] · cache.<history_key(name, i)>
    summed left to right (runtime.nn.units.CachePolicy.read in graph form), into `out` where given."""
    import onnx_graphsurgeon as gs

    history = [gs.Variable(names.cache_input(history_key(name, i)), like.dtype, like.shape) for i in range(order + 1)]
    graph.inputs += history
    if order == 0:
        return history[0]
    weights = gs.Variable(names.forecast_input(name), like.dtype, [order + 1])
    graph.inputs.append(weights)
    value = None
    for i, cached in enumerate(history):
        w = gs.Variable(f"forecast.{name}.w{i}", like.dtype, [])
        index = gs.Constant(f"forecast.{name}.i{i}", np.array(i, np.int64))
        term = gs.Variable(f"forecast.{name}.t{i}", like.dtype, like.shape)
        graph.nodes += [gs.Node("Gather", f"forecast.{name}.gather{i}", {"axis": 0}, [weights, index], [w]),
                        gs.Node("Mul", f"forecast.{name}.mul{i}", inputs=[w, cached], outputs=[term])]
        if value is not None:
            total = out if i == order and out is not None else gs.Variable(f"forecast.{name}.sum{i}", like.dtype,
                                                                          like.shape)
            graph.nodes.append(gs.Node("Add", f"forecast.{name}.add{i}", inputs=[value, term], outputs=[total]))
            term = total
        value = term
    return value


def derive_variant(master, compute: dict[str, bool], outputs: set[str], adjust: set[str] = frozenset(),
                   skips=(), records=(), forecasts=None):
    """The variant graph (onnx ModelProto) computing the units marked True in `compute`, reading the
    others from `cache.<unit>` inputs (corrected by `scale.<u>`/`shift.<u>` inputs for u in `adjust`),
    and exposing `unit.<u>` for u in `outputs` (runtime/plan/names.py).

    Spans, as (first block, last block, block before first or None): each of `skips` is cut out, the
    hidden state after its last block becoming the one before its first plus the input
    `cache.<span_key>`; each of `records` exposes its residual, after minus before, as `unit.<span_key>`.
    The skipped blocks' units are in neither `compute` as True nor read: they are simply gone.
    `forecasts`: {read unit or span key: order ≥ 1} of the reads that are forecasts (`_cached`)."""
    import onnx_graphsurgeon as gs

    forecasts = forecasts or {}
    graph = gs.import_onnx(master)
    tensors = graph.tensors()
    keep = {names.X_NEXT, names.CARRY_NEXT} | {names.unit_output(u) for u in outputs}  # carry_next where traced
    skipped_units = set()

    def before(first_before):
        return tensors[names.HIDDEN_INPUT if first_before is None else names.hidden_output(first_before)]

    for first, last, first_before, members in skips:
        key = span_key(first, last)
        after = tensors[names.hidden_output(last)]
        after.inputs.clear()  # the span's blocks become dead
        after.name = f"span.{key}.out"
        cache = _cached(graph, key, after, forecasts.get(key, 0))
        graph.nodes.append(gs.Node("Add", f"span.{key}.add", inputs=[before(first_before), cache], outputs=[after]))
        skipped_units.update(members)
    for first, last, first_before, _ in records:
        key = span_key(first, last)
        after = tensors[names.hidden_output(last)]
        residual = gs.Variable(names.unit_output(key), after.dtype, after.shape)
        graph.nodes.append(gs.Node("Sub", f"span.{key}.sub", inputs=[after, before(first_before)], outputs=[residual]))
        graph.outputs.append(residual)
        keep.add(residual.name)
    for unit, computed in compute.items():
        if computed or unit in skipped_units:
            continue
        tensor = tensors[names.unit_output(unit)]
        tensor.inputs.clear()  # detach from its producer: the unit's subgraph becomes dead
        order = forecasts.get(unit, 0)
        if unit not in adjust and order == 0:
            tensor.name = names.cache_input(unit)
            graph.inputs.append(tensor)
            continue
        if unit not in adjust:  # the consumers keep reading `tensor`, now the forecast
            tensor.name = f"forecast.{unit}.out"
            _cached(graph, unit, tensor, order, out=tensor)
            continue
        # The consumers keep reading `tensor`, now the corrected value v + v·scale + shift
        # (runtime.nn.units.correct in graph form).
        cache = _cached(graph, unit, tensor, order)
        channels = [tensor.shape[-1]]
        scale_name, shift_name = names.correction_inputs(unit)
        scale = gs.Variable(scale_name, tensor.dtype, channels)
        shift = gs.Variable(shift_name, tensor.dtype, channels)
        scaled = gs.Variable(f"adjust.{unit}.scaled", tensor.dtype, tensor.shape)
        plus = gs.Variable(f"adjust.{unit}.plus", tensor.dtype, tensor.shape)
        tensor.name = f"adjust.{unit}.out"
        graph.nodes += [gs.Node("Mul", f"adjust.{unit}.mul", inputs=[cache, scale], outputs=[scaled]),
                        gs.Node("Add", f"adjust.{unit}.add", inputs=[cache, scaled], outputs=[plus]),
                        gs.Node("Add", f"adjust.{unit}.shift", inputs=[plus, shift], outputs=[tensor])]
        graph.inputs += [scale, shift]
    graph.outputs = [t for t in graph.outputs if t.name in keep]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph)
    model.ir_version = IR_VERSION
    return model


def unit_of_nodes(master, unit_names) -> dict[str, str]:
    """{node name: unit} for the master graph's nodes inside a unit's module, read from the
    exporter's name-scope metadata. Variant graphs keep node names (not metadata), so this map tells
    which units still have operators in a variant: the proof that skipped units are absent."""
    wanted = {"model." + u: u for u in unit_names}
    owner = {}
    for node in master.graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                # e.g. "['', 'model', 'model.blocks.3', 'model.blocks.3.attn', 'model.blocks.3.attn.qkv', …]"
                scopes = [part.strip().strip("'\"") for part in prop.value.strip("[]").split(",")]
                units = [wanted[sc] for sc in scopes if sc in wanted]
                if units:
                    owner[node.name] = units[0]
    return owner


def tensor_shape(model, name: str) -> tuple[list[int], str]:
    """Static shape and numpy dtype name of a graph input or output."""
    import onnx

    for value in list(model.graph.input) + list(model.graph.output):
        if value.name == name:
            t = value.type.tensor_type
            return [d.dim_value for d in t.shape.dim], np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
    raise KeyError(name)
