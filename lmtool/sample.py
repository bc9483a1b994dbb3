"""Generation: one token at a time, carrying the RNN state, with temperature, top-k, top-p and priming."""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lmtool.config import check_new_seed
from lmtool.devices import inference_dtype
from lmtool.errors import LmtoolError, non_finite_scores
from lmtool.graphed_step import Capture, GraphedStep, capture_cuda_graph, on_current_gpu
from lmtool.lstm_stepper import LstmStepper
from lmtool.model import GATE_MAJOR_MIN_STREAMS, LanguageModel, map_state
from lmtool.tokenizer import EOS_ID, UNK_ID, Tokenizer


# A prompt of at most this many tokens (with the <EOS> before it) is stepped through like the generated tokens on a
# CPU in fp32 for fewer than GATE_MAJOR_MIN_STREAMS streams, not read by the sequence kernel, whose set-up costs
# more for a few tokens: for one token 0.28 against 2.6 ms (char 2x512 LSTM) and 0.14 against 0.86 ms (word 2x200)
# on a 2-core AMD EPYC, for 8 tokens 2.0 against 3.3 and 0.85 against 1.03 ms; at 16 the word model read faster
# (1.2 against 1.7 ms) and the char model about even (`python bench/sampling.py`, which times both; bench/RESULTS.md,
# Generation speed).
STEPPED_PROMPT_TOKENS = 8

# On a GPU, generate(cuda_graph=True) draws samples of at least this many tokens by replaying one token's step
# (the draw and the recurrent step) as a CUDA graph: a step is dozens of short kernels that the host launches one
# by one. A capture costs three eager warm-up tokens, a device synchronisation and a garbage collection. Prepared
# and tested on a CPU with a stand-in graph only: no GPU was lent to check it (bench/gpu_sampling.py does).
GRAPH_MIN_TOKENS = 16

# Generation steps an LSTM in StepWeights' gate-major layout (a CPU's) with lmtool.lstm_stepper.LstmStepper, on
# buffers made once per call (False: LanguageModel.step_layers, the same states; bench/sampling.py times both).
BUFFERED_LSTM_STEPS = True

# On a CPU, at least this many streams drawing from at least DRAW_BLOCKS_MIN_VOCAB tokens draw in blocks of
# DRAW_BLOCK tokens (`_draw_in_blocks`): there cumsum runs along each row on one thread. On a 2-core AMD EPYC the
# 33k-word 2x200 model generated 1.09-1.37x (fp32) and 1.17-1.62x (bf16) as many words per second that way at 64
# streams, 0.97-1.05x and 1.05-1.12x at 16 in two runs of `python bench/sampling.py` (bench/RESULTS.md, Generation
# speed). For fewer streams the blocks' dozen small operations cost about what they save. An adaptive softmax's
# draw within a large tail cluster takes the same rule (not timed).
DRAW_BLOCK = 256
DRAW_BLOCKS_MIN_VOCAB = 8 * DRAW_BLOCK
DRAW_BLOCKS_MIN_STREAMS = 16

