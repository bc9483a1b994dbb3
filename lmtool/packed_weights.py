"""Weight matrices packed once into oneDNN's own layout, for the products of a generation step on a CPU.

PyTorch's CPU linear layer in bf16 runs on oneDNN, which rearranges the weights into its blocked layout on every
call; for a generation step's few rows that costs more than the product. Packed once per generation call (with
`torch.ops.mkldnn._reorder_linear_weight`, the op PyTorch's own compiler uses for frozen CPU models), the bare
products of one step of a word model with 33,278 words took 0.28-0.30 ms in bf16 against 0.63-0.74 ms in the
fastest fp32 layout on a 2-core AMD EPYC, and fp32 matrices packed generated 4-64 streams 1.26-1.91x as fast
as in column blocks (three runs of `python bench/sampling.py`; bench/RESULTS.md, Generation speed). The ops
are private to PyTorch, so `packing_works` checks them once on a small product before anything is packed; where
they are missing or wrong, lmtool keeps its other layouts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PackedWeights:
    """A (K, N) matrix, held as oneDNN's packing of its (N, K) transpose (the linear layer's own shape)."""

    packed: torch.Tensor
    rows: int
    columns: int

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.columns))


def pack(matrix: torch.Tensor, streams: int = 1) -> PackedWeights:
    """A (K, N) matrix (any strides), packed for products with `streams` rows at a time (oneDNN's hint)."""
    rows, columns = matrix.shape
    weight = matrix.t().contiguous()  # (N, K), as a linear layer stores it
    return PackedWeights(torch.ops.mkldnn._reorder_linear_weight(weight, streams), rows, columns)


def packed_times(rows: torch.Tensor, matrix: PackedWeights, add: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) rows times a packed (K, N) matrix, plus `add` ((N,) bias, fused into the product, or (B, N), which
    may be overwritten with the result): (B, N) in the matrix's dtype. With `out` ((B, N)) and no (B, N) `add`,
    the result is copied into it (oneDNN's op writes only new tensors)."""
    bias = add if add is not None and add.dim() == 1 else None
    product = torch.ops.mkldnn._linear_pointwise(rows, matrix.packed, bias, "none", [], "")
    if add is not None and bias is None:
        return add.add_(product)
    return product if out is None else out.copy_(product)


@functools.cache
def packing_works(dtype: torch.dtype) -> bool:
    """Whether this PyTorch packs and multiplies `dtype` matrices right: the ops exist (a CPU build with oneDNN)
    and a small product with a fused bias matches the plain one (to float tolerance in fp32, to bf16's rounding
    of the inputs in bf16)."""
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    matrix, rows, bias = (torch.randn(shape, generator=generator).to(dtype) for shape in ((24, 40), (3, 24), (40,)))
    try:
        product = packed_times(rows, pack(matrix, 3), bias)
    except (AttributeError, RuntimeError, NotImplementedError):  # no such op, or no kernel for this dtype
        return False
    expected = F.linear(rows.double(), matrix.t().double(), bias.double())
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    return product.shape == expected.shape and bool(torch.allclose(product.double(), expected, atol=tolerance))
