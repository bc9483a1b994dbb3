"""The PyTorch word-language-model example's model, training loop and generator, rebuilt for side-by-side runs.

Not lmtool code: a reference. It keeps what decides the example's speed and results: nn.Embedding ->
dropout -> nn.LSTM -> dropout -> nn.Linear over the whole vocabulary, log_softmax + NLL loss in float32,
batch 20, BPTT 35, plain SGD by hand (lr 20) after clipping the gradient norm to 0.25, `loss.item()` every
step for its running loss, and a generator that calls the model on a length-1 input per word and draws with
torch.multinomial. The token ids come from lmtool's tokenizer (same text, same 33k-word vocabulary).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from lmtool.data import batchify


class PeerModel(nn.Module):
    def __init__(self, vocab: int, size: int = 200, layers: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, size)
        self.rnn = nn.LSTM(size, size, layers, dropout=dropout)
        self.decoder = nn.Linear(size, vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, tokens, hidden):  # (T, B) time-major, as in the example
        output, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return F.log_softmax(self.decoder(self.drop(output)), dim=-1), hidden  # (T, B, V)


def train_for(model: PeerModel, stream: torch.Tensor, seconds: float, lr: float = 20.0, clip: float = 0.25,
              batch: int = 20, bptt: int = 35) -> tuple[int, float]:
    """Train for `seconds` of wall time; returns (tokens trained, seconds taken)."""
    model.train()
    data = batchify(stream, batch).long().t().contiguous()  # (N / B, B)
    hidden, tokens, total_loss = None, 0, 0.0
    start = time.perf_counter()
    while True:
        for i in range(0, data.size(0) - 1, bptt):
            length = min(bptt, data.size(0) - 1 - i)
            x, y = data[i : i + length], data[i + 1 : i + 1 + length]
            if hidden is not None:
                hidden = tuple(h.detach() for h in hidden)
            model.zero_grad()
            output, hidden = model(x, hidden)
            loss = F.nll_loss(output.view(-1, output.size(-1)), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
            total_loss += loss.item()
            tokens += y.numel()
            if time.perf_counter() - start >= seconds:
                return tokens, time.perf_counter() - start


@torch.no_grad()
def perplexity(model: PeerModel, stream: torch.Tensor, batch: int = 10, bptt: int = 35) -> float:
    model.eval()
    data = batchify(stream, batch).long().t().contiguous()
    hidden, total, count = None, 0.0, 0
    for i in range(0, data.size(0) - 1, bptt):
        length = min(bptt, data.size(0) - 1 - i)
        output, hidden = model(data[i : i + length], hidden)
        y = data[i + 1 : i + 1 + length]
        total += F.nll_loss(output.view(-1, output.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return math.exp(total / count)


@torch.no_grad()
def generate_words_per_s(model: PeerModel, words: int) -> float:
    """The example's generate.py: one length-1 forward per word, softmax of scores / temperature, multinomial."""
    model.eval()
    token, hidden = torch.zeros(1, 1, dtype=torch.long), None
    start = time.perf_counter()
    for _ in range(words):
        output, hidden = model(token, hidden)
        weights = output.squeeze().div(1.0).exp()
        token.fill_(torch.multinomial(weights, 1)[0])
    return words / (time.perf_counter() - start)

