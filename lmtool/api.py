"""The Python API: `load_model` returns an object that samples, scores and measures perplexity."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from lmtool.checkpoint import LoadedModel, load_model_file, resolve_model_path
from lmtool.data import encode_file_to_disk
from lmtool.devices import resolve_device
from lmtool.evaluate import SentenceScore, StreamScore, score_sentences, stream_nll
from lmtool.sample import SamplingOptions, encode_prime, generate


@dataclass(frozen=True)
class FileEvaluation:
    """Perplexity of one or more files, with timing."""

    files: tuple[str, ...]
    score: StreamScore
    seconds: float

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

    def sample(
        self,
        prime: str = "",
        options: SamplingOptions | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
        **option_values,
    ) -> list[str]:
        """Generate text after `prime`; returns one string per sample (the prime not included)."""
        options = options or SamplingOptions(**option_values)
        prime_ids, _ = encode_prime(self.tokenizer, prime)
        samples = generate(self.network, prime_ids, options, on_token)
        return [self.tokenizer.decode(ids) for ids in samples]

    def score(self, sentences: Sequence[str] | str, batch_size: int = 64) -> list[SentenceScore]:
        """log P(sentence, <EOS>) from the sentence-start state, with a per-token breakdown."""
        if isinstance(sentences, str):
            sentences = [sentences]
        return score_sentences(self.network, self.tokenizer, list(sentences), batch_size)

    def perplexity(self, paths: Sequence[str | Path] | str | Path, batch_size: int = 1, bptt: int | None = None) -> FileEvaluation:
        """Stream files through the model as validation does (state carried across lines); memory stays bounded."""
        if isinstance(paths, (str, Path)):
            paths = [paths]
        bptt = bptt or self.config.data.bptt
        total = StreamScore(nll=0.0, tokens=0)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="lmtool-eval-") as tmp:
            for n, path in enumerate(paths):
                ids = encode_file_to_disk(self.tokenizer, Path(path), Path(tmp) / f"{n}.ids")
                part = stream_nll(self.network, ids, batch_size, bptt)
                total = StreamScore(
                    nll=total.nll + part.nll,
                    tokens=total.tokens + part.tokens,
                    unknown=total.unknown + part.unknown,
                    nll_unknown=total.nll_unknown + part.nll_unknown,
                )
                del ids
        return FileEvaluation(files=tuple(map(str, paths)), score=total, seconds=time.perf_counter() - start)


def load_model(ref: str | Path | None = None, device: str = "auto") -> Model:
    """Load a trained model: a run directory, a model file, or (by default) runs/latest."""
    return Model(load_model_file(resolve_model_path(ref)), resolve_device(device))
