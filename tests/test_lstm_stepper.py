import pytest
import torch

import lmtool.column_blocks
import lmtool.model
import lmtool.sample
from lmtool.column_blocks import ColumnBlocks
from lmtool.config import ModelConfig
from lmtool.lstm_stepper import LstmStepper
from lmtool.model import GATE_MAJOR_MIN_STREAMS, PACKED_FP32_MIN_STREAMS, LanguageModel
from lmtool.packed_weights import PackedWeights, packing_works
from lmtool.sample import SamplingOptions, generate

HAS_PACKING = packing_works(torch.float32)

# How StepWeights holds the gate-major matrices, and the settings (and stream counts) that give that form.
FORMS = {
    "whole": dict(amd=False, streams=(GATE_MAJOR_MIN_STREAMS, GATE_MAJOR_MIN_STREAMS + 3)),
    "blocks": dict(amd=True, streams=(1, 2)),
    "packed fp32": dict(amd=True, streams=(PACKED_FP32_MIN_STREAMS, GATE_MAJOR_MIN_STREAMS), packed_fp32=True),
    "packed bf16": dict(amd=True, streams=(1, GATE_MAJOR_MIN_STREAMS + 1), dtype=torch.bfloat16),
}
MATRIX_TYPE = {"whole": torch.Tensor, "blocks": ColumnBlocks, "packed fp32": PackedWeights,
               "packed bf16": PackedWeights}


def step_weights(monkeypatch, model, form, streams):
    settings = FORMS[form]
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", settings["amd"])
    monkeypatch.setattr(lmtool.column_blocks, "MIN_BLOCK_ELEMENTS", 1)  # blocks for these small matrices
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # three blocks, the last one padded
    monkeypatch.setattr(lmtool.model, "PACKED_FP32_MIN_ELEMENTS", 1 if settings.get("packed_fp32") else None)
    monkeypatch.setattr(lmtool.model, "bf16_is_native", lambda device: True)  # the ops run without it, slower
    return model.step_weights(dtype=settings.get("dtype"), streams=streams)


# embedding_size 6: the first layer multiplied; 16: looked up (V <= E). Where MKL_ON_AMD, from
# GATE_MAJOR_MIN_STREAMS streams only a looked-up first layer steps gate-major; fp32 matrices are packed from
# PACKED_FP32_MIN_STREAMS streams.
@pytest.mark.parametrize("form, embedding_size", [(form, size) for form in FORMS for size in (6, 16)])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_the_stepper_gives_step_layers_outputs_and_states_to_the_bit(monkeypatch, form, embedding_size,
                                                                      num_layers):
    """In every form of the gate-major matrices, for one and several streams, the stepper's outputs and states
    equal `step_layers`' exactly: the same arithmetic in the same order, on buffers made once."""
    if form.startswith("packed") and not HAS_PACKING:
        pytest.skip("this PyTorch build has no oneDNN packing")
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(embedding_size=embedding_size, hidden_size=10, num_layers=num_layers), 13)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4)  # so that a swapped gate, block or a lost bias shows
    stream_counts = FORMS[form]["streams"]
    if (form, embedding_size) == ("packed fp32", 6):  # many streams step a multiplied first layer in the cells
        stream_counts = (PACKED_FP32_MIN_STREAMS,)
    for streams in stream_counts:
        weights = step_weights(monkeypatch, model.eval(), form, streams)
        assert weights.gate_major and all(isinstance(matrix, MATRIX_TYPE[form]) for matrix, _ in weights.layers)
        assert (weights.input_table is not None) == (embedding_size == 16)
        dtype = FORMS[form].get("dtype", torch.float32)
        layers = [(torch.randn(streams, 10).to(dtype), torch.randn(streams, 10).to(dtype))
                  for _ in range(num_layers)]
        stepper = LstmStepper(weights, layers)
        assert [torch.equal(a, b) for (a, _), (b, _) in zip(stepper.states(), layers)] == [True] * num_layers
        for _ in range(5):
            token = torch.randint(0, 13, (streams,))
            expected, layers = model.step_layers(token, layers, weights)
            output = stepper(token)
            assert output.dtype == dtype and torch.equal(output, expected)
            for (h, c), (h_expected, c_expected) in zip(stepper.states(), layers):
                assert torch.equal(h, h_expected) and torch.equal(c, c_expected)


