import dataclasses

import pytest
import torch

from lmtool.config import ModelConfig, load_config
from lmtool.errors import LmtoolError
from lmtool.model import CELLS, GATE_MAJOR_MIN_STREAMS, LanguageModel, count_parameters, detach_state


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("num_layers", [1, 3])
def test_forward_shapes_and_state_for_every_cell(cell, num_layers):
    cfg = ModelConfig(cell=cell, embedding_size=6, hidden_size=10, num_layers=num_layers, dropout=0.1)
    model = LanguageModel(cfg, vocab_size=17)
    x = torch.randint(0, 17, (3, 5), dtype=torch.int32)
    logits, state = model(x)
    assert logits.shape == (3, 5, 17)
    states = state if isinstance(state, tuple) else (state,)
    assert len(states) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (num_layers, 3, 10) for s in states)
    # the state carries over: feeding the second half after the first equals one pass over both
    model.eval()
    full, _ = model(x)
    first, mid = model(x[:, :2])
    second, _ = model(x[:, 2:], detach_state(mid))
    torch.testing.assert_close(torch.cat([first, second], 1), full)


def test_tied_weights_share_one_tensor():
    model = LanguageModel(ModelConfig(embedding_size=8, hidden_size=8, tie_weights=True), vocab_size=11)
    assert model.decoder.weight is model.embedding.weight
    untied = LanguageModel(ModelConfig(embedding_size=8, hidden_size=8), vocab_size=11)
    assert count_parameters(untied) - count_parameters(model) == 11 * 8


def test_init_range_bounds_every_weight():
    model = LanguageModel(ModelConfig(embedding_size=8, hidden_size=8, init_range=0.05), vocab_size=11)
    assert max(p.abs().max().item() for p in model.parameters()) <= 0.05


def test_single_layer_with_dropout_does_not_warn(recwarn):
    LanguageModel(ModelConfig(num_layers=1, dropout=0.5, hidden_size=8, embedding_size=4), vocab_size=5)
    assert not [w for w in recwarn if "dropout" in str(w.message)]


def stepped(model, tokens, weights=None):
    """`model.step` over (B, T) tokens from the zero state: the (B, T, V) scores and the final state."""
    state, steps = model.init_state(tokens.size(0)), []
    for t in range(tokens.size(1)):
        scores, state = model.step(tokens[:, t], state, weights)
        steps.append(scores)
    return torch.stack(steps, 1), state


def sharpened(model):
    """The model with its weights 8 times the initialisation's, so that a swapped gate or a lost bias shows."""
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(8)
    return model


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_single_token_step_equals_the_sequence_kernel(cell):
    model = LanguageModel(ModelConfig(cell=cell, embedding_size=6, hidden_size=10, num_layers=2, dropout=0.3), 13)
    model.eval()
    x = torch.randint(0, 13, (3, 7))
    full, full_state = model(x)
    steps, state = stepped(model, x)
    torch.testing.assert_close(steps, full)
    for a, b in zip(state if isinstance(state, tuple) else (state,), full_state if isinstance(full_state, tuple) else (full_state,)):
        torch.testing.assert_close(a, b)
    # the cached step weights follow an update of the parameters
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(0.5)
    full, _ = model(x[:, :1])
    logits, _ = model.step(x[:, 0], model.init_state(3))
    torch.testing.assert_close(logits, full[:, 0])


