"""Temporaries: one naming scheme for every temporary file or folder geoseg creates, and failed writes.

Every temporary is named ``.geoseg-tmp-<pid>-<host>-<random>-<name>``: hidden,
recognisable, carrying the process id of its owner and a tag of its host, so
that a later run on the same host tells the temporaries of a run that was
killed (its process is gone) from those of a run still working, and removes
them (:func:`sweep`, with one warning). ``<name>`` is the name of the output
the temporary becomes (drivers infer the format from its extension). A
temporary is never nested: asked for a temporary of its own temporary, a writer
writes the temporary itself, and its owner publishes it (geoseg.publish).

A write to a temporary that fails (disk full, permissions changed, folder
removed) is turned into one :class:`~geoseg.errors.OutputError` that names the
output it was to become (:func:`write_errors`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from geoseg.errors import GeosegError, OutputError, file_error

log = logging.getLogger(__name__)

#: Start of the name of every temporary file or folder geoseg creates.
TEMP_PREFIX = ".geoseg-tmp-"
#: This host, as it appears in temporary names: process ids mean something on one host only.
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TEMP_NAME = re.compile(
    r"^\.geoseg-tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-(?P<tag>[0-9a-f]{8})-(?P<name>.+)$", re.S)
#: Longest file name (bytes) on common file systems, and the room kept for the sidecar
#: files drivers add to a name (``.aux.xml``, ``-journal``, ``-wal``).
MAX_NAME_BYTES = 255
SIDECAR_ROOM = 16
#: Free bytes under which a failed write is taken for a full disk.
LOW_SPACE_BYTES = 1 << 20
#: Errors of a failed write, and what the user can do about each.
_FIXES = {
    errno.ENOSPC: "free some space on that disk or choose another output folder",
    getattr(errno, "EDQUOT", -1): "free some space within your quota or choose another output folder",
    errno.EFBIG: "choose an output folder on a file system that takes larger files",
    errno.EROFS: "choose an output folder on a writable file system",
    errno.EACCES: "check the folder's permissions or choose another output folder",
    errno.EPERM: "check the folder's permissions or choose another output folder",
    errno.ENOENT: "check that the folder still exists (was it removed during the run?) or choose another one",
    errno.ENOTDIR: "check that the folder still exists (was it removed during the run?) or choose another one",
    errno.EIO: "check the disk, or choose another output folder",
}
#: Errors whose text alone tells the cause (GDAL, SQLite and PyTorch often drop the errno).
_TEXTS = (
    ("no space left on device", errno.ENOSPC), ("database or disk is full", errno.ENOSPC),
    ("disk quota exceeded", getattr(errno, "EDQUOT", errno.ENOSPC)), ("read-only file system", errno.EROFS),
    ("file too large", errno.EFBIG), ("permission denied", errno.EACCES),
)

#: Temporary path -> the output it becomes, for messages.
_finals: dict[str, Path] = {}
#: Folders already swept by this process.
_swept: set[str] = set()
_lock = threading.Lock()


# --- names ----------------------------------------------------------------------------------

def _new_name(name: str) -> str:
    prefix = f"{TEMP_PREFIX}{os.getpid()}-{HOST_TAG}-{secrets.token_hex(4)}-"
    room = MAX_NAME_BYTES - SIDECAR_ROOM - len(prefix)
    if len(os.fsencode(name)) > room:  # keep the extension: drivers infer the format from it
        stem, suffix = os.path.splitext(name)
        name = os.fsdecode(os.fsencode(stem)[: max(1, room - len(os.fsencode(suffix)))]).rstrip("\ufffd") + suffix
    return prefix + name


def temporary_path(final: str | os.PathLike[str]) -> Path:
    """A new temporary name beside ``final`` (the file is not created: drivers create it).

    The name ends with ``final``'s name, so that drivers infer the format from
    the extension. A ``final`` that is already a temporary of this process is
    returned as it is: temporaries are never nested.
    """
    p = Path(final)
    if is_own_temporary(p):
        return p
    tmp = p.parent / _new_name(p.name)
    with _lock:
        _finals[os.fspath(tmp)] = p
    return tmp


def is_temporary(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is named as a geoseg temporary (of any process)."""
    return _TEMP_NAME.match(Path(path).name) is not None


