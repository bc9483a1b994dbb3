"""A gate-major LSTM stack stepped on buffers made once per generation call (generation on a CPU).

`LanguageModel.step_layers` makes new tensors at every step: the concatenated input, the gates and each slice of
them, the new states. At one stream those small operations cost about as much as the products themselves.
`LstmStepper` does the same arithmetic in the same order, so its states are the same to the bit. It works in
buffers and views made once, and writes each layer's output where the next layer and its own next step read it.
Timed in turn with step_layers on a 2-core AMD EPYC, one stream of the char 2x512 model generated 1.72x and 1.38x
as fast in two runs, the 33k-word model 1.10x and 1.21x (1.32x and 1.14x in bf16); 4 and 64 streams 0.97-1.20x
(`python bench/sampling.py --streams 1,4,64`; bench/RESULTS.md, Generation speed).
"""

from __future__ import annotations

import torch

from lmtool.column_blocks import ColumnBlocks
from lmtool.model import StepWeights
from lmtool.packed_weights import PackedWeights, packed_times
from lmtool.step_products import Matrix


class _LayerGates:
    """One layer's (B, 4H) gate inputs, `inputs` (a fixed view of the rows) times its gate-major matrix, plus its
    bias or, for a first layer that looks its input product up, the token's row of `table`. Each form of the
    matrix does what lmtool.step_products.times does for it, in the same order, into buffers made here."""

    def __init__(self, inputs: torch.Tensor, matrix: Matrix, bias: torch.Tensor | None,
                 table: torch.Tensor | None) -> None:
        batch, columns = inputs.size(0), matrix.shape[1]
        self.inputs, self.matrix, self.bias, self.table = inputs, matrix, bias, table
        self.row = None
        if isinstance(matrix, ColumnBlocks):
            parts, _, width = matrix.blocks.shape
            self.expanded = inputs.expand(parts, -1, -1)
            self.blocks_out = inputs.new_empty(parts, batch, width)  # a block per thread
            if batch == 1:  # one row is already in column order
                self.gathered = None
                self.gates = self.blocks_out.view(1, -1)[:, :columns]
            else:  # more rows are interleaved into column order
                self.gathered = inputs.new_empty(batch, parts, width)
                self.gates = self.gathered.view(batch, -1)[:, :columns]
            if table is not None:
                self.row = inputs.new_empty(batch, columns)
        else:
            self.gates = inputs.new_empty(batch, columns)

    def fill(self, token: torch.Tensor) -> torch.Tensor:
        """The gate inputs for this step's (B,) tokens, in `gates`."""
        matrix, gates = self.matrix, self.gates
        if isinstance(matrix, ColumnBlocks):
            torch.bmm(self.expanded, matrix.blocks, out=self.blocks_out)
            if self.gathered is not None:
                self.gathered.copy_(self.blocks_out.transpose(0, 1))
            if self.table is None:
                return gates.add_(self.bias)
            return gates.add_(torch.index_select(self.table, 0, token, out=self.row))
        if isinstance(matrix, PackedWeights):
            if self.table is None:  # the bias fused into the product
                return gates.copy_(packed_times(self.inputs, matrix, self.bias))
            return torch.index_select(self.table, 0, token, out=gates).add_(packed_times(self.inputs, matrix))
        if self.table is None:
            return torch.addmm(self.bias, self.inputs, matrix, out=gates)
        return torch.index_select(self.table, 0, token, out=gates).addmm_(self.inputs, matrix)


class LstmStepper:
    """`LanguageModel.step_layers` for an LSTM in StepWeights' gate-major layout, on fixed buffers: call it with
    each step's (B,) tokens. The rows hold [input | h_1 | ... | h_L]; layer l multiplies its slice [h_(l-1) | h_l]
    (the first layer [embedded token | h_1], or h_1 alone where it looks its input product up) and writes its
    new h_l in place. The cell states are copies, updated in place."""

    def __init__(self, weights: StepWeights, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not weights.gate_major:
            raise ValueError("LstmStepper steps an LSTM's gate-major weights only")
        batch, hidden = layers[0][0].shape
        self.embedding = None if weights.input_table is not None else weights.embedding
        width = 0 if self.embedding is None else self.embedding.size(1)
        self.rows = layers[0][0].new_empty(batch, width + len(layers) * hidden)
        self.embedded = self.rows[:, :width]
        self.outputs = [self.rows[:, width + i * hidden: width + (i + 1) * hidden] for i in range(len(layers))]
        for output, (h, _) in zip(self.outputs, layers):
            output.copy_(h)
        self.cells = [c.clone() for _, c in layers]
        self.squashed_cell = layers[0][1].new_empty(batch, hidden)  # tanh(c), before the output gate
        self.layers = []
        for i, (matrix, bias) in enumerate(weights.layers):
            start = width + (i - 1) * hidden if i else 0
            looks_up = i == 0 and weights.input_table is not None
            inputs = self.outputs[0] if looks_up else self.rows[:, start: width + (i + 1) * hidden]
            layer_gates = _LayerGates(inputs, matrix, None if looks_up else bias,
                                      weights.input_table if looks_up else None)
            gates = layer_gates.gates  # input, forget, output | cell (GATE_MAJOR_ORDER)
            views = (gates[:, : 3 * hidden], gates[:, 3 * hidden:],
                     *(gates[:, k * hidden: (k + 1) * hidden] for k in range(3)))
            self.layers.append((layer_gates, views, self.cells[i], self.outputs[i]))

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """One step on (B,) tokens: the top layer's new output, (B, H), a view that the next call overwrites."""
        if self.embedding is not None:
            torch.index_select(self.embedding, 0, token, out=self.embedded)
        for layer_gates, (sigmoid_gates, cell_input, input_gate, forget_gate, output_gate), c, h in self.layers:
            layer_gates.fill(token)  # into the buffer the views read
            sigmoid_gates.sigmoid_()
            cell_input.tanh_()
            c.mul_(forget_gate).addcmul_(input_gate, cell_input)
            torch.mul(output_gate, torch.tanh(c, out=self.squashed_cell), out=h)
        return self.outputs[-1]

    def states(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of each layer's (h, c) now, as `step_layers` returns them."""
        return [(h.clone(), c.clone()) for h, c in zip(self.outputs, self.cells)]
