import pytest
import torch

import lmtool.model
import lmtool.packed_weights
from lmtool.config import ModelConfig
from lmtool.devices import bf16_is_native
from lmtool.model import GATE_MAJOR_MIN_STREAMS, PACKED_FP32_MIN_STREAMS, LanguageModel
from lmtool.packed_weights import PackedWeights, pack, packed_times, packing_works
from lmtool.sample import SamplingOptions, generate
from lmtool.step_products import times

# Skipped only where the ops are missing: a packed product that comes out wrong fails
# test_packing_works_where_this_pytorch_has_the_ops instead of skipping these.
HAS_OPS = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
needs_packing = pytest.mark.skipif(not HAS_OPS, reason="this PyTorch build has no oneDNN packing")


@needs_packing
def test_packing_works_where_this_pytorch_has_the_ops():
    assert packing_works(torch.float32)
    if bf16_is_native(torch.device("cpu")):
        assert packing_works(torch.bfloat16)


@needs_packing
@pytest.mark.parametrize("rows", [1, 5])
def test_rows_times_a_packed_matrix_equal_rows_times_the_matrix(rows):
    source = torch.randn(12, 7)
    matrix = source.t()  # (7, 12): a transposed view, as the output layer's
    packed = pack(matrix, streams=rows)
    assert isinstance(packed, PackedWeights) and packed.shape == (7, 12) and packed.dtype == torch.float32
    x, bias, add = torch.randn(rows, 7), torch.randn(12), torch.randn(rows, 12)
    torch.testing.assert_close(times(x, packed), x @ matrix)
    torch.testing.assert_close(times(x, packed, bias), x @ matrix + bias)
    torch.testing.assert_close(times(x, packed, add.clone()), x @ matrix + add)
    # bf16: rounded, but the same product
    low = pack(matrix.bfloat16())
    product = packed_times(x.bfloat16(), low, bias.bfloat16())
    assert product.dtype == torch.bfloat16
    torch.testing.assert_close(product.float(), x @ matrix + bias, atol=0.1, rtol=0.02)
    # the packing is a copy: a later change of the matrix does not reach it
    expected = x @ matrix
    source.zero_()
    torch.testing.assert_close(times(x, packed), expected)


def test_packing_is_not_trusted_where_the_ops_are_missing_or_fail(monkeypatch):
    packing_works.cache_clear()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    try:
        assert not packing_works(torch.float32)
        packing_works.cache_clear()
        monkeypatch.undo()

        def broken(*args):
            raise RuntimeError("could not create a primitive descriptor")

        monkeypatch.setattr(lmtool.packed_weights, "pack", broken)
        assert not packing_works(torch.bfloat16)
        packing_works.cache_clear()
        # a product that comes out wrong is not trusted either
        monkeypatch.setattr(lmtool.packed_weights, "pack", lambda matrix, streams=1: PackedWeights(
            torch.ops.mkldnn._reorder_linear_weight(matrix.t().contiguous() * 2, streams), *matrix.shape))
        assert not packing_works(torch.float32)
    finally:
        packing_works.cache_clear()


