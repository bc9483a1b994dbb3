"""Log-probabilities of text: the one definition of the loss, stream perplexity, and sentence scores."""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from lmtool.chunked_nll import PackedSlices, slice_size
from lmtool.data import batchify, oriented, windows
from lmtool.errors import LmtoolError
from lmtool.graphed_step import Capture, GraphedStep, capture_cuda_graph, on_current_gpu
from lmtool.model import LanguageModel, State, detach_state
from lmtool.tokenizer import EOS, EOS_ID, UNK_ID, Tokenizer

LOG10_E = 1 / math.log(10)

# On a CPU, evaluation's default window holds at least this many positions (batch x tokens): each window's output
# products read the whole output layer once, and the state is carried across windows, so a longer window changes
# the speed and not the numbers (beyond float rounding). At batch 1 the training window (35 words, 128 characters)
# left the products bound by memory. GPUs keep the model's window: replayed as a CUDA graph, one stream of the
# char model ran 0.98x as fast in windows of 512 and PTB-medium 1.14x in windows of 140 (H200, bench/gpu_eval.py).
EVALUATION_POSITIONS = 512


def evaluation_window(bptt: int, batch_size: int, device: torch.device) -> int:
    """The tokens per window that evaluating `batch_size` streams reads by default: the model's training window
    `bptt`, lengthened on a CPU until a window holds EVALUATION_POSITIONS positions."""
    if device.type != "cpu":
        return bptt
    return max(bptt, -(-EVALUATION_POSITIONS // batch_size))


# On a GPU, a stream of at least this many windows is scored by replaying one window as a CUDA graph. A window
# of these small models is hundreds of short kernels (cuDNN runs a few per time step and layer) that the host
# launches one by one. A capture costs three eager warm-up windows, a device synchronisation and a garbage
# collection (not timed on their own), so short streams (a long line of a bidirectional model's mixture, say)
# stay eager. The replays run the same kernels: the same numbers (bench/gpu_eval.py).
GRAPH_MIN_WINDOWS = 16


def window_capture(model: LanguageModel, windows_count: int, cuda_graph: bool) -> Capture | None:
    """How `stream_nll` captures its windows: as a CUDA graph where asked for, on the current GPU, with a full
    softmax (the adaptive one picks rows by their targets, so its shapes change) and for GRAPH_MIN_WINDOWS windows
    or more; None: every window eagerly."""
    if not cuda_graph or not on_current_gpu(model.device) or model.config.softmax != "full":
        return None
    return capture_cuda_graph if windows_count >= GRAPH_MIN_WINDOWS else None


def _capturable_autocast(device: torch.device) -> torch.autocast:
    """The autocast now in force, without its cache of cast weights, as PyTorch asks of captures: a cast cached
    during a capture would live in the graph's private memory and outlast the graph in the cache. Each replay
    casts the weights itself."""
    kind = device.type
    return torch.autocast(kind, dtype=torch.get_autocast_dtype(kind), enabled=torch.is_autocast_enabled(kind),
                          cache_enabled=False)


def safe_exp(x: float) -> float:
    """exp that saturates instead of overflowing (a diverged loss still prints a perplexity)."""
    return math.exp(min(x, 700.0))


@dataclass(frozen=True)
class StreamScore:
    """Summed negative log-likelihood over the tokens actually scored."""

    nll: float  # nats, summed over every scored token
    tokens: int
    unknown: int = 0  # scored positions whose target is <UNK>
    nll_unknown: float = 0.0  # the part of `nll` at those positions

    @property
    def loss(self) -> float:
        """Mean NLL per token in nats."""
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        """exp(total NLL / total tokens): never an average of per-batch perplexities."""
        return safe_exp(self.loss)

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)

    @property
    def unknown_rate(self) -> float:
        return self.unknown / self.tokens

    @property
    def perplexity_known(self) -> float | None:
        """Perplexity over the positions whose target is a known token (None if there are none)."""
        known = self.tokens - self.unknown
        return safe_exp((self.nll - self.nll_unknown) / known) if known else None


@torch.no_grad()
def stream_nll(
    model: LanguageModel,
    stream: torch.Tensor,
    batch_size: int,
    bptt: int,
    direction: str | None = None,
    rows: slice | None = None,
    cuda_graph: bool = True,
) -> StreamScore:
    """Score a (N,) id stream as `batch_size` contiguous streams, carrying the state across windows; a
    backward direction reads the stream reversed.

    `rows` scores only those streams (one rank's share in distributed training; the sums add up). `cuda_graph`:
    on a GPU, replay the windows as a CUDA graph where `window_capture` allows."""
    direction = model.direction_of(direction)
    streams = batchify(oriented(stream, direction), batch_size)  # (B, N // B), still on the host
    if streams.size(1) < 2:
        raise LmtoolError(f"the text has {stream.numel()} tokens: too short to score with batch size {batch_size}")
    if rows is not None:
        streams = streams[rows]  # (b, N // B)
        if streams.size(0) == 0:
            return StreamScore(nll=0.0, tokens=0)
    was_training = model.training
    model.eval()
    device = model.device
    state: State = model.init_state(streams.size(0))
    total = torch.zeros((), dtype=torch.float64, device=device)
    total_unknown = torch.zeros((), dtype=torch.float64, device=device)
    unknown = torch.zeros((), dtype=torch.int64, device=device)
    windows_count = -(-(streams.size(1) - 1) // bptt)
    packed = model.packed_output_layer(rows=streams.size(0) * min(bptt, streams.size(1) - 1), batches=windows_count)
    capture = window_capture(model, windows_count, cuda_graph)

    def score_window(x: torch.Tensor, y: torch.Tensor, state: State, step: object = None) -> State:
        """Adds window (x, y)'s sums to the totals in place (so that it can be replayed as a graph); returns
        the state to carry on. `step`, which GraphedStep passes, is not needed."""
        with _capturable_autocast(device) if capture is not None else nullcontext():
            nll, state = model(x, state, targets=y, direction=direction, packed_output=packed)  # (B, T), as training
        is_unknown = y == UNK_ID
        total.add_(nll.sum(dtype=torch.float64))
        total_unknown.add_((nll * is_unknown).sum(dtype=torch.float64))
        unknown.add_(is_unknown.sum())
        return detach_state(state)

    graphed = GraphedStep(score_window, bptt, capture) if capture is not None else None
    for x, y in windows(streams, bptt):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # the graph is captured once: evaluation has no learning rate to change, nor a step number to read
        state = graphed(x, y, state, 0, lr=0.0) if graphed is not None else score_window(x, y, state)
    if graphed is not None and graphed.failure is not None:
        warnings.warn(f"evaluation's windows could not be captured as a CUDA graph ({graphed.failure}); they were "
                      "scored one kernel at a time instead: the same numbers, more slowly")
    model.train(was_training)
    scored = streams.size(0) * (streams.size(1) - 1)
    return StreamScore(nll=float(total), tokens=scored, unknown=int(unknown), nll_unknown=float(total_unknown))


def combined(scores: Sequence[StreamScore]) -> StreamScore:
    """Several scores as one: NLL and token counts summed (for several files, or both directions)."""
    return StreamScore(
        nll=math.fsum(s.nll for s in scores),
        tokens=sum(s.tokens for s in scores),
        unknown=sum(s.unknown for s in scores),
        nll_unknown=math.fsum(s.nll_unknown for s in scores),
    )


@dataclass(frozen=True)
class TokenScore:
    """One token of a scored sentence."""

    token: str  # as written in the sentence; <EOS> for the end
    known: bool
    logprob: float  # natural log

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)

    @property
    def surprisal_bits(self) -> float:
        return -self.logprob / math.log(2)


class _SentenceTotals:
    """What follows from a sentence's log-probability and its token count."""

    logprob: float
    num_tokens: int

    @property
    def log10prob(self) -> float:
        return self.logprob * LOG10_E

    @property
    def perplexity(self) -> float:
        return safe_exp(-self.logprob / self.num_tokens)


@dataclass(frozen=True)
class SentenceScore(_SentenceTotals):
    """log P(tokens..., <EOS>) of one sentence, from the sentence-start state. Tokens are in sentence order;
    read backward, each token is predicted from the ones after it and the final <EOS> row is the sentence
    start, predicted from the whole sentence."""

    sentence: str
    tokens: tuple[TokenScore, ...]
    direction: str = "forward"

    @property
    def logprob(self) -> float:
        return math.fsum(t.logprob for t in self.tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_unknown(self) -> int:
        return sum(not t.known for t in self.tokens)


@dataclass(frozen=True)
class MixtureScore(_SentenceTotals):
    """A bidirectional model's sentence probability: the mixture 1/2 P_forward + 1/2 P_backward, a proper
    distribution over sentences, kept in log space (a long sentence's probabilities underflow any float)."""

    forward: SentenceScore
    backward: SentenceScore

    @property
    def sentence(self) -> str:
        return self.forward.sentence

    @property
    def logprob(self) -> float:
        return log_mean_exp(self.forward.logprob, self.backward.logprob)

    @property
    def num_tokens(self) -> int:
        return self.forward.num_tokens

    @property
    def num_unknown(self) -> int:
        return self.forward.num_unknown


def log_mean_exp(a: float, b: float) -> float:
    """log((e^a + e^b) / 2) without underflow or overflow."""
    top = max(a, b)
    if top == -math.inf:
        return -math.inf
    return top + math.log1p(math.exp(min(a, b) - top)) - math.log(2)


def packing_fits(packed: PackedSlices, rows: int, vocab_size: int) -> bool:
    """Whether a packing's slices suit a batch of `rows` positions: at least half as wide as its own slice width.
    Slices sized for a long first batch keep a long line's scores cache-sized but slow the short batches after it
    down; scoring, whose batches only narrow (longest first), packs again when this fails: a few times at most."""
    return slice_size(rows, vocab_size) < 2 * packed.columns


@torch.no_grad()
def score_sentences(
    model: LanguageModel,
    tokenizer: Tokenizer,
    sentences: Sequence[str],
    batch_size: int = 64,
    direction: str | None = None,
) -> list[SentenceScore]:
    """Score each sentence as P(y1 .. yT, <EOS>) starting after an <EOS>, in padded batches; a backward
    direction reads each sentence right to left, from its end to its start."""
    for s in sentences:
        if "\n" in s:
            raise LmtoolError("a sentence to score cannot contain a newline; give one sentence per line")
    model.eval()
    device = model.device
    direction = model.direction_of(direction)
    backward = direction == "backward"
    in_order = [tokenizer.encode_line(s) for s in sentences]
    # Read backward, "w1 .. wT <EOS>" is "wT .. w1 <EOS>": the <EOS> then stands for the sentence start.
    encoded = [ids[-2::-1] + ids[-1:] for ids in in_order] if backward else in_order
    # Longest first, so each padded batch wastes little; results go back in the caller's order.
    order = sorted(range(len(sentences)), key=lambda i: -len(encoded[i]))
    logprobs: list[list[float]] = [[] for _ in sentences]
    packed: PackedSlices | None = None
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(encoded[chunk[0]])
        rows = len(chunk) * width
        if packed is None or not packing_fits(packed, rows, model.vocab_size):
            packed = None  # the old packing goes before the new one is made
            packed = model.packed_output_layer(rows=rows, batches=-(-(len(order) - start) // batch_size))
        targets = torch.full((len(chunk), width), EOS_ID, dtype=torch.long)
        for row, i in enumerate(chunk):
            targets[row, : len(encoded[i])] = torch.tensor(encoded[i])
        inputs = torch.cat([torch.full((len(chunk), 1), EOS_ID), targets[:, :-1]], dim=1)  # (B, L)
        # Padding sits after each sentence, so it changes nothing before it.
        nll, _ = model(inputs.to(device), targets=targets.to(device), direction=direction,
                       packed_output=packed)  # (B, L)
        lp = (-nll).double().cpu()  # (B, L)
        for row, i in enumerate(chunk):
            logprobs[i] = lp[row, : len(encoded[i])].tolist()
            if backward:  # back to sentence order, the sentence-start row last
                logprobs[i] = logprobs[i][-2::-1] + logprobs[i][-1:]
    results = []
    for sentence, ids, lps in zip(sentences, in_order, logprobs):
        words = tokenizer.split(sentence) + [EOS]
        tokens = tuple(
            TokenScore(token=w, known=(i != UNK_ID), logprob=lp) for w, i, lp in zip(words, ids, lps)
        )
        results.append(SentenceScore(sentence=sentence, tokens=tokens, direction=direction))
    return results