def is_own_temporary(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a temporary of this very process."""
    m = _TEMP_NAME.match(Path(path).name)
    return m is not None and int(m["pid"]) == os.getpid() and m["host"] == HOST_TAG


def output_of(path: str | os.PathLike[str]) -> Path:
    """The output a temporary becomes (``path`` itself when it is not a temporary of this process)."""
    return _finals.get(os.fspath(path), Path(path))


def make_temporary_folder(base: Path, name: str, *, output: str | os.PathLike[str] | None = None) -> Path:
    """Create a temporary folder in ``base`` (after sweeping ``base``), readable by its owner only.

    A failed write in it names ``output`` (the output its files become), else ``base``.
    """
    sweep(base)
    while True:
        path = base / _new_name(name)
        try:
            path.mkdir(mode=0o700)
            break
        except FileExistsError:  # 32 random bits met an old name: draw again
            continue
    if output is not None:
        with _lock:
            _finals[os.fspath(path)] = Path(output)
    return path


@contextlib.contextmanager
def temporary_folder(parent: str | os.PathLike[str] | None = None, *, name: str = "scratch") -> Iterator[Path]:
    """A hidden scratch folder in ``parent`` (default: the system's), removed with its contents on exit.

    A failed write in it becomes one :class:`OutputError` that names ``parent``.
    """
    path = make_temporary_folder(Path(parent) if parent is not None else Path(tempfile.gettempdir()), name)
    try:
        yield path
    except Exception as exc:
        # Claimed only when the error names the folder or its disk is full, missing or read-only:
        # a failed write of an output elsewhere passes on to that output's publication.
        error = failed_write([path], exc, alone=False)
        if error is None:
            raise
        raise error from None
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_temporary(tmp: Path) -> None:
    """Remove a temporary file or folder and what drivers made beside it (``.aux.xml``, ``-journal``)."""
    for leftover in (tmp, *tmp.parent.glob(glob.escape(tmp.name) + "*")):
        _remove(leftover)
    forget(tmp)


def forget(tmp: Path) -> None:
    """Drop a temporary that was published or removed from the names used in messages."""
    with _lock:
        _finals.pop(os.fspath(tmp), None)


# --- temporaries of killed runs ---------------------------------------------------------------

def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (when unsure: yes)."""
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale(folder: str | os.PathLike[str]) -> list[tuple[int, Path, bool]]:
    """Remove the temporaries in ``folder`` whose owner process no longer exists on this host.

    Returns:
        (owner pid, path, whether it was a folder) of each removed temporary.
    """
    removed: list[tuple[int, Path, bool]] = []
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m is None or m["host"] != HOST_TAG:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        path = Path(entry.path)
        is_folder = entry.is_dir(follow_symlinks=False)
        _remove(path)
        if not os.path.lexists(path):
            removed.append((pid, path, is_folder))
    return removed


def sweep(folder: str | os.PathLike[str]) -> None:
    """Once per folder and process: remove the temporaries of killed runs there, with one warning."""
    key = os.path.realpath(folder)
    with _lock:
        if key in _swept:
            return
        _swept.add(key)
    removed = remove_stale(folder)
    if not removed:
        return
    folders = sum(1 for _, _, is_folder in removed if is_folder)
    files = len(removed) - folders
    what = " and ".join(f"{n} temporary {noun}{'s' if n != 1 else ''}"
                        for n, noun in ((files, "file"), (folders, "folder")) if n)
    pids = sorted({pid for pid, _, _ in removed})
    where = os.fspath(folder)
    where = "the current folder" if where in ("", ".") else where
    log.warning("removed %s left in %s by an earlier run that was killed (pid%s %s)", what, where,
                "s" if len(pids) > 1 else "", ", ".join(map(str, pids)))


# --- write errors -----------------------------------------------------------------------------

def _errno_of(exc: BaseException) -> int | None:
    """The errno of a failed write, from the exception, its causes, or their text."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and not isinstance(current, GeosegError) and current.errno in _FIXES:
            return current.errno
        text = str(current).lower()
        for needle, code in _TEXTS:
            if needle in text:
                return code
        current = current.__cause__ or current.__context__
    return None


def _folder_state(folder: Path) -> int | None:
    """Why nothing can be written in ``folder`` now: missing, not writable or full (None: it looks fine)."""
    if not folder.is_dir():
        return errno.ENOENT
    if not os.access(folder, os.W_OK | os.X_OK):
        return errno.EACCES
    try:
        if shutil.disk_usage(folder).free < LOW_SPACE_BYTES:
            return errno.ENOSPC
    except OSError:
        return None
    return None


def write_failure(exc: BaseException, path: str | os.PathLike[str]) -> int | None:
    """The errno that explains ``exc`` as a failed write of ``path``, or None when it is not one.

    Taken from the exception (or the causes and text of GDAL, pyogrio, SQLite and
    PyTorch errors, which often lose the errno), and otherwise from the state of
    the folder: removed, not writable, or with (almost) no space left. A missing
    file or a refused permission counts only where the folder confirms it, so
    that an unrelated error is never blamed on the output.
    """
    if isinstance(exc, GeosegError) or not isinstance(exc, Exception):
        return None
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    state = _folder_state(folder)
    code = _errno_of(exc)
    if code in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM):
        named = getattr(exc, "filename", None)
        mine = named is not None and os.path.dirname(os.path.abspath(os.fsdecode(named))) == os.path.abspath(folder)
        return code if (state in (errno.ENOENT, errno.EACCES) or mine) else None
    return code if code is not None else state


def write_error(exc: BaseException, path: str | os.PathLike[str]) -> OutputError | None:
    """The one-line OutputError for ``exc`` raised while writing ``path`` (None: not a write failure).

    ``path`` may be a temporary, or a temporary folder or a file in one: the message
    names the output it becomes, else the folder that holds the temporary folder.
    """
    code = write_failure(exc, path)
    if code is None:
        return None
    reason = os.strerror(code).lower()
    fix = _FIXES.get(code, "choose another output folder")
    target = Path(path)
    for holder in (target, *target.parents):
        if os.fspath(holder) in _finals:
            return file_error(OutputError, _finals[os.fspath(holder)], f"cannot be written ({reason})", fix)
        if is_temporary(holder):  # a scratch folder, or a file in one: name the folder that holds it
            return file_error(OutputError, holder.parent, f"temporary files cannot be written there ({reason})",
                              fix)
    return file_error(OutputError, target, f"cannot be written ({reason})", fix)


@contextlib.contextmanager
def write_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a failed write of ``path`` inside the block into one OutputError naming the output."""
    try:
        yield
    except Exception as exc:
        error = write_error(exc, path)
        if error is None:
            raise
        raise error from None


def failed_write(temporaries: list[Path], exc: BaseException, *, alone: bool = True) -> OutputError | None:
    """The one-line error of a failed write to one of ``temporaries`` (files or folders), naming its output.

    The temporary the error names; else the only one (when ``alone``: nothing else is
    written in the block); else the first whose folder is missing, not writable or
    full. None when the error is not a failed write.
    """
    if not temporaries:
        return None
    text = str(exc)
    named = os.fsdecode(getattr(exc, "filename", None) or "")
    mentioned = [t for t in temporaries if t.name in text or t.name in named]
    for tmp in mentioned or temporaries:
        error = write_error(exc, tmp)
        if error is not None and (mentioned or (alone and len(temporaries) == 1)
                                  or _folder_state(tmp if tmp.is_dir() else tmp.parent) is not None):
            return error
    return None
