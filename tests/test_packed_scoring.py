"""Evaluation and scoring with the output layer packed for many batches (chunked_nll.pack_slices,
model.packed_output_layer, evaluate.packing_fits)."""

import pytest
import torch
import torch.nn.functional as F

import lmtool.model
from lmtool.chunked_nll import linear_nll, pack_slices, slice_size
from lmtool.config import ModelConfig
from lmtool.evaluate import score_sentences, stream_nll
from lmtool.model import LanguageModel
from lmtool.packed_weights import packing_works
from lmtool.tokenizer import Tokenizer

HAS_OPS = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
needs_packing = pytest.mark.skipif(not HAS_OPS, reason="this PyTorch build has no oneDNN packing")
VOCAB = 5003  # above chunked_nll.MIN_VOCAB, and not a multiple of any slice width


def _layer(vocab=VOCAB, hidden=16, rows=70, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.5
    b = torch.randn(vocab, generator=gen) * 0.5
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[:3] = torch.tensor([0, vocab - 1, vocab - 2])  # the first and the last, narrower, slice
    return h, w, b, targets


@needs_packing
@pytest.mark.parametrize("rows", [70, 5000])  # one slice; many slices, the last one narrower
def test_packed_slices_give_the_nll_of_the_plain_layer_in_fp32(rows):
    h, w, b, targets = _layer()
    packed = pack_slices(w, b, torch.float32, rows)
    assert sum(slice_bias.numel() for _, slice_bias in packed.slices) == VOCAB
    assert (len(packed.slices) > 1) == (rows == 5000)
    with torch.no_grad():
        nll = linear_nll(h, w, b, targets, packed=packed)
    expected = F.cross_entropy(F.linear(h.double(), w.double(), b.double()), targets, reduction="none")
    torch.testing.assert_close(nll.double(), expected, rtol=1e-5, atol=1e-5)


@needs_packing
def test_packed_slices_in_bf16_give_the_nll_of_the_plain_bf16_layer():
    if not packing_works(torch.bfloat16):
        pytest.skip("oneDNN does not pack bf16 here")
    h, w, b, targets = _layer()
    packed = pack_slices(w, b, torch.bfloat16, rows=5000)
    with torch.no_grad():
        nll = linear_nll(h, w, b, targets, compute_dtype=torch.bfloat16, slice_columns=packed.columns,
                         packed=packed)
        plain = linear_nll(h, w, b, targets, compute_dtype=torch.bfloat16, slice_columns=packed.columns)
        exact = linear_nll(h, w, b, targets)
    # the same bf16 products (oneDNN's, rounded once), so equal up to the order of the sums; both near fp32's
    torch.testing.assert_close(nll, plain, rtol=1e-4, atol=1e-4)
    assert (nll - exact).abs().max() < 0.1 and (nll - exact).abs().max() > 0  # rounded, but not far


@needs_packing
def test_packed_slices_are_a_copy_used_only_without_gradients_and_in_their_own_dtype():
    h, w, b, targets = _layer()
    packed = pack_slices(w, b, torch.float32, rows=5000)
    original = linear_nll(h, w, b, targets)
    w_changed = w * 2  # a model whose weights moved on since the packing
    b.add_(0.3)  # and whose bias moved in place
    with torch.no_grad():
        stale = linear_nll(h, w_changed, b, targets, packed=packed)
        fresh = linear_nll(h, w_changed, b, targets)
    torch.testing.assert_close(stale, original)  # the packing, weights and bias, is what scored
    assert not torch.allclose(stale, fresh)
    with pytest.raises(ValueError, match="4003 rows"):  # a packing of another layer is refused, not half-used
        linear_nll(h, w_changed, b, targets, packed=pack_slices(w[:4003], b[:4003], torch.float32, rows=5000))
    # training: the weights move every step, so the packing is ignored and gradients flow as without it
    w_trained = w_changed.clone().requires_grad_()
    nll = linear_nll(h, w_trained, b, targets, packed=packed)
    torch.testing.assert_close(nll.detach(), fresh)
    nll.sum().backward()
    assert w_trained.grad is not None and w_trained.grad.abs().sum() > 0
    # a packing in another dtype than the products asked for is ignored too
    with torch.no_grad():
        torch.testing.assert_close(linear_nll(h, w_changed, b, targets, compute_dtype=torch.bfloat16, packed=packed),
                                   linear_nll(h, w_changed, b, targets, compute_dtype=torch.bfloat16))


def _model(softmax="full", vocab=VOCAB):
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(embedding_size=16, hidden_size=16, softmax=softmax), vocab).eval()


