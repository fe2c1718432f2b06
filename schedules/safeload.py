"""Reading torch pickles (checkpoints, router files) without running code they may carry.

`torch.load(weights_only=True)` only rebuilds tensors and plain containers; `argparse.Namespace`
is allowed as well because DiT's and L2C's training checkpoints store their arguments in one.
Anything else is refused with one line naming what the pickle tried to import.
"""

from __future__ import annotations

import os
import re

from .errors import BlockcacheError, one_line

_BOILERPLATE = ("Weights only load failed", "Check the documentation", "In PyTorch 2.6", "Re-running", "(1)", "(2)")


def safe_torch_load(path, what: str = "checkpoint"):
    import argparse
    import pickle
    import zipfile

    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BlockcacheError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"GLOBAL (\S+)", text)
        if found:
            raise BlockcacheError(f"{path}: refused, the pickle would import {found.group(1)} "
                                  "(only tensors and plain containers are loaded)") from None
        detail = " ".join(line for line in text.splitlines() if line.strip() and not line.startswith(_BOILERPLATE))
        raise BlockcacheError(f"{path}: refused, not a plain {what} ({one_line(detail)[:200]})") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError,
            KeyError, IndexError, UnicodeDecodeError) as e:
        raise BlockcacheError(f"{path}: truncated or corrupted {what} ({one_line(e)[:200]})") from None
