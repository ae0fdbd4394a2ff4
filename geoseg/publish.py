"""Outputs appear whole or not at all: published together, never replacing a file without ``overwrite``.

Outputs are written to temporaries (geoseg.temporaries) and published together
when the whole work succeeded (:class:`Publication`). Without ``overwrite``
each is moved into place with a move that refuses to replace a file
(``renameat2`` with ``RENAME_NOREPLACE`` on Linux, else a hard link, which
fails atomically when the name exists), so of two runs racing on one output
exactly one wins and the other fails with "already exists"; a failure part-way
takes back what the run had published. A failed write is one
:class:`~geoseg.errors.OutputError` that names the output.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

from geoseg.errors import OutputError, file_error
from geoseg.temporaries import (
    failed_write, is_own_temporary, make_temporary_folder, remove_temporary, sweep, temporary_path, write_error,
    write_errors,
)

#: Errors of ``os.link`` on file systems without hard links.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}
#: Errors of ``renameat2`` where the file system or kernel lacks RENAME_NOREPLACE.
_NO_RENAMEAT2 = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


# --- publishing -------------------------------------------------------------------------------

def exists_error(path: str | os.PathLike[str]) -> OutputError:
    """The refusal of an output that exists without ``--overwrite``."""
    return file_error(OutputError, path, "already exists", "pass --overwrite to replace it")


def check_output(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Refuse an output that exists (unless ``overwrite``) or cannot be written.

    Call this for every output before any work starts, so that a refused run
    writes nothing.

    Raises:
        OutputError: The file exists without overwrite, or its folder is not writable.
    """
    p = Path(path)
    if os.path.lexists(p) and not overwrite:
        raise exists_error(p)
    parent = p.parent if str(p.parent) else Path(".")
    probe = parent
    while not probe.exists():  # the folder will be created: check its nearest existing parent
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise file_error(
            OutputError, p, f"cannot be written (folder {probe} is not writable)",
            "choose another output folder",
        )
    return p


def move_no_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move ``src`` to ``dst`` unless ``dst`` exists, in one step no other process can get between.

    ``renameat2(RENAME_NOREPLACE)`` where the kernel and file system have it, else a
    hard link (which fails when the name exists) and the removal of ``src``. On a
    file system without hard links (FAT, some network shares) the existence check
    and the rename are two steps.

    Raises:
        FileExistsError: ``dst`` exists.
        OSError: The move failed otherwise.
    """
    s, d = os.fspath(src), os.fspath(dst)
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(s), _AT_FDCWD, os.fsencode(d), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), d)
        if code not in _NO_RENAMEAT2:
            raise OSError(code, os.strerror(code), s, None, d)
    try:
        os.link(s, d)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(d):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), d) from None
        os.rename(s, d)  # Windows refuses an existing dst itself
        return
    os.unlink(s)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first."""
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