@needs_packing
def test_the_model_packs_its_output_layer_only_where_it_was_measured_faster(monkeypatch):
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", True)
    model = _model()
    packed = model.packed_output_layer(rows=64 * 35, batches=1)  # in fp32 even one batch gains
    assert packed is not None and packed.dtype == torch.float32
    few_rows = lmtool.model.GATE_MAJOR_MIN_STREAMS - 1
    assert model.packed_output_layer(rows=few_rows, batches=9) is None  # too few rows in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.packed_output_layer(rows=2, batches=2)
        assert model.packed_output_layer(rows=2240, batches=1) is None  # one bf16 batch re-arranges it faster
    native = lmtool.model.bf16_is_native(model.device) and packing_works(torch.bfloat16)
    assert (bf16 is not None and bf16.dtype == torch.bfloat16) == native
    monkeypatch.setattr(lmtool.model, "bf16_is_native", lambda device: False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.packed_output_layer(rows=2240, batches=9) is None  # bf16 emulated: not measured
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", False)
    assert model.packed_output_layer(rows=2240, batches=9) is None  # fp32 on other CPUs keeps MKL's products
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", True)
    monkeypatch.setattr(lmtool.model, "PACKED_SCORING", False)
    assert model.packed_output_layer(rows=2240, batches=9) is None
    monkeypatch.setattr(lmtool.model, "PACKED_SCORING", True)
    assert _model(vocab=300).packed_output_layer(rows=2240, batches=9) is None  # small: PyTorch's path
    assert _model(softmax="adaptive").packed_output_layer(rows=2240, batches=9) is None


def _tokenizer(vocab: int) -> Tokenizer:
    tokenizer = Tokenizer.build([" ".join(f"w{i}" for i in range(vocab))], level="word")
    return Tokenizer(level="word", tokens=tokenizer.tokens[:vocab])  # the specials and the first words


@needs_packing
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluation_and_scoring_give_the_same_numbers_packed_or_not(monkeypatch, precision):
    if precision == "bf16" and not packing_works(torch.bfloat16):
        pytest.skip("oneDNN does not pack bf16 here")
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", True)
    monkeypatch.setattr(lmtool.model, "bf16_is_native", lambda device: True)
    model = _model()
    stream = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(1))
    calls, used = [], []
    original_pack, original_nll = lmtool.model.pack_slices, lmtool.model.linear_nll
    monkeypatch.setattr(lmtool.model, "pack_slices", lambda *args: calls.append(args[2]) or original_pack(*args))

    def spied_nll(*args, packed=None, **kwargs):
        used.append(packed is not None)
        assert not torch.is_grad_enabled()  # evaluation and scoring build no graph (and so keep no (N, V) exps)
        return original_nll(*args, packed=packed, **kwargs)

    monkeypatch.setattr(lmtool.model, "linear_nll", spied_nll)

    def scores():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            whole = stream_nll(model, stream, batch_size=8, bptt=20)
            lines = score_sentences(model, tokenizer, ["w1 w2 w3", "w4000 w9 w5000 w17 w3"], batch_size=1)
        return whole, [line.logprob for line in lines]

    tokenizer = _tokenizer(VOCAB)
    assert len(tokenizer) == VOCAB
    packed_whole, packed_lines = scores()
    assert calls == [torch.float32 if precision == "fp32" else torch.bfloat16] * 2  # once per call, not per batch
    assert len(used) > 2 and all(used)  # and every batch scored with it
    monkeypatch.setattr(lmtool.model, "PACKED_SCORING", False)
    used.clear()
    whole, lines = scores()
    assert len(calls) == 2 and not any(used)
    assert packed_whole.tokens == whole.tokens
    tolerance = 1e-6 if precision == "fp32" else 1e-4
    assert packed_whole.nll == pytest.approx(whole.nll, rel=tolerance)
    assert packed_lines == pytest.approx(lines, rel=tolerance)


