"""Read the user's text safely, without torch: checked paths, UTF-8 without NUL bytes, in bounded memory.

Without torch, the commands can read and check their input before importing it (seconds): a mistyped path or
a binary file is reported at once."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from lmtool.errors import LmtoolError


def check_readable_file(path: Path, what: str) -> None:
    """A clear error unless `path` is a file this process may read; `what` names it ("training", "test"...)."""
    if str(path) == "":  # Path("") would be the current directory
        raise LmtoolError(f"the {what} file name is empty; give the path of a text file")
    path = Path(path)
    if not path.exists():
        if path.is_symlink():  # the link is there; where it leads is not
            raise LmtoolError(f"{what} file {path} is a symbolic link that leads nowhere (its target is missing, or "
                              "it leads back to itself); give the text file itself")
        raise LmtoolError(f"{what} file not found: {path}")
    if path.is_dir():
        raise LmtoolError(f"{what} path is a directory, not a text file: {path}")
    if not path.is_file():  # a named pipe or a device: read more than once, a pipe would hang or come back empty
        raise LmtoolError(f"{what} path {path} is not a regular file (a pipe or a device?); save the text to a file "
                          "first" + (", or pipe it to 'lmtool score --file -'" if what == "sentence" else ""))
    if not os.access(path, os.R_OK):
        raise LmtoolError(f"cannot read {what} file {path}: permission denied")


CHUNK_BYTES = 1 << 22  # text is read, checked and encoded 4 MB at a time


def iter_text_chunks(path: Path | str, what: str = "text", chunk_bytes: int | None = None) -> Iterator[str]:
    """A UTF-8 file as pieces of whole lines, each ending in '\n' ('\r\n' normalised), checked as it is read.

    Memory stays bounded by the chunk size, whatever the size of the file (a single line is one piece).
    """
    path = Path(path)
    check_readable_file(path, what)
    try:
        with open(path, "rb") as f:
            yield from checked_chunks(f, f"{what} file {path}", chunk_bytes)
    except PermissionError:
        raise LmtoolError(f"cannot read {what} file {path}: permission denied") from None
    except IsADirectoryError:
        raise LmtoolError(f"{what} path is a directory, not a text file: {path}") from None
    except OSError as err:
        raise LmtoolError(f"cannot read {what} file {path}: {err.strerror}") from None


def checked_chunks(f: BinaryIO, source: str, chunk_bytes: int | None = None) -> Iterator[str]:
    """`iter_text_chunks` on an open binary stream (a file, or standard input); `source` names it in errors.
    `chunk_bytes` defaults to CHUNK_BYTES as it is when reading starts."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    offset = read = 0  # bytes decoded, bytes read
    carry: list[bytes] = []  # the pieces after the last newline seen (one line may span many blocks)
    while True:
        block = f.read(chunk_bytes)
        nul = block.find(b"\x00")  # each block as it comes: a binary file may hold no newline at all
        if nul >= 0:
            raise LmtoolError(f"{source} looks binary (NUL byte at offset {read + nul}); give a plain UTF-8 text file")
        read += len(block)
        if block:
            cut = block.rfind(b"\n") + 1  # search the new block only: long lines stay linear
            if cut == 0:
                carry.append(block)
                continue
            raw = b"".join(carry) + block[:cut]
            carry = [block[cut:]]
        else:
            raw, carry = b"".join(carry), []
            if not raw:
                return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise LmtoolError(
                f"{source} is not UTF-8: undecodable byte 0x{raw[err.start]:02x} at offset "
                f"{offset + err.start}; convert it to UTF-8 (e.g. iconv -t utf-8)"
            ) from None
        if offset == 0:
            text = text.removeprefix("\ufeff")
        offset += len(raw)
        if "\r" in text:  # a one-character search is far cheaper than a replace that finds nothing
            text = text.replace("\r\n", "\n")
        yield text if text.endswith("\n") else text + "\n"


def read_text(path: Path | str, what: str = "corpus") -> str:
    """The whole UTF-8 text of a (small) file, checked as `iter_text_chunks` does."""
    text = "".join(iter_text_chunks(path, what))
    if not text.strip():
        raise empty_file(path, what)
    return text


def empty_file(path: Path | str, what: str) -> LmtoolError:
    """The error for a file with nothing but whitespace in it."""
    purpose = "to learn from" if what in ("training", "corpus") else "to score"
    return LmtoolError(f"{what} file {path} is empty (no text {purpose})")


def iter_lines(path: Path | str, what: str = "text") -> Iterator[str]:
    """Stream a UTF-8 file line by line (newlines removed) without holding it in memory."""
    yield from _lines(iter_text_chunks(path, what))


def _lines(chunks: Iterable[str]) -> Iterator[str]:
    """The lines of whole-line chunks, newlines removed."""
    for text in chunks:
        yield from text.split("\n")[:-1]


def stdin_lines() -> list[str]:
    """The lines of standard input, checked as a file's are."""
    if sys.stdin is None:
        raise LmtoolError("standard input is closed; pipe the text in, or give a file instead of -")
    try:
        return list(_lines(checked_chunks(sys.stdin.buffer, "standard input")))
    except OSError as err:
        raise LmtoolError(f"cannot read standard input: {err.strerror or err}") from None


def split_lines(text: str) -> list[str]:
    """Lines of a text without their newlines (a final newline does not make an extra empty line)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines
