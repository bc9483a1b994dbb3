"""Character and word vocabularies with <EOS> and <UNK>: text <-> token ids, and to/from plain dicts."""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Iterable, Sequence

import torch

from lmtool.errors import LmtoolError

EOS = "<EOS>"
UNK = "<UNK>"
SPECIALS = (EOS, UNK)
EOS_ID = 0
UNK_ID = 1
MAX_CODE_POINT = 0x10FFFF


def _code_points(text: str) -> torch.Tensor:
    """The Unicode code points of a text as an integer tensor (N,), without a Python loop: one byte each for
    ASCII text (most corpora; 4x less memory and time), four otherwise."""
    if not text:
        return torch.zeros(0, dtype=torch.int32)
    if text.isascii():
        return torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8)
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)


def id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer type that holds every id: 1 byte a token for characters, 2 for most vocabularies."""
    if vocab_size <= 256:
        return torch.uint8
    if vocab_size <= 32767:
        return torch.int16
    return torch.int32


@dataclass(frozen=True)
class Tokenizer:
    """A fixed vocabulary. `<EOS>` stands for a line end ('\\n'); `<UNK>` for anything not in the vocabulary."""

    level: str
    tokens: tuple[str, ...]
    lowercase: bool = False
    unk_marker: str | None = None
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)
    _read_as_unk: frozenset[str] = field(init=False, repr=False, compare=False)  # words that are <UNK> in any text

    def __post_init__(self) -> None:
        assert self.tokens[: len(SPECIALS)] == SPECIALS, "vocabulary must start with the special tokens"
        object.__setattr__(self, "_ids", {tok: i for i, tok in enumerate(self.tokens)})
        # A vocabulary built before lowercased specials were read as <UNK> may hold "<eos>" as a word: it keeps it.
        words = _read_as_unk(self.unk_marker, self.lowercase)
        object.__setattr__(self, "_read_as_unk", frozenset(w for w in words if self._ids.get(w, UNK_ID) <= UNK_ID))
        if len(self._ids) != len(self.tokens):
            raise LmtoolError("vocabulary holds the same token twice")

    @classmethod
    def build(
        cls,
        lines: Iterable[str],
        level: str,
        min_freq: int = 1,
        max_size: int | None = None,
        lowercase: bool = False,
        unk_marker: str | None = None,
    ) -> "Tokenizer":
        """Count tokens in the (training) lines or multi-line text pieces; keep the frequent ones, most frequent first."""
        return cls.from_counts(cls.count(lines, level, lowercase), level, min_freq, max_size, lowercase, unk_marker)

    @classmethod
    def count(cls, lines: Iterable[str], level: str, lowercase: bool = False) -> Counter:
        """How often each token occurs in lines or multi-line text pieces (specials written out included)."""
        probe = cls(level=level, tokens=SPECIALS, lowercase=lowercase)
        counts: Counter[str] = Counter()
        for text in lines:
            probe.count_into(counts, text)
        return counts

    def count_into(self, counts: Counter, text: str) -> None:
        """Add the token counts of a piece of text (any number of lines) to `counts`."""
        if self.lowercase:
            text = text.lower()
        if self.level == "char":
            histogram = torch.bincount(_code_points(text))  # vectorised: no Python work per character
            for code_point in histogram.nonzero().flatten().tolist():
                if code_point != ord("\n"):
                    counts[chr(code_point)] += int(histogram[code_point])
        else:
            counts.update(text.split())

    @classmethod
    def from_counts(
        cls,
        counts: Counter,
        level: str,
        min_freq: int = 1,
        max_size: int | None = None,
        lowercase: bool = False,
        unk_marker: str | None = None,
    ) -> "Tokenizer":
        """The vocabulary of a token count: specials first, then by frequency, ties broken by the token."""
        counts = Counter(counts)
        for word in _read_as_unk(unk_marker, lowercase):
            counts.pop(word, None)
        ranked = sorted((tok for tok, n in counts.items() if n >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            ranked = ranked[: max(0, max_size - len(SPECIALS))]
        return cls(level=level, tokens=SPECIALS + tuple(ranked), lowercase=lowercase, unk_marker=unk_marker)

    def __len__(self) -> int:
        return len(self.tokens)

    def left_out(self, counts: Counter) -> tuple[int, int]:
        """Of the counted tokens, leaving aside the text's own unknown markers and written-out specials (which are
        <UNK> whatever the vocabulary): how many this vocabulary reads as <UNK> because it does not hold them, and
        how many there are."""
        left_out = total = 0
        for token, n in counts.items():
            if token not in self._read_as_unk:
                total += n
                left_out += n if token not in self._ids else 0
        return left_out, total

    def split(self, line: str) -> list[str]:
        """One line (no newline) into token strings, before the vocabulary is applied."""
        if self.lowercase:
            line = line.lower()
        return list(line) if self.level == "char" else line.split()

    def token_id(self, token: str) -> int:
        """The id of one token string; unknown tokens and the corpus's own unknown marker give <UNK>."""
        if token in self._read_as_unk:  # a literal "<EOS>" in text is no line end
            return UNK_ID
        return self._ids.get(token, UNK_ID)

    def encode_line(self, line: str) -> list[int]:
        """Ids of one line followed by <EOS>."""
        ids = [self.token_id(tok) for tok in self.split(line)]
        ids.append(EOS_ID)
        return ids

    @property
    def dtype(self) -> torch.dtype:
        return id_dtype(len(self.tokens))

    def encode_lines_text(self, text: str) -> torch.Tensor:
        """Ids of whole lines ('\n'-terminated text), each '\n' becoming <EOS>: vectorised, (N,) compact ids."""
        if self.lowercase:
            text = text.lower()
        if not text:
            return torch.zeros(0, dtype=self.dtype)
        if self.level == "char":
            if text.isascii() and self.dtype == torch.uint8:  # one C pass: each byte becomes its id
                return torch.frombuffer(bytearray(text.encode("ascii").translate(self._byte_table())), dtype=torch.uint8)
            return self._code_point_table().index_select(0, _code_points(text).int())
        lookup = self._word_lookup()
        if "\0" not in text:  # files never hold NUL (they are refused), so it can stand for the line end
            words = text.replace("\n", " \0 ").split()
            ids = array("i", map(self._word_lookup(line_end="\0").get, words, repeat(UNK_ID)))  # looked up in C
        else:
            ids = array("i")
            for line in text.split("\n")[:-1]:
                ids.extend(map(lookup.get, line.split(), repeat(UNK_ID)))
                ids.append(EOS_ID)
        return torch.frombuffer(ids, dtype=torch.int32).to(self.dtype) if ids else torch.zeros(0, dtype=self.dtype)

    def _code_point_table(self) -> torch.Tensor:
        """Id of every Unicode code point (<UNK> by default): characters encode by one gather."""
        table = self.__dict__.get("_table")
        if table is None:
            table = torch.full((MAX_CODE_POINT + 1,), UNK_ID, dtype=self.dtype)
            for i, tok in enumerate(self.tokens[len(SPECIALS) :], start=len(SPECIALS)):
                table[ord(tok)] = i
            table[ord("\n")] = EOS_ID
            object.__setattr__(self, "_table", table)
        return table

    def _byte_table(self) -> bytes:
        """bytes.translate table from each ASCII byte to its id (valid when every id fits in a byte)."""
        table = self.__dict__.get("_bytes")
        if table is None:
            table = bytes(self._code_point_table()[:256].tolist())
            object.__setattr__(self, "_bytes", table)
        return table

    def _word_lookup(self, line_end: str | None = None) -> dict[str, int]:
        """token_id as one dict (for map in C); with `line_end`, that word stands for <EOS>."""
        cache = self.__dict__.setdefault("_lookups", {})
        lookup = cache.get(line_end)
        if lookup is None:
            lookup = dict(self._ids)
            for word in self._read_as_unk:
                lookup[word] = UNK_ID
            if line_end is not None:
                lookup[line_end] = EOS_ID
            cache[line_end] = lookup
        return lookup

    def encode(self, text: str) -> list[int]:
        """Ids of a text; each '\\n' becomes <EOS> (no <EOS> is added after a final line without one)."""
        lines = text.split("\n")
        ids: list[int] = []
        for i, line in enumerate(lines):
            ids.extend(self.token_id(tok) for tok in self.split(line))
            if i < len(lines) - 1:
                ids.append(EOS_ID)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a sequence of ids: <EOS> renders as a newline, words are joined by single spaces."""
        if self.level == "char":
            return "".join("\n" if i == EOS_ID else self.tokens[i] for i in ids)
        out: list[str] = []
        for i in ids:
            if i == EOS_ID:
                out.append("\n")
            else:
                if out and out[-1] != "\n":
                    out.append(" ")
                out.append(self.tokens[i])
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON (saved with the model)."""
        return {
            "level": self.level,
            "lowercase": self.lowercase,
            "unk_marker": self.unk_marker,
            "tokens": list(self.tokens),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Tokenizer":
        """Rebuild a tokenizer from `to_dict` output, refusing anything malformed."""
        try:
            tokens = tuple(data["tokens"])
            level = data["level"]
            if level not in ("char", "word") or not all(isinstance(t, str) for t in tokens):
                raise ValueError
            if tokens[: len(SPECIALS)] != SPECIALS:
                raise ValueError
            if level == "char" and any(len(t) != 1 for t in tokens[len(SPECIALS) :]):
                raise ValueError
            return cls(
                level=level,
                tokens=tokens,
                lowercase=bool(data.get("lowercase", False)),
                unk_marker=data.get("unk_marker"),
            )
        except (KeyError, TypeError, ValueError):
            raise LmtoolError("the vocabulary is malformed (expected level, tokens starting with <EOS>, <UNK>)") from None


def _read_as_unk(unk_marker: str | None, lowercase: bool) -> frozenset[str]:
    """The words read as <UNK> wherever they appear: the special tokens written out and the corpus's own unknown
    marker, as split text shows them: lowercased with the text when data.lowercase is on (a literal "<EOS>" would
    otherwise become the ordinary word "<eos>", and a marker such as <UNK> would never match)."""
    words = SPECIALS if unk_marker is None else (*SPECIALS, unk_marker)
    return frozenset(words) | frozenset(word.lower() for word in words if lowercase)
