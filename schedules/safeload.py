"""Reading torch pickles (checkpoints, router files) without running code they may carry.

`torch.load(weights_only=True)` only rebuilds tensors and plain containers; `argparse.Namespace`
is allowed as well because DiT's and L2C's training checkpoints store their arguments in one.
Anything else is refused with one line naming what the pickle tried to import: the pickle's opcodes
are read (`pickletools`, which runs nothing) to find its imports, whichever protocol wrote it.
"""

from __future__ import annotations

import os
import re
import warnings

from .errors import BlockcacheError, one_line

_BOILERPLATE = ("Weights only load failed", "Check the documentation", "In PyTorch 2.6", "Re-running", "(1)", "(2)")
# Imports a plain checkpoint makes (tensor rebuilding and containers); any other one is named.
_PLAIN = ("torch.", "collections.OrderedDict", "argparse.Namespace", "_codecs.encode")


def safe_torch_load(path, what: str = "checkpoint"):
    import argparse
    import pickle
    import zipfile

    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BlockcacheError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it reads anyway
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"GLOBAL (\S+)", text)
        imported = found.group(1) if found else next(iter(foreign_imports(path)), None)
        if imported:
            raise BlockcacheError(f"{path}: refused, the pickle would import {imported} "
                                  "(only tensors and plain containers are loaded)") from None
        detail = " ".join(line for line in text.splitlines() if line.strip() and not line.startswith(_BOILERPLATE))
        raise BlockcacheError(f"{path}: refused, not a plain {what} ({one_line(detail)[:200]})") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError,
            KeyError, IndexError, UnicodeDecodeError) as e:
        raise BlockcacheError(f"{path}: truncated or corrupted {what} ({one_line(e)[:200]})") from None


def foreign_imports(path: str) -> list[str]:
    """The `module.name` globals a pickle file (raw, or torch's zip layout) imports beyond a plain
    checkpoint's, read from its opcodes without unpickling; [] where it cannot be read."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = b"".join(z.read(n) for n in z.namelist() if n.endswith(".pkl"))
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, zipfile.BadZipFile):
        return []
    found, pushed, memo = [], [], []  # pushed: the values pushed so far, as far as names go
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
                found.append(f"{pushed[-2]}.{pushed[-1]}")
            elif op.name == "MEMOIZE":
                memo.append(pushed[-1] if pushed else None)
            elif op.name in ("BINGET", "LONG_BINGET") and isinstance(arg, int) and arg < len(memo):
                pushed.append(memo[arg])
            elif isinstance(arg, str):
                pushed.append(arg)
    except Exception:  # a damaged pickle: report what was read before the damage
        pass
    return [name for name in found if not name.startswith(_PLAIN)]
