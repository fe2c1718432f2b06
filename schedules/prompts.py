"""Prompts files and prompt-embeddings files of the text-to-image models (PixArt), in numpy only.

A plan takes prompt embeddings as inputs: the T5 text encoder runs outside it, once, in
`blockcache-encode-prompts` (exporter/encode_prompts.py), which reads a prompts file (`read_prompts`)
and writes an embeddings file; `Sampler(plan)(prompt_embeds=…, prompt_mask=…)` and
`blockcache-sample --prompt-embeds` read it back with `load_prompt_embeds`.

Prompts file: UTF-8 text, one prompt per line (blank lines skipped; `\\n` or `\\r\\n` ends a line), or a
`.json` file holding a list of strings. At most `MAX_PROMPTS` prompts of at most `MAX_PROMPT_CHARS`
characters each.

Embeddings file (.npz as `np.savez` writes it: one `.npy` per key, no pickles, readable with
`np.load(path, allow_pickle=False)`); N prompts, L = max_length tokens, D the encoder's width (T5 v1.1
XXL: 4096, PixArt's caption_channels):

    prompt_embeds    float32 (N, L, D)  the encoder's last hidden states, padding positions included
    prompt_mask      int64   (N, L)     1 for a token (the prompt's and its </s>), 0 for padding
    negative_embeds  float32 (1, L, D)  the negative (unconditional) prompt's, the same way ("" by default)
    negative_mask    int64   (1, L)
    prompts          unicode (N,)       the prompts as given (before the pipelines' lowercasing)
    max_length       int64   ()         L: α 120, Σ 300 (the pipelines' max_sequence_length)

Every mask row holds at least one 1 and only 0s and 1s; every embedding value is finite.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from .errors import BlockcacheError, one_line
from .zoo import MAX_TOKENS, MAX_WIDTH, takes_prompt

PROMPT_EMBEDS = "prompt_embeds"
PROMPT_MASK = "prompt_mask"
NEGATIVE_EMBEDS = "negative_embeds"
NEGATIVE_MASK = "negative_mask"
PROMPTS = "prompts"
MAX_LENGTH = "max_length"
KEYS = (PROMPT_EMBEDS, PROMPT_MASK, NEGATIVE_EMBEDS, NEGATIVE_MASK, PROMPTS, MAX_LENGTH)

MAX_PROMPTS = 10_000
MAX_PROMPT_CHARS = 10_000  # far beyond 300 T5 tokens (about 1,500 characters of English)
MAX_PROMPTS_FILE_BYTES = 64 << 20
_DEFLATE_RATIO = 1100  # deflate expands at most about 1032×: a member claiming more is corrupt


def _existing_file(path, what: str, not_folder: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BlockcacheError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise BlockcacheError(f"{what} {path} is a folder{not_folder}")
    return path


def read_prompts(path) -> list[str]:
    """The prompts of a prompts file (see the module docstring), as given; one-line errors."""
    path = _existing_file(path, "prompts file", "")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPTS_FILE_BYTES + 1)
    except OSError as e:
        raise BlockcacheError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    if len(data) > MAX_PROMPTS_FILE_BYTES:
        raise BlockcacheError(f"prompts file {path} is larger than {MAX_PROMPTS_FILE_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BlockcacheError(f"prompts file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                              f"{e.start})") from None
    if path.lower().endswith(".json"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise BlockcacheError(f"prompts file {path} is not valid JSON ({e.msg} at line {e.lineno} column "
                                  f"{e.colno})") from None
        if not isinstance(value, list):
            raise BlockcacheError(f"prompts file {path} must hold a JSON list of strings, not a "
                                  f"{type(value).__name__}")
        wrong = next((i for i, v in enumerate(value) if not isinstance(v, str)), None)
        if wrong is not None:
            raise BlockcacheError(f"prompts file {path}: entry {wrong} is a {type(value[wrong]).__name__}, "
                                  "not a string (a JSON list of strings is expected)")
        prompts = value
    else:
        prompts = [line.removesuffix("\r") for line in text.split("\n")]
        prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise BlockcacheError(f"prompts file {path} holds no prompts")
    if len(prompts) > MAX_PROMPTS:
        raise BlockcacheError(f"prompts file {path} holds {len(prompts)} prompts, more than {MAX_PROMPTS}: "
                              "split it")
    for i, p in enumerate(prompts):
        if len(p) > MAX_PROMPT_CHARS:
            raise BlockcacheError(f"prompt {i} of {path} has {len(p)} characters, more than {MAX_PROMPT_CHARS}")
        if "\0" in p:  # numpy's unicode arrays drop trailing NULs: the prompt would not round-trip
            raise BlockcacheError(f"prompt {i} of {path} holds a NUL character")
    return prompts


def _headers(path: str, z: zipfile.ZipFile) -> dict:
    """Each key's (shape, dtype) from its .npy header, read without loading (or allocating) the data;
    refuses object arrays (pickles) and members whose data cannot be there."""
    size = os.path.getsize(path)
    names = {info.filename: info for info in z.infolist()}
    found = {}
    for key in KEYS:
        info = names.get(key + ".npy")
        if info is None:
            raise BlockcacheError(f"{path} has no {key!r} array: not a prompt-embeddings file (it holds "
                                  f"{', '.join(sorted(n.removesuffix('.npy') for n in names)) or 'nothing'})")
        with z.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise BlockcacheError(f"{path}: {key} is a .npy of format {version[0]}.{version[1]}, not 1.0 or 2.0")
        if dtype.hasobject:
            raise BlockcacheError(f"{path}: {key} is an object array (a pickle): refused, only plain arrays are read")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        stored = info.compress_type == zipfile.ZIP_STORED
        if info.compress_size > size or nbytes > info.file_size or \
                (not stored and nbytes > _DEFLATE_RATIO * info.compress_size + (1 << 20)):
            raise BlockcacheError(f"{path}: {key} is truncated or corrupted (its header declares {shape} "
                                  f"{dtype}, more than the file holds)")
        found[key] = (tuple(shape), dtype)
    return found


def _check_shapes(path: str, headers: dict) -> None:
    """Consistent shapes and plain dtypes, from the headers alone (before reading gigabytes)."""
    shape, dtype = headers[PROMPT_EMBEDS]
    if len(shape) != 3 or 0 in shape:
        raise BlockcacheError(f"{path}: {PROMPT_EMBEDS} must be (N, L, D) with none 0, got shape {shape}")
    n, length, width = shape
    if n > MAX_PROMPTS or length > MAX_TOKENS or width > MAX_WIDTH:
        raise BlockcacheError(f"{path}: {PROMPT_EMBEDS} of shape {shape} exceeds the limits ({MAX_PROMPTS} prompts, "
                              f"{MAX_TOKENS} tokens, width {MAX_WIDTH})")
    expected = {PROMPT_EMBEDS: (n, length, width), PROMPT_MASK: (n, length), NEGATIVE_EMBEDS: (1, length, width),
                NEGATIVE_MASK: (1, length), PROMPTS: (n,), MAX_LENGTH: ()}
    for key, want in expected.items():
        got, dtype = headers[key]
        if got != want:
            raise BlockcacheError(f"{path}: {key} has shape {got}, expected {want} for {PROMPT_EMBEDS} of shape {shape}")
        if key in (PROMPT_EMBEDS, NEGATIVE_EMBEDS) and dtype.newbyteorder("=") != np.dtype(np.float32):
            raise BlockcacheError(f"{path}: {key} must be float32, got {dtype}")
        if key in (PROMPT_MASK, NEGATIVE_MASK) and dtype.kind not in "iub":
            raise BlockcacheError(f"{path}: {key} must be integers (int64), got {dtype}")
        if key == MAX_LENGTH and dtype.kind not in "iu":
            raise BlockcacheError(f"{path}: {MAX_LENGTH} must be an integer, got {dtype}")
        if key == PROMPTS and dtype.kind != "U":
            raise BlockcacheError(f"{path}: {PROMPTS} must be a unicode array, got {dtype}")


def check_prompt_embeds(embeds: np.ndarray, mask: np.ndarray, what: str = PROMPT_EMBEDS) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (N, L, D) float32 and their mask (N, L) of 0s and 1s with a 1 in every row, all finite:
    returned as native float32 and int64; one-line errors naming `what`."""
    embeds, mask = np.asarray(embeds), np.asarray(mask)
    if embeds.ndim != 3 or 0 in embeds.shape:
        raise BlockcacheError(f"{what} must be (N, L, D) with none 0, got shape {embeds.shape}")
    if embeds.dtype.newbyteorder("=") != np.dtype(np.float32):
        raise BlockcacheError(f"{what} must be float32, got {embeds.dtype}")
    if mask.shape != embeds.shape[:2]:
        raise BlockcacheError(f"{what}'s mask has shape {mask.shape}, expected {embeds.shape[:2]}")
    if mask.dtype.kind not in "iub":
        raise BlockcacheError(f"{what}'s mask must be integers (0 or 1), got {mask.dtype}")
    if not np.isin(mask, (0, 1)).all():
        bad = mask[~np.isin(mask, (0, 1))].flat[0]
        raise BlockcacheError(f"{what}'s mask must hold only 0 and 1, found {bad}")
    empty = np.flatnonzero(~mask.astype(bool).any(axis=1))
    if empty.size:
        raise BlockcacheError(f"{what}: row {empty[0]} of the mask has no token (all 0)")
    for i in range(embeds.shape[0]):  # row by row: no copy of the whole array
        if not np.isfinite(embeds[i]).all():
            raise BlockcacheError(f"{what}: row {i} is not finite (NaN or infinity)")
    return embeds.astype(np.float32, copy=False), mask.astype(np.int64, copy=False)