def test_many_streams_step_in_the_gate_major_layout_like_the_sequence_kernel(monkeypatch):
    """Generation for several streams steps an LSTM with its weights transposed and its gates reordered: the
    same scores and states as the sequence kernel, in each direction of a bidirectional model."""
    import lmtool.model

    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", False)  # as on an Intel CPU
    model = LanguageModel(ModelConfig(cell="lstm", embedding_size=6, hidden_size=10, num_layers=2,
                                      direction="bidirectional"), 13).eval()
    sharpened(model)
    x = torch.randint(0, 13, (5, 7))
    for direction in ("forward", "backward"):
        full, (h_full, c_full) = model(x, direction=direction)
        weights = model.step_weights(direction, streams=5)
        assert weights.gate_major
        steps, state = stepped(model, x, weights)
        torch.testing.assert_close(steps, full)
        torch.testing.assert_close(state[0], h_full)
        torch.testing.assert_close(state[1], c_full)
    assert not model.step_weights(streams=GATE_MAJOR_MIN_STREAMS - 1).gate_major
    # in bf16 only packed (lmtool.packed_weights): the cell's layout was faster than whole bf16 matrices
    monkeypatch.setattr(lmtool.model, "packing_works", lambda dtype: False)
    assert not model.step_weights(dtype=torch.bfloat16, streams=64).gate_major
    assert not model.to(torch.bfloat16).step_weights(streams=64).gate_major
    # the other cells' transposed steps were timed where MKL_ON_AMD only: on this CPU they keep PyTorch's cells
    gru = LanguageModel(ModelConfig(cell="gru", embedding_size=6, hidden_size=10), 13)
    assert not gru.step_weights(streams=64).gate_major


def test_generation_for_many_streams_steps_in_the_gate_major_layout(monkeypatch):
    import lmtool.model
    import lmtool.sample
    from lmtool.sample import SamplingOptions, generate

    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", False)  # as on an Intel CPU
    model = LanguageModel(ModelConfig(embedding_size=6, hidden_size=10), 13).eval()
    calls = []

    class CountingStepper(lmtool.sample.LstmStepper):  # the gate-major layout's generation step
        def __call__(self, token):
            calls.append(1)
            return super().__call__(token)

    monkeypatch.setattr(lmtool.sample, "LstmStepper", CountingStepper)
    generate(model, [], SamplingOptions(length=5, num_samples=GATE_MAJOR_MIN_STREAMS - 1, seed=0, stop_at_eos=False))
    assert calls == []
    samples = generate(model, [], SamplingOptions(length=5, num_samples=GATE_MAJOR_MIN_STREAMS, seed=0,
                                                  stop_at_eos=False))
    assert len(calls) == 5  # a step after each of the 5 draws (the prompt is read)
    assert len(samples) == GATE_MAJOR_MIN_STREAMS and all(len(ids) == 5 for ids in samples)
    # same seed, same samples
    assert samples == generate(model, [], SamplingOptions(length=5, num_samples=GATE_MAJOR_MIN_STREAMS, seed=0,
                                                          stop_at_eos=False))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_few_streams_step_with_transposed_weights_where_the_cpu_wants_them(monkeypatch, cell):
    """Where MKL runs on an AMD CPU, one to three streams step every cell with its weights transposed (an LSTM's
    in the gate-major layout) and score a full softmax with its output weights as an (H, V) matrix, and more
    streams use PyTorch's layout: the same scores and states as the sequence kernel. The copies follow the model's
    later training (made per generation)."""
    import lmtool.model

    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", True)
    model = sharpened(LanguageModel(ModelConfig(cell=cell, embedding_size=6, hidden_size=10, num_layers=2), 13).eval())
    x = torch.randint(0, 13, (GATE_MAJOR_MIN_STREAMS - 1, 7))
    full, final = model(x)
    weights = model.step_weights(streams=GATE_MAJOR_MIN_STREAMS - 1)
    assert weights.gate_major and weights.input_table is None
    weight_t, bias = weights.output_major
    assert weight_t.shape == (10, 13) and weight_t.is_contiguous() and bias is not None
    steps, state = stepped(model, x, weights)
    torch.testing.assert_close(steps, full)
    torch.testing.assert_close(state, final)
    # from GATE_MAJOR_MIN_STREAMS streams both keep PyTorch's layout there; bf16's output layer does not: packed
    # in bf16 where oneDNN packs (lmtool.packed_weights), else transposed in fp32
    many = model.step_weights(streams=GATE_MAJOR_MIN_STREAMS)
    assert many.output_major is None and not many.gate_major
    with monkeypatch.context() as unpacked:
        unpacked.setattr(lmtool.model, "packing_works", lambda dtype: False)
        bf16 = model.step_weights(dtype=torch.bfloat16)
    assert not bf16.gate_major and bf16.output_major[0].dtype == bf16.output_major[1].dtype == torch.float32
    # the transposed copies are taken from the weights of the moment, not cached
    streams, first = GATE_MAJOR_MIN_STREAMS - 1, x[:, 0]
    with torch.no_grad():
        model.decoder.weight.add_(0.5)
        next(model.rnn.parameters()).mul_(-1)
    fresh = model.step_weights(streams=streams)
    assert fresh.output_major is not None
    torch.testing.assert_close(model.step(first, model.init_state(streams), fresh)[0], model(x[:, :1])[0][:, 0])
    # a decoder without a bias (a library user's change) scores the same in the transposed layout
    model.decoder.bias = None
    no_bias = model.step_weights(streams=streams)
    assert no_bias.output_major[1] is None
    torch.testing.assert_close(model.step(first, model.init_state(streams), no_bias)[0], model(x[:, :1])[0][:, 0])
    # a step given no weights reads PyTorch's layout: a copy would cost more than the step
    plain = model.step_weights(relayout=False)
    assert plain.output_major is None and not plain.gate_major and plain.layers[0][0] is not None
    calls = []
    real_step_weights = type(model).step_weights
    monkeypatch.setattr(type(model), "step_weights", lambda self, *a, **k: calls.append(k) or real_step_weights(self, *a, **k))
    model.step(x[:, 0], model.init_state(GATE_MAJOR_MIN_STREAMS - 1))
    model.step_hidden(x[:, 0], model.init_state(GATE_MAJOR_MIN_STREAMS - 1))
    assert calls == [{"relayout": False}] * 2
    monkeypatch.setattr(type(model), "step_weights", real_step_weights)
    # an adaptive softmax has no such layer; elsewhere (an Intel CPU) nothing is transposed for few streams
    assert adaptive_model().step_weights().output_major is None
    from lmtool.sample import SamplingOptions, generate

    options = SamplingOptions(length=20, num_samples=2, seed=3, stop_at_eos=False)
    transposed = generate(model, [1, 2], options)
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", False)
    assert model.step_weights().output_major is None and not model.step_weights().gate_major
    assert generate(model, [1, 2], options) == transposed  # the same distributions, so the same draws


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("amd", [True, False])
def test_a_model_in_another_dtype_steps_in_that_dtype(monkeypatch, dtype, amd):
    """A library user's model cast to bf16 or fp64 steps as it did before the transposed layouts: its scores
    come in its own dtype and match its sequence kernel."""
    import lmtool.model

    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", amd)
    model = LanguageModel(ModelConfig(embedding_size=6, hidden_size=10), 13).eval().to(dtype)
    x = torch.randint(0, 13, (2, 1))
    for weights in (None, model.step_weights(streams=2)):
        logits, _ = model.step(x[:, 0], model.init_state(2), weights)
        assert logits.dtype == dtype
        torch.testing.assert_close(logits, model(x)[0][:, 0], atol=0.05, rtol=0.02)