@pytest.fixture
def packing_spy(monkeypatch):
    """Packing allowed as on an AMD EPYC with native bf16; records, per NLL call, its rows and packed slice width."""
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", True)
    monkeypatch.setattr(lmtool.model, "bf16_is_native", lambda device: True)
    calls = []
    original = lmtool.model.linear_nll

    def spied(hidden, *args, packed=None, **kwargs):
        calls.append((hidden.size(0), packed.columns if packed is not None else None))
        return original(hidden, *args, packed=packed, **kwargs)

    monkeypatch.setattr(lmtool.model, "linear_nll", spied)
    return calls


@needs_packing
@pytest.mark.parametrize("windows", [1, 2])
def test_bf16_evaluation_packs_only_for_more_than_one_window(packing_spy, windows):
    if not packing_works(torch.bfloat16):
        pytest.skip("oneDNN does not pack bf16 here")
    bptt, batch = 20, 4
    stream = torch.randint(0, VOCAB, (batch * (bptt * (windows - 1) + 2),), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stream_nll(_model(), stream, batch_size=batch, bptt=bptt)
    assert len(packing_spy) == windows
    assert all(columns is not None for _, columns in packing_spy) == (windows > 1)


@needs_packing
@pytest.mark.parametrize("sentences", [2, 3])
def test_bf16_scoring_packs_only_for_more_than_one_batch(packing_spy, sentences):
    if not packing_works(torch.bfloat16):
        pytest.skip("oneDNN does not pack bf16 here")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        score_sentences(_model(), _tokenizer(VOCAB), ["w1 w2 w3 w4 w5"] * sentences, batch_size=2)
    assert all(columns is not None for _, columns in packing_spy) == (sentences > 2)


@needs_packing
def test_each_call_packs_the_weights_it_finds(packing_spy, monkeypatch):
    model, tokenizer = _model(), _tokenizer(VOCAB)
    stream = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(1))
    lines = ["w1 w2 w3 w4", "w9 w8 w7 w6"]

    def both():
        return stream_nll(model, stream, 8, 20), score_sentences(model, tokenizer, lines, batch_size=1)

    before = both()
    with torch.no_grad():  # as an optimizer step does, in place
        model.decoder.weight.mul_(1.5)
        model.decoder.bias.add_(0.3)
    packed = both()
    assert all(columns is not None for _, columns in packing_spy)
    assert packed[0].nll != pytest.approx(before[0].nll, rel=1e-6)  # the weights did move it
    monkeypatch.setattr(lmtool.model, "PACKED_SCORING", False)
    plain = both()
    assert packed[0].nll == pytest.approx(plain[0].nll, rel=1e-6)
    assert [s.logprob for s in packed[1]] == pytest.approx([s.logprob for s in plain[1]], rel=1e-6)


@needs_packing
def test_both_directions_in_one_forward_use_the_packing(packing_spy):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(embedding_size=16, hidden_size=16, direction="bidirectional"), VOCAB).eval()
    gen = torch.Generator().manual_seed(3)
    x, y = (torch.randint(0, VOCAB, (2, 4, 10), generator=gen) for _ in range(2))
    with torch.no_grad():
        packed = model.packed_output_layer(rows=40, batches=3)
        nll, _ = model(x, targets=y, direction="both", packed_output=packed)
        assert [columns is not None for _, columns in packing_spy] == [True, True]
        plain, _ = model(x, targets=y, direction="both")
    torch.testing.assert_close(nll, plain)


