"""-log softmax(h Wᵀ + b)[target] for a full-softmax output layer, computed a slice of the vocabulary at a time.

PyTorch's `cross_entropy(linear(h))` writes the (N, V) scores to memory and then reads and writes matrices of
that size several more times (log-softmax, the one-hot gradient, its backward, the bias sum), so over a large
vocabulary a CPU spends a large part of the step moving them. Here each cache-sized slice (N, C) of scores is
turned into exp(score - the slice's row maximum) while it is still in cache; the forward pass keeps one
log-sum-exp per row (as the row's top score plus a small log-sum, so that a confident prediction's tiny NLL
and gradients lose no digits: as accurate as PyTorch's path) and, when a gradient is wanted, those
exponentials. The backward pass turns each kept slice straight into the gradients of h, W and b. In fp32 each
row's softmax factor is applied to the small (N, H) operands rather than to the slice, and the one-hot part is subtracted apart; under bf16 the slice is
rescaled in place into g * (softmax - one-hot) before any rounding. So the (N, V) matrix is written once and
read by the products (and once more under bf16); in training it is held from the forward pass to the
backward, N x V floats, as PyTorch's path holds its log-softmax. Without a gradient (evaluation) nothing of
size (N, V) is kept. Small score matrices (WHOLE_BYTES) are one slice. Each row's NLL and every gradient match
PyTorch's to float rounding.

Evaluation can hand in the output layer already cut into slices and packed by oneDNN (`pack_slices`), once for
many batches: PyTorch's bf16 linear layer re-arranges a slice's weights on every call, and in fp32 on an AMD
EPYC oneDNN's packed product ran faster than MKL's (bench/RESULTS.md, Evaluation and scoring speed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmtool.packed_weights import PackedWeights, pack, packed_times

# Bytes of float32 scores per vocabulary slice: large enough for efficient products, small enough to stay in
# cache between the product that writes them and the exp/sum that reads them.
SLICE_BYTES = 6 * 2**20


# Scores up to this size are handled as one slice: there fewer, larger operations beat cache residency (a PTB
# training step, 15 MB of scores, ran 1.00-1.04x faster whole in bench/step_variants.py --variant small-slices
# --keep-freed-memory); larger ones, like WikiText-2's 89 MB, stay sliced.
WHOLE_BYTES = 32 * 2**20
# Vocabularies below this size keep PyTorch's path (a character model's scores are small and it was faster).
MIN_VOCAB = 4096


LOG2_E = 1 / math.log(2)


def exp_(x: torch.Tensor) -> torch.Tensor:
    """exp(x) in place, computed as 2^(x log2 e): PyTorch's CPU exp2 is much cheaper than its exp, and on a 2-core
    AMD EPYC the word defaults' evaluation ran 1.01-1.11x (fp32) and 1.09-1.22x (bf16) as fast with it at batch
    64 in seven runs (`python bench/eval_throughput.py --level word`, which times both ways in turn), and the
    training steps of the word defaults, WikiText-2 and PTB 1.00-1.02x and 1.03-1.06x (`python
    bench/step_variants.py --variant natural-exp`). The product x log2 e rounds once, which moves exp(x) by about
    |x| x 1e-7 relative at most: under 1e-7 for the scores within 1 of the slice's maximum, which make up most of
    a sum of exponentials (torch.exp's own error there is 6e-8), and 2e-6 for an exp(-20) term."""
    return x.mul_(LOG2_E).exp2_()


def slice_size(rows: int, vocab_size: int) -> int:
    """Vocabulary entries per slice for `rows` scored positions: the whole vocabulary when its scores fit
    WHOLE_BYTES, else a multiple of 256, at least 256."""
    if 4 * rows * vocab_size <= WHOLE_BYTES:
        return vocab_size
    columns = SLICE_BYTES // (4 * max(rows, 1)) // 256 * 256
    return min(vocab_size, max(256, columns))


def saves_traffic(rows: int, vocab_size: int) -> bool:
    """Whether this layer beats PyTorch's: from 10k words on it was faster in fp32 and bf16, while a character
    vocabulary measured slower (bench/step_variants.py)."""
    return vocab_size >= MIN_VOCAB


def folds_row_factors(compute_dtype: torch.dtype) -> bool:
    """Whether the backward pass leaves the kept exps as they are and applies each row's softmax factor to the
    small operands instead: in fp32, where that saved a pass over the (N, V) matrix (bench/step_variants.py
    --variant rescaled-exps); not where the products round, which needs g * (softmax - one-hot) formed first."""
    return compute_dtype == torch.float32


@dataclass(frozen=True)
class PackedSlices:
    """An output layer's (V, H) weights and (V,) bias in `dtype`, cut into vocabulary slices `columns` wide (the
    last one may be narrower), each slice's (H, C) transpose packed by oneDNN, with a copy of its bias."""

    slices: tuple[tuple[PackedWeights, torch.Tensor], ...]
    columns: int
    dtype: torch.dtype
    vocab_size: int


def pack_slices(weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype, rows: int) -> PackedSlices:
    """The output layer packed for `linear_nll` without gradients, for products with about `rows` rows at a time
    (the slices' width and oneDNN's hint). A copy: it does not follow later changes to the weights."""
    columns = slice_size(rows, weight.size(0))
    w, b = weight.detach().to(dtype), bias.detach().to(dtype)
    slices = tuple((pack(w[start:start + columns].t(), rows), b[start:start + columns].clone())
                   for start in range(0, w.size(0), columns))
    return PackedSlices(slices=slices, columns=columns, dtype=dtype, vocab_size=w.size(0))


def linear_nll(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32, slice_columns: int | None = None,
    packed: PackedSlices | None = None,
) -> torch.Tensor:
    """(N, H), (V, H), (V,), (N,) int64 -> (N,) float32 NLL of each target. The products run in `compute_dtype`
    (bf16 under autocast, as `nn.Linear` would) and everything else in float32. Differentiable in hidden,
    weight and bias; its backward pass runs once (it reuses the kept exponentials in place). `packed`, the same
    weight and bias packed in `compute_dtype` (`pack_slices`), is used where no gradient is wanted, and then
    sets the slices."""
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, weight, bias))
    if packed is not None and packed.vocab_size != weight.size(0):
        raise ValueError(f"the packed output layer has {packed.vocab_size} rows, the weight {weight.size(0)}")
    if packed is not None and (keep or packed.dtype != compute_dtype):
        packed = None
    columns = packed.columns if packed is not None else slice_columns or slice_size(hidden.size(0), weight.size(0))
    return _LinearNLL.apply(hidden, weight, bias, targets.long(), compute_dtype, columns, keep, packed)


