"""Character and word vocabularies with <EOS> and <UNK>: text <-> token ids, and to/from plain dicts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from lmtool.errors import LmtoolError

EOS = "<EOS>"
UNK = "<UNK>"
SPECIALS = (EOS, UNK)
EOS_ID = 0
UNK_ID = 1


@dataclass(frozen=True)
class Tokenizer:
    """A fixed vocabulary. `<EOS>` stands for a line end ('\\n'); `<UNK>` for anything not in the vocabulary."""

    level: str
    tokens: tuple[str, ...]
    lowercase: bool = False
    unk_marker: str | None = None
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert self.tokens[: len(SPECIALS)] == SPECIALS, "vocabulary must start with the special tokens"
        object.__setattr__(self, "_ids", {tok: i for i, tok in enumerate(self.tokens)})
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
        """Count tokens in the (training) lines and keep the frequent ones, most frequent first."""
        probe = cls(level=level, tokens=SPECIALS, lowercase=lowercase, unk_marker=unk_marker)
        counts: Counter[str] = Counter()
        for line in lines:
            counts.update(probe.split(line))
        for special in SPECIALS:
            counts.pop(special, None)
        if unk_marker is not None:
            counts.pop(unk_marker, None)
        # Ties broken by the token itself, so the same text always gives the same ids.
        ranked = sorted((tok for tok, n in counts.items() if n >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            ranked = ranked[: max(0, max_size - len(SPECIALS))]
        return cls(level=level, tokens=SPECIALS + tuple(ranked), lowercase=lowercase, unk_marker=unk_marker)

    def __len__(self) -> int:
        return len(self.tokens)

    def split(self, line: str) -> list[str]:
        """One line (no newline) into token strings, before the vocabulary is applied."""
        if self.lowercase:
            line = line.lower()
        return list(line) if self.level == "char" else line.split()

    def token_id(self, token: str) -> int:
        """The id of one token string; unknown tokens and the corpus's own unknown marker give <UNK>."""
        if token == self.unk_marker:
            return UNK_ID
        return self._ids.get(token, UNK_ID)

    def encode_line(self, line: str) -> list[int]:
        """Ids of one line followed by <EOS>."""
        ids = [self.token_id(tok) for tok in self.split(line)]
        ids.append(EOS_ID)
        return ids

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
            return cls(
                level=level,
                tokens=tokens,
                lowercase=bool(data.get("lowercase", False)),
                unk_marker=data.get("unk_marker"),
            )
        except (KeyError, TypeError, ValueError):
            raise LmtoolError("the vocabulary is malformed (expected level, tokens starting with <EOS>, <UNK>)") from None
