"""Writing a plan folder: the manifest writer, and the staging folder that replaces a plan atomically.

- `write_manifest` validates the manifest with the runtime's own parser, seals it and writes it by
  rename: a reader sees the old manifest or the new one.
- `staging(out_dir)` gives a fresh folder beside `out_dir`; only when the block succeeds does it
  replace `out_dir`, by an atomic exchange of the two folders (Linux `renameat2(RENAME_EXCHANGE)`), so
  `out_dir` is never missing, and the old plan is removed afterwards. Where the exchange is not
  available, two renames are used and an export that dies between them leaves the old plan under a
  `.old-` name beside `out_dir`, which the next export restores before it starts.
- Staging and old folders carry the exporting process's id; the next export removes those whose
  process is gone (killed exports leave nothing behind for long), and SIGTERM is turned into an
  exception by the CLIs, so a terminated export removes its own.
- Folders and files are created with the user's umask (a serving account can read the plan).
- `check_destination` refuses to replace anything but an empty folder or a folder whose manifest is a
  blockcache plan's; `upgrade_plan` seals a version-1 plan after checking it in full.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import tempfile

from schedules.errors import BlockcacheError, ParameterError
from schedules.files import current_umask

from . import names
from .files import file_entry, parse_and_verify, read_document
from .manifest import Plan, manifest_seal

RENAME_EXCHANGE = 2  # linux/fs.h


def write_manifest(plan_dir: str, document: dict, added: list[str] | None = None) -> dict:
    """Validate `document`, seal it and write it as the manifest of `plan_dir` (by rename, so a reader
    sees the old manifest or the new one); returns the document written. Its `files` are every file of
    a freshly written `plan_dir`, each checksummed; with `added`, the document's own `files` plus those."""
    document = {k: v for k, v in document.items() if k != "seal"}
    document["version"] = names.VERSION
    if added is None:
        listed = sorted(name for name in os.listdir(plan_dir) if name != names.MANIFEST and not name.startswith("."))
        document["files"] = {name: file_entry(os.path.join(plan_dir, name)) for name in listed}
    else:
        document["files"] = {**document["files"], **{name: file_entry(os.path.join(plan_dir, name)) for name in added}}
    Plan.parse(document, plan_dir)  # the writer never writes a manifest the runtime would refuse
    document["seal"] = manifest_seal(document)
    fd, tmp = tempfile.mkstemp(dir=plan_dir, prefix=".manifest-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=1, allow_nan=False)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, os.path.join(plan_dir, names.MANIFEST))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return document


def upgrade_plan(plan_dir: str) -> dict:
    """Seal a version-1 plan in place, after checking everything but the seal it lacks: the manifest's
    consistency, every file's checksum, every graph against the manifest. Returns the new manifest.
    Whoever upgrades vouches that the manifest was not edited since its export."""
    document = read_document(plan_dir)
    if not isinstance(document, dict) or isinstance(document.get("version"), bool) or document.get("version") != 1:
        raise BlockcacheError(f"{plan_dir}: only version-1 plans are upgraded (this one says "
                              f"{document.get('version') if isinstance(document, dict) else document!r})")
    parse_and_verify(document, os.fspath(plan_dir))
    return write_manifest(plan_dir, document, added=[])


def check_destination(out_dir: str) -> None:
    """Refuse to replace a folder that is not a plan: the user's other files are never deleted."""
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise ParameterError("out_dir", f"{{name}} must be a folder path, not {out_dir!r}")
    if os.path.lexists(out_dir):
        if os.path.islink(out_dir) or not os.path.isdir(out_dir):
            raise ParameterError("out_dir", f"{{name}} {out_dir} exists and is not a folder")
        if os.listdir(out_dir) and not is_plan(out_dir):
            raise ParameterError("out_dir", f"{{name}} {out_dir} is a non-empty folder that is not a plan (its "
                                 "plan.json, if any, is no blockcache manifest); choose another")


def is_plan(folder: str) -> bool:
    """Whether `folder` holds a blockcache plan manifest (the only folders an export replaces)."""
    try:
        document = read_document(folder)
    except BlockcacheError:
        return False
    return isinstance(document, dict) and document.get("format") == names.FORMAT


@contextlib.contextmanager
def staging(out_dir: str):
    """A new folder beside `out_dir` to write a plan into. When the block ends without error the folder
    replaces `out_dir`; otherwise it is removed and `out_dir` stays as it was."""
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    recover(out_dir)
    check_destination(out_dir)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)  # mode 0o777 & ~umask, unlike mkdtemp's 0o700
    try:
        yield tmp
        publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(new: str, out_dir: str) -> None:
    """Put the finished folder `new` at `out_dir`; an existing `out_dir` is replaced atomically where the
    file system can exchange two folders, and removed only once the new one is in place."""
    if not os.path.lexists(out_dir):
        os.rename(new, out_dir)
        return
    if _exchange(new, out_dir):  # `new` now holds the old plan
        shutil.rmtree(new, ignore_errors=True)
        return
    parent, base = os.path.split(out_dir)
    old = os.path.join(parent, f".{base}.old-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(out_dir, old)
        os.rename(new, out_dir)
    except BaseException:  # an error or a signal between the renames: the old plan goes back
        if os.path.lexists(old) and not os.path.lexists(out_dir):
            os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def recover(out_dir: str) -> None:
    """Undo what a killed export left beside `out_dir`: restore a plan moved aside by an interrupted
    two-rename swap, and remove the staging and old folders of exports whose process is gone."""
    parent, base = os.path.split(os.path.abspath(out_dir))
    pattern = re.compile(rf"^\.{re.escape(base)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    for entry in sorted(os.listdir(parent)):
        match = pattern.match(entry)
        if not match or _alive(int(match.group(2))):
            continue
        path = os.path.join(parent, entry)
        if match.group(1) == "old" and not os.path.lexists(out_dir):
            os.rename(path, out_dir)  # the swap died between its two renames: the old plan comes back
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or file system without the exchange
        return False
    raise OSError(err, os.strerror(err), b)