def test_large_vocabularies_score_transposed_at_any_stream_count_where_the_cpu_wants_it(monkeypatch):
    """Where MKL runs on an AMD CPU, a full softmax of OUTPUT_MAJOR_MIN_VOCAB tokens or more scores with its output
    weights transposed for many streams too (the LSTM keeps PyTorch's layout there): the same scores."""
    import lmtool.model

    model = LanguageModel(ModelConfig(embedding_size=6, hidden_size=10), 13).eval()
    x = torch.randint(0, 13, (GATE_MAJOR_MIN_STREAMS + 1, 1))
    for amd, min_vocab, transposed in ((True, 13, True), (True, 14, False), (True, None, False), (False, 13, False)):
        monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", amd)
        monkeypatch.setattr(lmtool.model, "OUTPUT_MAJOR_MIN_VOCAB", min_vocab)
        weights = model.step_weights(streams=x.size(0))
        assert (weights.output_major is not None) == transposed and weights.gate_major == (not amd)
        logits, _ = model.step(x[:, 0], model.init_state(x.size(0)), weights)
        torch.testing.assert_close(logits, model(x)[0][:, 0])


@pytest.mark.parametrize("amd", [True, False])
def test_a_small_vocabulary_looks_up_the_first_layers_input_product(monkeypatch, amd):
    """In the gate-major layout a vocabulary no larger than the embedding (a character model's) gets the first
    layer's input product of every token precomputed: the same scores and states as the sequence kernel, in
    both directions of a bidirectional model, and the same samples."""
    import lmtool.model
    from lmtool.sample import SamplingOptions, generate

    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", amd)
    model = sharpened(LanguageModel(ModelConfig(embedding_size=16, hidden_size=10, num_layers=2,
                                                direction="bidirectional"), 13).eval())
    streams = 2 if amd else GATE_MAJOR_MIN_STREAMS  # where each CPU steps gate-major
    x = torch.randint(0, 13, (streams, 6))
    for direction in ("forward", "backward"):
        full, (h_full, c_full) = model(x, direction=direction)
        weights = model.step_weights(direction, streams=streams)
        assert weights.gate_major and weights.input_table.shape == (13, 40)
        steps, state = stepped(model, x, weights)
        torch.testing.assert_close(steps, full)
        torch.testing.assert_close(state, (h_full, c_full))
        weights.input_table.zero_()  # the step reads the table, not the embedding
        assert not torch.allclose(model.step(x[:, 0], model.init_state(streams), weights)[0], full[:, 0])
    # a model in another dtype stepped in fp32 builds its table in fp32 too
    assert model.double().step_weights(dtype=torch.float32, streams=streams).input_table.dtype == torch.float32
    model.float()
    many = model.step_weights(streams=64)  # many streams too, on either CPU: the lookup makes gate-major faster
    assert many.gate_major and many.input_table is not None
    options = SamplingOptions(length=12, num_samples=streams, seed=5, stop_at_eos=False)
    looked_up = generate(model, [3], options)
    # as if the table were larger than w_ih: the embedding is multiplied
    monkeypatch.setattr(model, "config", dataclasses.replace(model.config, embedding_size=12))
    assert model.step_weights(streams=streams).input_table is None
    assert model.step_weights(streams=64).gate_major == (not amd)  # AMD: PyTorch's layout without the lookup
    assert generate(model, [3], options) == looked_up
    # the cell's layout and bf16 steps multiply as before
    assert model.step_weights(dtype=torch.bfloat16, streams=streams).input_table is None


