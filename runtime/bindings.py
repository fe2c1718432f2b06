"""Binding plan: for every step, which resident buffer each engine tensor is bound to, as plain data.

A backend that replays a plan with fixed device addresses (TensorRT, and a CUDA graph over it) needs
the same bookkeeping whatever executes the graphs, so it lives here, without any GPU library:

- `io` arena: the latents (DDIM ping-pongs: step s reads `x.{s%2}` and writes `x.{(s+1)%2}`;
  DPM-Solver-2 rotates three, DPM-Solver++ 2M four, its `carry_next` output bound like `x_next`, as
  the manifest's per-step `latents` say), the labels, the guidance scale, every step's constants
  (`step.{s}.timestep|a|b`, written once at load, so a captured loop needs no host writes;
  `step.{s}.c` for solvers with a carry, `step.{s}.p|q` where it is a step's output; with Block
  Caching, also `step.{s}.scale.<unit>|shift.<unit>`; with forecasts `step.{s}.forecast.<unit>`) and one
  cache buffer per reused unit (`cache.<unit>`: written by the variants that compute the unit as
  `unit.<unit>`, read by the ones that reuse it as `cache.<unit>`); a forecast over m + 1 values has
  m + 1 buffers (`cache.<unit>@r`) that its inputs `cache.<unit>~i` are bound to in rotation
  (`Program.cache_slots`). A plan with a decoder also has the `image` slot, which the decoder engine
  writes from the final latent's slot after the loop.
- `weights` arena: one slot per weight that an engine takes as an *input*; every engine binds the
  same slot, so each weight is held on the device once however many engines use it.

Every slot starts on a 256-byte boundary: TensorRT requires it of every address given to
`IExecutionContext.setTensorAddress` (NvInferRuntime.h), and an arena is one `cudaMalloc` (itself
256-byte aligned), so the address of a tensor is `base + slot.offset`.

The engines' I/O comes from the plan's TensorRT engines (`Plan.engines`); for a plan without engines
it is derived from the variants (what ONNX Runtime binds), which lets the plan be checked end to end
on a CPU (tests/test_tensorrt.py). Everything here is plain data: no file is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from schedules.errors import BlockcacheError

from .plan import Plan, names
from .plan.graphs import decoder_io, prologue_io, variant_io
from .plan.manifest import Engine, Program

ALIGNMENT = 256


def itemsize(dtype: str) -> int:
    try:
        return names.DTYPE_SIZES[dtype]
    except KeyError:
        raise BlockcacheError(f"tensor dtype {dtype!r} is not supported "
                              f"(expected one of {', '.join(names.DTYPE_SIZES)})") from None


def host_dtype(dtype: str) -> np.dtype:
    """The numpy dtype that holds `dtype`'s bytes on the host (bfloat16 as its raw uint16 bits)."""
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def to_bfloat16(array: np.ndarray) -> np.ndarray:
    """float16/float32 values → bfloat16 bits (uint16), rounded to nearest even, NaN kept NaN."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(array), np.uint16(0x7FC0), rounded).astype(np.uint16)


def convert(array: np.ndarray, dtype: str) -> np.ndarray:
    """`array` in the tensor dtype `dtype`, as host bytes (see host_dtype)."""
    if dtype == "bfloat16":
        return to_bfloat16(array)
    if array.dtype.kind == "f" and np.dtype(dtype).kind == "f":
        return array.astype(dtype)
    if array.dtype == np.dtype(dtype):
        return array
    raise BlockcacheError(f"cannot convert a {array.dtype.name} tensor to {dtype}")


@dataclass(frozen=True)
class Slot:
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Arena:
    """Named tensors packed in one allocation, each slot aligned."""

    slots: dict[str, Slot] = field(default_factory=dict)
    nbytes: int = 0

    @classmethod
    def pack(cls, specs, alignment: int = ALIGNMENT) -> "Arena":
        """specs: iterable of (name, shape, dtype), in the order wanted."""
        arena = cls()
        for name, shape, dtype in specs:
            shape = tuple(int(d) for d in shape)
            size = int(np.prod(shape, dtype=np.int64)) * itemsize(dtype)
            offset = -(-arena.nbytes // alignment) * alignment
            arena.slots[name] = Slot(offset, size, shape, dtype)
            arena.nbytes = offset + size
        arena.nbytes = -(-arena.nbytes // alignment) * alignment
        return arena

    def view(self, buffer: np.ndarray, name: str) -> np.ndarray:
        """A typed view of slot `name` inside a host byte buffer of this arena's size."""
        slot = self.slots[name]
        return buffer[slot.offset: slot.offset + slot.nbytes].view(host_dtype(slot.dtype)).reshape(slot.shape)


