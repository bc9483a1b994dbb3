"""Read corpora safely, split them, turn them into compact id streams, batchify, and cut BPTT windows."""

from __future__ import annotations

import hashlib
import os
import warnings
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from lmtool.errors import LmtoolError
from lmtool.tokenizer import EOS_ID, Tokenizer


def read_text(path: Path | str, what: str = "corpus") -> str:
    """The UTF-8 text of a file with '\\r\\n' line ends normalised; every failure is one clear message."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LmtoolError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise LmtoolError(f"{what} path is a directory, not a text file: {path}") from None
    except PermissionError:
        raise LmtoolError(f"cannot read {what} file {path}: permission denied") from None
    except OSError as err:
        raise LmtoolError(f"cannot read {what} file {path}: {err.strerror}") from None
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise LmtoolError(f"{what} file {path} looks binary (NUL byte at offset {nul}); give a plain UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LmtoolError(
            f"{what} file {path} is not UTF-8: undecodable byte 0x{raw[err.start]:02x} at offset {err.start}; "
            "convert it to UTF-8 (e.g. iconv -t utf-8)"
        ) from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if not text.strip():
        raise LmtoolError(f"{what} file {path} is empty (no text to learn from)")
    return text


def split_lines(text: str) -> list[str]:
    """Lines of a text without their newlines (a final newline does not make an extra empty line)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def hold_out_tail(lines: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split into (train, valid) with the last `fraction` of the lines, contiguous, held out."""
    if len(lines) < 2:
        raise LmtoolError(
            "the corpus has a single line, so no validation lines can be held out; give --valid FILE "
            "or a corpus with several lines"
        )
    n_valid = min(len(lines) - 1, max(1, round(len(lines) * fraction)))
    return lines[:-n_valid], lines[-n_valid:]


def encode_lines(tokenizer: Tokenizer, lines: Iterable[str]) -> torch.Tensor:
    """One id stream: <EOS> (the text starts at a line start), then each line followed by <EOS>.

    The leading <EOS> means every token of the text is scored, the first one from the sentence-start
    context, exactly as `score` does. int32 (4 bytes a token) keeps big corpora compact.
    """
    ids = array("i", [EOS_ID])
    for line in lines:
        ids.extend(tokenizer.encode_line(line))
    return torch.frombuffer(ids, dtype=torch.int32)  # (N + 1,)


def iter_lines(path: Path | str, what: str = "text") -> Iterator[str]:
    """Stream a UTF-8 file line by line (newlines removed) without holding it in memory."""
    path = Path(path)
    _check_readable_file(path, what)
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            nul = raw.find(b"\x00")
            if nul >= 0:
                raise LmtoolError(f"{what} file {path} looks binary (NUL byte at offset {offset + nul})")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise LmtoolError(
                    f"{what} file {path} is not UTF-8: undecodable byte 0x{raw[err.start]:02x} at offset "
                    f"{offset + err.start}; convert it to UTF-8 (e.g. iconv -t utf-8)"
                ) from None
            if offset == 0:
                line = line.removeprefix("\ufeff")
            offset += len(raw)
            yield line.rstrip("\n").removesuffix("\r")


def _check_readable_file(path: Path, what: str) -> None:
    if not path.exists():
        raise LmtoolError(f"{what} file not found: {path}")
    if path.is_dir():
        raise LmtoolError(f"{what} path is a directory, not a text file: {path}")
    if not os.access(path, os.R_OK):
        raise LmtoolError(f"cannot read {what} file {path}: permission denied")


def encode_file_to_disk(tokenizer: Tokenizer, path: Path, ids_path: Path, chunk_lines: int = 10_000) -> torch.Tensor:
    """Encode a file of any size into an int32 file and map it: memory stays bounded by the page cache."""
    count = 1
    with open(ids_path, "wb") as out:
        out.write(array("i", [EOS_ID]).tobytes())  # the text starts at a line start, as in encode_lines
        chunk: list[str] = []
        for line in iter_lines(path, "evaluation"):
            chunk.append(line)
            if len(chunk) >= chunk_lines:
                count += _write_ids(tokenizer, chunk, out)
                chunk = []
        count += _write_ids(tokenizer, chunk, out)
    if count == 1:
        raise LmtoolError(f"evaluation file {path} is empty (no text to score)")
    return torch.from_file(str(ids_path), shared=True, size=count, dtype=torch.int32)  # (N,), memory-mapped


def _write_ids(tokenizer: Tokenizer, lines: list[str], out) -> int:
    ids = array("i")
    for line in lines:
        ids.extend(tokenizer.encode_line(line))
    out.write(ids.tobytes())
    return len(ids)


def batchify(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a (N,) stream into `batch_size` contiguous rows (B, N // B); the last N % B tokens are dropped."""
    width = stream.numel() // batch_size
    return stream[: width * batch_size].view(batch_size, width)  # (B, N // B)


def windows(streams: torch.Tensor, bptt: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Successive (x, y) views of width <= bptt: y is x shifted one token ahead; nothing but the last column is unused."""
    width = streams.size(1)
    for i in range(start, width - 1, bptt):
        n = min(bptt, width - 1 - i)
        yield streams[:, i : i + n], streams[:, i + 1 : i + 1 + n]  # (B, T), (B, T)


def num_windows(streams: torch.Tensor, bptt: int) -> int:
    """How many windows `windows` yields."""
    return max(0, (streams.size(1) - 1 + bptt - 1) // bptt)


def fit_batch_size(num_tokens: int, batch_size: int, bptt: int, what: str) -> int:
    """The batch size to use for a stream: the asked one, or a smaller one (with a warning) for a short stream."""
    # Each stream needs at least two tokens (one input, one target).
    if num_tokens // batch_size >= 2:
        return batch_size
    smaller = num_tokens // 2
    if smaller < 1:
        raise LmtoolError(
            f"the {what} text has {num_tokens} token(s); at least 2 are needed "
            f"(and {batch_size * (bptt + 1)} to fill one batch of {batch_size} x {bptt}); give a longer text"
        )
    warnings.warn(
        f"the {what} text has only {num_tokens} tokens: using batch size {smaller} instead of {batch_size}",
        stacklevel=2,
    )
    return smaller


@dataclass(frozen=True)
class Corpus:
    """The tokenizer and the encoded splits of one training run."""

    tokenizer: Tokenizer
    train: torch.Tensor  # (N_train,) int32
    valid: torch.Tensor  # (N_valid,) int32
    test: torch.Tensor | None  # (N_test,) int32


def load_corpus(
    train_path: Path,
    valid_path: Path | None,
    test_path: Path | None,
    level: str,
    min_freq: int,
    max_size: int | None,
    lowercase: bool,
    unk_marker: str | None,
    valid_fraction: float,
    tokenizer: Tokenizer | None = None,
) -> Corpus:
    """Read the files, build the vocabulary from the training split only (unless given), and encode every split."""
    train_lines = split_lines(read_text(train_path, "training"))
    if valid_path is not None:
        valid_lines = split_lines(read_text(valid_path, "validation"))
    else:
        train_lines, valid_lines = hold_out_tail(train_lines, valid_fraction)
    test_lines = split_lines(read_text(test_path, "test")) if test_path is not None else None
    if tokenizer is None:
        tokenizer = Tokenizer.build(
            train_lines, level=level, min_freq=min_freq, max_size=max_size, lowercase=lowercase, unk_marker=unk_marker
        )
    return Corpus(
        tokenizer=tokenizer,
        train=encode_lines(tokenizer, train_lines),
        valid=encode_lines(tokenizer, valid_lines),
        test=encode_lines(tokenizer, test_lines) if test_lines is not None else None,
    )


def file_digest(path: Path | str) -> str:
    """SHA-256 of a file's bytes, read in blocks (so a resumed run can tell that its corpus is unchanged)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
