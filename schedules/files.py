"""Writing output files atomically: a reader never sees a half-written file, and a failed write
leaves an existing file untouched."""

from __future__ import annotations

import contextlib
import os
import tempfile

from .errors import BlockcacheError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), so no other thread
    ever sees a umask of 0."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output(path: str, suffixes: tuple[str, ...], what: str) -> str:
    """Refuse, before minutes of work rather than after, an output `path` that cannot be written: a
    suffix not in `suffixes`, an existing folder, a folder that does not exist or cannot be written."""
    if not path.lower().endswith(suffixes):
        raise BlockcacheError(f"{what} must end in {' or '.join(suffixes)}, got {path!r}")
    if os.path.isdir(path):
        raise BlockcacheError(f"{what} {path} is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BlockcacheError(f"cannot write {path}: folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise BlockcacheError(f"cannot write {path}: {e.strerror or e}") from None
    return path


@contextlib.contextmanager
def atomic_output(path, suffix: str = ""):
    """Yield a temporary path beside `path` to write to; when the block ends without error it replaces
    `path` (with the usual permissions, not mkstemp's private ones), else it is removed. OS errors
    become one-line BlockcacheErrors."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise BlockcacheError(f"cannot write {path}: folder {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
        os.close(fd)
    except OSError as e:
        raise BlockcacheError(f"cannot write {path}: {e.strerror}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise BlockcacheError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
