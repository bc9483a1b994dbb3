"""One generation step of each cell with its weights transposed, (inputs, gates x H), for CPU generation.

PyTorch's single-step cells (torch.lstm_cell and friends) multiply by the (gates x H, inputs) weights nn.RNNBase
stores. Where MKL runs on an AMD processor it multiplies one or two rows by that layout far below the memory's
speed, and a generation step's few rows are all it has (lmtool.model.MKL_ON_AMD). These steps take the weights
transposed instead, as `LanguageModel.step_weights` lays them out (StepWeights.gate_major), in any form
lmtool.step_products.times multiplies: whole, in column blocks or packed by oneDNN. They equal PyTorch's cells
to float rounding. Each cell has a step from its input and one from its first layer's input product looked up
in StepWeights.input_table (a copy of the table's rows, which the step may overwrite).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from lmtool.step_products import Matrix, times

# PyTorch stores an LSTM's gates as input, forget, cell, output; the gate-major layout moves the cell gate last,
# so that the three sigmoid gates sit side by side and take one call.
GATE_MAJOR_ORDER = (0, 1, 3, 2)


def lstm_gate_major(*weights: torch.Tensor) -> torch.Tensor:
    """An LSTM layer's (4H, inputs) weights, or several side by side ([w_ih | w_hh]), as an (inputs, 4H) matrix
    in GATE_MAJOR_ORDER: the transpose (a view) of one contiguous matrix of their rows, copied gate by gate. Row
    copies are fast; the one transposing copy is left to the matrix's final form (lmtool.model.StepWeights), and
    oneDNN packs the rows as they are, with none."""
    hidden = weights[0].size(0) // 4
    rows = weights[0].new_empty(4 * hidden, sum(weight.size(1) for weight in weights))
    for place, gate in enumerate(GATE_MAJOR_ORDER):
        start = 0
        for weight in weights:
            rows[place * hidden: (place + 1) * hidden, start: start + weight.size(1)].copy_(
                weight[gate * hidden: (gate + 1) * hidden])
            start += weight.size(1)
    return rows.t()


def lstm_step_gate_major(x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], weight_t: Matrix,
                         bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.lstm_cell on StepWeights' gate-major layout: the input and the hidden state side by side take one
    product with the stacked (inputs + H, 4H) weights (one call, not two), the gates land in one (B, 4H) buffer,
    and the three sigmoid gates, stored side by side, take one call."""
    h, c = state
    return lstm_gates_step(times(torch.cat((x, h), dim=1), weight_t, bias), c)


def lstm_gates_step(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An LSTM step's (h, c) from its (B, 4H) gate inputs in the gate-major order, which it overwrites."""
    hidden = c.size(-1)
    sigmoid_gates = gates[:, : 3 * hidden].sigmoid_()
    cell_input = gates[:, 3 * hidden:].tanh_()
    input_gate, forget_gate = sigmoid_gates[:, :hidden], sigmoid_gates[:, hidden: 2 * hidden]
    c = torch.addcmul(forget_gate * c, input_gate, cell_input)
    return sigmoid_gates[:, 2 * hidden:] * torch.tanh(c), c


def lstm_step_from_input_gates(input_gates: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor],
                               w_hh_t: Matrix, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`lstm_step_gate_major` from the input's (B, 4H) contribution, biases included (so `bias` is unused), which
    it may overwrite, and the (H, 4H) hidden weights."""
    h, c = state
    return lstm_gates_step(times(h, w_hh_t, input_gates), c)  # gates (B, 4H): input, forget, output | cell


def gru_step_transposed(x: torch.Tensor, h: torch.Tensor, w_ih_t: Matrix, w_hh_t: Matrix, b_ih: torch.Tensor,
                        b_hh: torch.Tensor) -> torch.Tensor:
    """torch.gru_cell with its (inputs, 3H) and (H, 3H) weights transposed, gates in PyTorch's order (reset,
    update, new). The new gate's hidden part is reset before it is added, so the two products stay apart."""
    return gru_gates_step(times(x, w_ih_t, b_ih), times(h, w_hh_t, b_hh), h)


def gru_step_from_input(input_gates: torch.Tensor, h: torch.Tensor, w_hh_t: Matrix, b_hh: torch.Tensor
                        ) -> torch.Tensor:
    """`gru_step_transposed` from the input's (B, 3H) contribution, its bias included."""
    return gru_gates_step(input_gates, times(h, w_hh_t, b_hh), h)


