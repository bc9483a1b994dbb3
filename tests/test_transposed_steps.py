import pytest
import torch

import lmtool.column_blocks
import lmtool.model
from lmtool.column_blocks import ColumnBlocks
from lmtool.config import ModelConfig
from lmtool.model import GATE_MAJOR_MIN_STREAMS, PACKED_FP32_MIN_STREAMS, LanguageModel
from lmtool.packed_weights import PackedWeights, packing_works
from lmtool.sample import SamplingOptions, generate
from lmtool.transposed_steps import GATE_MAJOR_ORDER, lstm_gate_major

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
# Where MKL_ON_AMD: few streams step in column blocks (or whole matrices, when they are too small for blocks), cut
# for 3 and for 4 threads so that every cell meets a padded last block; fp32 matrices large enough are packed from
# PACKED_FP32_MIN_STREAMS streams; from GATE_MAJOR_MIN_STREAMS only a looked-up first layer keeps the transposed
# layout; bf16 packs every matrix at any count.
# form: (stream counts, MIN_BLOCK_ELEMENTS, thread counts, the form no matrix may take, dtype)
FORMS = {"whole": ((1,), 10**9, (3,), ColumnBlocks, None), "blocks": ((1, 2), 1, (3, 4), torch.Tensor, None),
         "packed fp32": ((PACKED_FP32_MIN_STREAMS, GATE_MAJOR_MIN_STREAMS + 1), 1, (3,), ColumnBlocks, None),
         "packed bf16": ((1, GATE_MAJOR_MIN_STREAMS + 1), 1, (3,), ColumnBlocks, torch.bfloat16)}


@pytest.mark.parametrize("cell", CELLS)
# embedding_size 6: the first layer multiplied; 16: looked up (V <= E), which many streams need to step transposed
@pytest.mark.parametrize("form, embedding_size", [(form, size) for form in FORMS for size in (6, 16)])
def test_every_cell_steps_with_transposed_weights_like_the_sequence_kernel(monkeypatch, cell, form, embedding_size):
    """Where MKL runs on an AMD CPU every cell generates with its weights transposed, in each form they take: the
    scores and states of the sequence kernel to float rounding (in bf16, to well within a lost bias or swapped
    gate), in each direction of a bidirectional model."""
    stream_counts, min_block, thread_counts, not_this, dtype = FORMS[form]
    if (form, embedding_size) == ("packed fp32", 6):  # many streams step a multiplied first layer in the cells
        stream_counts = (PACKED_FP32_MIN_STREAMS,)
    if form.startswith("packed") and not packing_works(dtype or torch.float32):
        pytest.skip("this PyTorch build has no oneDNN packing")
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", True)
    monkeypatch.setattr(lmtool.model, "bf16_is_native", lambda device: True)  # the ops run without it, slower
    monkeypatch.setattr(lmtool.column_blocks, "MIN_BLOCK_ELEMENTS", min_block)
    monkeypatch.setattr(lmtool.model, "PACKED_FP32_MIN_ELEMENTS", 1 if form == "packed fp32" else None)
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(cell=cell, embedding_size=embedding_size, hidden_size=10, num_layers=2,
                                      direction="bidirectional"), 13).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4)  # so that a swapped gate, block or a lost bias shows
    padded = []
    for streams in stream_counts:
        x = torch.randint(0, 13, (streams, 7))
        for threads in thread_counts:
            monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # one block per thread
            for direction in ("forward", "backward"):
                full, final = model(x, direction=direction)
                weights = model.step_weights(direction, dtype=dtype, streams=streams)
                assert weights.gate_major and (weights.input_table is not None) == (embedding_size == 16)
                matrices = [w for entry in weights.layers for w in entry[: (len(entry) + 1) // 2]]
                assert matrices and not any(isinstance(w, not_this) for w in matrices)
                assert all(w.dtype == (dtype or torch.float32) for w in matrices)
                if form.startswith("packed"):
                    assert all(isinstance(w, PackedWeights) for w in matrices)
                padded += [w.blocks.size(0) * w.blocks.size(2) != w.columns for w in matrices
                           if isinstance(w, ColumnBlocks)]
                state = model.init_state(streams) if dtype is None else lmtool.model.map_state(
                    lambda t: t.to(dtype), model.init_state(streams))
                steps = []
                for t in range(x.size(1)):
                    scores, state = model.step(x[:, t], state, weights)
                    steps.append(scores)
                if dtype is None:
                    torch.testing.assert_close(torch.stack(steps, 1), full)
                    torch.testing.assert_close(state, final)
                else:  # bf16 rounding is a few 0.1% of the largest score; a lost bias or swapped gate, over 10%
                    scale = full.abs().max().item()
                    torch.testing.assert_close(torch.stack(steps, 1), full, atol=0.03 * scale, rtol=0)
    assert any(padded) == (form == "blocks")


@pytest.mark.parametrize("cell", ["gru", "rnn_tanh"])
def test_other_cpus_keep_pytorchs_cells_for_the_other_cells(monkeypatch, cell):
    """Off MKL on AMD, only the LSTM steps transposed (from GATE_MAJOR_MIN_STREAMS streams): the other cells keep
    PyTorch's single-step cells, which draw the same samples."""
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", True)
    model = LanguageModel(ModelConfig(cell=cell, embedding_size=6, hidden_size=10), 13).eval()
    options = SamplingOptions(length=12, num_samples=2, seed=7)
    transposed = generate(model, [3], options)
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", False)
    for streams in (1, GATE_MAJOR_MIN_STREAMS):
        assert not model.step_weights(streams=streams).gate_major
    assert generate(model, [3], options) == transposed


def test_gate_major_matrix_is_a_view_of_rows_copied_gate_by_gate_which_packing_takes_without_a_copy():
    """lstm_gate_major puts [w_ih | w_hh]'s gates in GATE_MAJOR_ORDER and transposes by a view only: its rows are
    one contiguous matrix, which oneDNN packs as they are and the other forms copy once."""
    hidden, inputs = 3, 5
    w_ih, w_hh = torch.randn(4 * hidden, inputs), torch.randn(4 * hidden, hidden)
    matrix = lstm_gate_major(w_ih, w_hh)
    assert matrix.shape == (inputs + hidden, 4 * hidden) and matrix.t().is_contiguous()
    for place, gate in enumerate(GATE_MAJOR_ORDER):  # gate `gate` of PyTorch's order lands in column block `place`
        block = matrix[:, place * hidden: (place + 1) * hidden]
        assert torch.equal(block, torch.cat((w_ih, w_hh), dim=1)[gate * hidden: (gate + 1) * hidden].t())
    assert torch.equal(lstm_gate_major(w_hh), matrix[inputs:])
