"""The plan's vocabulary, declared once: its version, file names, precisions and every tensor name
its graphs and buffers use (docs/ARCHITECTURE.md, "The plan format")."""

from __future__ import annotations

from schedules.schedule import scale_shift_file

FORMAT = "blockcache-plan"
VERSION = 2  # what the exporter writes: version 2 manifests are sealed (runtime.plan.manifest.manifest_seal)
READABLE_VERSIONS = (1, 2)  # version 1: the same entries, no seal

# Files of a plan folder.
MANIFEST = "plan.json"
WEIGHTS = "weights.bin"
SCHEDULE = "schedule.yaml"
SCALE_SHIFT = scale_shift_file(SCHEDULE)  # the sidecar Schedule.save writes beside SCHEDULE


def schedule_file(steps: int) -> str:
    """A schedule of a plan with several: `schedule-<steps>.yaml` (a plan with one has SCHEDULE)."""
    return f"schedule-{steps}.yaml"


def variant_file(k: int, program: int | None = None) -> str:
    """Variant k's graph: `variant_<k>.onnx` in a plan of one program, `variant_<j>_<k>.onnx` for program j."""
    return f"variant_{k}.onnx" if program is None else f"variant_{program}_{k}.onnx"


def engine_file(k: int, program: int | None = None) -> str:
    return f"engine_{k}.plan" if program is None else f"engine_{program}_{k}.plan"


# Tensor dtypes a plan may hold (numpy names, and bfloat16) and their item sizes in bytes.
DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}

# Precisions: what ONNX graphs are stored in, and what each engine precision is built from.
PRECISIONS = ("fp32", "fp16", "bf16")
STORED_PRECISIONS = ("fp32", "fp16")  # fp16 keeps norms, guidance and the solver update in fp32
ENGINE_SOURCE = {"fp32": "fp32", "fp16": "fp16", "bf16": "fp16"}  # bf16 engines retype the fp16 graphs

# Inputs and outputs of a step graph.
X, Y, TIMESTEP, A, B, GUIDANCE_SCALE = "x", "y", "timestep", "a", "b", "guidance_scale"
C, X_CARRY = "c", "x_carry"  # only in graphs of solvers with a carry term (DPM-Solver-2, DPM-Solver++ 2M)
# Only where the carry is the previous step's output (DPM-Solver++ 2M): the output carry_next = p·x + q·eps
# (fp32, of the guided eps) is the next step's x_carry.
P, Q, CARRY_NEXT = "p", "q", "carry_next"
X_NEXT = "x_next"
STEP_INPUTS = (X, Y, TIMESTEP, A, B, GUIDANCE_SCALE)
CARRY_INPUTS = (C, X_CARRY)
CARRY_OUTPUT_INPUTS = (P, Q)
LATENTS = (X, X_CARRY, X_NEXT, CARRY_NEXT)  # bound to a step's (input, carry, output, carry output) latent buffer
STEP_CONSTANTS = (TIMESTEP, A, B, C, P, Q)  # one value per step, fixed at export
CALL_INPUTS = (X, Y, GUIDANCE_SCALE)  # written by the host on every call

UNIT_PREFIX = "unit."  # graph output: a computed unit's raw value, kept for a later step
CACHE_PREFIX = "cache."  # graph input: a reused unit's cached value (and the cache buffer's name)
SCALE_PREFIX, SHIFT_PREFIX = "scale.", "shift."  # graph inputs: Block Caching scale-shift of a read
CORRECTION_PREFIXES = (SCALE_PREFIX, SHIFT_PREFIX)
FORECAST_PREFIX = "forecast."  # graph input: a forecast read's weights over its history, newest first
STEP_VECTOR_PREFIXES = CORRECTION_PREFIXES + (FORECAST_PREFIX,)  # per-step vectors, fixed at export


DECODER_INPUT, DECODER_OUTPUT = "latents", "image"  # the decoder graph's: final latents in, uint8 RGB out


def decoder_file(batch_size: int) -> str:
    """The decoder graph for batches of `batch_size`, shared by the programs of that batch size."""
    return f"decoder_{batch_size}.onnx"


def decoder_engine_file(batch_size: int) -> str:
    return f"decoder_engine_{batch_size}.plan"


HIDDEN_PREFIX = "hidden."  # master graph outputs: the hidden state after each block (surgery's span cuts)
HIDDEN_INPUT = "hidden.input"  # ... and before the first block


def hidden_output(block: str) -> str:
    return HIDDEN_PREFIX + block


def step_inputs(carry: bool, carry_output: bool = False, conditioning: tuple[str, ...] = (Y,)) -> tuple[str, ...]:
    """A step graph's inputs in order; `conditioning` replaces the labels `y` of a text-to-image model."""
    return ((X, *conditioning) + STEP_INPUTS[2:] + (CARRY_INPUTS if carry else ())
            + (CARRY_OUTPUT_INPUTS if carry_output else ()))


# Text-to-image models (PixArt): a call's prompt embeddings and mask for the network batch ([cond; uncond]
# under guidance), the inputs of the prologue graph, or of every step graph in a plan without prologue.
PROMPT_EMBEDS, PROMPT_MASK = "prompt_embeds", "prompt_mask"
PROMPT_INPUTS = (PROMPT_EMBEDS, PROMPT_MASK)
# The prologue's outputs, which every step graph reads: each block's cross-attention keys and values and
# the mask's additive bias (runtime.nn.pixart.Prompt).
PROMPT_PREFIX = "prompt."
PROMPT_BIAS = PROMPT_PREFIX + "bias"


def prompt_key(block: int) -> str:
    return f"{PROMPT_PREFIX}keys.{block}"


def prompt_value(block: int) -> str:
    return f"{PROMPT_PREFIX}values.{block}"


def prologue_outputs(depth: int) -> tuple[str, ...]:
    """The prologue graph's outputs in order: keys and values block by block, then the bias."""
    return tuple(n for i in range(depth) for n in (prompt_key(i), prompt_value(i))) + (PROMPT_BIAS,)


def prologue_file(batch_size: int) -> str:
    """The prologue graph for batches of `batch_size`, shared by the programs of that batch size."""
    return f"prologue_{batch_size}.onnx"


def prologue_engine_file(batch_size: int) -> str:
    return f"prologue_engine_{batch_size}.plan"


def unit_output(unit: str) -> str:
    return UNIT_PREFIX + unit


def cache_input(unit: str) -> str:
    return CACHE_PREFIX + unit


def forecast_input(name: str) -> str:
    return FORECAST_PREFIX + name


def ring_buffer(name: str, r: int) -> str:
    """The r-th cache buffer of a unit or span whose forecasts read several of its values (`name` for
    r = 0): the values rotate through the buffers by binding (runtime.plan.manifest.Program.cache_slots)."""
    return name if r == 0 else f"{name}@{r}"


def ring_of(buffer: str) -> tuple[str, int | None]:
    """(name, r) of a cache buffer `ring_buffer(name, r)`; r is None where the suffix is not a number."""
    name, at, r = buffer.rpartition("@")
    if not at:
        return buffer, 0
    return name, int(r) if r.isdigit() and len(r) < 4 else None


def correction_inputs(unit: str) -> tuple[str, str]:
    """The (scale, shift) input names of a corrected read of `unit`."""
    return SCALE_PREFIX + unit, SHIFT_PREFIX + unit
