"""The network: embedding -> fused RNN/GRU/LSTM stack -> dropout -> linear output. No I/O, no globals."""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from lmtool.config import ModelConfig

# An LSTM carries (h, c); the other cells carry h alone. Each tensor is (num_layers, B, H).
State = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

# Closed choice of cell -> (fused PyTorch module, extra constructor arguments).
CELLS: dict[str, tuple[type[nn.RNNBase], dict]] = {
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
    "gru": (nn.GRU, {}),
    "lstm": (nn.LSTM, {}),
}


def detach_state(state: State) -> State:
    """Cut the graph at a window boundary while keeping the values (truncated BPTT)."""
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)  # type: ignore[return-value]
    return state.detach()


class LanguageModel(nn.Module):
    """Predicts token t+1 from tokens 1..t; `forward` returns unnormalised scores over the vocabulary."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        rnn_class, rnn_kwargs = CELLS[config.cell]
        self.embedding = nn.Embedding(vocab_size, config.embedding_size)
        self.drop = nn.Dropout(config.dropout)
        # nn.RNNBase warns when given dropout with a single layer: inter-layer dropout exists only between layers.
        self.rnn = rnn_class(
            config.embedding_size,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
            **rnn_kwargs,
        )
        self.decoder = nn.Linear(config.hidden_size, vocab_size)
        if config.init_range is not None:
            for param in self.parameters():
                nn.init.uniform_(param, -config.init_range, config.init_range)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight

    def init_state(self, batch_size: int) -> State:
        """The zero state for `batch_size` streams, on the model's device."""
        weight = self.decoder.weight
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        h = weight.new_zeros(shape)
        return (h, weight.new_zeros(shape)) if self.config.cell == "lstm" else h

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Scores for the next token at every position, and the state after the last position."""
        if tokens.dtype not in (torch.int32, torch.int64):
            tokens = tokens.int()  # the data pipeline stores ids in 1 or 2 bytes; the embedding wants int32/64
        emb = self.drop(self.embedding(tokens))  # (B, T, E)
        if state is None:
            state = self.init_state(tokens.size(0))
        output, state = self.rnn(emb, state)  # (B, T, H)
        logits = self.decoder(self.drop(output))  # (B, T, V)
        return logits, state


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
