"""blockcache-encode-prompts (exporter/encode_prompts.py) and the embeddings file's reader
(schedules/prompts.py), on a tiny random T5 encoder and a tokenizer built here (nothing from the hub):
the CLI's embeddings and masks equal diffusers' PixArt pipelines' `encode_prompt`, the reader refuses
malformed files in one line, bad input is one `error:` line, and a failed run leaves no file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import REPO, cli_error  # noqa: E402
from schedules.errors import BlockcacheError, Terminated  # noqa: E402
from schedules.prompts import KEYS, MAX_PROMPTS, check_prompt_embeds, load_prompt_embeds, read_prompts  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from exporter import encode_prompts  # noqa: E402
from exporter.encode_prompts import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

WORDS = ("a photo of cat dog sitting on the red blue green chair in garden under sky with big small house tree "
         "an astronaut riding horse moon painting").split()
SPECIALS = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # T5's ids 0, 1, 2
VOCAB = SPECIALS + [("▁", -2.0)] + [("▁" + w, -3.0) for w in WORDS] + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz,."]
LONG = " ".join(["a photo of a cat"] * 40)  # 200 tokens: truncated at 120, not at 300
MEDIUM = "A photo of a dog sitting on the red chair in the garden under the blue sky with a big house"  # 20 tokens
PROMPTS = ["A Photo of a Cat", "  dog  ", LONG, MEDIUM, "an astronaut riding a horse on the moon", "cat"]


def make_tokenizer():
    """A T5 tokenizer (Unigram over VOCAB, </s> appended) built without the hub or sentencepiece."""
    import inspect

    from transformers import T5TokenizerFast

    if "vocab" in inspect.signature(T5TokenizerFast.__init__).parameters:  # transformers >= 5
        return T5TokenizerFast(vocab=VOCAB, extra_ids=0)
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    backend = Tokenizer(Unigram(VOCAB, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁")
    backend.decoder = decoders.Metaspace(replacement="▁")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """pipe/ (diffusers layout: text_encoder/ + tokenizer/), one/ (encoder and tokenizer in one folder),
    bin/ (the weights as a plain pytorch_model.bin only)."""
    from transformers import T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("t5")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    encoder = T5EncoderModel(config).eval()
    pipe = root / "pipe"
    encoder.save_pretrained(pipe / "text_encoder")
    assert (pipe / "text_encoder" / "model.safetensors").is_file()
    tokenizer.save_pretrained(pipe / "tokenizer")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    one = root / "one"
    shutil.copytree(pipe / "text_encoder", one)
    shutil.copytree(pipe / "tokenizer", one, dirs_exist_ok=True)
    binary = root / "bin"
    binary.mkdir()
    shutil.copy(pipe / "text_encoder" / "config.json", binary)
    torch.save(encoder.state_dict(), binary / "pytorch_model.bin")
    shutil.copytree(pipe / "tokenizer", binary, dirs_exist_ok=True)
    return dict(root=root, pipe=pipe, one=one, bin=binary)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n\n   \n" + "\n".join(PROMPTS[3:]) + "\n", encoding="utf-8")
    return path


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.err


def reference(pipe, prompts, max_length, sigma=False):
    """diffusers' PixArt pipeline's encode_prompt (clean_caption=False, negative ""), on `pipe`'s files."""
    pytest.importorskip("diffusers")
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(pipe / "tokenizer", local_files_only=True)
    encoder = T5EncoderModel.from_pretrained(pipe / "text_encoder", local_files_only=True).eval()
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipeline = cls(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
    with torch.no_grad():
        out = pipeline.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="",
                                     device=torch.device("cpu"), clean_caption=False, max_sequence_length=max_length)
    return [t.numpy() for t in out]


# --- (1) the CLI's output is the pipelines' ------------------------------------------------------------

