"""Checks on the user's input files that need no torch, so that the commands can make them before importing it
(seconds): a mistyped path is reported at once."""

from __future__ import annotations

import os
from pathlib import Path

from lmtool.errors import LmtoolError


def check_readable_file(path: Path, what: str) -> None:
    """A clear error unless `path` is a file this process may read; `what` names it ("training", "test"...)."""
    path = Path(path)
    if not path.exists():
        raise LmtoolError(f"{what} file not found: {path}")
    if path.is_dir():
        raise LmtoolError(f"{what} path is a directory, not a text file: {path}")
    if not os.access(path, os.R_OK):
        raise LmtoolError(f"cannot read {what} file {path}: permission denied")
