"""Read corpora safely, split them, turn them into compact id streams, batchify, and cut BPTT windows."""

from __future__ import annotations

import ctypes
import hashlib
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from lmtool.errors import LmtoolError, counted
from lmtool.text_files import empty_file, iter_text_chunks
from lmtool.tokenizer import EOS_ID, SPECIALS, Tokenizer


def held_out_lines(num_lines: int, fraction: float, hint: str = "") -> int:
    """How many lines at the end of a corpus become validation text (at least one, never all)."""
    if num_lines < 2:
        raise LmtoolError(
            "the corpus has a single line, so no validation lines can be held out; give --valid FILE "
            f"or a corpus with several lines{hint}"
        )
    return min(num_lines - 1, max(1, round(num_lines * fraction)))


def encode_lines(tokenizer: Tokenizer, lines: Iterable[str]) -> torch.Tensor:
    """One id stream: <EOS> (the text starts at a line start), then each line followed by <EOS>.

    The leading <EOS> means every token of the text is scored, the first one from the sentence-start
    context, exactly as `score` does.
    """
    text = "".join(line + "\n" for line in lines)
    start = torch.tensor([EOS_ID], dtype=tokenizer.dtype)
    return torch.cat([start, tokenizer.encode_lines_text(text)])  # (N + 1,)


@dataclass(frozen=True)
class TextScan:
    """What one streaming pass learned about a file."""

    num_lines: int
    num_chars: int  # code points, newlines included: a bound on the number of tokens (+1 for the leading <EOS>)
    lone_carriage_returns: int = 0  # '\r' not followed by '\n': old Mac line ends, read as characters

    def carriage_return_hint(self) -> str:
        """Advice when the lines seem to end in a lone CR, which is not a line end here."""
        if self.lone_carriage_returns <= self.num_lines:
            return ""
        return (f"; it holds {self.lone_carriage_returns:,} lone carriage returns (\\r, old Mac line ends), which are "
                "not line ends: convert them first, e.g. tr '\\r' '\\n' < FILE > FILE.txt")


def scan_text(path: Path, what: str) -> TextScan:
    """Check a whole file (UTF-8, no NUL, not empty) and count its lines and characters, in bounded memory."""
    lines, chars, crs, has_text = 0, 0, 0, False
    for text in iter_text_chunks(path, what):  # CRLF already normalised to '\n'
        lines += text.count("\n")
        chars += len(text)
        crs += text.count("\r")
        has_text = has_text or not text.isspace()
    if not has_text:
        raise empty_file(path, what)
    return TextScan(num_lines=lines, num_chars=chars, lone_carriage_returns=crs)


def iter_line_range(path: Path, what: str, start: int, stop: int | None) -> Iterator[str]:
    """Pieces of text holding lines [start, stop) of a file, each ending in '\n'."""
    line = 0
    for text in iter_text_chunks(path, what):
        count = text.count("\n")
        first, last = line, line + count
        line = last
        if last <= start:
            continue
        if stop is not None and first >= stop:
            return
        if first >= start and (stop is None or last <= stop):
            yield text
            continue
        lines = text.split("\n")[:-1]
        lo = max(0, start - first)
        hi = count if stop is None else min(count, stop - first)
        if hi > lo:
            yield "\n".join(lines[lo:hi]) + "\n"


def encode_stream(tokenizer: Tokenizer, pieces: Iterable[str], capacity: int) -> torch.Tensor:
    """<EOS> followed by the ids of every piece, written into one preallocated compact buffer (no copies)."""
    buffer = torch.empty(capacity, dtype=tokenizer.dtype)  # pages never written are never resident
    buffer[0] = EOS_ID
    n = 1
    for text in pieces:
        ids = tokenizer.encode_lines_text(text)
        if n + ids.numel() > buffer.numel():  # lowercasing can lengthen text: grow rather than fail
            buffer = torch.cat([buffer[:n], torch.empty(max(buffer.numel(), ids.numel()), dtype=buffer.dtype)])
        buffer[n : n + ids.numel()] = ids
        n += ids.numel()
    return buffer[:n]  # (N,)