@needs_packing
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("embedding_size", [6, 16])  # the first layer multiplied, and looked up (V <= E)
@pytest.mark.parametrize("streams", [1, GATE_MAJOR_MIN_STREAMS + 1])
def test_bf16_generation_steps_with_packed_bf16_weights_close_to_fp32(monkeypatch, cell, embedding_size, streams):
    """--precision bf16 on a CPU with native bf16 packs every transposed matrix of the cell and the output layer
    in bf16: each step's scores within bf16's rounding of fp32's, on any CPU vendor, and in fp32 for the draw."""
    monkeypatch.setattr(lmtool.model, "bf16_is_native", lambda device: True)  # the ops run without it, slower
    for amd in (True, False):
        monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", amd)
        model = LanguageModel(ModelConfig(cell=cell, embedding_size=embedding_size, hidden_size=10, num_layers=2),
                              13).eval()
        x = torch.randint(0, 13, (streams, 6))
        full, _ = model(x)
        weights = model.step_weights(dtype=torch.bfloat16, streams=streams)
        assert weights.gate_major
        assert isinstance(weights.output_major[0], PackedWeights) and weights.output_major[0].dtype == torch.bfloat16
        looks_up = embedding_size >= 13
        assert (weights.input_table is not None) == looks_up
        # per layer: the GRU's input and hidden matrices apart, the others' stacked; the looked-up layer's hidden one
        matrices = [[w for w in entry if isinstance(w, PackedWeights) and w.dtype == torch.bfloat16]
                    for entry in weights.layers]
        per_layer = 2 if cell == "gru" else 1
        assert [len(layer) for layer in matrices] == [1 if looks_up else per_layer, per_layer]
        assert all(not isinstance(w, PackedWeights) and w.dtype == torch.bfloat16 for entry in weights.layers
                   for w in entry[len(entry) // 2:])  # the biases, plain bf16
        state = tuple(s.bfloat16() for s in model.init_state(streams)) if cell == "lstm" else \
            model.init_state(streams).bfloat16()
        for t in range(x.size(1)):
            scores, state = model.step(x[:, t], state, weights)
            assert scores.dtype == torch.float32
            torch.testing.assert_close(scores, full[:, t], atol=5e-3, rtol=0)  # at scale: test_transposed_steps
            assert not torch.equal(scores, full[:, t])  # bf16 rounding is there
        options = SamplingOptions(length=8, num_samples=streams, seed=4, precision="bf16")
        samples = generate(model, [2], options)
        assert samples == generate(model, [2], options)  # same seed, same samples
        assert all(0 <= token < 13 for row in samples for token in row)


@needs_packing
def test_a_tied_output_layer_packs_the_embeddings_bf16_copy_with_the_same_values(monkeypatch):
    """With tied weights, bf16 generation packs the embedding's bf16 copy as the output layer (no second
    conversion): its products equal those of the decoder's own weights converted and packed, to the bit."""
    monkeypatch.setattr(lmtool.model, "bf16_is_native", lambda device: True)
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(embedding_size=10, hidden_size=10, tie_weights=True), 13).eval()
    assert model.decoder.weight is model.embedding.weight
    weights = model.step_weights(dtype=torch.bfloat16)
    rows = torch.randn(3, 10).bfloat16()
    bias = model.decoder.bias.detach().bfloat16()
    expected = packed_times(rows, pack(model.decoder.weight.detach().t().bfloat16()), bias)
    assert torch.equal(times(rows, *weights.output_major), expected)
    assert torch.equal(weights.embedding, model.embedding.weight.detach().bfloat16())


@needs_packing
@pytest.mark.parametrize("streams", [1, PACKED_FP32_MIN_STREAMS, GATE_MAJOR_MIN_STREAMS])
def test_large_matrices_step_packed_in_fp32_for_several_streams_where_mkl_runs_on_amd(monkeypatch, streams):
    """Where MKL_ON_AMD, from PACKED_FP32_MIN_STREAMS streams, transposed matrices of PACKED_FP32_MIN_ELEMENTS and
    more come packed in fp32 (the char model's LSTM matrices, a large vocabulary's output layer): the sequence
    kernel's scores and states, and the same samples as unpacked. One stream, and other CPUs, pack nothing."""
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", True)
    monkeypatch.setattr(lmtool.model, "OUTPUT_MAJOR_MIN_VOCAB", 13)
    # an embedding larger than the vocabulary: gate-major at any count, the first layer's input looked up
    model = LanguageModel(ModelConfig(embedding_size=16, hidden_size=10, num_layers=2), 13).eval()
    # elements: the first layer's (H, 4H) 400, the second's stacked (2H, 4H) 800, the output layer's (H, V) 130
    monkeypatch.setattr(lmtool.model, "PACKED_FP32_MIN_ELEMENTS", 400)
    weights = model.step_weights(streams=streams)
    many = streams >= PACKED_FP32_MIN_STREAMS
    assert weights.gate_major and weights.input_table is not None
    assert [isinstance(w, PackedWeights) for w, _ in weights.layers] == [many, many]
    assert not isinstance(weights.output_major[0], PackedWeights)
    monkeypatch.setattr(lmtool.model, "PACKED_FP32_MIN_ELEMENTS", 130)
    assert isinstance(model.step_weights(streams=streams).output_major[0], PackedWeights) == many
    monkeypatch.setattr(lmtool.model, "PACKED_FP32_MIN_ELEMENTS", 401)
    assert [isinstance(w, PackedWeights) for w, _ in model.step_weights(streams=streams).layers] == [False, many]
    monkeypatch.setattr(lmtool.model, "PACKED_FP32_MIN_ELEMENTS", 130)
    weights = model.step_weights(streams=streams)
    x = torch.randint(0, 13, (streams, 6))
    full, (h_full, c_full) = model(x)
    state, steps = model.init_state(streams), []
    for t in range(x.size(1)):
        scores, state = model.step(x[:, t], state, weights)
        steps.append(scores)
    torch.testing.assert_close(torch.stack(steps, 1), full)
    torch.testing.assert_close(state, (h_full, c_full))
    options = SamplingOptions(length=10, num_samples=streams, seed=6)
    packed = generate(model, [1], options)
    monkeypatch.setattr(lmtool.model, "PACKED_FP32_MIN_ELEMENTS", None)  # never packed: the same draws
    unpacked = model.step_weights(streams=streams)
    assert not any(isinstance(w, PackedWeights) for w in (*unpacked.layers[-1], unpacked.output_major[0]))
    assert generate(model, [1], options) == packed
    monkeypatch.setattr(lmtool.model, "PACKED_FP32_MIN_ELEMENTS", 1)
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", False)
    weights = model.step_weights(streams=GATE_MAJOR_MIN_STREAMS)
    assert not any(isinstance(w, PackedWeights) for w in weights.layers[-1]) and weights.output_major is None


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bf16_generation_without_packing_keeps_the_cell_step_and_an_fp32_output_layer(monkeypatch, cell):
    """Where the CPU lacks native bf16, or oneDNN cannot pack, bf16 generation steps as before the packing: the
    cell's layout in bf16 and the output layer in fp32, with scores close to fp32's."""
    model = LanguageModel(ModelConfig(cell=cell, embedding_size=6, hidden_size=10, num_layers=2), 13).eval()
    x = torch.randint(0, 13, (2, 5))
    full, _ = model(x)
    for native, works in ((False, True), (True, False)):
        monkeypatch.setattr(lmtool.model, "bf16_is_native", lambda device: native)
        monkeypatch.setattr(lmtool.model, "packing_works", lambda dtype: works)
        weights = model.step_weights(dtype=torch.bfloat16, streams=2)
        assert not weights.gate_major  # where MKL_ON_AMD the output layer is transposed, in fp32
        assert weights.output_major is None or weights.output_major[0].dtype == torch.float32
        state = model.init_state(2)
        state = tuple(s.bfloat16() for s in state) if cell == "lstm" else state.bfloat16()
        for t in range(x.size(1)):
            scores, state = model.step(x[:, t], state, weights)
            assert scores.dtype == torch.float32
            torch.testing.assert_close(scores, full[:, t], atol=5e-3, rtol=0)