@dataclass
class BindingPlan:
    io: Arena
    weights: Arena
    step_engine: list[int]
    steps: list[dict[str, tuple[str, str]]]  # per step: tensor name → (arena "io" | "weights", slot)
    constants: dict[str, np.ndarray]  # io slot → value written once at load
    output: str  # the io slot holding the final latent
    input: str = "x.0"  # the io slot the noise is written to
    decoder: dict | None = None  # the decoder engine's tensor name → (arena, slot): final latent in, `image` out
    # a text model's prologue engine: tensor name → (arena, slot): the prompt inputs in, the keys, values
    # and bias every step reads out (run before the steps)
    prologue: dict | None = None

    def addresses(self, step: int | str | None, bases: dict[str, int]) -> dict[str, int]:
        """Device address of every tensor of `step`: a step index, "prologue", or None (the decoder), given
        each arena's base address."""
        table = self.decoder if step is None else self.prologue if step == "prologue" else self.steps[step]
        return {name: bases[arena] + getattr(self, arena).slots[slot].offset for name, (arena, slot) in table.items()}

    def initial_io(self) -> np.ndarray:
        """Host bytes of the io arena with every step constant written (the rest zero)."""
        buffer = np.zeros(self.io.nbytes, np.uint8)
        for slot, value in self.constants.items():
            self.io.view(buffer, slot)[...] = value
        return buffer


def engine_io(program: Program) -> tuple[Engine, ...]:
    """Each engine's inputs, outputs and weight inputs: the program's TensorRT engines, or for a plan
    without engines its variant graphs' (runtime.plan.graphs.variant_io: weights inside the graphs)."""
    return program.engines or variant_io(program)


def weights_arena(plan: Plan) -> Arena:
    """One weights arena for the engines of every program of `plan`: each weight an engine takes as an
    input has one slot, whichever programs' engines bind it."""
    specs: dict[str, tuple] = {}
    for program in plan.programs:
        side = tuple(e for e in (decoder_io(program), prologue_io(program)) if e is not None)
        for k, engine in enumerate(engine_io(program) + side):
            for name in engine.weight_inputs:
                spec = engine.inputs[name]
                if specs.setdefault(name, (list(spec.shape), spec.dtype)) != (list(spec.shape), spec.dtype):
                    raise BlockcacheError(f"engine {k} of program {program.index}: weight {name} is {spec.dtype}"
                                          f"{list(spec.shape)} but another engine has {specs[name][1]}{specs[name][0]}")
    return Arena.pack((n, *specs[n]) for n in sorted(specs))


