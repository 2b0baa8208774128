"""Writing outputs so that a failure (full disk, I/O error, a crash) never leaves a half-written
model or results directory and never damages the previous one.

    with atomic_dir(out, overwrite=force, what="results directory") as tmp:
        ...write everything into tmp...
    # now `out` is the new directory; on any exception it is untouched and tmp is gone

The new content is written to a hidden sibling ``.NAME.tmp-XXXX`` (same filesystem, so the final
step is a rename). When ``out`` already exists (and ``overwrite``) it is first renamed to
``.NAME.old-PID``, the new directory is renamed into place, then the old one is removed; a failure
between the two renames puts the old one back. ``OSError`` (ENOSPC, EDQUOT, EIO, EROFS, ...) becomes
a :class:`~gaikan.errors.GaikanError` naming the path, the problem and that the previous content is
unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from gaikan.errors import GaikanError

_FRIENDLY = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EIO: "input/output error",
    errno.EFBIG: "file too large for the file system",
}


def describe_os_error(exc: OSError) -> str:
    """A one-line description of an OSError: its errno name and meaning, e.g. 'no space left on the
    device (ENOSPC)'."""
    code = exc.errno
    if code is None:
        return " ".join(str(exc).split()) or type(exc).__name__
    name = errno.errorcode.get(code, str(code))
    return f"{_FRIENDLY.get(code, os.strerror(code).lower())} ({name})"


def check_output_dir(path: Path, *, overwrite: bool, what: str) -> None:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GaikanError(f"{what} {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise GaikanError(f"{what} {path} already exists and is not empty; use --force to replace it")


@contextlib.contextmanager
def atomic_dir(path, *, overwrite: bool, what: str = "output directory") -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` when the block succeeds (see module doc)."""
    path = Path(path)
    check_output_dir(path, overwrite=overwrite, what=what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as exc:
        raise GaikanError(f"cannot write the {what} {path}: {describe_os_error(exc)}") from None
    previous = "the previous content is unchanged" if path.exists() else "nothing was written"
    try:
        try:
            yield tmp
            _swap_into_place(tmp, path)
        except OSError as exc:
            raise GaikanError(f"cannot write the {what} {path}: {describe_os_error(exc)}; {previous}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path, *, what: str = "file") -> Iterator[Path]:
    """Yield a temporary sibling path for one file that replaces ``path`` (one rename) when the
    block succeeds; an OSError (a full disk) becomes a GaikanError naming ``what`` and ``path``,
    the previous file (if any) untouched and the temporary file gone. The file gets the mode of
    an ordinary new file (the umask), not mkstemp's 0600."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise GaikanError(f"cannot write the {what} {path}: {describe_os_error(exc)}") from None
    tmp = Path(name)
    try:
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            yield tmp
            os.replace(tmp, path)
        except OSError as exc:
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            raise GaikanError(f"cannot write the {what} {path}: {describe_os_error(exc)}; {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _swap_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    if path.is_dir() and not any(path.iterdir()):
        os.rmdir(path)
        os.rename(tmp, path)
        return
    backup = path.with_name(f".{path.name}.old-{os.getpid()}")
    if backup.exists():
        shutil.rmtree(backup)
    os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(backup, path)  # put the previous one back
        raise
    shutil.rmtree(backup, ignore_errors=True)