class _LinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype, columns, keep, packed):
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen here, explicitly
            h = hidden.to(compute_dtype)  # (N, H)
            if packed is None:
                w = weight.to(compute_dtype)  # (V, H)
                b = bias.to(compute_dtype)  # (V,)
            slices = range(0, weight.size(0), columns)
            slice_max = h.new_empty((len(slices), h.size(0)), dtype=torch.float32)  # (slices, N)
            slice_log_sum = torch.empty_like(slice_max)  # log of each slice's sum of exp(score - its max)
            # The target's own score comes from the same product as the others, so a confident prediction's NLL
            # (its target the top score) is the small log_sum alone, not a difference of two roundings. Each
            # slice's score at every row's target column is kept and the target's own slice picked at the end:
            # one gather per slice rather than a mask, a gather and a select (an evaluation has dozens of slices).
            target_slice = targets // columns  # (N,) the slice that holds each target
            target_column = (targets - target_slice * columns)[:, None]  # (N, 1) its column there
            at_target_column = h.new_empty((len(slices), h.size(0), 1), dtype=torch.float32)  # (slices, N, 1)
            kept = []
            for i, start in enumerate(slices):
                if packed is None:
                    exps = _scores(h, w[start:start + columns], b[start:start + columns])  # (N, C)
                else:
                    exps = packed_times(h, *packed.slices[i]).float()  # (N, C): a copy only in bf16
                torch.gather(exps, 1, _within(target_column, exps.size(1), columns), out=at_target_column[i])
                torch.amax(exps, dim=1, out=slice_max[i])
                exp_(exps.sub_(slice_max[i][:, None]))  # in place, while the slice is in cache
                torch.log(exps.sum(dim=1), out=slice_log_sum[i])
                if keep:
                    kept.append(exps)
            # log-sum-exp = top + log_sum, kept apart: both the softmax factors below and the NLL then subtract
            # numbers of similar size first, which a confident prediction's large scores would otherwise round.
            top = slice_max.amax(dim=0)  # (N,) each row's highest score
            below_top = slice_max - top  # (slices, N), 0 for the slice that holds it
            log_sum = torch.logsumexp(below_top + slice_log_sum, dim=0)  # (N,) log sum of exp(score - top)
            target_scores = at_target_column.squeeze(2).gather(0, target_slice[None]).squeeze(0)  # (N,)
        if keep:
            ctx.save_for_backward(h, w, targets, target_slice, target_column, log_sum, below_top, *kept)
            ctx.columns, ctx.dtypes, ctx.used = columns, (hidden.dtype, weight.dtype, bias.dtype), False
        return (top - target_scores) + log_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll):
        if ctx.used:
            raise RuntimeError("linear_nll's backward pass can run only once (retain_graph is not supported)")
        ctx.used = True
        h, w, targets, target_slice, target_column, log_sum, below_top, *kept = ctx.saved_tensors
        columns = ctx.columns
        g = grad_nll.float().contiguous()  # (N,) dLoss/dNLL of each row
        with torch.autocast(h.device.type, enabled=False):
            grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)  # (N, H)
            grad_w = torch.empty(w.shape, dtype=torch.float32, device=w.device)  # (V, H)
            grad_b = torch.empty(w.size(0), dtype=torch.float32, device=w.device)  # (V,)
            folded = folds_row_factors(h.dtype)
            for i, start in enumerate(range(0, w.size(0), columns)):
                stop = start + kept[i].size(1)
                # g * softmax = row_scale * the kept exps, row_scale = g * exp(slice max - log-sum-exp)
                row_scale = (below_top[i] - log_sum).exp_().mul_(g)  # (N,)
                slice_grads = (grad_h, grad_w[start:stop], grad_b[start:stop])
                if folded:
                    _add_scaled_softmax(kept[i], row_scale, h, w[start:stop], *slice_grads)
                else:
                    targets_here = (_within(target_column, stop - start, columns), target_slice == i)
                    _add_rounded_softmax_minus_one_hot(kept[i], row_scale, h, w[start:stop], targets_here, g,
                                                       *slice_grads)
            if folded:  # the one-hot part of softmax - one-hot, for all slices at once
                grad_h.sub_(w[targets] * g[:, None])
                grad_w.index_add_(0, targets, h * -g[:, None])
                grad_b.index_add_(0, targets, -g)
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        return grad_h.to(hidden_dtype), grad_w.to(weight_dtype), grad_b.to(bias_dtype), None, None, None, None, None