@pytest.mark.parametrize("flags, length, sigma, cut", [
    (["--model", "pixart-alpha-512", "--caption-channels", 32], 120, False, 1),
    (["--model", "pixart-sigma-512", "--caption-channels", 32], 300, True, 0),
    (["--max-length", 16], 16, False, 2),
])
def test_equals_the_pipelines_encode_prompt(folders, prompts_file, tmp_path, capsys, flags, length, sigma, cut):
    out = tmp_path / "embeds.npz"
    err = run(["--text-encoder", folders["pipe"], "--prompts", prompts_file, "-o", out, "--batch-size", 4, "--quiet",
               *flags], capsys)
    warnings = [line for line in err.splitlines() if line.strip()]
    if cut:
        assert len(warnings) == 1 and warnings[0].startswith(f"warning: {cut} of {len(PROMPTS)} prompts"), err
    else:
        assert warnings == [], err
    got = load_prompt_embeds(out)
    embeds, mask, negative, negative_mask = reference(folders["pipe"], PROMPTS, length, sigma)
    assert got["max_length"] == length and got["prompts"] == PROMPTS
    assert got["prompt_embeds"].shape == (len(PROMPTS), length, 32) and got["prompt_embeds"].dtype == np.float32
    assert np.abs(got["prompt_embeds"] - embeds).max() <= 1e-6
    assert np.array_equal(got["prompt_mask"], mask) and got["prompt_mask"].dtype == np.int64
    assert np.allclose(negative, negative[:1], atol=0, rtol=0)  # the pipeline repeats one negative per prompt
    assert np.abs(got["negative_embeds"] - negative[:1]).max() <= 1e-6
    assert np.array_equal(got["negative_mask"], negative_mask[:1])
    assert got["negative_mask"].sum() == 1  # "" is </s> alone
    # the short prompt pads, the long one fills every position (its last token </s>)
    assert mask[5].sum() == 2 and mask[2].sum() == min(length, 201)
    # the file is what np.savez would write: plain arrays only
    with np.load(out, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(KEYS)
        assert z["max_length"].shape == () and z["max_length"].dtype == np.int64 and z["prompts"].dtype.kind == "U"


@pytest.mark.parametrize("layout", ["one", "text_encoder", "bin"])
def test_layouts_give_the_same_embeddings(folders, prompts_file, tmp_path, capsys, layout):
    """The pipeline folder, its text_encoder/ (tokenizer found in ../tokenizer), one folder holding
    both, and a plain pickle's weights all encode the same."""
    argv = ["--prompts", prompts_file, "--max-length", 16, "--quiet"]
    run(["--text-encoder", folders["pipe"], "-o", tmp_path / "a.npz", *argv], capsys)
    where = folders["pipe"] / "text_encoder" if layout == "text_encoder" else folders[layout]
    run(["--text-encoder", where, "-o", tmp_path / "b.npz", *argv], capsys)
    a, b = load_prompt_embeds(tmp_path / "a.npz"), load_prompt_embeds(tmp_path / "b.npz")
    for key in ("prompt_embeds", "prompt_mask", "negative_embeds", "negative_mask"):
        assert np.array_equal(a[key], b[key]), key


def test_json_prompts_negative_prompt_and_dtype(folders, tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["a red chair", "Dog"]), encoding="utf-8")
    err = run(["--text-encoder", folders["pipe"], "--prompts", path, "-o", tmp_path / "e.npz", "--max-length", 8,
               "--negative-prompt", "a blue sky", "--batch-size", 1], capsys)
    assert err.strip().splitlines()[-1].startswith("wrote ")
    got = load_prompt_embeds(tmp_path / "e.npz")
    assert got["prompts"] == ["a red chair", "Dog"] and got["negative_mask"].sum() == 4  # ▁a ▁blue ▁sky </s>
    run(["--text-encoder", folders["pipe"], "--prompts", path, "-o", tmp_path / "h.npz", "--max-length", 8,
         "--negative-prompt", "a blue sky", "--dtype", "bfloat16", "--quiet"], capsys)
    half = load_prompt_embeds(tmp_path / "h.npz")
    assert half["prompt_embeds"].dtype == np.float32
    assert np.abs(half["prompt_embeds"] - got["prompt_embeds"]).max() < 0.1


def test_reader_imports_no_torch():
    code = "import sys, schedules.prompts; print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


# --- (2) load_prompt_embeds: round trip and refusals ------------------------------------------------------

def valid(n=2, length=6, d=4):
    rng = np.random.default_rng(0)
    mask = np.zeros((n, length), np.int64)
    mask[:, :3] = 1
    return dict(prompt_embeds=rng.standard_normal((n, length, d)).astype(np.float32), prompt_mask=mask,
                negative_embeds=rng.standard_normal((1, length, d)).astype(np.float32),
                negative_mask=np.eye(1, length, dtype=np.int64), prompts=np.array(["a cat", "a dog"][:n]),
                max_length=np.array(length, np.int64))


