"""A gate-major LSTM stack stepped on buffers made once per generation call (generation on a CPU).

`LanguageModel.step_layers` makes new tensors at every step: the concatenated input, the gates and each slice of
them, the new states. At one stream those small operations cost about as much as the products themselves.
`LstmStepper` does the same arithmetic in the same order on buffers and views made once, so its states and the
scores read from its output are the same to the bit. Every product reads a buffer laid out as step_layers' own
(a fresh contiguous [input | h] per layer), because a BLAS may round differently for other strides or alignments.
Timed in turn with step_layers on a 2-core AMD EPYC in three runs, one stream of the char 2x512 model generated
1.09-1.10x as fast (1.09-1.20x in bf16), the 33k-word model 1.07-1.16x (1.16-1.38x in bf16), 4 char streams
1.05-1.06x (bf16 1.05-1.12x), 64 streams 0.94-0.98x (bf16 1.00-1.08x)
(`python bench/sampling.py --streams 1,4,64`; bench/RESULTS.md, Generation speed).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmtool.column_blocks import BlocksOut, ColumnBlocks
from lmtool.model import StepWeights
from lmtool.step_products import Matrix, times


class _LayerGates:
    """One layer's (B, 4H) gate inputs, `inputs` (a fixed view) times its gate-major matrix, plus its bias or, for
    a first layer that looks its input product up, the token's row of `table`: lmtool.step_products.times, the
    arithmetic `step_layers` does, writing into buffers made here, so that `gates` is the same view at every
    step."""

    def __init__(self, inputs: torch.Tensor, matrix: Matrix, bias: torch.Tensor | None,
                 table: torch.Tensor | None) -> None:
        batch, columns = inputs.size(0), matrix.shape[1]
        self.inputs, self.matrix, self.bias, self.table = inputs, matrix, bias, table
        self.out: torch.Tensor | BlocksOut
        self.row: torch.Tensor | None = None  # the table's row of each token
        if isinstance(matrix, ColumnBlocks):  # the product lands in the blocks' buffers, the row is added to it
            self.out = BlocksOut.of(matrix, inputs)
            self.row = None if table is None else inputs.new_empty(batch, columns)
            self.gates = self.out.result(columns)
        else:  # the row, where there is one, takes the product (times overwrites a (B, N) `add`)
            self.out = self.gates = inputs.new_empty(batch, columns)
            self.row = None if table is None else self.out

    def fill(self, token: torch.Tensor) -> torch.Tensor:
        """The gate inputs for this step's (B,) tokens, in `gates`."""
        add = self.bias if self.table is None else torch.index_select(self.table, 0, token, out=self.row)
        return times(self.inputs, self.matrix, add, out=self.out)


class _Layer(NamedTuple):
    """One layer's buffers and views, made once."""

    gates: _LayerGates
    sigmoid_gates: torch.Tensor  # input, forget, output (GATE_MAJOR_ORDER), side by side
    cell_input: torch.Tensor
    input_gate: torch.Tensor
    forget_gate: torch.Tensor
    output_gate: torch.Tensor
    cell: torch.Tensor  # c, updated in place
    output: torch.Tensor  # h, in place in this layer's inputs
    next_input: torch.Tensor  # where the next layer reads h (the top layer: the stepper's output)


class LstmStepper:
    """`LanguageModel.step_layers` for an LSTM in StepWeights' gate-major layout, on fixed buffers: call it with
    each step's (B,) tokens. Layer l multiplies its own [h_(l-1) | h_l] buffer (the first layer [embedded token |
    h_1], or h_1 alone where it looks its input product up), writes its new h_l into that buffer's h_l part and
    copies it into the next layer's h_(l-1) part (the top layer into the output buffer). The cell states are
    copies, updated in place."""

    def __init__(self, weights: StepWeights, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not weights.gate_major or not all(isinstance(layer, tuple) and len(layer) == 2 for layer in layers):
            raise ValueError("LstmStepper steps an LSTM's gate-major weights only")
        batch, hidden = layers[0][0].shape
        looks_up = weights.input_table is not None
        self.embedding = None if looks_up else weights.embedding
        widths = [0 if looks_up else weights.embedding.size(1)] + [hidden] * (len(layers) - 1)
        inputs = [h.new_empty(batch, width + hidden) for width, (h, _) in zip(widths, layers)]
        self.embedded = inputs[0][:, : widths[0]]
        self.output = layers[0][0].new_empty(batch, hidden)
        self.squashed_cell = layers[0][1].new_empty(batch, hidden)  # tanh(c), before the output gate
        self.layers: list[_Layer] = []
        for i, ((matrix, bias), (h, c)) in enumerate(zip(weights.layers, layers)):
            first_lookup = i == 0 and looks_up
            layer_inputs, width = inputs[i], widths[i]
            layer_inputs[:, width:].copy_(h)  # its input part is written at each step before it is read
            gates = _LayerGates(layer_inputs, matrix, None if first_lookup else bias,
                                weights.input_table if first_lookup else None)
            g = gates.gates
            self.layers.append(_Layer(
                gates, g[:, : 3 * hidden], g[:, 3 * hidden:], *(g[:, k * hidden: (k + 1) * hidden] for k in range(3)),
                cell=c.clone(), output=layer_inputs[:, width:],
                next_input=inputs[i + 1][:, :hidden] if i + 1 < len(layers) else self.output))

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """One step on (B,) tokens: the top layer's new output, (B, H), a buffer that the next call overwrites."""
        if self.embedding is not None:
            torch.index_select(self.embedding, 0, token, out=self.embedded)
        for layer in self.layers:
            layer.gates.fill(token)  # into the buffer the views read
            layer.sigmoid_gates.sigmoid_()
            layer.cell_input.tanh_()
            layer.cell.mul_(layer.forget_gate).addcmul_(layer.input_gate, layer.cell_input)
            torch.mul(layer.output_gate, torch.tanh(layer.cell, out=self.squashed_cell), out=layer.output)
            layer.next_input.copy_(layer.output)
        return self.output

    def states(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of each layer's (h, c) now, as `step_layers` returns them."""
        return [(layer.output.clone(), layer.cell.clone()) for layer in self.layers]
