"""Writing output files atomically: a reader never sees a half-written file, and a failed write
leaves an existing file untouched."""

from __future__ import annotations

import contextlib
import os
import tempfile

from .errors import BlockcacheError


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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        raise BlockcacheError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