def test_mkl_on_amd_reads_the_cpu_vendor(monkeypatch, tmp_path):
    import builtins

    import lmtool.model

    real_open = builtins.open
    for vendor, expected in (("AuthenticAMD", True), ("GenuineIntel", False)):
        cpuinfo = tmp_path / vendor
        cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu avx512f\n")
        monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
        monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
        assert lmtool.model._mkl_on_amd() is expected
        monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)  # another BLAS: not measured
        assert lmtool.model._mkl_on_amd() is False
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setattr(builtins, "open", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("/proc/cpuinfo")))
    assert lmtool.model._mkl_on_amd() is False  # no /proc (macOS, Windows)


def test_precision_resolution():
    from lmtool.devices import bf16_is_native, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if bf16_is_native(cpu) else None)
    assert resolve_precision("auto", torch.device("cuda")) is None  # bf16 measured no faster on GPUs


def adaptive_model(**overrides) -> LanguageModel:
    cfg = ModelConfig(embedding_size=6, hidden_size=16, softmax="adaptive", adaptive_cutoffs=(10, 30), **overrides)
    return LanguageModel(cfg, vocab_size=50).eval()


def test_adaptive_softmax_is_an_exact_distribution_and_its_loss_matches_it():
    model = adaptive_model()
    x = torch.randint(0, 50, (3, 9))
    y = torch.randint(0, 50, (3, 9))
    y[0, :3] = torch.tensor([0, 15, 45])  # one target in the head and in each tail cluster
    scores, _ = model(x)  # (3, 9, 50): log-probabilities
    torch.testing.assert_close(scores.double().exp().sum(-1), torch.ones(3, 9, dtype=torch.float64), atol=1e-6, rtol=0)
    nll, _ = model(x, targets=y)
    torch.testing.assert_close(nll, -scores.gather(-1, y.unsqueeze(-1)).squeeze(-1))
    # generation's step gives the same distribution as the sequence kernel
    torch.testing.assert_close(stepped(model, x)[0], scores)