def gru_gates_step(input_gates: torch.Tensor, hidden_gates: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A GRU step's new h from the input's and the hidden state's (B, 3H) gate contributions, which it
    overwrites, in the order of PyTorch's own cell: n = tanh(i_n + r * h_n), h' = (h - n) * z + n."""
    hidden = h.size(-1)
    reset_update = input_gates[:, : 2 * hidden].add_(hidden_gates[:, : 2 * hidden]).sigmoid_()
    new_gate = input_gates[:, 2 * hidden:].add_(hidden_gates[:, 2 * hidden:].mul_(reset_update[:, :hidden])).tanh_()
    return (h - new_gate).mul_(reset_update[:, hidden:]).add_(new_gate)


def rnn_step_transposed(x: torch.Tensor, h: torch.Tensor, weight_t: Matrix, bias: torch.Tensor,
                        activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh_) -> torch.Tensor:
    """torch.rnn_tanh_cell (or, with torch.relu_, rnn_relu_cell) with the input and the hidden state side by side
    taking one product with the stacked (inputs + H, H) weights, `bias` = b_ih + b_hh."""
    return activation(times(torch.cat((x, h), dim=1), weight_t, bias))


def rnn_step_from_input(input_part: torch.Tensor, h: torch.Tensor, w_hh_t: Matrix,
                        bias: torch.Tensor | None = None,
                        activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh_) -> torch.Tensor:
    """`rnn_step_transposed` from the input's (B, H) contribution, both biases included (`bias` is unused)."""
    return activation(times(h, w_hh_t, input_part))


# Per cell: a step from the layer's input, and one from its first layer's input product looked up. Each takes
# (input or looked-up rows, the layer's state, *the layer's entry of StepWeights.layers).
TRANSPOSED_STEPS: dict[str, tuple[Callable, Callable]] = {
    "lstm": (lstm_step_gate_major, lstm_step_from_input_gates),
    "gru": (gru_step_transposed, gru_step_from_input),
    "rnn_tanh": (rnn_step_transposed, rnn_step_from_input),
    "rnn_relu": (functools.partial(rnn_step_transposed, activation=torch.relu_),
                 functools.partial(rnn_step_from_input, activation=torch.relu_)),
}


def transposed_layer(cell: str, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor,
                     embedding: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """One layer's weights for its TRANSPOSED_STEPS: (the input table or None, the transposed matrices, the
    biases), the layer's entry of StepWeights.layers being the matrices, then the biases. With `embedding`
    (a first layer whose vocabulary is no larger than its embedding), the input product of every token, (V,
    gates x H), biases included where the step adds them to it, is looked up instead of multiplied:
    - LSTM: ([w_ih.T; w_hh.T],), (b_ih + b_hh,) in GATE_MAJOR_ORDER; looked up: (w_hh.T,), (b_ih + b_hh,), unused;
    - GRU: (w_ih.T, w_hh.T), (b_ih, b_hh); looked up: (w_hh.T,), (b_hh,), the table holding b_ih;
    - plain RNN: ([w_ih.T; w_hh.T],), (b_ih + b_hh,); looked up: (w_hh.T,), (b_ih + b_hh,), unused.
    The matrices come as transposed views of contiguous rows; step_weights lays them out for its products."""
    if cell == "lstm":
        bias = (b_ih + b_hh).view(4, -1)[list(GATE_MAJOR_ORDER)].flatten()
        if embedding is not None:  # the table multiplies a contiguous matrix, as it always has (the same rounding)
            return (torch.addmm(bias, embedding, lstm_gate_major(w_ih).contiguous()), (lstm_gate_major(w_hh),),
                    (bias,))
        return None, (lstm_gate_major(w_ih, w_hh),), (bias,)  # (inputs + H, 4H)
    if cell == "gru":
        if embedding is not None:
            return torch.addmm(b_ih, embedding, w_ih.t()), (w_hh.t(),), (b_hh,)
        return None, (w_ih.t(), w_hh.t()), (b_ih, b_hh)
    bias = b_ih + b_hh
    if embedding is not None:
        return torch.addmm(bias, embedding, w_ih.t()), (w_hh.t(),), (bias,)
    return None, (torch.cat((w_ih, w_hh), dim=1).t(),), (bias,)