# Samples generated together, at most: one batch, so far more would only run out of memory (and beyond 2^63 torch's
# shapes overflow).
MAX_SAMPLES = 1_000_000


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick each next token."""

    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int | None = None  # keep exactly the k most probable tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches p
    length: int = 200  # tokens to generate per sample
    num_samples: int = 1  # generated together as one batch
    stop_at_eos: bool = False
    seed: int | None = None
    precision: str = "fp32"  # bf16: the recurrent layers step in bfloat16 (faster for many streams, not exact)

    def __post_init__(self) -> None:
        self._check_types()
        inference_dtype(self.precision)  # the name; the device is checked when sampling
        if not 0 <= self.temperature < float("inf"):  # NaN too
            raise LmtoolError(f"--temperature must be 0 (greedy) or positive and finite, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise LmtoolError(f"--top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise LmtoolError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.length < 1:
            raise LmtoolError(f"--length must be at least 1, got {self.length}")
        if not 1 <= self.num_samples <= MAX_SAMPLES:
            raise LmtoolError(f"--num-samples must be between 1 and {MAX_SAMPLES:,}, got {self.num_samples}")
        if self.seed is not None:
            check_new_seed("--seed", self.seed)

    def _check_types(self) -> None:
        """Library callers get a clear error for a value of the wrong type, not a TypeError from deep inside.
        Any integer or real number type counts (numpy's too), stored as a plain int or float."""
        for name, (plain, optional) in _OPTION_TYPES.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if plain is bool:
                ok = value in (True, False)  # numpy's bool too
            elif plain is str:
                ok = isinstance(value, str)
            else:  # bool is an Integral to Python, but never a count or a temperature here
                ok = isinstance(value, _NUMBERS[plain]) and not isinstance(value, bool)
            if not ok:
                raise LmtoolError(f"{name} must be {_KINDS[plain]}{' or None' if optional else ''}, "
                                  f"got {value!r} ({type(value).__name__})")
            object.__setattr__(self, name, plain(value))  # the dataclass is frozen


# SamplingOptions' fields: (the plain type each is stored as, whether None is allowed)
_OPTION_TYPES = {
    "temperature": (float, False),
    "top_k": (int, True),
    "top_p": (float, True),
    "length": (int, False),
    "num_samples": (int, False),
    "stop_at_eos": (bool, False),
    "seed": (int, True),
    "precision": (str, False),
}
_NUMBERS = {int: numbers.Integral, float: numbers.Real}
_KINDS = {int: "a whole number", float: "a number", bool: "a flag (True or False)", str: "a string"}


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set every token outside the top-k / top-p set to -inf: (B, V) -> (B, V)."""
    if top_k is not None and top_k < logits.size(-1):
        # Select by index, so ties at the k-th score cannot let more than k tokens through.
        keep = torch.topk(logits, top_k, dim=-1).indices
        masked = torch.full_like(logits, float("-inf"))
        logits = masked.scatter(-1, keep, logits.gather(-1, keep))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach p; the most probable one always stays.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop_sorted[:, 0] = False  # even where p rounds to 0 in float32 (below about 1e-45)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None,
              non_finite: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of every stream: (B, V) scores -> (B,) ids. Non-finite scores raise at once, or, with a
    `non_finite` flag (a bool tensor), set it on the device without a host synchronisation."""
    # A temperature below the smallest float32 would round to 0 in the division: it is greedy anyway.
    if options.temperature < torch.finfo(torch.float32).tiny:
        if non_finite is not None:
            non_finite.logical_or_(torch.isnan(logits).any())
        elif bool(torch.isnan(logits).any()):
            raise non_finite_scores()
        return logits.argmax(dim=-1)
    if options.temperature != 1:
        # Shifted so that the largest score is 0 first: a tiny temperature then sends the others to -inf
        # instead of overflowing the largest to inf (the softmax is the same).
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / options.temperature
    filtered = options.top_k is not None or options.top_p is not None
    if filtered:
        logits = filter_logits(logits, options.top_k, options.top_p)
    # Inverse-CDF sampling: one uniform number per stream and a binary search. torch.multinomial costs
    # about 1 ms over a 33k-word vocabulary on a CPU, this about 0.06 ms. Zero-probability tokens have no
    # width in the CDF, so they can never be picked.
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (B, V)
    picked = _draw(probs, generator, non_finite)  # (B, 1)
    # A parallel (GPU) cumsum can give a filtered token, or one whose probability underflowed to 0 at a low
    # temperature, a sliver of width: never return one.
    if filtered or options.temperature != 1:
        allowed = probs.gather(-1, picked) > 0
        picked = torch.where(allowed, picked, probs.argmax(dim=-1, keepdim=True))
    return picked.squeeze(-1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None, non_finite: torch.Tensor | None = None
          ) -> torch.Tensor:
    """One index per row of (B, V) probabilities, by inverse CDF: (B, 1). Non-finite ones raise, or set
    `non_finite` (see pick_next)."""
    batch, vocab = probs.shape
    if batch >= DRAW_BLOCKS_MIN_STREAMS and vocab >= DRAW_BLOCKS_MIN_VOCAB and probs.device.type == "cpu":
        return _draw_in_blocks(probs, generator, non_finite)
    cdf = probs.cumsum(dim=-1)
    totals = cdf[:, -1:]  # (B, 1): a NaN anywhere in a row reaches its total, so one cheap check covers it
    _check_totals(totals, non_finite)
    u = torch.rand((batch, 1), generator=generator, device=probs.device) * totals
    return torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)  # (B, 1)


