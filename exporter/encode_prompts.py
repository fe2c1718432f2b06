"""`blockcache-encode-prompts`: encode text prompts with PixArt's T5 text encoder into an embeddings file
that a plan takes as input (the text encoder runs outside the plan, once per prompt).

    blockcache-encode-prompts --text-encoder DIR --prompts FILE -o embeds.npz --model pixart-alpha-512

It computes what diffusers' `PixArtAlphaPipeline.encode_prompt` / `PixArtSigmaPipeline.encode_prompt`
compute with `clean_caption=False`: each prompt lowercased and stripped (`text.lower().strip()`, the
pipelines' `_text_preprocessing`), tokenized with padding="max_length", max_length=L, truncation=True
and the special tokens (T5 appends </s>); mask = the tokenizer's attention_mask; embeddings =
text_encoder(input_ids, attention_mask=mask)[0]. L is the model's `max_text_tokens` (α 120, Σ 300:
the pipelines' `max_sequence_length`) or `--max-length`. The negative (unconditional) prompt,
`--negative-prompt` ("" by default, as the pipelines), is encoded the same way with the same L. A prompt
longer than L tokens is truncated to L (its last token </s>), as the pipelines do, with one warning.

Caption cleaning is NOT done: the pipelines' `__call__` defaults to `clean_caption=True`, which (when
bs4 and ftfy are installed) also drops URLs, HTML, @names, long numbers, some punctuation… before
encoding. For plain lowercase text the cleaning changes nothing; clean captions beforehand if yours
need it.

DIR is a folder with a T5 encoder (config.json with model_type "t5", model.safetensors — preferred —
or pytorch_model.bin, read with torch's weights_only so no pickled code runs) and its tokenizer
(tokenizer.json, or spiece.model which needs the sentencepiece package); or the encoder's folder
whose sibling `../tokenizer` holds the tokenizer; or a diffusers pipeline folder with `text_encoder/`
and `tokenizer/`. Nothing is downloaded.

The output (.npz, no pickles) holds prompt_embeds float32 (N, L, D), prompt_mask int64 (N, L),
negative_embeds float32 (1, L, D), negative_mask int64 (1, L), prompts (unicode, N: as given, before
the lowercasing) and max_length (int): the layout of `schedules.prompts`, which reads it back
(`load_prompt_embeds`). The file is written beside its final name and renamed when complete: a failed
or interrupted run leaves no partial file (and an older file of that name untouched). prompt_embeds is
streamed into the file batch by batch, so memory stays at one batch however many prompts.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import sys
import time
import warnings
import zipfile

import numpy as np

from schedules.errors import BlockcacheError, cli_main, one_line
from schedules.files import atomic_output, check_output
from schedules.options import ArgumentParser
from schedules.prompts import (MAX_LENGTH, NEGATIVE_EMBEDS, NEGATIVE_MASK, PROMPT_EMBEDS, PROMPT_MASK, PROMPTS,
                               read_prompts)
from schedules.safeload import foreign_imports
from schedules.zoo import CONFIGS, MAX_TOKENS, MAX_WIDTH, family_of, model_config

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
MAX_BATCH = 4096
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
PIXART_MODELS = tuple(n for n, c in CONFIGS.items() if c["family"] == "pixart")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="blockcache-encode-prompts", description=(
        "Encode prompts with PixArt's T5 text encoder into prompt embeddings (.npz) for a plan, exactly as "
        "diffusers' PixArt pipelines' encode_prompt with clean_caption=False (prompts lowercased and stripped). "
        "Caption cleaning (the pipelines' clean_caption=True: URLs, HTML, punctuation…) is not done: clean "
        "the captions beforehand if they need it."))
    p.add_argument("--text-encoder", required=True, metavar="DIR",
                   help="a T5 encoder folder with its tokenizer (or with ../tokenizer beside it), or a diffusers "
                        "pipeline folder (text_encoder/ and tokenizer/); local files only")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="UTF-8 text, one prompt per line (blank lines skipped), or a .json list of strings; "
                        "at most 10,000 prompts")
    p.add_argument("-o", "--out", required=True, metavar="OUT.npz", help="the embeddings file to write")
    length = p.add_argument_group("token count and width (--model, --max-length or both)")
    length.add_argument("--model", metavar="NAME", help="PixArt zoo model whose max_text_tokens (α 120, Σ 300) "
                        f"and caption_channels (4096) to use: {', '.join(PIXART_MODELS)}")
    length.add_argument("--max-length", type=int, metavar="N", help="tokens per prompt (padding and truncation "
                        "length); with --model, overrides its max_text_tokens")
    length.add_argument("--caption-channels", type=int, metavar="D", help="with --model: the embedding width the "
                        "model takes instead of its config's (for test-sized encoders)")
    p.add_argument("--negative-prompt", default="", metavar="TEXT",
                   help='the negative (unconditional) prompt (default "", as the pipelines)')
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per encoder call (default 8)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto (cuda when available), cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="the encoder's precision (default float32; the file holds float32 either way; "
                        "float16 can overflow in T5: prefer bfloat16)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary (warnings still shown)")
    return p


def preprocess(text: str) -> str:
    """The pipelines' `_text_preprocessing` with clean_caption=False."""
    return text.lower().strip()


