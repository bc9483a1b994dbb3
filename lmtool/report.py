"""Turn scores and evaluations into text: rich tables, JSON Lines and KenLM `query`-style lines."""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lmtool.api import FileEvaluation
from lmtool.display import format_perplexity, token_unit
from lmtool.evaluate import MixtureScore, SentenceScore, StreamScore
from lmtool.tokenizer import EOS_ID, UNK_ID


def ranks(scores: Sequence[SentenceScore]) -> list[int]:
    """1 for the most probable sentence; ties share the order they were given in."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i].logprob)
    rank = [0] * len(scores)
    for position, i in enumerate(order, start=1):
        rank[i] = position
    return rank


def score_json_lines(
    scores: Sequence[SentenceScore] | Sequence[MixtureScore], with_tokens: bool, precision: str = "fp32"
) -> list[str]:
    """One JSON object per sentence, in input order; a mixture also holds each direction's own record."""
    lines = []
    for score, rank in zip(scores, ranks(scores)):
        record = _score_record(score, with_tokens)
        record["rank"] = rank
        record["precision"] = precision
        if isinstance(score, MixtureScore):
            record["direction"] = "mixture"
            record["forward"] = _score_record(score.forward, with_tokens)
            record["backward"] = _score_record(score.backward, with_tokens)
        lines.append(json.dumps(record, ensure_ascii=False))
    return lines


def _score_record(score: SentenceScore | MixtureScore, with_tokens: bool) -> dict:
    record = {
        "sentence": score.sentence,
        "logprob": score.logprob,
        "log10prob": score.log10prob,
        "perplexity": score.perplexity,
        "tokens": score.num_tokens,
        "unknown": score.num_unknown,
    }
    if isinstance(score, SentenceScore):
        record["direction"] = score.direction
        if with_tokens:
            record["per_token"] = [
                {"token": t.token, "known": t.known, "prob": t.prob, "logprob": t.logprob, "bits": t.surprisal_bits}
                for t in score.tokens
            ]
    return record


def kenlm_id(our_id: int) -> int:
    """KenLM numbers <unk> 0, <s> 1 and </s> 2; our other ids follow after them."""
    return {UNK_ID: 0, EOS_ID: 2}.get(our_id, our_id + 1)


def score_kenlm_lines(scores: Sequence[SentenceScore], tokenizer) -> list[str]:
    """Lines like KenLM's `query`: `word=id n log10p` per token, then `Total: X OOV: n`; corpus totals last."""
    lines = []
    total_log10, total_tokens, total_oov, known_log10 = 0.0, 0, 0, 0.0
    for score in scores:
        parts = []
        backward = score.direction == "backward"
        n = len(score.tokens)
        for index, t in enumerate(score.tokens, start=1):
            end = index == n  # the last row is the sentence end (a word written "<EOS>" in the text is not)
            our_id = EOS_ID if end else tokenizer.token_id(t.token) if t.known else UNK_ID
            word, kenlm = t.token, kenlm_id(our_id)
            if end:  # read backward, the last row predicts the sentence start: KenLM's <s> (id 1)
                word, kenlm = ("<s>", 1) if backward else ("</s>", 2)
            # For an RNN the context is the whole history read so far, so the "n-gram length" is the number of
            # predictions made up to this one: the position in reading order.
            position = index if not backward else (n if index == n else n - index)
            # a character model's space or tab would otherwise split the fields it sits in
            parts.append(f"{word if end else visible_token(word)}={kenlm} {position} {t.logprob / math.log(10):.6g}")
            if t.known:
                known_log10 += t.logprob / math.log(10)
        lines.append("\t".join(parts) + f"\tTotal: {score.log10prob:.6g} OOV: {score.num_unknown}")
        total_log10 += score.log10prob
        total_tokens += score.num_tokens
        total_oov += score.num_unknown
    if total_tokens:
        lines.append(f"Perplexity including OOVs:\t{10 ** (-total_log10 / total_tokens):.6g}")
        if total_tokens > total_oov:
            lines.append(f"Perplexity excluding OOVs:\t{10 ** (-known_log10 / (total_tokens - total_oov)):.6g}")
        lines.append(f"OOVs:\t{total_oov}")
        lines.append(f"Tokens:\t{total_tokens}")
    return lines


def _surprisal_style(bits: float) -> str:
    """Green for expected tokens, through yellow, to bold red for the surprising ones."""
    if bits < 2:
        return "green"
    if bits < 5:
        return "yellow"
    if bits < 9:
        return "red"
    return "bold red"