def _check_totals(totals: torch.Tensor, non_finite: torch.Tensor | None) -> None:
    """Raise for a non-finite total among the (B, 1) rows' sums, or set `non_finite` (see pick_next)."""
    if non_finite is not None:
        non_finite.logical_or_(~torch.isfinite(totals).all())
    elif not math.isfinite(totals.item() if totals.numel() == 1 else totals.sum().item()):
        # one sum read on the host (a NaN or inf in any row reaches it; every total is about 1): torch.isfinite is
        # several operations, which cost more than the rest of a small draw
        raise non_finite_scores()


def _draw_in_blocks(probs: torch.Tensor, generator: torch.Generator | None, non_finite: torch.Tensor | None
                    ) -> torch.Tensor:
    """`_draw` in two levels, the same inverse CDF: the uniform number picks a block of DRAW_BLOCK tokens from
    the blocks' cumulated sums, then a token from that block's own cumulated probabilities. A CPU's cumsum runs
    along a row on one thread; here the long pass is a sum, which runs on them all."""
    batch, vocab = probs.shape
    whole = vocab - vocab % DRAW_BLOCK  # the tokens of whole blocks; the rest form a last, shorter one
    sums = probs[:, :whole].view(batch, -1, DRAW_BLOCK).sum(-1)
    if whole < vocab:
        sums = torch.cat((sums, probs[:, whole:].sum(-1, keepdim=True)), 1)
    cdf = sums.cumsum_(-1)  # (B, blocks)
    totals = cdf[:, -1:]
    _check_totals(totals, non_finite)
    # u < its row's total (a float32 product of a number below 1), so the block found holds probability
    u = torch.rand((batch, 1), generator=generator, device=probs.device).mul_(totals)
    block = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(1) - 1)  # (B, 1)
    u.sub_(torch.nn.functional.pad(cdf, (1, 0)).gather(1, block))  # what lies inside the block
    # The last block's columns past the vocabulary repeat its last token: u stays below the block's sum, so
    # they can only be reached where that sum rounds differently, and then they give that token, which has
    # probability (they add none where it has none).
    columns = torch.arange(DRAW_BLOCK, device=probs.device).add(block * DRAW_BLOCK).clamp_(max=vocab - 1)
    within = probs.gather(1, columns).cumsum_(-1)  # (B, DRAW_BLOCK)
    # The block's own cumulated sum may round below the difference of the blocks' ones: keep u inside it, so that
    # the token found has probability.
    u = torch.minimum(u, torch.nextafter(within[:, -1:], torch.zeros_like(u)))
    return columns.gather(1, torch.searchsorted(within, u, right=True).clamp_(max=DRAW_BLOCK - 1))  # (B, 1)


