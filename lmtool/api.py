"""The Python API: `load_model` returns an object that samples, scores and measures perplexity."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import numbers
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from lmtool.checkpoint import LoadedModel, load_model_file
from lmtool.data import encode_file_to_disk
from lmtool.devices import inference_autocast, resolve_device
from lmtool.errors import LmtoolError, non_finite_scores
from lmtool.evaluate import (
    MixtureScore,
    SentenceScore,
    StreamScore,
    combined,
    evaluation_window,
    log_mean_exp,
    score_sentences,
    stream_nll,
)
from lmtool.run_paths import path_argument, resolve_model_path
from lmtool.sample import SamplingOptions, encode_prime, generate
from lmtool.text_files import iter_lines
from lmtool.tokenizer import EOS_ID


# Lines longer than this many characters are scored alone in windows: a padded batch holds whole lines.
LONG_LINE = 2000


@dataclass(frozen=True)
class FileEvaluation:
    """Perplexity of one or more files, with timing."""

    files: tuple[str, ...]
    score: StreamScore  # the first (or only) direction evaluated
    seconds: float
    by_direction: dict[str, StreamScore] = field(default_factory=dict)
    # A bidirectional model's per-line mixture 1/2 P_forward(line) + 1/2 P_backward(line), each line read from
    # the sentence-start state (as `score` does), unlike the streams above that carry the state across lines.
    mixture: StreamScore | None = None
    precision: str = "fp32"  # bf16: products in bfloat16, not exact

    @property
    def tokens_per_s(self) -> float:
        return self.score.tokens / self.seconds if self.seconds > 0 else float("inf")


class Model:
    """A trained language model with its tokenizer: the object behind `sample`, `score` and `evaluate-perplexity`."""

    def __init__(self, loaded: LoadedModel, device: torch.device) -> None:
        self.network = loaded.model.to(device).eval()
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.path = loaded.path
        self.device = device

    @property
    def level(self) -> str:
        return self.tokenizer.level

    @property
    def directions(self) -> tuple[str, ...]:
        return self.network.directions

    def sample(
        self,
        prime: str = "",
        options: SamplingOptions | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
        ending: str | None = None,
        **option_values,
    ) -> list[str]:
        """Generate text after `prime` (forward) or, given `ending`, the text that leads to it (backward, written
        right to left); returns one string per sample, without the prime or the ending (and, with stop_at_eos,
        without the line end that stopped it)."""
        if options is not None and option_values:
            raise LmtoolError(f"give options or {', '.join(sorted(option_values))}, not both")
        if options is not None and not isinstance(options, SamplingOptions):
            raise LmtoolError(f"options must be a SamplingOptions, got {type(options).__name__}; or give the options "
                              "as keywords, e.g. sample(prime, length=100, temperature=0.8)")
        _check_option_names(option_values)
        if on_token is not None and not callable(on_token):
            raise LmtoolError(f"on_token must be a function that takes each step's token ids, got "
                              f"{type(on_token).__name__}")
        prime = "" if prime is None else prime
        for name, text in (("prime", prime), ("ending", ending)):
            if text is not None and not isinstance(text, str):
                raise LmtoolError(f"{name} must be a string, got {type(text).__name__}")
        options = options or SamplingOptions(**option_values)
        if ending is not None:
            if prime:
                raise LmtoolError("give --prime or --ending, not both: a model writes in one direction at a time")
            if on_token is not None:  # its tokens come right to left; the text is returned whole
                raise LmtoolError("on_token streams forward generation only; with ending= the text is returned whole")
            ending_ids, _ = encode_prime(self.tokenizer, ending)
            if ending_ids and ending_ids[-1] == EOS_ID:  # "...\n": it ends a line, which the reading starts from
                ending_ids = ending_ids[:-1]
            samples = generate(self.network, ending_ids[::-1], options, None, "backward")
            # read backward, <EOS> is where the line starts: nothing to print
            return [self.tokenizer.decode(_without_stop(ids, options)[::-1]) for ids in samples]
        if "forward" not in self.directions:
            raise LmtoolError("this model reads backward only: give ending=TEXT to write the text that leads to it "
                              "(ending=\"\" for a line that leads to a line end)")
        prime_ids, _ = encode_prime(self.tokenizer, prime)
        samples = generate(self.network, prime_ids, options, on_token, "forward")
        return [self.tokenizer.decode(_without_stop(ids, options)) for ids in samples]

    def score(
        self, sentences: Sequence[str] | str, batch_size: int = 64, direction: str | None = None,
        precision: str = "fp32",
    ) -> list[SentenceScore] | list[MixtureScore]:
        """log P(sentence, <EOS>) from the sentence-start state, with a per-token breakdown. A bidirectional model
        gives the mixture of both directions unless `direction` picks one. precision="bf16": as in `perplexity`."""
        sentences = _list_of(sentences, (str,), "sentences must be a string or a list of strings")
        batch_size = _count("batch_size", batch_size)
        with inference_autocast(precision, self.device):
            scores = [score_sentences(self.network, self.tokenizer, sentences, batch_size, d)
                      for d in self._directions(direction)]
        if not all(math.isfinite(s.logprob) for per_direction in scores for s in per_direction):
            raise non_finite_scores()
        return [MixtureScore(f, b) for f, b in zip(*scores)] if len(scores) == 2 else scores[0]

    def _directions(self, direction: str | None) -> tuple[str, ...]:
        """The directions a request reads: all the model has for None or "both", else the one named."""
        if direction not in (None, "forward", "backward", "both"):
            raise LmtoolError(f"direction must be forward, backward or both, got {direction!r}")
        if direction == "both" and len(self.directions) < 2:
            raise LmtoolError(f"--direction both needs a bidirectional model; this one reads {self.directions[0]} only")
        if direction in (None, "both"):
            return self.directions
        return (self.network.direction_of(direction),)

    def perplexity(
        self,
        paths: Sequence[str | Path] | str | Path,
        batch_size: int = 1,
        bptt: int | None = None,
        direction: str | None = None,
        precision: str = "fp32",
    ) -> FileEvaluation:
        """Stream files through the model as validation does (state carried across lines); memory stays bounded.
        A bidirectional model is evaluated in both directions and as a per-line mixture unless `direction`
        picks one. precision="bf16" computes the products in bfloat16 (autocast, as bf16 training does): faster
        on hardware with native bf16, and no longer exact. `bptt`: tokens per window (default: the model's
        data.bptt, lengthened on a CPU for small batches, see `evaluation_window`; it changes the speed, not the
        numbers)."""
        paths = _list_of(paths, (str, os.PathLike), "paths must be a file path (str or Path) or a list of them")
        if not paths:
            raise LmtoolError("no files to evaluate; give at least one")
        paths = [path_argument(path, "a file to evaluate") for path in paths]
        batch_size = _count("batch_size", batch_size)
        bptt = None if bptt is None else _count("bptt", bptt)
        window = bptt or evaluation_window(self.config.data.bptt, batch_size, self.device)
        directions = self._directions(direction)  # a clear error before any work for a direction the model lacks
        autocast = inference_autocast(precision, self.device)
        totals = {d: StreamScore(nll=0.0, tokens=0) for d in directions}
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="lmtool-eval-") as tmp, autocast:
            for n, path in enumerate(paths):
                ids = encode_file_to_disk(self.tokenizer, path, Path(tmp) / f"{n}.ids")
                if ids.numel() < 2 * batch_size:  # each of the batch's streams needs a token and its successor
                    # ids start with the sentence start, which is read but not scored
                    raise LmtoolError(f"{path} holds {ids.numel() - 1} tokens, too few for --batch-size {batch_size}; "
                                      f"use --batch-size {ids.numel() // 2} or less")
                for d in directions:
                    totals[d] = combined([totals[d], stream_nll(self.network, ids, batch_size, window, d,
                                                                    cuda_graph=self.config.train.cuda_graph)])
                del ids
            mixture = self._line_mixture(paths, bptt, precision) if len(directions) == 2 else None
        if not all(math.isfinite(t.nll) for t in totals.values()):
            raise non_finite_scores()
        return FileEvaluation(files=tuple(map(str, paths)), score=totals[directions[0]],
                              seconds=time.perf_counter() - start, by_direction=totals, mixture=mixture,
                              precision=precision)

    def _line_mixture(self, paths: Sequence[Path], bptt: int | None, precision: str,
                      lines_per_batch: int = 1024) -> StreamScore:
        """Sum over lines of -log(1/2 P_forward + 1/2 P_backward), reading the files a batch of lines at a time.
        Short lines are scored together in padded batches; a long line alone, `bptt` tokens at a time (default:
        `evaluation_window` for one stream), so memory stays bounded however long a line is."""
        bptt = bptt or evaluation_window(self.config.data.bptt, 1, self.device)
        nll, tokens = [], 0
        for path in paths:
            lines = iter_lines(path, "evaluation")
            while batch := list(itertools.islice(lines, lines_per_batch)):
                short = [line for line in batch if len(line) <= LONG_LINE]
                for mix in self.score(short, batch_size=64, precision=precision) if short else []:
                    nll.append(-mix.logprob)
                    tokens += mix.num_tokens
                for line in (line for line in batch if len(line) > LONG_LINE):
                    ids = torch.tensor([EOS_ID] + self.tokenizer.encode_line(line))  # from the sentence start
                    parts = [stream_nll(self.network, ids, 1, bptt, d, cuda_graph=self.config.train.cuda_graph)
                             for d in self.directions]
                    nll.append(-log_mean_exp(-parts[0].nll, -parts[1].nll))
                    tokens += parts[0].tokens
        return StreamScore(nll=math.fsum(nll), tokens=tokens)


def _without_stop(ids: list[int], options: SamplingOptions) -> list[int]:
    """A sample stopped at <EOS> ends with it; the caller shows or writes the line end itself."""
    return ids[:-1] if options.stop_at_eos and ids and ids[-1] == EOS_ID else ids


def _list_of(values, types: tuple[type, ...], message: str) -> list:
    """One value of `types`, or any iterable of them, as a list; else a clear error."""
    if isinstance(values, types):
        return [values]
    try:
        values = list(values)
    except TypeError:
        raise LmtoolError(message) from None
    if not all(isinstance(v, types) for v in values):
        raise LmtoolError(message)
    return values


def _count(name: str, value: int) -> int:
    """Library callers get the CLI's range checks too: a batch size or window of 0 or less would score nothing.
    Any integer type counts (numpy's too), as a plain int; a bool is not a count."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise LmtoolError(f"{name} must be an integer of at least 1, got {value!r}")
    return int(value)


def _check_option_names(option_values: dict) -> None:
    """A misspelt sampling option is named, with the nearest real one, rather than a TypeError."""
    options = [f.name for f in dataclasses.fields(SamplingOptions)]
    arguments = ["prime", "options", "on_token", "ending", *options]  # sample's own, misspelt, land here too
    for name in option_values:
        if name not in options:
            nearest = difflib.get_close_matches(name, arguments, n=1)
            raise LmtoolError(f"unknown sampling option {name!r}" + (f"; did you mean {nearest[0]!r}?" if nearest else
                                                                     f"; sample takes {', '.join(arguments)}"))


def load_model(ref: str | Path | None = None, device: str = "auto") -> Model:
    """Load a trained model: a run directory, a model file, or (by default) runs/latest."""
    return Model(load_model_file(resolve_model_path(ref)), resolve_device(device))
