"""Products of a few rows with a matrix cut into column blocks, one block per thread.

Generating one to a few streams multiplies a few rows by each weight matrix. Where MKL runs on an AMD processor
it did such a product on one thread however many PyTorch had. Cut into blocks of columns, (parts, K, N / parts),
and multiplied in one batched call (`torch.bmm`, which runs the blocks on separate threads), the same products
ran about twice as fast, in fp32 with results equal to float rounding (the BLAS sums each output in its own
order, which can differ with the number of blocks, so with the thread count): on a 2-core AMD EPYC the bare
products of one generation step took 0.43-0.57 ms in two blocks against 0.85-1.01 ms as whole transposed
matrices for a word model with 33,278 words, and 0.18-0.23 against 0.29-0.37 ms for the char 2x512 model in five
runs (`python bench/sampling.py`, which times them both ways). Matrices of fewer than MIN_BLOCK_ELEMENTS per block
stay whole: for a small matrix, such as the char model's (512, 66) output layer, the batched call's own cost
outweighs the second thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Fewest elements per block: smaller matrices stay whole (see above).
MIN_BLOCK_ELEMENTS = 2**16
# Columns copied into the blocks at a time (a cache-friendlier transposition of a large matrix).
COPY_COLUMNS = 512


@dataclass(frozen=True)
class ColumnBlocks:
    """A (K, N) matrix as `blocks`, (parts, K, width): its columns cut into `parts` blocks of `width`, the last
    one zero-padded to that width. `blocks_times` multiplies rows by it, one block per thread."""

    blocks: torch.Tensor
    columns: int

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.blocks.size(1), self.columns))


def block_count(rows: int, columns: int) -> int:
    """Blocks for a (rows, columns) matrix: one per thread PyTorch uses, each of at least MIN_BLOCK_ELEMENTS."""
    return max(1, min(torch.get_num_threads(), rows * columns // MIN_BLOCK_ELEMENTS))


def in_column_blocks(matrix: torch.Tensor) -> torch.Tensor | ColumnBlocks:
    """A (K, N) matrix (any strides, e.g. a transposed view) as ColumnBlocks where block_count gives more than
    one, else contiguous (a copy if it was not)."""
    rows, columns = matrix.shape
    parts = block_count(rows, columns)
    if parts == 1:
        return matrix.contiguous()
    width = -(-columns // parts)
    # zeros only where the last block is padded: filling megabytes costs a generation call time up front
    blocks = (matrix.new_zeros if parts * width != columns else matrix.new_empty)(parts, rows, width)
    # COPY_COLUMNS at a time: a large transposed matrix (a word model's output layer) copies faster in pieces
    # whose source rows stay in cache than in one strided pass. But where a transposed view's stored rows hold a
    # multiple of 4 KB (1,024 fp32 values, as the char model's (1,024, 2,048) second-layer matrix), a piece's reads
    # share a few cache sets, and a block at a time goes faster: PyTorch transposes a whole contiguous destination
    # in cache-sized tiles (a padded last block, whose destination is strided, is copied the plain way).
    aliased = matrix.stride(0) == 1 and matrix.stride(1) * matrix.element_size() % 4096 == 0
    step = width if aliased else COPY_COLUMNS
    for start in range(0, columns, step):
        stop = min(start + step, columns)
        for part in range(start // width, (stop - 1) // width + 1):  # the blocks these columns land in
            first, last = max(start, part * width), min(stop, (part + 1) * width)
            blocks[part, :, first - part * width: last - part * width].copy_(matrix[:, first:last])
    return ColumnBlocks(blocks=blocks, columns=columns)


@dataclass(frozen=True)
class BlocksOut:
    """Buffers that `blocks_times` writes a product of `rows` rows into instead of new tensors (a generation step
    made once per call): the blocks' products, (parts, rows, width), and for several rows the same interleaved
    into column order, (rows, parts x width)."""

    blocks: torch.Tensor
    gathered: torch.Tensor | None

    @staticmethod
    def of(matrix: ColumnBlocks, rows: torch.Tensor) -> "BlocksOut":
        parts, _, width = matrix.blocks.shape
        count = rows.size(0)
        return BlocksOut(rows.new_empty(parts, count, width),
                         None if count == 1 else rows.new_empty(count, parts * width))

    def result(self, columns: int) -> torch.Tensor:
        """The (rows, columns) product in column order, a view of the buffers (one row is already in that order;
        the padding of the last block is left out)."""
        ordered = self.blocks.view(1, -1) if self.gathered is None else self.gathered
        return ordered[:, :columns]


def blocks_times(rows: torch.Tensor, matrix: ColumnBlocks, add: torch.Tensor | None = None,
                 out: BlocksOut | None = None) -> torch.Tensor:
    """(B, K) rows times a (K, N) matrix in ColumnBlocks, plus `add` ((N,) or (B, N)) if given: (B, N).
    A (B, N) `add` may be overwritten with the result. With `out` the result is a view of its buffers, the same
    view at every call."""
    blocks = matrix.blocks
    count = rows.size(0)
    expanded = rows.expand(blocks.size(0), -1, -1)
    # (B, parts x width) from (parts, B, width), a block per thread: one row is already in that order; more rows
    # are interleaved by a copy (the size of the result; with it, blocks measured about even with whole matrices at
    # 64 streams of a 33k-word output layer)
    if out is None:
        product = torch.bmm(expanded, blocks)
        product = product.view(1, -1) if count == 1 else product.transpose(0, 1).reshape(count, -1)
        product = product[:, : matrix.columns]
    else:
        torch.bmm(expanded, blocks, out=out.blocks)
        if out.gathered is not None:
            out.gathered.view(count, blocks.size(0), -1).copy_(out.blocks.transpose(0, 1))
        product = out.result(matrix.columns)
    return product if add is None else product.add_(add)