def draw_adaptive(head: nn.AdaptiveLogSoftmaxWithLoss, hidden: torch.Tensor, generator: torch.Generator | None
                  ) -> torch.Tensor:
    """An exact draw from an adaptive softmax at temperature 1, (B, H) -> (B,): draw from the head (the frequent
    tokens and one entry per tail cluster), then, only for the streams that drew a cluster, within that cluster.
    P(token) = P_head(cluster) x P(token | cluster) is the model's probability, but the work is the head and
    at most one cluster instead of the whole vocabulary."""
    hidden = hidden.float()
    with torch.autocast(hidden.device.type, enabled=False):
        drawn = _draw(torch.softmax(head.head(hidden), dim=-1), generator).squeeze(-1)  # (B,) in the head
        if drawn.numel() == 1:  # one stream: a Python branch costs less than the masks below (the same draws)
            cluster = int(drawn) - head.shortlist_size
            if cluster < 0:
                return drawn
            within = _draw(torch.softmax(head.tail[cluster](hidden), dim=-1), generator).squeeze(-1)
            return within + head.cutoffs[cluster]
        token = drawn.clone()
        for i, cluster in enumerate(head.tail):
            rows = (drawn == head.shortlist_size + i).nonzero().flatten()
            if rows.numel():
                within = _draw(torch.softmax(cluster(hidden[rows]), dim=-1), generator).squeeze(-1)
                token[rows] = head.cutoffs[i] + within
    return token


def token_capture(model: LanguageModel, options: SamplingOptions, two_level: bool, cuda_graph: bool,
                  generator: torch.Generator | None) -> Capture | None:
    """How `generate` captures its token step: as a CUDA graph where asked for, on the current GPU, for
    GRAPH_MIN_TOKENS tokens or more and unless an adaptive softmax draws in two levels (which cluster it reads
    depends on the draw); None: every token eagerly."""
    if not cuda_graph or not on_current_gpu(model.device) or two_level or options.length < GRAPH_MIN_TOKENS:
        return None
    if generator is None:  # the default generator: a capture draws from it by itself
        return capture_cuda_graph
    return functools.partial(capture_cuda_graph, generators=(generator,))


@torch.no_grad()
def generate(
    model: LanguageModel,
    prime_ids: list[int],
    options: SamplingOptions,
    on_token: Callable[[torch.Tensor], None] | None = None,
    direction: str | None = None,
    cuda_graph: bool = False,
) -> list[list[int]]:
    """Generate `options.length` tokens per sample after <EOS> + prime; `on_token` sees each (B,) step.
    In the backward direction the prime is an ending, reversed, and so are the tokens returned. `cuda_graph`: on
    a GPU, replay each token's step as a CUDA graph where `token_capture` allows. Off by default, and not used by
    `Model.sample`, until a GPU run of bench/gpu_sampling.py shows the replays draw the tokens eager steps do."""
    direction = model.direction_of(direction)
    model.eval()
    device = model.device
    dtype = inference_dtype(options.precision, device)
    generator = None
    if options.seed is not None:
        generator = torch.Generator(device=device).manual_seed(options.seed)
    batch = options.num_samples
    context = torch.tensor([EOS_ID] + list(prime_ids), device=device).expand(batch, -1)  # (B, P + 1)
    # bf16 generation: the prompt is read in fp32, then the recurrent layers step in bf16 and, on a CPU, the
    # output layer's products round to bf16 too (lmtool.packed_weights); the softmax and the draw stay fp32.
    weights = model.step_weights(direction, dtype, streams=batch)
    few = batch < GATE_MAJOR_MIN_STREAMS  # the cut-off was timed for one stream; many share the read's set-up
    if device.type == "cpu" and dtype is None and few and context.size(1) <= STEPPED_PROMPT_TOKENS:
        layers = model.layer_states(model.init_state(batch))
        for t in range(context.size(1)):
            last, layers = model.step_layers(context[:, t], layers, weights)  # (B, H)
    else:  # reads the prompt once; then constant work per token
        hidden, state = model.read(context, direction=direction)
        last = hidden[:, -1]  # (B, H)
        layers = model.layer_states(state)
    if dtype is not None:
        layers = [map_state(lambda t: t.to(dtype), layer) for layer in layers]
    # At temperature 1 with no filter an adaptive softmax samples without computing the whole distribution.
    two_level = (model.config.softmax == "adaptive" and options.temperature == 1
                 and options.top_k is None and options.top_p is None)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    lstm = model.config.cell == "lstm"
    stepper = LstmStepper(weights, layers) if weights.gate_major and lstm and BUFFERED_LSTM_STEPS else None

    def advance(last: torch.Tensor, done: torch.Tensor, layers: list, non_finite: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """One token for every stream (the draw; with stop_at_eos, <EOS> after an end and `done` updated in
        place), then the recurrent step on it: (token (B,), the top layer's output (B, H), the layers' states).
        Constant work per token. With the stepper, which keeps the states itself, `layers` comes back as given."""
        if two_level:
            token = draw_adaptive(model.adaptive, last.float(), generator)  # (B,)
        else:
            token = pick_next(model.step_scores(last, weights), options, generator, non_finite)  # (B,)
        if options.stop_at_eos:
            token = token.masked_fill(done, EOS_ID)
            done |= token == EOS_ID
        if stepper is not None:
            return token, stepper(token), layers  # its output buffer is overwritten by the next step, after the draw
        return (token, *model.step_layers(token, layers, weights))

    capture = token_capture(model, options, two_level, cuda_graph, generator)
    if capture is not None:
        return _trimmed(_graphed_tokens(advance, options, device, (last, done, tuple(layers)), capture, on_token),
                        batch, options)
    out: list[torch.Tensor] = []
    for _ in range(options.length):
        token, last, layers = advance(last, done, layers)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if options.stop_at_eos and bool(done.all()):
            break
    return _trimmed(out, batch, options)


def _trimmed(out: list[torch.Tensor], batch: int, options: SamplingOptions) -> list[list[int]]:
    """The generated (B,) steps as one list of ids per sample, each cut after its first <EOS> if asked."""
    ids = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(batch)]
    if options.stop_at_eos:  # cut each sample after its first <EOS>
        ids = [row[: row.index(EOS_ID) + 1] if EOS_ID in row else row for row in ids]
    return ids