def encode_file_to_disk(tokenizer: Tokenizer, path: Path, ids_path: Path) -> torch.Tensor:
    """Encode a file of any size into an id file and map it: memory stays bounded by the page cache."""
    count, has_text = 1, False
    try:
        with open(ids_path, "wb") as out:
            out.write(_raw_bytes(torch.tensor([EOS_ID], dtype=tokenizer.dtype)))  # starts at a line start
            for text in iter_text_chunks(path, "evaluation"):
                has_text = has_text or not text.isspace()  # as for training: blank lines alone are no text
                ids = tokenizer.encode_lines_text(text)
                out.write(_raw_bytes(ids))
                count += ids.numel()
    except OSError as err:
        raise LmtoolError(f"cannot write the temporary id file {ids_path}: {err.strerror or err}", exit_code=1) from None
    if not has_text:
        raise LmtoolError(f"evaluation file {path} is empty (no text to score)")
    return torch.from_file(str(ids_path), shared=True, size=count, dtype=tokenizer.dtype)  # (N,), memory-mapped


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """The memory of a CPU tensor as bytes (torch has no buffer protocol, and numpy is not a dependency)."""
    tensor = tensor.contiguous()
    return ctypes.string_at(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def batchify(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a (N,) stream into `batch_size` contiguous rows (B, N // B); the last N % B tokens are dropped."""
    width = stream.numel() // batch_size
    return stream[: width * batch_size].view(batch_size, width)  # (B, N // B)


def windows(streams: torch.Tensor, bptt: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Successive (x, y) views of width <= bptt: y is x shifted one token ahead; nothing but the last column is unused."""
    width = streams.size(-1)  # (B, W), or (D, B, W) for the streams of several directions
    for i in range(start, width - 1, bptt):
        n = min(bptt, width - 1 - i)
        yield streams[..., i : i + n], streams[..., i + 1 : i + 1 + n]  # (B, T), (B, T)


def num_windows(streams: torch.Tensor, bptt: int) -> int:
    """How many windows `windows` yields."""
    return max(0, (streams.size(-1) - 1 + bptt - 1) // bptt)


def oriented(stream: torch.Tensor, direction: str) -> torch.Tensor:
    """The (N,) stream as a model of that direction reads it: a backward model reads it reversed. Because a
    stream starts with <EOS> and every line ends with one, the reversed stream is exactly the encoding of
    the text with its lines, and the tokens of each line, in reverse order."""
    return stream.flip(0) if direction == "backward" else stream


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
    train: torch.Tensor  # (N_train,) compact ids (uint8, int16 or int32 by vocabulary size)
    valid: torch.Tensor  # (N_valid,)
    test: torch.Tensor | None  # (N_test,)


# A vocabulary that leaves more than this share of the training tokens out (data.min_freq, data.max_size) turns
# much of the text into <UNK>, which the model then learns to predict instead: worth a word, as it may not be meant.
UNKNOWN_SHARE_WARNING = 0.25


def _warn_if_mostly_unknown(counts: Counter, tokenizer: Tokenizer, min_freq: int, max_size: int | None) -> None:
    left_out, total = tokenizer.left_out(counts)
    if total and left_out > UNKNOWN_SHARE_WARNING * total:
        unit = "characters" if tokenizer.level == "char" else "words"
        limit = "null" if max_size is None else max_size
        warnings.warn(f"{left_out / total:.0%} of the training split's {unit} are outside its vocabulary of "
                      f"{counted(len(tokenizer), 'entry', 'entries')} (data.min_freq={min_freq}, data.max_size={limit}) "
                      "and read as <UNK>; if that is not meant, lower data.min_freq or raise data.max_size",
                      stacklevel=3)


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
    """Read the files in streaming passes, build the vocabulary from the training split only (unless given),
    and encode every split into compact ids: memory is the ids plus one chunk, not the text."""
    train_path = Path(train_path)
    new_run = tokenizer is None  # a resumed run (or another rank's copy of one) keeps the splits it was given
    train_scan = scan_text(train_path, "training")
    scans = [(train_scan, train_path, "training")]
    train_stop = None
    if valid_path is None:
        train_stop = train_scan.num_lines - held_out_lines(train_scan.num_lines, valid_fraction,
                                                           train_scan.carriage_return_hint())
    else:
        valid_scan = scan_text(Path(valid_path), "validation")
        scans.append((valid_scan, valid_path, "validation"))
    test_scan = scan_text(Path(test_path), "test") if test_path is not None else None
    if test_scan is not None:
        scans.append((test_scan, test_path, "test"))
    for scan, path, what in scans:
        if scan.carriage_return_hint():  # training goes on, with lines the user may not have meant
            warnings.warn(f"{what} file {path} reads as {counted(scan.num_lines, 'line')}{scan.carriage_return_hint()}",
                          stacklevel=2)
    if tokenizer is None:
        counts = Tokenizer.count(iter_line_range(train_path, "training", 0, train_stop), level, lowercase)
        tokenizer = Tokenizer.from_counts(counts, level, min_freq, max_size, lowercase, unk_marker)
        # Every token would be <UNK>: a perplexity that measures nothing. Told before the slow encoding; a split
        # with no tokens at all is blank, which the check below names more precisely.
        if len(tokenizer) == len(SPECIALS) and counts:
            unit = "character" if level == "char" else "word"
            why = (f"every {unit} occurs fewer than data.min_freq={min_freq} times; lower data.min_freq" if min_freq > 1
                   else f"its only {unit}s are literal <EOS>, <UNK> or data.unk_marker; train on real text")
            raise LmtoolError(f"the training split of {train_path} gives an empty vocabulary (nothing besides <EOS> "
                              f"and <UNK>): {why}")
        _warn_if_mostly_unknown(counts, tokenizer, min_freq, max_size)
    # A token takes at least one character, so the character count bounds the number of ids (lowercasing can
    # lengthen text: encode_stream grows then). Pages of the buffer that are never written cost no memory.
    room = train_scan.num_chars + 2
    train = encode_stream(tokenizer, iter_line_range(train_path, "training", 0, train_stop), room)
    if valid_path is None:
        valid = encode_stream(tokenizer, iter_line_range(train_path, "training", train_stop, None), room)
        held_out = train_scan.num_lines - train_stop
        splits = (("training", train, train_stop, "first"), ("validation", valid, held_out, "last"))
        for split, ids, lines, which in splits:
            # the leading <EOS> and one per line, nothing else: line ends alone, to learn from or to score
            if new_run and ids.numel() == lines + 1:
                raise LmtoolError(f"the {split} split of {train_path} (its {which} {counted(lines, 'line')}) holds "
                                  "only blank lines; give --valid FILE, or trim the blank lines")
    else:
        valid = encode_stream(tokenizer, iter_text_chunks(valid_path, "validation"), valid_scan.num_chars + 2)
    test = None
    if test_scan is not None:
        test = encode_stream(tokenizer, iter_text_chunks(test_path, "test"), test_scan.num_chars + 2)
    return Corpus(tokenizer=tokenizer, train=train, valid=valid, test=test)


def file_digest(path: Path | str) -> str:
    """SHA-256 of a file's bytes, read in blocks (so a resumed run can tell that its corpus is unchanged)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
