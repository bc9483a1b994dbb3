"""Writing files so that a reader sees the old version or the new one, never half of one (torch-free)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lmtool.errors import LmtoolError

_UMASK = os.umask(0o022)
os.umask(_UMASK)
# The temporary file is named after its target, cut short: a 250-character file name plus the temporary's
# additions would exceed the 255-byte limit of most file systems.
_NAME_CHARS = 64


def temporary_beside(path: Path) -> tuple[int, str]:
    """A new, empty temporary file in `path`'s directory (where a rename onto `path` is atomic): (fd, name)."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:_NAME_CHARS]}.", suffix=".tmp")


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    path = Path(path)
    try:
        fd, tmp = temporary_beside(path)
    except OSError as err:
        raise write_failed(path, err) from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run's files should be as readable as any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_failed(path, err) from None
        raise
    _fsync_dir(path.parent)


def can_write_beside(path: Path) -> OSError | None:
    """Try what atomic_write will do first, without writing anything: None if a temporary file could be made
    beside `path`, else the error. A permission check says yes to root, yet /sys or a read-only mount refuse."""
    try:
        fd, tmp = temporary_beside(path)
    except OSError as err:
        return err
    try:
        os.close(fd)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return None


def write_failed(path: Path, err: OSError) -> LmtoolError:
    kept = "; the previous version is intact" if path.exists() else ""
    return LmtoolError(f"cannot write {path}: {err.strerror or err}{kept}", exit_code=1)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