class Publication:
    """Outputs written to temporaries and published all together, or not at all.

    Use it through :func:`publishing` (or call :meth:`commit` and :meth:`discard`):
    when the work ends normally every output is published; on an error, an
    interrupt or a failed publication, every temporary is removed, what this
    publication had already published is taken back, and folders it created are
    removed when empty.

    Without ``overwrite`` an output is published only where no file exists, by
    :func:`move_no_replace`; the run that loses a race fails with "already
    exists". With ``overwrite`` an existing file is replaced (``os.replace``) and
    kept aside (a hard link) until every output is in place, to be restored if a
    later one fails.
    """

    def __init__(self, *, overwrite: bool) -> None:
        self.overwrite = overwrite
        self._pending: list[tuple[Path, Path]] = []  # (temporary, output)
        self._folders: list[Path] = []  # temporary folders, removed when the publication ends
        self._created: list[Path] = []
        self.published: list[Path] = []

    def temporaries(self, start: tuple[int, int] = (0, 0)) -> list[Path]:
        """The temporary files and folders registered (from ``start``: counts of each, see :meth:`mark`)."""
        return [tmp for tmp, _ in self._pending[start[0]:]] + self._folders[start[1]:]

    def mark(self) -> tuple[int, int]:
        """How many temporary files and folders are registered now."""
        return len(self._pending), len(self._folders)

    def folder(self, parent: str | os.PathLike[str], *, name: str = "stage",
               output: str | os.PathLike[str] | None = None) -> Path:
        """A temporary folder in ``parent`` (created, with missing parents) for files to :meth:`adopt`.

        It is removed, with what is left in it, when the publication ends. Write
        errors in it name ``output`` (default: ``parent``).
        """
        base = Path(parent)
        self._created.extend(_make_folders(base))
        path = make_temporary_folder(base, name, output=output if output is not None else base)
        self._folders.append(path)
        return path

    @property
    def outputs(self) -> list[Path]:
        """The outputs registered so far."""
        return [final for _, final in self._pending]

    def file(self, path: str | os.PathLike[str]) -> Path:
        """Register output ``path``; return the temporary to write it to (not created).

        Creates the output's folder (removed again if the publication fails and it is empty)
        and removes the temporaries of killed runs there.

        Raises:
            OutputError: As :func:`check_output`.
        """
        if is_own_temporary(path):  # a temporary of an outer writer: that writer publishes it
            return Path(path)
        final = check_output(path, overwrite=self.overwrite)
        self._created.extend(_make_folders(final.parent))
        sweep(final.parent)
        tmp = temporary_path(final)
        self._pending.append((tmp, final))
        return tmp

    def adopt(self, tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
        """Register a finished file ``tmp`` (e.g. in a temporary folder) to be published as ``path``.

        Raises:
            OutputError: As :func:`check_output`.
        """
        final = check_output(path, overwrite=self.overwrite)
        self._created.extend(_make_folders(final.parent))
        self._pending.append((Path(tmp), final))
        return final

    def commit(self) -> None:
        """Publish every output (see the class); on any failure take back what was published.

        Raises:
            OutputError: An output exists without ``overwrite`` (another run published it
                first), or a move failed (the folder was removed, the disk is full, ...).
        """
        if not self.overwrite:  # refuse before moving anything, the common case of a lost race
            for _, final in self._pending:
                if os.path.lexists(final):
                    raise exists_error(final)
        done: list[tuple[Path, os.stat_result, Path | None]] = []  # (output, its stat, the old file kept aside)
        try:
            for tmp, final in self._pending:
                try:
                    st = os.stat(tmp)
                    if self.overwrite:
                        aside = self._keep_aside(final)
                        done.append((final, st, aside))
                        os.replace(tmp, final)
                    else:
                        move_no_replace(tmp, final)
                        done.append((final, st, None))
                except FileExistsError:
                    raise exists_error(final) from None
                except OSError as exc:
                    error = write_error(exc, final)
                    if error is None:
                        raise
                    raise error from None
        except BaseException:
            for final, st, aside in reversed(done):
                with contextlib.suppress(OSError):
                    if aside is not None:
                        os.replace(aside, final)
                    elif os.path.samestat(os.stat(final), st):  # ours, not a file another run put there
                        os.unlink(final)
            raise
        finally:
            for _, _, aside in done:
                if aside is not None:
                    remove_temporary(aside)
        self.published = [final for final, _, _ in done]
        for tmp, _ in self._pending:
            remove_temporary(tmp)
        self._pending = []
        self._remove_folders()

    def _keep_aside(self, final: Path) -> Path | None:
        """A hard link to the file ``final`` replaces, so that a failed publication can restore it."""
        if not os.path.isfile(final):
            return None
        aside = temporary_path(final)
        try:
            os.link(final, aside)
        except OSError:  # no hard links here: the old file cannot be restored
            return None
        return aside

    def failure(self, exc: BaseException) -> OutputError | None:
        """The one-line OutputError for ``exc`` when it is a failed write of one of these outputs.

        Ask before :meth:`discard`, while the temporaries still fill the disk.
        """
        return failed_write(self.temporaries(), exc)

    def _remove_folders(self) -> None:
        for folder in self._folders:
            remove_temporary(folder)
        self._folders = []

    def discard(self) -> None:
        """Remove every temporary, and the folders this publication created when they are empty."""
        for tmp, _ in self._pending:
            remove_temporary(tmp)
        self._pending = []
        self._remove_folders()
        for folder in sorted(self._created, key=lambda f: len(Path(os.path.abspath(f)).parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created = []


@contextlib.contextmanager
def publishing(*, overwrite: bool, into: Publication | None = None) -> Iterator[Publication]:
    """A :class:`Publication` committed when the block ends normally, discarded on any error.

    With ``into`` the block registers its outputs in that outer publication (whose
    ``overwrite`` holds), which publishes them with its own when it ends: several
    writers, one all-or-nothing run. Write failures inside the block become one
    OutputError naming the output.
    """
    if into is not None:
        start = into.mark()
        try:
            yield into
        except Exception as exc:
            error = failed_write(into.temporaries(start), exc)
            if error is None:
                raise
            raise error from None
        return
    pub = Publication(overwrite=overwrite)
    try:
        try:
            yield pub
        except Exception as exc:
            error = failed_write(pub.temporaries(), exc)
            if error is None:
                raise
            raise error from None
        pub.commit()
    except BaseException:
        pub.discard()
        raise


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, overwrite: bool, publication: Publication | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; publish it on success (see :class:`Publication`).

    The output appears at its final path only when complete; on any error the
    temporary is removed and an existing file at ``path`` is untouched. The
    temporary keeps the name's extension so that drivers infer the format. A
    ``path`` that is already a temporary of this process is yielded as it is (its
    owner publishes it). With ``publication`` the output is published with that
    publication's others.

    Raises:
        OutputError: As :func:`check_output`; the output exists when it is published
            (without ``overwrite``); or the write failed (disk full, ...).
    """
    if is_own_temporary(path):
        with write_errors(path):
            yield Path(path)
        return
    with publishing(overwrite=overwrite, into=publication) as pub:
        yield pub.file(path)