def test_the_stepper_leaves_the_states_it_starts_from_alone(monkeypatch):
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", False)  # gate-major from GATE_MAJOR_MIN_STREAMS streams
    model = LanguageModel(ModelConfig(embedding_size=6, hidden_size=10), 13).eval()
    layers = model.layer_states((torch.randn(2, 1, 10), torch.randn(2, 1, 10)))
    before = [(h.clone(), c.clone()) for h, c in layers]
    stepper = LstmStepper(model.step_weights(streams=GATE_MAJOR_MIN_STREAMS), layers)
    stepper(torch.tensor([3]))
    assert all(torch.equal(h, h0) and torch.equal(c, c0) for (h, c), (h0, c0) in zip(layers, before))
    assert not torch.equal(stepper.states()[0][1], before[0][1])


def test_the_stepper_refuses_weights_in_pytorchs_layout():
    model = LanguageModel(ModelConfig(embedding_size=6, hidden_size=10), 13).eval()
    with pytest.raises(ValueError, match="gate-major"):
        LstmStepper(model.step_weights(relayout=False), model.layer_states(model.init_state(1)))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_generation_steps_a_gate_major_lstm_with_the_stepper(monkeypatch, cell):
    """generate steps through LstmStepper exactly where an LSTM's weights are gate-major (a CPU's layouts), once
    per generated token."""
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", True)  # gate-major (transposed, for the GRU) for one stream
    model = LanguageModel(ModelConfig(cell=cell, embedding_size=6, hidden_size=10), 13).eval()
    assert model.step_weights(streams=2).gate_major
    calls = []

    class CountingStepper(LstmStepper):
        def __call__(self, token):
            calls.append(token.shape)
            return super().__call__(token)

    monkeypatch.setattr(lmtool.sample, "LstmStepper", CountingStepper)
    generate(model, [4, 2], SamplingOptions(length=7, num_samples=2, seed=5))
    assert calls == ([torch.Size([2])] * 7 if cell == "lstm" else [])


# Sizes at which a BLAS rounds a product differently for a strided or misaligned input (seen with MKL on an AMD
# EPYC): the scores of the stepper's output must still equal step_layers'.
REAL_SIZES = {
    "char, looked up, full softmax, 6 streams": (ModelConfig(embedding_size=256, hidden_size=650), 66, 6, {}),
    "adaptive softmax, 2 streams": (ModelConfig(embedding_size=37, hidden_size=129, softmax="adaptive",
                                                adaptive_cutoffs=(200,)), 500, 2, {}),
    "word, 1 stream, top-p, stop at <EOS>": (ModelConfig(embedding_size=37, hidden_size=129), 500, 1,
                                             dict(top_p=0.9, temperature=0.8, stop_at_eos=True)),
    "backward, 3 streams, bf16": (ModelConfig(embedding_size=37, hidden_size=129, direction="backward"), 500, 3,
                                  dict(precision="bf16")),
}


@pytest.mark.parametrize("case", list(REAL_SIZES))
def test_generation_draws_from_the_same_probabilities_with_the_stepper_as_without(monkeypatch, case):
    """Every draw's probabilities, the tokens and what on_token sees are the same to the bit with the stepper as
    with step_layers (BUFFERED_LSTM_STEPS off), at real sizes."""
    config, vocab, streams, how = REAL_SIZES[case]
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", True)  # gate-major for these streams
    monkeypatch.setattr(lmtool.model, "bf16_is_native", lambda device: True)  # the ops run without it, slower
    torch.manual_seed(0)
    model = LanguageModel(config, vocab).eval()
    assert model.step_weights(dtype=torch.bfloat16 if how.get("precision") else None, streams=streams).gate_major
    real_draw, drawn_from = lmtool.sample._draw, []
    monkeypatch.setattr(lmtool.sample, "_draw", lambda probs, *args: drawn_from.append(probs.clone()) or
                        real_draw(probs, *args))
    runs = {}
    for buffered in (True, False):
        monkeypatch.setattr(lmtool.sample, "BUFFERED_LSTM_STEPS", buffered)
        drawn_from.clear()
        seen = []
        samples = generate(model, [3, 1], SamplingOptions(length=25, num_samples=streams, seed=1, **how),
                           on_token=lambda token: seen.append(token.tolist()))
        runs[buffered] = samples, seen, list(drawn_from)
    (samples, seen, probs), (expected_samples, expected_seen, expected_probs) = runs[True], runs[False]
    assert samples == expected_samples and seen == expected_seen
    assert len(probs) == len(expected_probs) >= 25
    assert all(torch.equal(a, b) for a, b in zip(probs, expected_probs))
