"""A generation step's products: rows times a weight matrix held whole, in column blocks or packed by oneDNN."""

from __future__ import annotations

from typing import Union

import torch

from lmtool.column_blocks import BlocksOut, ColumnBlocks, blocks_times
from lmtool.packed_weights import PackedWeights, packed_times

# A transposed (K, N) weight matrix of a generation step, in one of the three forms.
Matrix = Union[torch.Tensor, ColumnBlocks, PackedWeights]


def times(rows: torch.Tensor, matrix: Matrix, add: torch.Tensor | None = None,
          out: torch.Tensor | BlocksOut | None = None) -> torch.Tensor:
    """(B, K) rows times a (K, N) matrix in any of its forms, plus `add` ((N,) or (B, N)) if given: (B, N).
    A (B, N) `add` may be overwritten with the result. `out`, for a step on buffers made once: a (B, N) tensor
    for a whole or packed matrix (unused when a (B, N) `add` takes the result), BlocksOut for column blocks; the
    same arithmetic either way."""
    if isinstance(matrix, PackedWeights):
        return packed_times(rows, matrix, add, out)
    if isinstance(matrix, ColumnBlocks):
        return blocks_times(rows, matrix, add, out)
    if add is None:
        return torch.mm(rows, matrix, out=out)
    if add.dim() == 2:
        return add.addmm_(rows, matrix)
    return torch.addmm(add, rows, matrix, out=out)
