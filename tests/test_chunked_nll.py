import pytest
import torch
import torch.nn.functional as F

from lmtool import chunked_nll
from lmtool.chunked_nll import linear_nll, saves_traffic, slice_size
from lmtool.config import ModelConfig
from lmtool.model import LanguageModel


def _inputs(rows=60, hidden=16, vocab=1001, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=gen, dtype=dtype) * 0.5
    b = torch.randn(vocab, generator=gen, dtype=dtype) * 0.5
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    weights = torch.rand(rows, generator=gen, dtype=dtype)  # a different dLoss/dNLL per row
    return h, w, b, targets, weights


def _nll_and_grads(fn, h, w, b, targets, weights):
    h, w, b = (t.detach().clone().requires_grad_() for t in (h, w, b))
    nll = fn(h, w, b, targets)
    (nll.to(weights.dtype) * weights).sum().backward()
    return nll.detach(), h.grad, w.grad, b.grad


def _reference(h, w, b, targets):
    return F.cross_entropy(F.linear(h, w, b), targets, reduction="none")


@pytest.mark.parametrize("folded", [True, False])
@pytest.mark.parametrize("columns", [256, 300, 1001, None])
def test_sliced_nll_and_gradients_match_pytorch_in_fp32(columns, folded, monkeypatch):
    # Slices that divide the vocabulary unevenly, one slice, and the default; rows weighted unequally, so the
    # backward pass must use each row's own gradient. Both backward passes: row factors applied to the small
    # operands (fp32's) and the kept exps rescaled in memory (bf16's, kept in fp32 for the bench's variant).
    monkeypatch.setattr(chunked_nll, "folds_row_factors", lambda dtype: folded)
    inputs = _inputs(dtype=torch.float32)
    expected = _nll_and_grads(_reference, *inputs)
    got = _nll_and_grads(lambda h, w, b, t: linear_nll(h, w, b, t, slice_columns=columns), *inputs)
    assert got[0].dtype == torch.float32
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("confident", [False, True])
def test_bf16_products_are_as_accurate_as_autocast(confident):
    h, w, b, targets, weights = _inputs(dtype=torch.float64)
    if confident:  # P(target) near 1: the gradient is a small difference of two numbers close to g
        targets = torch.arange(h.size(0)) * 7
        w[targets] = 0.8 * h
    exact = _nll_and_grads(_reference, h, w, b, targets, weights)
    inputs = (h.float(), w.float(), b.float(), targets, weights)

    def autocast_reference(h, w, b, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = F.linear(h, w, b)
        return F.cross_entropy(scores.float(), t, reduction="none")

    ours = _nll_and_grads(lambda h, w, b, t: linear_nll(h, w, b, t, torch.bfloat16, slice_columns=256), *inputs)
    theirs = _nll_and_grads(autocast_reference, *inputs)
    for mine, autocast, truth in zip(ours, theirs, exact):
        error, autocast_error = ((x.double() - truth).norm() / truth.norm() for x in (mine, autocast))
        assert 0 < error <= 1.2 * autocast_error  # bf16 really was used, and no worse than PyTorch's own


@pytest.mark.parametrize("columns", [256, None])
def test_fp32_nll_and_gradients_of_confident_predictions_are_as_accurate_as_pytorchs(columns):
    """Where P(target) is near 1 the scores are large, the NLL is tiny and each gradient is a small difference of
    two large terms: all must still come out as close to the float64 truth as PyTorch's own fp32 path does."""
    h, w, b, targets, weights = _inputs(dtype=torch.float64)
    targets = torch.arange(h.size(0)) * 7
    w[targets] = 4 * h
    exact = _nll_and_grads(_reference, h, w, b, targets, weights)
    assert (exact[0] < 1e-3).float().mean() > 0.8  # most targets' probabilities above 0.999
    inputs = (h.float(), w.float(), b.float(), targets, weights)
    ours = _nll_and_grads(lambda h, w, b, t: linear_nll(h, w, b, t, slice_columns=columns), *inputs)
    theirs = _nll_and_grads(_reference, *inputs)
    nll_error, pytorch_nll_error = ((x[0].double() - exact[0]).abs().max() for x in (ours, theirs))
    assert nll_error <= 2 * pytorch_nll_error
    for mine, pytorchs, truth in zip(ours[1:], theirs[1:], exact[1:]):
        error, pytorch_error = ((x.double() - truth).norm() / truth.norm() for x in (mine, pytorchs))
        assert error <= 2 * pytorch_error


def test_exponentials_match_exp_to_float_rounding_in_place():
    x = torch.linspace(-30, 0, 30001)
    result = x.clone()
    assert chunked_nll.exp_(result) is result
    truth = x.double().exp()
    relative = (result.double() - truth).abs() / truth
    # x log2 e rounds once (and log2 e itself): about |x| x 1e-7 relative at most, plus exp2's own rounding
    assert (relative <= x.abs().double() * 1e-7 + 2.5e-7).all()
    near_top = x >= -1  # the exponentials that make up most of a sum: as close as torch.exp's own
    torch_exp_error = (x[near_top].exp().double() - truth[near_top]).abs() / truth[near_top]
    assert relative[near_top].max() <= 2 * torch_exp_error.max()
    edges = chunked_nll.exp_(torch.tensor([float("-inf"), -200.0, 0.0, float("nan")]))
    assert edges[:3].tolist() == [0.0, 0.0, 1.0] and edges[3].isnan()


def test_slices_are_cache_sized_and_used_only_where_they_pay():
    assert slice_size(700, 33278) == 2048  # 700 rows x 2048 float32 scores ~ 5.5 MB
    assert slice_size(100_000, 33278) == 256
    assert slice_size(400, 10000) == 10000  # 15 MB of scores: one slice
    assert slice_size(1120, 10000) < 10000  # 43 MB: sliced again
    assert saves_traffic(700, 33278) and saves_traffic(400, 10000)
    assert not saves_traffic(8192, 66)  # a character vocabulary: PyTorch's path was faster


def test_model_nll_for_a_large_vocabulary_matches_the_scores_softmax():
    # Tied weights: the decoder's gradient and the embedding's meet in one tensor.
    vocab = 9000
    model = LanguageModel(ModelConfig(embedding_size=12, hidden_size=12, dropout=0.0, tie_weights=True), vocab)
    x, y = torch.randint(0, vocab, (4, 50)), torch.randint(0, vocab, (4, 50))
    assert saves_traffic(y.numel(), vocab)
    nll, _ = model(x, targets=y)
    nll.mean().backward()
    sliced_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    scores, _ = model(x)
    expected = F.cross_entropy(scores.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    expected.mean().backward()
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)
    for got, p in zip(sliced_grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_nll, _ = model(x, targets=y)
    assert bf16_nll.dtype == torch.float32
    torch.testing.assert_close(bf16_nll, expected, rtol=0, atol=0.1)


def test_a_second_backward_pass_is_refused_rather_than_wrong():
    # The backward pass turns the kept exponentials into gradients in place, so it can run only once.
    h, w, b, targets, _ = _inputs(dtype=torch.float32)
    h.requires_grad_()
    nll = linear_nll(h, w, b, targets, slice_columns=256)
    nll.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        nll.sum().backward()


def test_only_a_pass_that_needs_gradients_keeps_the_exponentials(monkeypatch):
    # Evaluation must not hold (N, V) floats: `keep` is what decides whether the forward pass stores them.
    import lmtool.chunked_nll as chunked_nll

    seen = []
    original = chunked_nll._LinearNLL.apply
    monkeypatch.setattr(chunked_nll._LinearNLL, "apply", lambda *args: seen.append(args[-2]) or original(*args))
    h, w, b, targets, _ = _inputs(dtype=torch.float32)
    with torch.no_grad():
        evaluated = linear_nll(h.requires_grad_(), w, b, targets, slice_columns=256)
    trained = linear_nll(h, w, b, targets, slice_columns=256)
    linear_nll(h.detach(), w, b, targets, slice_columns=256)  # nothing requires a gradient
    assert seen == [False, True, False]
    torch.testing.assert_close(evaluated, trained.detach())