def load_prompt_embeds(path) -> dict:
    """Read and validate a prompt-embeddings file (see the module docstring): a dict of the six keys,
    the arrays native float32 / int64, `prompts` a list of str and `max_length` an int; one-line errors."""
    path = _existing_file(path, "prompt embeddings", ", not an .npz file")
    try:
        with zipfile.ZipFile(path) as z:
            headers = _headers(path, z)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise BlockcacheError(f"{path} is not an .npz file ({one_line(e)[:160]})") from None
    except (ValueError, OSError) as e:  # a malformed .npy header, an unreadable file
        raise BlockcacheError(f"{path}: truncated or corrupted ({one_line(e)[:160]})") from None
    _check_shapes(path, headers)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in KEYS}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise BlockcacheError(f"{path}: truncated or corrupted ({one_line(e)[:160]})") from None
    out = {}
    out[PROMPT_EMBEDS], out[PROMPT_MASK] = check_prompt_embeds(arrays[PROMPT_EMBEDS], arrays[PROMPT_MASK],
                                                               f"{path}: {PROMPT_EMBEDS}")
    out[NEGATIVE_EMBEDS], out[NEGATIVE_MASK] = check_prompt_embeds(arrays[NEGATIVE_EMBEDS], arrays[NEGATIVE_MASK],
                                                                   f"{path}: {NEGATIVE_EMBEDS}")
    length = int(arrays[MAX_LENGTH])
    if length != out[PROMPT_EMBEDS].shape[1]:
        raise BlockcacheError(f"{path}: {MAX_LENGTH} is {length} but the embeddings have "
                              f"{out[PROMPT_EMBEDS].shape[1]} tokens")
    out[PROMPTS] = [str(p) for p in arrays[PROMPTS]]
    out[MAX_LENGTH] = length
    return out