def plan_bindings(program: Program, engines=None, corrections: list[dict] | None = None,
                  weights: Arena | None = None) -> BindingPlan:
    """The binding plan of `program`'s steps over `engines` (default: engine_io(program)).
    `corrections`: per step {unit: (scale, shift)} (runtime.plan.files.plan_corrections), needed by a
    program with Block Caching scale-shift. `weights`: the plan's weights arena (`weights_arena`) when
    several programs share one; by default this program's engines' own."""
    engines = engine_io(program) if engines is None else engines
    if program.scale_shift_file and corrections is None:
        raise BlockcacheError("this plan has Block Caching scale-shift: its binding plan needs the per-step vectors")
    if len(engines) != len(program.variants):
        raise BlockcacheError(f"plan has {len(program.variants)} variants but {len(engines)} engines")
    io_specs: dict[str, tuple] = {}
    weight_specs: dict[str, tuple] = {}

    def declare(specs, slot, spec, owner):
        shape, dtype = list(spec.shape), spec.dtype
        if slot in specs and specs[slot] != (shape, dtype):
            raise BlockcacheError(f"{owner}: tensor for {slot} is {dtype}{shape} but another engine has "
                                  f"{specs[slot][1]}{specs[slot][0]}")
        specs[slot] = (shape, dtype)

    bound = []
    for s, (step, (reads, writes)) in enumerate(zip(program.steps, program.cache_slots)):
        k = step.variant
        eng = engines[k]
        owner = f"engine {k}"
        weight_inputs = set(eng.weight_inputs)
        table = {}
        for direction, tensors in (("inputs", eng.inputs), ("outputs", eng.outputs)):
            for name, spec in tensors.items():
                if name in weight_inputs:
                    declare(weight_specs, name, spec, owner)
                    table[name] = ("weights", name)
                    continue
                if name in names.LATENTS:  # the step's (input, carry, output, carry output) latent buffers
                    slot = f"x.{step.latents[names.LATENTS.index(name)]}"
                elif name in names.STEP_CONSTANTS or name.startswith(names.STEP_VECTOR_PREFIXES):
                    slot = f"step.{s}.{name}"
                elif name in names.CALL_INPUTS or name in names.PROMPT_INPUTS or name.startswith(names.PROMPT_PREFIX):
                    slot = name  # a call's conditioning, or the prologue's output that every step reads
                elif (name.startswith(names.CACHE_PREFIX) and direction == "inputs"
                      and name[len(names.CACHE_PREFIX):] in reads):  # a forecast's history: by rotation
                    slot = names.cache_input(reads[name[len(names.CACHE_PREFIX):]])
                elif (name.startswith(names.UNIT_PREFIX) and direction == "outputs"
                      and name[len(names.UNIT_PREFIX):] in writes):
                    slot = names.cache_input(writes[name[len(names.UNIT_PREFIX):]])
                else:
                    raise BlockcacheError(f"{owner} has a tensor {name!r} that no plan buffer matches")
                declare(io_specs, "x.0" if slot.startswith("x.") else slot, spec, owner)
                table[name] = ("io", slot)
        missing = {names.X, names.X_NEXT} - table.keys()
        if missing:
            raise BlockcacheError(f"{owner} lacks the tensor(s) {', '.join(sorted(missing))}")
        bound.append(table)
    output = f"x.{program.steps[-1].latents[2]}"

    def side_table(engine, what: str, slot_of) -> dict | None:
        """The tensor table of an engine run beside the steps (the decoder after them, the prologue before):
        weights by name, every other tensor at the io slots `slot_of(name, direction)` gives (declared
        slot, bound slot), or None where no plan buffer matches."""
        if engine is None:
            return None
        table = {}
        for direction, tensors in (("inputs", engine.inputs), ("outputs", engine.outputs)):
            for name, spec in tensors.items():
                if name in engine.weight_inputs:
                    declare(weight_specs, name, spec, f"the {what} engine")
                    table[name] = ("weights", name)
                    continue
                slots = slot_of(name, direction)
                if slots is None:
                    raise BlockcacheError(f"the {what} engine has a tensor {name!r} that no plan buffer matches")
                declare(io_specs, slots[0], spec, f"the {what} engine")
                table[name] = ("io", slots[1])
        return table

    # the decoder: the final latent in, the uint8 image out
    decoder_table = side_table(decoder_io(program), "decoder", lambda name, direction: {
        (names.DECODER_INPUT, "inputs"): ("x.0", output),
        (names.DECODER_OUTPUT, "outputs"): (names.DECODER_OUTPUT, names.DECODER_OUTPUT)}.get((name, direction)))
    # the prologue: the prompt inputs in, the keys, values and bias every step reads out
    prologue_table = side_table(prologue_io(program), "prologue", lambda name, direction: (
        (name, name) if (direction == "inputs" and name in names.PROMPT_INPUTS)
        or (direction == "outputs" and name.startswith(names.PROMPT_PREFIX)) else None))

    count = program.num_latents
    for k in range(count):
        io_specs[f"x.{k}"] = io_specs["x.0"]
    # Fixed order: per-call inputs and latents first (a text model's prompt inputs and the prologue's
    # outputs), then caches, then the per-step constants.
    order = [f"x.{k}" for k in range(count)] + [n for n in names.CALL_INPUTS if n in io_specs and n != names.X]
    order += [n for n in names.PROMPT_INPUTS if n in io_specs]
    order += sorted(n for n in io_specs if n.startswith(names.PROMPT_PREFIX))
    order += sorted(n for n in io_specs if n.startswith(names.CACHE_PREFIX))
    order += [names.DECODER_OUTPUT] if names.DECODER_OUTPUT in io_specs else []
    order += [n for n in io_specs if n.startswith("step.")]
    io = Arena.pack((n, *io_specs[n]) for n in order)
    if weights is None:
        weights = Arena.pack((n, *weight_specs[n]) for n in sorted(weight_specs))
    for name, (shape, dtype) in weight_specs.items():
        slot = weights.slots.get(name)
        if slot is None or (list(slot.shape), slot.dtype) != (shape, dtype):
            raise BlockcacheError(f"engine weight input {name} has no matching slot in the weights arena")
    constants = {}
    for s, step in enumerate(program.steps):
        for name in names.STEP_CONSTANTS:
            slot = f"step.{s}.{name}"
            if slot in io.slots:
                spec = io.slots[slot]
                constants[slot] = np.full(spec.shape, getattr(step, name), dtype=host_dtype(spec.dtype))
        vectors = [(input_name, value) for unit, pair in (corrections[s] if corrections else {}).items()
                   for input_name, value in zip(names.correction_inputs(unit), pair)]
        vectors += [(names.forecast_input(name), np.array(w, np.float64)) for name, w in step.forecast.items()]
        for input_name, value in vectors:
            slot = f"step.{s}.{input_name}"
            if slot in io.slots:
                constants[slot] = convert(value, io.slots[slot].dtype)
    return BindingPlan(io=io, weights=weights, step_engine=[step.variant for step in program.steps], steps=bound,
                       constants=constants, output=output, input=f"x.{program.steps[0].latents[0]}",
                       decoder=decoder_table, prologue=prologue_table)


