"""Log-probabilities of text: the one definition of the loss, and the NLL of a whole token stream."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmtool.data import batchify, windows
from lmtool.model import LanguageModel, State, detach_state


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log P(target) at every position: (B, T, V), (B, T) -> (B, T), in float32 whatever the logits' precision."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().long(), reduction="none")
    return nll.view(targets.shape)  # (B, T)


@dataclass(frozen=True)
class StreamScore:
    """Summed negative log-likelihood over the tokens actually scored."""

    nll: float  # nats, summed
    tokens: int

    @property
    def loss(self) -> float:
        """Mean NLL per token in nats."""
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        """exp(total NLL / total tokens): never an average of per-batch perplexities."""
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)


@torch.no_grad()
def stream_nll(model: LanguageModel, stream: torch.Tensor, batch_size: int, bptt: int) -> StreamScore:
    """Score a (N,) id stream as `batch_size` contiguous streams, carrying the state across windows."""
    was_training = model.training
    model.eval()
    device = model.decoder.weight.device
    streams = batchify(stream, batch_size).to(device)  # (B, N // B)
    state: State = model.init_state(streams.size(0))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in windows(streams, bptt):
        logits, state = model(x, state)  # (B, T, V)
        total += token_nll(logits, y).sum(dtype=torch.float64)
        state = detach_state(state)
    model.train(was_training)
    scored = streams.size(0) * max(0, streams.size(1) - 1)
    return StreamScore(nll=float(total), tokens=scored)