def token_count(args) -> tuple[int, int | None, str]:
    """(max_length, expected width or None, what decided them) from --model / --max-length."""
    if args.caption_channels is not None and not args.model:
        raise BlockcacheError("--caption-channels needs --model")
    if args.model:
        family = family_of(model_config(args.model)).name
        if family != "pixart":
            raise BlockcacheError(f"--model {args.model} is a {family} model, which takes no prompt: give a PixArt "
                                  f"model ({', '.join(PIXART_MODELS)})")
        if args.max_length is not None:
            _check_length(args.max_length)
        if args.caption_channels is not None and not 1 <= args.caption_channels <= MAX_WIDTH:
            raise BlockcacheError(f"--caption-channels must be 1…{MAX_WIDTH}, got {args.caption_channels}")
        config = model_config(args.model, max_text_tokens=args.max_length, caption_channels=args.caption_channels)
        return config["max_text_tokens"], config["caption_channels"], f"--model {args.model}"
    if args.max_length is None:
        raise BlockcacheError("give --model NAME (its max_text_tokens: α 120, Σ 300) or --max-length N")
    return _check_length(args.max_length), None, "--max-length"


def _check_length(n: int) -> int:
    if not 1 <= n <= MAX_TOKENS:
        raise BlockcacheError(f"--max-length must be 1…{MAX_TOKENS}, got {n}")
    return n


def find_folders(path: str) -> tuple[str, str]:
    """(text encoder folder, tokenizer folder) of the layouts in the module docstring."""
    if not os.path.exists(path):
        raise BlockcacheError(f"--text-encoder {path}: no such folder")
    if not os.path.isdir(path):
        raise BlockcacheError(f"--text-encoder {path} is a file: give the text encoder's folder or the pipeline's")
    if os.path.isfile(os.path.join(path, "config.json")):
        encoder = path
    elif os.path.isfile(os.path.join(path, "text_encoder", "config.json")):
        encoder = os.path.join(path, "text_encoder")
    elif os.path.isfile(os.path.join(path, "model_index.json")):
        raise BlockcacheError(f"--text-encoder {path}: the pipeline folder has no text_encoder/config.json")
    else:
        raise BlockcacheError(f"--text-encoder {path} holds no config.json nor text_encoder/config.json: give a T5 "
                              "encoder folder or a diffusers pipeline folder")
    candidates = list(dict.fromkeys([encoder, os.path.join(os.path.dirname(os.path.abspath(encoder)), "tokenizer")]))
    for folder in candidates:
        if any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
            return encoder, folder
    raise BlockcacheError(f"no tokenizer for the text encoder {encoder}: looked for {' or '.join(TOKENIZER_FILES)} "
                          f"in {' and '.join(candidates)}")