def pack_weights(blob: np.ndarray, plan: Plan, arena: Arena) -> np.ndarray:
    """Host bytes of the weights arena from the plan's weights file (`blob`, uint8, read_weights),
    converting dtypes where the engines want another one."""
    from .plan.files import stored_array

    buffer = np.zeros(arena.nbytes, np.uint8)
    for name, slot in arena.slots.items():
        if name not in plan.weights.tensors:
            raise BlockcacheError(f"engine weight input {name!r} is not in the plan's weights file")
        stored = plan.weights.tensors[name]
        src = stored_array(blob, plan, name)
        if stored.dtype == "bfloat16":
            if slot.dtype != "bfloat16":
                raise BlockcacheError(f"weight {name}: cannot convert bfloat16 to {slot.dtype}")
            value = src
        else:
            value = convert(src, slot.dtype)
        if tuple(stored.shape) != tuple(slot.shape):
            raise BlockcacheError(f"weight {name}: engine wants shape {list(slot.shape)}, the plan stores "
                                  f"{list(stored.shape)}")
        arena.view(buffer, name)[...] = value.reshape(slot.shape)
    return buffer


def check_engine_io(expected: Engine, actual: dict, where: str) -> None:
    """Compare an engine's I/O as TensorRT reports it ({name: {"mode", "shape", "dtype"}}) with what the
    manifest says; one line naming the first difference. An input the engine lacks is allowed (a
    builder may drop an input nothing reads, e.g. the guidance scale of a plan without guidance); the
    runtime then binds only the tensors the engine has."""
    want = {n: ("input", list(s.shape), s.dtype) for n, s in expected.inputs.items()}
    want.update({n: ("output", list(s.shape), s.dtype) for n, s in expected.outputs.items()})
    got = {n: (a["mode"], list(a["shape"]), a["dtype"]) for n, a in actual.items()}
    for name in sorted(want.keys() | got.keys()):
        if name not in got and want[name][0] == "input":
            continue
        if want.get(name) != got.get(name):
            raise BlockcacheError(f"{where}: tensor {name!r} is {got.get(name)} in the engine but {want.get(name)} "
                                  "in the manifest (engine and plan do not match; re-export)")