def print_scores(
    console: Console, scores: Sequence[SentenceScore] | Sequence[MixtureScore], with_tokens: bool, level: str = "word",
    precision: str = "fp32",
) -> None:
    """Sentences ranked most probable first, and optionally each one's per-token table (per direction)."""
    mixture = bool(scores) and isinstance(scores[0], MixtureScore)
    direction = "mixture of both directions" if mixture else (scores[0].direction if scores else "forward")
    approximate = "" if precision == "fp32" else f", {precision} (approximate)"
    table = Table(title=f"sentence log-probabilities, {direction}{approximate} (most probable first)",
                  title_justify="left")
    columns = ["rank", "log P", "log10 P", "ppl", "tokens", "unk"] + (["fwd", "bwd"] if mixture else [])
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column))  # numbers never get cut
    table.add_column("sentence", ratio=1)  # the sentence wraps instead
    rank = ranks(scores)
    separator = "" if level == "char" else " "
    for i in sorted(range(len(scores)), key=lambda i: rank[i]):
        s = scores[i]
        extra = [f"{s.forward.logprob:.2f}", f"{s.backward.logprob:.2f}"] if mixture else []
        sentence = Text(_layout_safe(s.sentence)) if mixture else _colour_tokens(s, separator)
        table.add_row(
            str(rank[i]), f"{s.logprob:.4f}", f"{s.log10prob:.4f}", format_perplexity(s.perplexity),
            str(s.num_tokens), str(s.num_unknown), *extra, sentence,
        )
    console.print(table)
    if not with_tokens:
        return
    for i in sorted(range(len(scores)), key=lambda i: rank[i]):
        for s in (scores[i].forward, scores[i].backward) if mixture else (scores[i],):
            _print_token_table(console, s, f"{rank[i]}. {_layout_safe(s.sentence)}"
                               + (f" ({s.direction})" if mixture else ""))


def _print_token_table(console: Console, s: SentenceScore, title: str) -> None:
    tokens = Table(title=title, title_justify="left")
    for column, justify in (("token", "left"), ("known", "left"), ("prob", "right"), ("log P", "right"),
                            ("bits", "right")):
        tokens.add_column(column, justify=justify)
    for index, t in enumerate(s.tokens, start=1):
        style = _surprisal_style(t.surprisal_bits)
        token = visible_token(t.token)
        if s.direction == "backward" and index == len(s.tokens):
            token = "<EOS> (start)"  # read backward, the last step predicts the sentence start
        tokens.add_row(
            Text(token, style=style), "yes" if t.known else "<UNK>", f"{t.prob:.4g}", f"{t.logprob:.4f}",
            Text(f"{t.surprisal_bits:.2f}", style=style),
        )
    console.print(tokens)


def visible_token(token: str) -> str:
    """A token as it can be shown in a table cell or a field: a space as ␣, a tab or other unprintable character
    escaped (\\t), a combining mark on a dotted circle (alone, it would join the cell's padding)."""
    if token == " ":
        return "␣"
    if not any(c.isprintable() for c in token):  # a lone no-break space or joiner would show as nothing
        return "".join(map(_escaped, token))
    shown = _layout_safe(token)  # a joiner inside a word stays: escaped, the field would no longer be the word
    return "◌" + shown if shown and unicodedata.combining(shown[0]) else shown


def _escaped(character: str) -> str:
    return character.encode("unicode_escape").decode("ascii")


# Escaped wherever text is shown: controls (a tab, CR, U+0085), which split a table cell over rows or a KenLM
# line in two; Unicode's line and paragraph separators, likewise; and invisible format characters (a zero-width
# space, a soft hyphen, a bidi override), which would make "ca\\u200bt" look like "cat". The zero-width
# (non-)joiners are kept: they shape emoji and Persian or Indic words, which escaped would no longer be the word.
_ESCAPED_CATEGORIES = {"Cc", "Zl", "Zp", "Cf"}
_JOINERS_KEPT = {"\u200c", "\u200d"}


def _layout_safe(text: str) -> str:
    """The text with each character that would break a row or a line, or hide, escaped (\\t, \\u200b)."""
    return "".join(_escaped(c) if unicodedata.category(c) in _ESCAPED_CATEGORIES and c not in _JOINERS_KEPT else c
                   for c in text)


