import pytest
import torch

import lmtool.column_blocks
import lmtool.model
from lmtool.column_blocks import ColumnBlocks, block_count, in_column_blocks
from lmtool.step_products import times
from lmtool.config import ModelConfig
from lmtool.model import LanguageModel
from lmtool.sample import SamplingOptions, generate


@pytest.fixture
def threads(monkeypatch):
    """Set how many threads block_count sees (PyTorch's own pool is left alone)."""
    return lambda count: monkeypatch.setattr(torch, "get_num_threads", lambda: count)


@pytest.mark.parametrize("columns", [12, 13])  # divisible by the blocks, and not (the last block padded)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("copy_columns", [512, 3])  # copied in one piece, and in pieces across block edges
def test_rows_times_blocks_equal_rows_times_the_whole_matrix(monkeypatch, threads, rows, columns, copy_columns):
    monkeypatch.setattr(lmtool.column_blocks, "MIN_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(lmtool.column_blocks, "COPY_COLUMNS", copy_columns)
    threads(3)
    matrix = torch.randn(7, columns, dtype=torch.float64)
    blocks = in_column_blocks(matrix.t().contiguous().t())  # from a transposed view, as the output layer's
    assert isinstance(blocks, ColumnBlocks) and blocks.blocks.shape == (3, 7, 5 if columns == 13 else 4)
    assert blocks.shape == (7, columns) and blocks.dtype == torch.float64
    x, bias, add = torch.randn(rows, 7, dtype=torch.float64), torch.randn(columns, dtype=torch.float64), None
    torch.testing.assert_close(times(x, blocks), x @ matrix)
    torch.testing.assert_close(times(x, blocks, bias), x @ matrix + bias)
    add = torch.randn(rows, columns, dtype=torch.float64)
    torch.testing.assert_close(times(x, blocks, add.clone()), x @ matrix + add)
    # the blocks are a copy: a later change of the matrix does not reach them
    matrix.zero_()
    assert times(x, blocks).abs().sum() > 0


@pytest.mark.parametrize("rows", [7, 512])  # a transposed view with rows 56 bytes apart, and 4 KB (a block at once)
@pytest.mark.parametrize("columns", [12, 13])
def test_blocks_hold_the_matrix_columns_in_order_and_zeros_only_in_the_padding(monkeypatch, threads, rows, columns):
    monkeypatch.setattr(lmtool.column_blocks, "MIN_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(lmtool.column_blocks, "COPY_COLUMNS", 3)  # pieces that cross the edges of the blocks
    threads(3)
    matrix = torch.randn(columns, rows, dtype=torch.float64).t()  # (rows, columns), stored transposed
    assert (matrix.stride(1) * matrix.element_size() % 4096 == 0) == (rows == 512)
    blocks = in_column_blocks(matrix).blocks
    width = blocks.size(2)
    gathered = torch.cat(list(blocks), dim=1)  # (rows, parts x width)
    assert torch.equal(gathered[:, :columns], matrix)
    assert not gathered[:, columns:].any() and gathered[:, columns:].shape == (rows, 3 * width - columns)


def test_block_count_gives_each_thread_a_block_of_at_least_the_minimum(threads):
    minimum = lmtool.column_blocks.MIN_BLOCK_ELEMENTS
    threads(2)
    assert block_count(200, 33278) == 2  # a word model's output layer
    assert block_count(512, 66) == 1  # a char model's: too small to gain
    assert block_count(1, minimum - 1) == 1 and block_count(1, 2 * minimum) == 2
    threads(4)
    assert block_count(1, 3 * minimum) == 3 and block_count(1, 10 * minimum) == 4
    threads(1)
    assert block_count(200, 33278) == 1
    assert not isinstance(in_column_blocks(torch.randn(200, 1000)), ColumnBlocks)  # one thread: whole


@pytest.mark.parametrize("embedding_size", [6, 16])  # the first layer multiplied, and looked up (V <= E)
def test_generation_in_column_blocks_steps_like_the_sequence_kernel(monkeypatch, threads, embedding_size):
    """Where MKL runs on an AMD CPU the step's transposed matrices come in blocks, one per thread: the same scores
    and states as the sequence kernel, and the same samples as the whole matrices give."""
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", True)
    monkeypatch.setattr(lmtool.column_blocks, "MIN_BLOCK_ELEMENTS", 1)
    threads(2)
    model = LanguageModel(ModelConfig(embedding_size=embedding_size, hidden_size=10, num_layers=2), 13).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(8)  # so that a swapped block or a lost bias shows
    x = torch.randint(0, 13, (2, 6))
    full, (h_full, c_full) = model(x)
    weights = model.step_weights(streams=2)
    matrices = [layer[0] for layer in weights.layers] + [weights.output_major[0]]
    assert weights.gate_major and all(isinstance(m, ColumnBlocks) for m in matrices)
    assert (weights.input_table is not None) == (embedding_size == 16)
    state, steps = model.init_state(2), []
    for t in range(x.size(1)):
        scores, state = model.step(x[:, t], state, weights)
        steps.append(scores)
    torch.testing.assert_close(torch.stack(steps, 1), full)
    torch.testing.assert_close(state, (h_full, c_full))
    for streams in (1, 2):
        options = SamplingOptions(length=15, num_samples=streams, seed=4, stop_at_eos=False)
        in_blocks = generate(model, [3], options)
        monkeypatch.setattr(lmtool.column_blocks, "MIN_BLOCK_ELEMENTS", 10**9)
        assert not isinstance(model.step_weights(streams=streams).output_major[0], ColumnBlocks)
        assert generate(model, [3], options) == in_blocks
        monkeypatch.setattr(lmtool.column_blocks, "MIN_BLOCK_ELEMENTS", 1)


def test_other_cpus_keep_whole_matrices(monkeypatch, threads):
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", False)
    monkeypatch.setattr(lmtool.column_blocks, "MIN_BLOCK_ELEMENTS", 1)
    threads(2)
    model = LanguageModel(ModelConfig(embedding_size=6, hidden_size=10), 13).eval()
    weights = model.step_weights(streams=lmtool.model.GATE_MAJOR_MIN_STREAMS)  # gate-major there
    assert weights.gate_major and all(isinstance(layer[0], torch.Tensor) for layer in weights.layers)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("add_kind", [None, "bias", "rows"])
def test_products_into_buffers_made_once_equal_new_tensors_and_keep_their_view(monkeypatch, threads, rows, add_kind):
    """times(..., out=) (a generation step on buffers made once) computes exactly what it computes into new
    tensors, and returns the same view of its buffers at every call."""
    from lmtool.column_blocks import BlocksOut

    monkeypatch.setattr(lmtool.column_blocks, "MIN_BLOCK_ELEMENTS", 1)
    threads(3)
    matrix = torch.randn(7, 13)
    blocks = in_column_blocks(matrix)
    assert isinstance(blocks, ColumnBlocks)
    for form, out_of in ((blocks, lambda x: BlocksOut.of(blocks, x)), (matrix, lambda x: x.new_empty(x.size(0), 13))):
        x = torch.randn(rows, 7)
        out, results = out_of(x), []
        for _ in range(2):
            x.copy_(torch.randn(rows, 7))
            add = {None: None, "bias": torch.randn(13), "rows": torch.randn(rows, 13)}[add_kind]
            expected = times(x, form, None if add is None else add.clone())
            results.append(times(x, form, add, out=out))
            assert torch.equal(results[-1], expected)
        if add_kind != "rows" or isinstance(form, ColumnBlocks):  # a (B, N) add takes a whole matrix's result
            assert results[0].data_ptr() == results[1].data_ptr() and results[0].stride() == results[1].stride()