@dataclass(frozen=True)
class PromptInputs:
    """A sampling call's checked prompts: N prompts' embeddings (N, L, D) float32 and mask (N, L) int64,
    and the negative (unconditional) prompt's (1, L, D) and (1, L), or None without guidance."""
    embeds: np.ndarray
    mask: np.ndarray
    negative_embeds: np.ndarray | None = None
    negative_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def batch(self, start: int, stop: int, size: int) -> "PromptInputs":
        """Rows start…stop − 1 padded to `size` rows with copies of the last (finite, one token at least:
        the padding's results are dropped, but must not be NaN)."""
        embeds, mask = self.embeds[start:stop], self.mask[start:stop]
        if len(embeds) < size:
            extra = size - len(embeds)
            embeds = np.concatenate([embeds, np.repeat(embeds[-1:], extra, axis=0)])
            mask = np.concatenate([mask, np.repeat(mask[-1:], extra, axis=0)])
        return PromptInputs(embeds, mask, self.negative_embeds, self.negative_mask)

    def network(self, guidance: bool) -> tuple[np.ndarray, np.ndarray]:
        """The embeddings and mask of the network batch: the N prompts' rows and, under classifier-free
        guidance, N copies of the negative prompt's after them ([cond; uncond], as the doubled latents
        [x; x]). The PixArt pipelines concatenate [negative; prompt] and guide uncond + s·(cond − uncond);
        the order of the rows changes no value."""
        if not guidance:
            return self.embeds, self.mask
        if self.negative_embeds is None:  # checked without guidance (a neutral scale): eps = cond, so any rows do
            return np.concatenate([self.embeds, self.embeds]), np.concatenate([self.mask, self.mask])
        n = len(self)
        return (np.concatenate([self.embeds, np.repeat(self.negative_embeds, n, axis=0)]),
                np.concatenate([self.mask, np.repeat(self.negative_mask, n, axis=0)]))