def test_round_trip(tmp_path):
    arrays = valid()
    np.savez(tmp_path / "e.npz", **arrays)
    got = load_prompt_embeds(tmp_path / "e.npz")
    assert sorted(got) == sorted(KEYS)
    for key in ("prompt_embeds", "prompt_mask", "negative_embeds", "negative_mask"):
        assert np.array_equal(got[key], arrays[key]) and got[key].dtype == arrays[key].dtype
    assert got["prompts"] == ["a cat", "a dog"] and got["max_length"] == 6
    # other integer mask types (bool, int32) and big-endian float32 are read and normalised
    np.savez(tmp_path / "f.npz", **{**arrays, "prompt_mask": arrays["prompt_mask"].astype(bool),
                                   "prompt_embeds": arrays["prompt_embeds"].astype(">f4")})
    got = load_prompt_embeds(tmp_path / "f.npz")
    assert got["prompt_mask"].dtype == np.int64 and got["prompt_embeds"].dtype == np.float32
    assert np.array_equal(got["prompt_embeds"], arrays["prompt_embeds"])


def _bad(arrays, **changes):
    return {k: v for k, v in {**arrays, **changes}.items() if v is not None}


@pytest.mark.parametrize("change, message", [
    (dict(prompt_embeds=valid()["prompt_embeds"].astype(np.float64)), "prompt_embeds must be float32"),
    (dict(prompt_mask=valid()["prompt_mask"].astype(np.float32)), "prompt_mask must be integers"),
    (dict(prompt_mask=np.ones((3, 6), np.int64)), "prompt_mask has shape (3, 6), expected (2, 6)"),
    (dict(negative_embeds=np.zeros((1, 5, 4), np.float32)), "negative_embeds has shape (1, 5, 4)"),
    (dict(negative_embeds=np.zeros((2, 6, 4), np.float32)), "negative_embeds has shape (2, 6, 4)"),
    (dict(prompts=np.array(["one"])), "prompts has shape (1,)"),
    (dict(prompts=np.array([1, 2])), "prompts must be a unicode array"),
    (dict(prompt_embeds=np.zeros((2, 6), np.float32)), "must be (N, L, D)"),
    (dict(max_length=np.array(7)), "max_length is 7 but the embeddings have 6 tokens"),
    (dict(max_length=np.array(6.0)), "max_length must be an integer"),
    (dict(prompt_mask=np.full((2, 6), 2, np.int64)), "only 0 and 1, found 2"),
    (dict(negative_mask=np.zeros((1, 6), np.int64)), "row 0 of the mask has no token"),
    (dict(prompt_mask=np.array([[1] * 6, [0] * 6])), "row 1 of the mask has no token"),
    (dict(prompt_embeds=np.where(np.arange(48).reshape(2, 6, 4) == 30, np.nan, 1).astype(np.float32)),
     "row 1 is not finite"),
    (dict(negative_embeds=np.full((1, 6, 4), np.inf, np.float32)), "negative_embeds: row 0 is not finite"),
    (dict(negative_mask=None), "has no 'negative_mask' array"),
    (dict(prompts=np.array(["a", {"pickled": "object"}], dtype=object)), "object array (a pickle): refused"),
])
def test_reader_refuses(tmp_path, change, message):
    np.savez(tmp_path / "e.npz", **_bad(valid(), **change))  # np.savez pickles object arrays by default
    with pytest.raises(BlockcacheError, match=None) as info:
        load_prompt_embeds(tmp_path / "e.npz")
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_reader_refuses_files(tmp_path):
    np.savez(tmp_path / "e.npz", **valid())
    data = (tmp_path / "e.npz").read_bytes()
    cases = {"missing.npz": None, "cut.npz": data[: len(data) // 2], "plain.npy": b"\x93NUMPY junk", "dir": "dir"}
    for name, content in cases.items():
        path = tmp_path / name
        if content == "dir":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        with pytest.raises(BlockcacheError) as info:
            load_prompt_embeds(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    # a header that claims more data than the member holds: refused before allocating it
    import zipfile

    with zipfile.ZipFile(tmp_path / "liar.npz", "w") as z:
        for key, array in valid().items():
            with z.open(key + ".npy", "w") as f:
                if key == "prompt_embeds":
                    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                             "shape": (10_000, 60_000, 4096)})
                else:
                    np.lib.format.write_array(f, array)
    with pytest.raises(BlockcacheError, match="truncated or corrupted"):
        load_prompt_embeds(tmp_path / "liar.npz")


def test_check_prompt_embeds_in_memory():
    arrays = valid()
    embeds, mask = check_prompt_embeds(arrays["prompt_embeds"], arrays["prompt_mask"].astype(np.int32))
    assert mask.dtype == np.int64 and embeds is arrays["prompt_embeds"]
    with pytest.raises(BlockcacheError, match="mask has shape"):
        check_prompt_embeds(arrays["prompt_embeds"], arrays["prompt_mask"][:, :3])


def test_read_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfa cat\r\n\r\n  \n a dog \n")  # BOM, CRLF, blank lines skipped, text kept as is
    assert read_prompts(path) == ["a cat", " a dog "]
    (tmp_path / "p.json").write_text('["", "x\\ny"]')  # JSON: any strings, empty ones included
    assert read_prompts(tmp_path / "p.json") == ["", "x\ny"]


# --- (3) one-line errors ------------------------------------------------------------------------------------

@pytest.fixture()
def bad(tmp_path, folders):
    """Folders and files for the error cases, in tmp_path."""
    clip = tmp_path / "clip"
    shutil.copytree(folders["pipe"] / "tokenizer", clip)
    (clip / "config.json").write_text(json.dumps({"model_type": "clip_text_model", "hidden_size": 32}))
    lonely = tmp_path / "lonely" / "encoder"
    shutil.copytree(folders["pipe"] / "text_encoder", lonely)
    noweights = tmp_path / "noweights"
    shutil.copytree(folders["pipe"] / "tokenizer", noweights)
    shutil.copy(folders["pipe"] / "text_encoder" / "config.json", noweights)
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    return dict(clip=clip, lonely=lonely, noweights=noweights, pipeline=pipeline, prompts=prompts, tmp=tmp_path)


def base(folders, bad, **override):
    argv = {"--text-encoder": folders["pipe"], "--prompts": bad["prompts"], "-o": bad["tmp"] / "e.npz",
            "--max-length": 16, **override}
    return [x for k, v in argv.items() if v is not None for x in (k, v)]


@pytest.mark.parametrize("override, message", [
    ({"--text-encoder": "nope"}, "no such folder"),
    ({"--text-encoder": "prompts"}, "is a file"),
    ({"--text-encoder": "clip"}, "is a 'clip_text_model' model config, not a T5 encoder"),
    ({"--text-encoder": "lonely"}, "no tokenizer for the text encoder"),
    ({"--text-encoder": "noweights"}, "no weights in"),
    ({"--text-encoder": "pipeline"}, "the pipeline folder has no text_encoder/config.json"),
    ({"--prompts": "missing.txt"}, "prompts file not found"),
    ({"--prompts": ("empty.txt", b"\n  \n\n")}, "holds no prompts"),
    ({"--prompts": ("latin1.txt", b"caf\xe9 au lait\n")}, "is not UTF-8 text (byte 0xe9 at offset 3)"),
    ({"--prompts": ("d.json", b'{"a": 1}')}, "must hold a JSON list of strings, not a dict"),
    ({"--prompts": ("n.json", b'["a", 3]')}, "entry 1 is a int"),
    ({"--prompts": ("broken.json", b'["a", ')}, "is not valid JSON"),
    ({"--prompts": ("many.txt", b"cat\n" * (MAX_PROMPTS + 1))}, f"more than {MAX_PROMPTS}"),
    ({"--max-length": None, "--model": "pixart-alpha-512"}, "makes 32-wide embeddings, but pixart-alpha-512 takes "
                                                             "caption_channels 4096"),
    ({"--max-length": None}, "give --model NAME"),
    ({"--max-length": None, "--model": "dit-xl2"}, "is a dit model, which takes no prompt"),
    ({"--max-length": None, "--model": "pixart-omega"}, "unknown model 'pixart-omega'"),
    ({"--caption-channels": 32}, "--caption-channels needs --model"),
    ({"--max-length": 0}, "--max-length must be 1…65536, got 0"),
    ({"--batch-size": 0}, "--batch-size must be 1…4096"),
    ({"-o": "e.npy"}, "-o/--out must end in .npz"),
    ({"-o": "no/such/e.npz"}, "does not exist"),
    ({"--dtype": "int8"}, "invalid choice"),
])
def test_cli_errors(folders, bad, capsys, override, message):
    resolved = {}
    for flag, value in override.items():
        if isinstance(value, tuple):  # (name, bytes): a file made here
            (bad["tmp"] / value[0]).write_bytes(value[1])
            value = bad["tmp"] / value[0]
        elif isinstance(value, str) and flag in ("--text-encoder", "--prompts", "-o"):
            value = bad.get(value, bad["tmp"] / value)
        resolved[flag] = value
    line = cli_error(main, base(folders, bad, **resolved), capsys)
    assert message in line, line
    assert not (bad["tmp"] / "e.npz").exists()


def test_cuda_unavailable(folders, bad, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    assert "no CUDA device" in cli_error(main, base(folders, bad, **{"--device": "cuda"}), capsys)


def test_pickled_code_is_refused_not_run(folders, tmp_path, capsys):
    """A pytorch_model.bin that would call open() when unpickled: refused by weights_only, nothing runs."""
    evil = tmp_path / "evil"
    shutil.copytree(folders["bin"], evil)
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = torch.load(folders["bin"] / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": Payload()}, evil / "pytorch_model.bin")
    (tmp_path / "p.txt").write_text("a cat\n")
    line = cli_error(main, ["--text-encoder", evil, "--prompts", tmp_path / "p.txt", "-o", tmp_path / "e.npz",
                            "--max-length", 8], capsys)
    assert "refused the pickled weights" in line and "would import io.open" in line, line
    assert not marker.exists() and not (tmp_path / "e.npz").exists()


def test_incomplete_weights_are_refused(folders, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(folders["bin"], partial)
    state = torch.load(folders["bin"] / "pytorch_model.bin", weights_only=True)
    state.pop("encoder.block.0.layer.0.SelfAttention.q.weight")
    torch.save(state, partial / "pytorch_model.bin")
    (tmp_path / "p.txt").write_text("a cat\n")
    line = cli_error(main, ["--text-encoder", partial, "--prompts", tmp_path / "p.txt", "-o", tmp_path / "e.npz",
                            "--max-length", 8], capsys)
    assert "they would stay random" in line and "SelfAttention.q.weight" in line, line


def test_spiece_only_tokenizer(folders, prompts_file, tmp_path, capsys):
    """A tokenizer saved as spiece.model only (as PixArt's hub folders are) needs sentencepiece: without
    it one line says so; with it the embeddings are the pipeline's with that tokenizer."""
    import importlib.util
    import io

    folder = tmp_path / "spm"
    shutil.copytree(folders["pipe"] / "text_encoder", folder / "text_encoder")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": "<pad>", "model_max_length": 512}))
    argv = ["--text-encoder", folder, "-o", tmp_path / "s.npz", "--prompts", prompts_file, "--max-length", 16,
            "--quiet"]
    if importlib.util.find_spec("sentencepiece") is None:
        (folder / "tokenizer" / "spiece.model").write_bytes(b"not read: the package check comes first")
        line = cli_error(main, argv, capsys)
        assert "needs the sentencepiece package" in line
        return
    import sentencepiece

    model = io.BytesIO()  # a real unigram model, T5's special ids, no larger than the encoder's vocabulary
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4 + PROMPTS
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=40,
                                             model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                             hard_vocab_limit=False)
    (folder / "tokenizer" / "spiece.model").write_bytes(model.getvalue())
    run(argv, capsys)
    got = load_prompt_embeds(tmp_path / "s.npz")
    embeds, mask, negative, negative_mask = reference(folder, [p.strip() for p in PROMPTS if p.strip()], 16)
    assert np.array_equal(got["prompt_mask"], mask) and np.array_equal(got["prompt_embeds"], embeds)
    # the pipeline repeats its negative embedding per prompt; the file holds it once
    assert np.array_equal(got["negative_mask"], negative_mask[:1]) and np.array_equal(got["negative_embeds"], negative[:1])


# --- (4) a failed or interrupted run leaves no file -----------------------------------------------------------

@pytest.mark.parametrize("failure, rc", [(KeyboardInterrupt, 130), (Terminated, 143),
                                         (BlockcacheError("the embeddings are not finite"), 2)])
def test_failure_mid_write_leaves_no_file(folders, prompts_file, tmp_path, capsys, monkeypatch, failure, rc):
    real, calls = encode_prompts.encode, []

    def failing(*args, **kwargs):  # the negative prompt, then batch 1, then fail in batch 2
        calls.append(1)
        if len(calls) == 3:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(encode_prompts, "encode", failing)
    out = tmp_path / "embeds.npz"
    old = tmp_path / "old.npz"
    old.write_bytes(b"an older file")
    for target in (out, old):
        calls.clear()
        assert main([str(a) for a in ["--text-encoder", folders["pipe"], "--prompts", prompts_file, "-o", target,
                                      "--max-length", 16, "--batch-size", 2, "--quiet"]]) == rc
        assert len(calls) == 3
    capsys.readouterr()
    assert not out.exists() and old.read_bytes() == b"an older file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.npz"]  # no temporary file left either