def _add_scaled_softmax(exps, row_scale, h, w_slice, grad_h, grad_w_slice, grad_b_slice) -> None:
    """Add one slice's g * softmax, row_scale[:, None] * exps, to the gradients without rescaling the (N, C)
    exps in memory: the row factor goes onto the (N, H) operands and results, and the bias gradient is one
    matrix-vector product. In fp32 the one-hot part can then be subtracted apart, for all slices at once."""
    grad_h.addcmul_(exps @ w_slice, row_scale[:, None])
    torch.mm(exps.t(), h * row_scale[:, None], out=grad_w_slice)
    torch.mv(exps.t(), row_scale, out=grad_b_slice)


def _add_rounded_softmax_minus_one_hot(exps, row_scale, h, w_slice, target_columns, g, grad_h, grad_w_slice,
                                       grad_b_slice) -> None:
    """The same for products in a lower precision. `target_columns`: each row's target column in this slice
    (clamped into it, (N, 1)) and whether the target is really there ((N,) bool). g * (softmax - one-hot) is
    formed whole in fp32 before any rounding: a confident prediction's gradient is a small difference of two
    numbers close to g, which bf16 would round away."""
    probs = exps.mul_(row_scale[:, None])  # (N, C) g * softmax, in place
    column, inside = target_columns
    one_hot = torch.where(inside, -g, 0)[:, None]  # (N, 1), subtracted at the target's column
    probs.scatter_add_(1, column, one_hot)
    torch.sum(probs, dim=0, out=grad_b_slice)
    probs = probs.to(w_slice.dtype)
    grad_h += probs @ w_slice
    grad_w_slice.copy_(probs.t() @ h)


def _within(target_column: torch.Tensor, width: int, columns: int) -> torch.Tensor:
    """Each row's target column (N, 1) as an index into a slice `width` wide: clamped in the last, narrower slice,
    where rows whose target lies in another slice would otherwise point past its end."""
    return target_column if width == columns else target_column.clamp(max=width - 1)


def _scores(h: torch.Tensor, w_slice: torch.Tensor, b_slice: torch.Tensor) -> torch.Tensor:
    """(N, H), (C, H), (C,) -> (N, C) float32 scores, rounded once to the product's dtype as `nn.Linear` would."""
    if h.dtype == torch.float32:
        # addmm would first copy the bias into every row of the output: adding it afterwards moves less.
        return torch.mm(h, w_slice.t()).add_(b_slice)
    return torch.addmm(b_slice, h, w_slice.t()).float()