# How often a graphed generation without on_token looks whether every sample has ended (a host synchronisation);
# the steps after the last <EOS> produce only <EOS>, which _trimmed cuts off.
ENDED_CHECK_TOKENS = 16


def _graphed_tokens(advance: Callable, options: SamplingOptions, device: torch.device, state: tuple,
                    capture: Capture, on_token: Callable[[torch.Tensor], None] | None) -> list[torch.Tensor]:
    """`generate`'s loop with each token's `advance` run on fixed buffers by GraphedStep, which replays it as one
    captured graph after three eager warm-up tokens. `state` is (the top layer's output, the ended samples, the
    layers' states). The draw records non-finite scores on the device; they raise before on_token sees their
    step, or at the end."""
    token_out = torch.empty(options.num_samples, dtype=torch.long, device=device)
    non_finite = torch.zeros((), dtype=torch.bool, device=device)

    def token_step(x: torch.Tensor, y: torch.Tensor, state: tuple, step: object) -> tuple:
        last, done, layers = state
        token, last, layers = advance(last, done, list(layers), non_finite)
        token_out.copy_(token)
        return last, done, tuple(layers)

    graphed = GraphedStep(token_step, 1, capture)
    no_window = torch.zeros((1, 1), device=device)  # GraphedStep's input buffers: this step reads none
    out: list[torch.Tensor] = []
    for n in range(1, options.length + 1):
        state = graphed(no_window, no_window, state, 0, lr=0.0)  # one capture: no learning rate changes
        token = token_out.clone()
        out.append(token)
        if on_token is not None:
            if bool(non_finite):
                raise non_finite_scores()
            on_token(token)
        if options.stop_at_eos and (on_token is not None or n % ENDED_CHECK_TOKENS == 0) and bool(state[1].all()):
            break
    if graphed.failure is not None:
        warnings.warn(f"generation's token step could not be captured as a CUDA graph ({graphed.failure}); "
                      "generation went on with eager steps, which draw the same tokens", stacklevel=3)
    if bool(non_finite):
        raise non_finite_scores()
    return out


def encode_prime(tokenizer: Tokenizer, prime: str) -> tuple[list[int], int]:
    """The prompt's ids (its newlines are <EOS>) and how many of them are <UNK>."""
    ids = tokenizer.encode(prime)
    return ids, ids.count(UNK_ID)