def read_encoder_config(folder: str) -> dict:
    """config.json of a T5 encoder, checked before any weights are read."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BlockcacheError(f"cannot read {path}: {one_line(e)[:160]}") from None
    if not isinstance(config, dict):
        raise BlockcacheError(f"{path} is not a model config (a JSON object)")
    kind = config.get("model_type")
    if kind != "t5":
        raise BlockcacheError(f"{path} is a {kind!r} model config, not a T5 encoder's (model_type 't5'): PixArt's "
                              "prompts come from T5 v1.1 XXL")
    for key in ("d_model", "vocab_size"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 24:
            raise BlockcacheError(f"{path}: {key} must be a positive integer, got {value!r}")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise BlockcacheError(f"no weights in {folder} ({' or '.join(WEIGHT_FILES[::2])})")
    return config


@contextlib.contextmanager
def quiet_transformers():
    """transformers' info/warning logs, progress bars and Python warnings off while the block runs
    (a user error stays one line), restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_encoder(folder: str, dtype, device):
    """T5EncoderModel from local files, safetensors preferred; a pickle (.bin) is read with torch's
    weights_only (tensors only: a pickle that would import anything else is refused)."""
    from transformers import T5EncoderModel

    safetensors = any(os.path.isfile(os.path.join(folder, n)) for n in WEIGHT_FILES[:2])
    try:
        encoder, info = T5EncoderModel.from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                       use_safetensors=safetensors, weights_only=True,
                                                       output_loading_info=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        binaries = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".bin")]
        imported = found.group(1) if found else next((i for b in binaries for i in foreign_imports(b)), None)
        why = f"the pickle would import {imported}" if imported else "not a plain tensor pickle"
        raise BlockcacheError(f"{folder}: refused the pickled weights, {why} (only tensors are loaded)") from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise BlockcacheError(f"cannot load the text encoder {folder}: {one_line(e)[:240]}") from None
    missing = sorted(info.get("missing_keys") or ()) + sorted(info.get("mismatched_keys") or ())
    if missing:
        raise BlockcacheError(f"{folder}: the weights lack {len(missing)} of the T5 encoder's tensors or have "
                              f"other shapes (e.g. {missing[0]}): refused, they would stay random")
    return encoder.to(device).eval()


def load_tokenizer(folder: str, vocab_size: int):
    import importlib.util

    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(folder, "tokenizer.json")) and importlib.util.find_spec("sentencepiece") is None:
        raise BlockcacheError(f"the tokenizer {folder} has only spiece.model, which needs the sentencepiece package "
                              "(pip install sentencepiece)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError, AttributeError) as e:
        raise BlockcacheError(f"cannot load the tokenizer {folder}: {one_line(e)[:240]}") from None
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise BlockcacheError(f"the tokenizer {folder} has no padding token (T5's is <pad>)")
    if len(tokenizer) > vocab_size:
        raise BlockcacheError(f"the tokenizer {folder} has {len(tokenizer)} tokens, more than the encoder's "
                              f"{vocab_size} embeddings: they do not belong together")
    return tokenizer


def truncated(tokenizer, texts: list[str], max_length: int) -> int:
    """How many of the (preprocessed) texts have more than max_length tokens with </s>."""
    return sum(len(ids) > max_length for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])


def encode(tokenizer, encoder, texts: list[str], max_length: int, device):
    """Embeddings (float32 numpy (B, L, D)) and mask (int64 (B, L)) of preprocessed texts, as the
    pipelines' encode_prompt computes them."""
    import torch

    inputs = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                       return_tensors="pt")
    mask = inputs.attention_mask.to(device)
    with torch.no_grad():
        try:
            embeds = encoder(inputs.input_ids.to(device), attention_mask=mask)[0]
        except torch.cuda.OutOfMemoryError:
            raise BlockcacheError(f"out of memory encoding {len(texts)} prompts on {device}: lower --batch-size "
                                  "or use --dtype bfloat16") from None
    embeds = embeds.float().cpu().numpy()
    if embeds.shape[:2] != (len(texts), max_length):  # the tokenizer ignored max_length
        raise BlockcacheError(f"the tokenizer made {embeds.shape[1]} tokens per prompt, not --max-length {max_length}")
    bad = np.flatnonzero(~np.isfinite(embeds).all(axis=(1, 2)))
    if bad.size:
        raise BlockcacheError(f"the text encoder's embeddings of {texts[bad[0]][:60]!r} are not finite (T5 "
                              "overflows in float16: use --dtype bfloat16 or float32)")
    mask = mask.cpu().numpy().astype(np.int64)
    if not mask.any(axis=1).all():
        raise BlockcacheError(f"the tokenizer gave {texts[int(np.flatnonzero(~mask.any(axis=1))[0])][:60]!r} no token")
    return embeds, mask


def resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BlockcacheError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(name)


def _write_npy_header(f, shape: tuple[int, ...]) -> None:
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                             "fortran_order": False, "shape": shape})


def write_embeddings(tmp: str, batches, shape: tuple[int, int, int], arrays: dict) -> None:
    """The .npz np.savez would write (stored, zip64 members), prompt_embeds streamed from `batches` of
    (embeds, mask); the masks are collected into prompt_mask; `arrays` are the other keys."""
    masks, rows = [], 0
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open(PROMPT_EMBEDS + ".npy", "w", force_zip64=True) as f:
            _write_npy_header(f, shape)
            for embeds, mask in batches:
                f.write(np.ascontiguousarray(embeds, dtype="<f4").tobytes())
                masks.append(mask)
                rows += len(embeds)
        if rows != shape[0]:
            raise RuntimeError(f"wrote {rows} rows of prompt_embeds, declared {shape[0]}")
        for key, array in {PROMPT_MASK: np.concatenate(masks), **arrays}.items():
            with z.open(key + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    max_length, width, source = token_count(args)
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise BlockcacheError(f"--batch-size must be 1…{MAX_BATCH}, got {args.batch_size}")
    check_output(args.out, (".npz",), "-o/--out")
    if os.path.exists(args.prompts) and os.path.exists(args.out) and os.path.samefile(args.prompts, args.out):
        raise BlockcacheError(f"-o/--out {args.out} is the prompts file: write the embeddings elsewhere")
    prompts = read_prompts(args.prompts)
    encoder_dir, tokenizer_dir = find_folders(args.text_encoder)
    config = read_encoder_config(encoder_dir)
    if width is not None and config["d_model"] != width:
        raise BlockcacheError(f"the text encoder {encoder_dir} makes {config['d_model']}-wide embeddings, but "
                              f"{args.model} takes caption_channels {width} (T5 v1.1 XXL's 4096)")
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise BlockcacheError("blockcache-encode-prompts needs the transformers package (pip install transformers)")
    import torch
    from tqdm.auto import tqdm

    device = resolve_device(args.device)
    with quiet_transformers():
        tokenizer = load_tokenizer(tokenizer_dir, config["vocab_size"])
        encoder = load_encoder(encoder_dir, getattr(torch, args.dtype), device)
        texts = [preprocess(p) for p in prompts]
        negative = preprocess(args.negative_prompt)
        cut = truncated(tokenizer, texts, max_length)
        if cut:
            print(f"warning: {cut} of {len(texts)} prompts have more than {max_length} tokens ({source}) and were "
                  f"truncated to {max_length}, as the pipelines do", file=sys.stderr)
        if truncated(tokenizer, [negative], max_length):
            print(f"warning: the negative prompt has more than {max_length} tokens and was truncated", file=sys.stderr)
        negative_embeds, negative_mask = encode(tokenizer, encoder, [negative], max_length, device)
        d = negative_embeds.shape[2]

        def batches():
            with tqdm(total=len(texts), unit="prompt", desc="encoding", file=sys.stderr, disable=args.quiet,
                      leave=False) as bar:
                for i in range(0, len(texts), args.batch_size):
                    chunk = texts[i:i + args.batch_size]
                    yield encode(tokenizer, encoder, chunk, max_length, device)
                    bar.update(len(chunk))

        others = {NEGATIVE_EMBEDS: negative_embeds, NEGATIVE_MASK: negative_mask,
                  PROMPTS: np.array(prompts, dtype=str), MAX_LENGTH: np.array(max_length, dtype=np.int64)}
        with atomic_output(args.out, ".npz") as tmp:
            write_embeddings(tmp, batches(), (len(texts), max_length, d), others)
    if not args.quiet:
        print(f"wrote {args.out}: {len(texts)} prompts × {max_length} tokens × {d} ({source}), negative prompt "
              f"{args.negative_prompt!r}, {encoder_dir} on {device} in {args.dtype}, "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