def test_the_loss_stays_float32_under_bf16_autocast():
    for model in (adaptive_model(), LanguageModel(ModelConfig(embedding_size=6, hidden_size=16), 50)):
        x = torch.randint(0, 50, (2, 5))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll, _ = model(x, targets=x)
        assert nll.dtype == torch.float32 and nll.shape == (2, 5)


def test_adaptive_softmax_has_a_much_smaller_output_layer():
    full = LanguageModel(ModelConfig(embedding_size=8, hidden_size=256), vocab_size=30000)
    adaptive = LanguageModel(ModelConfig(embedding_size=8, hidden_size=256, softmax="adaptive"), vocab_size=30000)
    assert count_parameters(adaptive.adaptive) < 0.25 * count_parameters(full.decoder)


@pytest.mark.parametrize("overrides, message", [
    (["model.softmax=adaptive", "model.tie_weights=true"], "cannot be combined with model.softmax=adaptive"),
    (["model.softmax=adaptive", "model.tie_weights=false", "model.adaptive_cutoffs=[10, 5]"], "must be increasing"),
    (["model.softmax=adaptive", "model.tie_weights=false", "model.adaptive_cutoffs=[0]"], "out of range"),
    (["model.softmax=adaptive", "model.tie_weights=false", "model.adaptive_cutoffs=lots"], "expected a whole number"),
    (["model.softmax=adaptive", "model.tie_weights=false", "model.adaptive_cutoffs={}"], "expected a list"),
    (["model.softmax=sampled"], "is not one of full | adaptive"),
])
def test_adaptive_softmax_config_errors(overrides, message):
    with pytest.raises(LmtoolError, match=message):
        load_config(None, ["data.level=word", *overrides])


def test_adaptive_softmax_unties_the_word_defaults_unless_tying_is_asked_for():
    assert load_config(None, ["data.level=word"]).model.tie_weights
    assert not load_config(None, ["data.level=word", "model.softmax=adaptive"]).model.tie_weights


def test_adaptive_cutoffs_parse_from_a_list_or_commas_and_must_fit_the_vocabulary():
    assert load_config(None, ["model.softmax=adaptive", "model.adaptive_cutoffs=20"]).model.adaptive_cutoffs == (20,)
    for value in ("[20, 40]", "20,40"):
        cfg = load_config(None, ["model.softmax=adaptive", f"model.adaptive_cutoffs={value}"])
        assert cfg.model.adaptive_cutoffs == (20, 40)
    with pytest.raises(LmtoolError, match="below the vocabulary size minus one"):
        LanguageModel(cfg.model, vocab_size=41)
    assert LanguageModel(cfg.model, vocab_size=42).adaptive.cutoffs == [20, 40, 42]
    # left to lmtool, the cut points adapt to the vocabulary
    auto = load_config(None, ["model.softmax=adaptive"]).model
    assert LanguageModel(auto, vocab_size=30000).adaptive.cutoffs == [2000, 10000, 30000]
    assert LanguageModel(auto, vocab_size=65).adaptive.cutoffs == [32, 65]


def test_recurrence_stays_fp32_under_autocast_where_autocast_would_mistype_it(monkeypatch):
    # On CUDA PyTorch's autocast runs cuDNN's recurrent layers in float16 even when bf16 was asked for; there
    # the stack must run in fp32. Exercised here by listing the CPU among those devices.
    import lmtool.model as model_module

    model = LanguageModel(ModelConfig(embedding_size=8, hidden_size=8, dropout=0.0), vocab_size=11)
    seen = []
    model.rnn.register_forward_hook(lambda module, inputs, output: seen.append(output[0].dtype))
    x = torch.randint(0, 11, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, targets=x)
        monkeypatch.setattr(model_module, "FP32_RECURRENCE_UNDER_AUTOCAST", {"cpu"})
        model(x, targets=x)
    assert seen == [torch.bfloat16, torch.float32]