def test_no_packing_in_other_dtypes_or_off_the_cpu(monkeypatch):
    monkeypatch.setattr(lmtool.model, "MKL_ON_AMD", True)
    assert _model().double().packed_output_layer(rows=2240, batches=9) is None
    model = _model()
    with torch.autocast("cpu", dtype=torch.float16):
        assert model.packed_output_layer(rows=2240, batches=9) is None
    monkeypatch.setattr(LanguageModel, "device", property(lambda self: torch.device("cuda")))
    assert model.packed_output_layer(rows=2240, batches=9) is None


@needs_packing
def test_scoring_a_long_line_keeps_its_slices_cache_sized(packing_spy, monkeypatch):
    # The longest batch runs first: its packed slices must be no wider than the unpacked path's would be, or a
    # long line would build one (rows, V) score matrix of hundreds of megabytes; and the short batches after it
    # get slices sized for them again (at least half as wide as theirs), packed once, not once per batch.
    vocab = 20000
    packings = []
    original = lmtool.model.pack_slices
    monkeypatch.setattr(lmtool.model, "pack_slices", lambda *args: packings.append(args[3]) or original(*args))
    score_sentences(_model(vocab=vocab), _tokenizer(vocab), ["w1 w2 w3"] * 9 + [" ".join(["w5"] * 800)], batch_size=1)
    assert len(packing_spy) == 10 and all(columns is not None for _, columns in packing_spy)
    assert all(columns <= slice_size(rows, vocab) for rows, columns in packing_spy), packing_spy[:2]
    assert all(2 * columns > slice_size(rows, vocab) for rows, columns in packing_spy), packing_spy[:2]
    assert packings == [801, 4]  # the long line's batch, then the first short one


def _packings(monkeypatch) -> list:
    """The rows each packing of the output layer is made for."""
    packings = []
    original = lmtool.model.pack_slices
    monkeypatch.setattr(lmtool.model, "pack_slices", lambda *args: packings.append(args[3]) or original(*args))
    return packings


@needs_packing
def test_scoring_packs_again_exactly_when_slices_twice_as_wide_fit(packing_spy, monkeypatch):
    packings, vocab = _packings(monkeypatch), 20000
    assert slice_size(768, vocab) == 2 * slice_size(1536, vocab)
    score_sentences(_model(vocab=vocab), _tokenizer(vocab), [" ".join(["w5"] * 1535), " ".join(["w5"] * 767)],
                    batch_size=1)
    assert packings == [1536, 768]


@needs_packing
def test_scoring_sizes_slices_for_a_batch_of_rows_and_the_partial_last_batch(packing_spy, monkeypatch):
    packings, vocab = _packings(monkeypatch), 20000
    score_sentences(_model(vocab=vocab), _tokenizer(vocab), [" ".join(["w5"] * 119)] * 5, batch_size=4)
    assert packings == [480, 120]  # 4 sentences of 120 positions, then the last one alone
    assert all(columns <= slice_size(rows, vocab) < 2 * columns for rows, columns in packing_spy)


@needs_packing
def test_bf16_scoring_does_not_pack_again_for_a_last_single_batch(packing_spy):
    if not packing_works(torch.bfloat16):
        pytest.skip("oneDNN does not pack bf16 here")
    vocab = 20000
    with torch.autocast("cpu", dtype=torch.bfloat16):
        score_sentences(_model(vocab=vocab), _tokenizer(vocab), ["w1 w2 w3", " ".join(["w5"] * 800)], batch_size=1)
    assert packing_spy == [(801, slice_size(801, vocab)), (4, None)]  # the short one runs unpacked