# Joiners: a character token that joins its neighbours into one symbol (an emoji family, a keycap).
_JOINERS = ("\u200d", "\ufe0f")


def _colour_tokens(score: SentenceScore, separator: str) -> Text:
    """The sentence, each token coloured by its surprisal. Tokens joined into one symbol share one colour (the
    most surprising one's): split into spans, rich measured the symbol wider than its cells and cut the cell's end."""
    groups: list[list] = []  # [text, surprisal in bits]
    for t in score.tokens[:-1]:  # the final <EOS> is not part of the sentence's text
        token = _layout_safe(t.token)  # expanded, a tab pushed the sentence onto a second row
        if groups and not separator and (token in _JOINERS or groups[-1][0].endswith("\u200d")):
            groups[-1] = [groups[-1][0] + token, max(groups[-1][1], t.surprisal_bits)]
        else:
            groups.append([token, t.surprisal_bits])
    if not groups:
        return Text(_layout_safe(score.sentence))
    text = Text()
    for n, (piece, bits) in enumerate(groups):
        if n:
            text.append(separator)
        text.append(piece, style=_surprisal_style(bits))
    return text


def evaluation_record(evaluation: FileEvaluation, level: str) -> dict:
    record = {"files": list(evaluation.files), "direction": next(iter(evaluation.by_direction)),
              **_stream_record(evaluation.score, level),
              "seconds": evaluation.seconds, "tokens_per_s": evaluation.tokens_per_s, "precision": evaluation.precision}
    if len(evaluation.by_direction) > 1:
        record["directions"] = {d: _stream_record(s, level) for d, s in evaluation.by_direction.items()}
    if evaluation.mixture is not None:
        m = evaluation.mixture
        record["mixture_per_line"] = {"tokens": m.tokens, "nll": m.loss, "perplexity": m.perplexity,
                                      _bits_key(level): m.bits_per_token}
    return record


def _bits_key(level: str) -> str:
    return "bits_per_char" if level == "char" else "bits_per_word"


def _stream_record(s: StreamScore, level: str) -> dict:
    return {
        "tokens": s.tokens,
        "unknown": s.unknown,
        "unknown_rate": s.unknown_rate,
        "nll": s.loss,
        "perplexity": s.perplexity,
        _bits_key(level): s.bits_per_token,
        "perplexity_excluding_unknown": s.perplexity_known,
    }


def print_evaluation(console: Console, evaluation: FileEvaluation, level: str) -> None:
    """One table per direction evaluated; the per-line mixture (if any), time and speed close the list."""
    unit = token_unit(level)
    several = len(evaluation.by_direction) > 1
    # a forward reading is what "perplexity" means; any other is named, as score's titles name it
    sections = [("perplexity" if d == "forward" and not several else f"perplexity, {d}",
                 _stream_rows(evaluation, s, unit)) for d, s in evaluation.by_direction.items()]
    closing = []
    m = evaluation.mixture
    if m is not None:
        closing += [("tokens scored", f"{m.tokens:,}"), ("perplexity", format_perplexity(m.perplexity, 3)),
                    (f"bits per {unit}", f"{m.bits_per_token:.4f}")]
    closing += [("time", f"{evaluation.seconds:.2f}s"), ("tokens/s", f"{evaluation.tokens_per_s:,.0f}")]
    if evaluation.precision != "fp32":
        closing.append(("precision", f"{evaluation.precision} (approximate)"))
    if several:
        sections.append(("mixture 1/2 P_forward + 1/2 P_backward, per line" if m else "speed", closing))
    else:
        sections[-1][1].extend(closing)
    for title, rows in sections:
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column("what", style="bold")
        table.add_column("value", justify="right")
        for what, value in rows:
            table.add_row(what, value)
        console.print(table)


def _stream_rows(evaluation: FileEvaluation, s: StreamScore, unit: str) -> list[tuple[str, str]]:
    known = s.perplexity_known
    return [
        ("files", ", ".join(evaluation.files)),
        ("tokens scored", f"{s.tokens:,}"),
        ("unknown tokens", f"{s.unknown:,} ({100 * s.unknown_rate:.2f}%)"),
        ("mean NLL", f"{s.loss:.4f} nats/{unit}"),
        ("perplexity", format_perplexity(s.perplexity, 3)),
        (f"bits per {unit}", f"{s.bits_per_token:.4f}"),
        ("perplexity excluding <UNK>", format_perplexity(known, 3) if known is not None else "-"),
    ]