def check_prompt_inputs(config: dict, prompt_embeds, prompt_mask=None, negative_embeds=None, negative_mask=None,
                        guidance: bool = True, model_name: str = "the model") -> PromptInputs:
    """The prompts of a call to a text-to-image model with `config`: embeddings of its T5 width
    (`caption_channels`) and token count (`max_text_tokens`, what the pipelines pad to), a mask of
    their shape (None: every token counts), and under guidance the negative prompt's, one row; one-line
    errors naming the argument."""
    if prompt_embeds is None:
        raise BlockcacheError(f"{model_name} is a text-to-image model: give prompt_embeds (and prompt_mask)")
    embeds = np.asarray(prompt_embeds)
    if embeds.ndim != 3:
        raise BlockcacheError(f"prompt_embeds must be (N, L, D), got shape {embeds.shape}")
    mask = np.ones(embeds.shape[:2], np.int64) if prompt_mask is None else prompt_mask
    embeds, mask = check_prompt_embeds(embeds, mask)
    width, length = config["caption_channels"], config["max_text_tokens"]
    if embeds.shape[2] != width:
        raise BlockcacheError(f"prompt_embeds are {embeds.shape[2]} wide but {model_name} takes {width} (its text "
                              "encoder's width, T5-XXL: 4096)")
    if embeds.shape[1] != length:
        raise BlockcacheError(f"prompt_embeds have {embeds.shape[1]} tokens but {model_name} takes {length} (the "
                              f"pipelines' max_sequence_length): encode with --max-length {length}")
    if not guidance:
        return PromptInputs(embeds, mask)
    if negative_embeds is None:
        raise BlockcacheError("guidance needs the negative prompt: give negative_embeds (an embeddings file holds "
                              "the empty prompt's) or a guidance scale of 1")
    negative = np.asarray(negative_embeds)
    negative_mask = np.ones(negative.shape[:2], np.int64) if negative_mask is None else negative_mask
    negative, negative_mask = check_prompt_embeds(negative, negative_mask, NEGATIVE_EMBEDS)
    if negative.shape != (1, length, width):
        raise BlockcacheError(f"negative_embeds must be one prompt of shape (1, {length}, {width}), got {negative.shape}")
    return PromptInputs(embeds, mask, negative, negative_mask)


def check_prompts(config: dict, prompts: PromptInputs | None, guidance: bool, model_name: str = "the model") -> PromptInputs:
    """`check_prompt_inputs` of a `PromptInputs` (None: refused as no prompt_embeds)."""
    if prompts is None:
        return check_prompt_inputs(config, None, model_name=model_name)
    return check_prompt_inputs(config, prompts.embeds, prompts.mask, prompts.negative_embeds, prompts.negative_mask,
                               guidance, model_name)


def check_conditioning(config: dict, labels, prompt_embeds, model_name: str = "the model") -> None:
    """Refuse, in one line, labels given to a text-to-image model and prompts given to a class model."""
    if takes_prompt(config) and labels is not None:
        raise BlockcacheError(f"{model_name} is a text-to-image model: it takes prompt_embeds, not class labels")
    if not takes_prompt(config) and prompt_embeds is not None:
        raise BlockcacheError(f"{model_name} is class-conditional: it takes class labels, not prompt_embeds")
