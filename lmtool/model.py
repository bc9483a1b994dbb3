"""The network: embedding -> dropout -> fused RNN/GRU/LSTM stack -> dropout -> output layer (full or adaptive
softmax).
No I/O, no globals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from lmtool.chunked_nll import PackedSlices, linear_nll, pack_slices, saves_traffic
from lmtool.column_blocks import in_column_blocks
from lmtool.config import ModelConfig
from lmtool.devices import bf16_is_native
from lmtool.dropout import dropout, fast_dropout_applies
from lmtool.errors import LmtoolError
from lmtool.packed_weights import pack, packing_works
from lmtool.step_products import Matrix, times
from lmtool.transposed_steps import TRANSPOSED_STEPS, transposed_layer

# An LSTM carries (h, c); the other cells carry h alone. Each tensor is (num_layers, B, H).
State = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

# Closed choice of cell -> (fused PyTorch module, extra constructor arguments).
CELLS: dict[str, tuple[type[nn.RNNBase], dict]] = {
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
    "gru": (nn.GRU, {}),
    "lstm": (nn.LSTM, {}),
}

# The recurrent stacks of each direction setting, in the order they are built.
DIRECTIONS = {"forward": ("forward",), "backward": ("backward",), "bidirectional": ("forward", "backward")}

# Devices whose autocast must not reach the recurrent stack: on CUDA, PyTorch's autocast runs cuDNN's recurrent
# layers in float16 whatever dtype was asked for, and float16 gradients underflow without loss scaling. There
# the stack stays fp32 and bf16 speeds up the rest (cuDNN's own bf16 LSTM was no faster on an H100).
FP32_RECURRENCE_UNDER_AUTOCAST = {"cuda"}

# The same cells one step at a time: PyTorch's fused single-step functions, with nn.RNNBase's weight layout.
CELL_STEPS = {
    "rnn_tanh": torch.rnn_tanh_cell,
    "rnn_relu": torch.rnn_relu_cell,
    "gru": torch.gru_cell,
    "lstm": torch.lstm_cell,
}


# The same cells over a whole sequence, one layer per call (nn.RNNBase's own functions): lmtool runs a stack's
# layers one by one in CPU training, to put its own dropout between them (lmtool.dropout).
LAYER_FUNCTIONS = {"rnn_tanh": torch.rnn_tanh, "rnn_relu": torch.rnn_relu, "gru": torch.gru, "lstm": torch.lstm}


# An LSTM generating on a CPU can step with its input and hidden weights transposed and stacked into one
# (inputs + hidden, 4 x hidden) matrix and its three sigmoid gates side by side (the gate-major layout,
# `lstm_step_gate_major`; (hidden, 4 x hidden) for a first layer whose input product is looked up), the other
# cells with their weights transposed too (lmtool.transposed_steps), and a full softmax can score with its output
# weights as an (H, V) matrix. Which layout runs faster depends on the CPU's
# BLAS and on how many streams are generated: below GATE_MAJOR_MIN_STREAMS or from it (see MKL_ON_AMD).
# `python bench/sampling.py` times both layouts at every stream count. In bf16 the gate-major layout with whole
# matrices was mostly slower, so bf16 on a CPU steps gate-major only with its matrices packed by oneDNN
# (lmtool.packed_weights), at every count; CUDA keeps torch.lstm_cell, whose pointwise part is one fused kernel.
GATE_MAJOR_MIN_STREAMS = 4


def _mkl_on_amd() -> bool:
    """Whether PyTorch's CPU products run on MKL on an AMD processor (Linux's /proc/cpuinfo names the vendor)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in cpuinfo)
    except OSError:
        return False


# Where MKL runs on an AMD processor, one to three streams generate with transposed weights (the LSTM
# gate-major, the other cells too: OTHER_CELLS_TRANSPOSED; the output layer (H, V)) and more streams in PyTorch's
# layout, except that a model whose first layer's input product is looked up (StepWeights.input_table: a
# character vocabulary) stays transposed, which for the LSTM measured 0.94-1.20x the cell's at 4-64 streams with
# the lookup (four runs); elsewhere the reverse. On a 2-core
# AMD EPYC, MKL multiplied one or two rows by PyTorch's (outputs, inputs) weights far below the memory's speed:
# the bare step products of a word model with 33k words took 3.4-4.1 ms per token that way and 0.9-1.2 ms
# transposed, the char model's 0.37-0.89 against 0.28-0.38 ms; from 4 to 64 streams the gate-major step without
# the lookup measured 0.69-1.09x the cell's (before lmtool.column_blocks). On an Intel Xeon the cell's layout was
# the faster one for one to three streams (the gate-major step 0.77-0.87x) and the gate-major one from four
# (1.06-1.80x); CPUs not measured are treated like it. `python bench/sampling.py` times both layouts (bench/RESULTS.md,
# Generation speed).
MKL_ON_AMD = _mkl_on_amd()

# Where MKL_ON_AMD, a full softmax over at least this many tokens scores with its output weights transposed at
# any stream count, not only below GATE_MAJOR_MIN_STREAMS (None: never). For 33,278 words that generated
# 1.28x (4 streams), 1.19x (16) and 1.07x (64) as many words per second on the AMD EPYC (`python bench/sampling.py`
# times both layouts); smaller vocabularies were not measured, so the line is the word defaults' cap of 30,000.
OUTPUT_MAJOR_MIN_VOCAB: int | None = 30000


# Where MKL_ON_AMD, from PACKED_FP32_MIN_STREAMS streams, a transposed matrix of at least this many elements
# steps packed by oneDNN in fp32 (lmtool.packed_weights): the char model's gate-major LSTM matrices and a large
# vocabulary's output layer; fewer streams and smaller matrices keep column blocks (None: never packed in fp32).
# On a 2-core AMD EPYC the char model generated 1.26-1.91x as fast with its LSTM matrices packed at 4-64 streams
# and the word model 1.51-1.91x with its 33,278-word output layer packed (three runs of `python bench/sampling.py`);
# packed at every count, one char stream ran 0.88x (another run), and one row's bare products took 1.15-1.26x
# (char) and 2.1-2.3x (word) as long packed as in column blocks.
PACKED_FP32_MIN_ELEMENTS: int | None = 2**19
# ... and from this many streams: two and three streams, which step transposed like one, take their products in
# about one stream's time when packed, but one stream multiplies faster in column blocks. The char model's 2 and 3
# streams generated 1.04-1.30x and 1.12-1.97x as fast packed as in column blocks in four runs of
# `python bench/sampling.py --streams 1,2,3,4,64` on a 2-core AMD EPYC (2026-11-28 02:38-03:18; the same layout on
# both sides at one stream read 0.86-1.29x: this machine's noise), the word model's 33k-word output layer 1.08x and
# 1.69x (03:18).
PACKED_FP32_MIN_STREAMS = 2

# Whether the GRU and the plain RNN step with their weights transposed (lmtool.transposed_steps) where MKL_ON_AMD
# and in bf16 with packed weights on any CPU, as the LSTM does (False: PyTorch's single-step cells there). On a
# 2-core AMD EPYC, in three runs, one stream of a char 2x512 GRU generated 1.34-2.41x as fast that way (1.31-1.35x
# in bf16), a plain tanh RNN 1.07-1.15x (1.42-1.52x), a 33k-word 2x200 GRU, mostly its output layer, 0.93-1.14x
# (0.97-1.13x), 64 streams of the char GRU 1.48-1.52x (1.14-1.41x), of the RNN 1.01-1.13x (1.08-1.26x), timed in
# turn with PyTorch's cells (`python bench/sampling.py`; bench/RESULTS.md, Generation speed). Other CPUs were not
# measured in fp32, where they keep PyTorch's cells; bf16's packed weights were measured on the AMD EPYC only, for
# every cell.
OTHER_CELLS_TRANSPOSED = True

# Whether evaluation and scoring pack a large full softmax's output layer once per call (scoring: a few times,
# see evaluate.packing_fits; `LanguageModel.packed_output_layer`): in bf16 where the CPU has native bf16 and the
# call scores more than one batch (PyTorch's bf16 linear layer re-arranges the weights on every batch), in fp32
# where MKL_ON_AMD and a batch has at least GATE_MAJOR_MIN_STREAMS rows. On a 2-core AMD EPYC the word defaults'
# evaluation ran 1.06-1.17x as fast packed in fp32 and 1.00-1.12x in bf16 at batch 64 (ten runs of `python
# bench/eval_throughput.py --level word`, which times both ways in turn), and at batch 1 1.56-2.06x and 1.48-1.72x
# in 35-token windows, 1.12-1.19x and 1.00-1.12x in the 512-token default (evaluate.evaluation_window), with the
# same perplexities to float rounding.
PACKED_SCORING = True


@dataclass(frozen=True)
class StepWeights:
    """What one generation step reads, detached (and cast, for bf16 generation): the embedding table and each
    layer's (w_ih, w_hh, b_ih, b_hh); or, with `gate_major`, each layer's weights transposed for its step in
    lmtool.transposed_steps (`transposed_layer`): an LSTM's input and hidden weights stacked, (inputs + H, 4H),
    with the gates reordered to input, forget, output, cell, and b_ih + b_hh; a GRU's two matrices, (inputs, 3H)
    and (H, 3H), and two biases; a plain RNN's stacked (inputs + H, H) and b_ih + b_hh. `output_major` is a full
    softmax's (weight.T, bias) where that layout scores faster (MKL_ON_AMD: few streams, or a large vocabulary;
    bf16 on a CPU: packed); else None, and the model's own output layer scores (in its dtype). `input_table`,
    gate-major only: the first layer's input product of every token ((V, gates x H): embedding @ w_ih.T and the
    biases the step adds to it), where it is no larger than the w_ih it replaces (a character vocabulary): a step
    looks its token's row up instead of embedding it and multiplying, and that layer's entry holds its hidden
    weights and bias. Where MKL_ON_AMD, the transposed matrices come in column blocks, one per thread, where they
    are large enough (lmtool.column_blocks), or packed by oneDNN from PACKED_FP32_MIN_STREAMS streams where larger
    still (PACKED_FP32_MIN_ELEMENTS; lmtool.packed_weights); elsewhere they are contiguous tensors. bf16
    generation on a CPU with native bf16 has the transposed matrices and a full softmax's output layer packed in
    bf16 (their biases plain bf16 tensors), where packing works."""

    embedding: torch.Tensor
    layers: list[tuple]
    gate_major: bool = False
    output_major: tuple[Matrix, torch.Tensor | None] | None = None
    input_table: torch.Tensor | None = None


def map_state(fn, state, *others):
    """`fn` applied to every tensor of a state: one tensor, an LSTM's (h, c), or a tuple of directions' states.
    With `others` (states of the same structure), fn gets the matching tensor of each as further arguments."""
    if isinstance(state, tuple):
        return tuple(map_state(fn, *parts) for parts in zip(state, *others))
    return fn(state, *others)


def detach_state(state):
    """Cut the graph at a window boundary while keeping the values (truncated BPTT)."""
    return map_state(torch.Tensor.detach, state)


# Where the adaptive softmax's tail clusters start when the config leaves it to us (Grave et al. used
# similar cut points for vocabularies of 30k-250k words): only the ones below the vocabulary size are used.
AUTO_CUTOFFS = (2000, 10000, 50000)


def adaptive_cutoffs(config: ModelConfig, vocab_size: int) -> list[int]:
    """The token ranks where each adaptive-softmax tail cluster starts, checked against the vocabulary."""
    if config.adaptive_cutoffs is None:
        cutoffs = [c for c in AUTO_CUTOFFS if c < vocab_size - 1] or [max(1, vocab_size // 2)]
    else:
        cutoffs = list(config.adaptive_cutoffs)
    if vocab_size < 3 or cutoffs[-1] >= vocab_size - 1:
        raise LmtoolError(
            f"model.adaptive_cutoffs {cutoffs} must all lie below the vocabulary size minus one ({vocab_size - 1}); "
            "lower them, or use model.softmax=full for a vocabulary this small"
        )
    return cutoffs


def check_fits(config: ModelConfig, vocab_size: int) -> None:
    """Fail, before anything is written, if the model's config cannot work with this vocabulary."""
    if config.softmax == "adaptive":
        adaptive_cutoffs(config, vocab_size)


class LanguageModel(nn.Module):
    """Predicts token t+1 from tokens 1..t. `forward` gives scores over the vocabulary whose softmax is the
    model's distribution or, given targets, -log P(target) at every position: the one definition of the loss."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, config.embedding_size)
        # One recurrent stack per direction; a bidirectional model shares the embedding and output layer
        # between its two stacks, as ELMo does. A backward stack reads streams that the caller reversed.
        self.directions: tuple[str, ...] = DIRECTIONS[config.direction]
        self.rnn = _stack(config)
        if len(self.directions) == 2:
            self.rnn_backward = _stack(config)
        if config.softmax == "adaptive":
            # Frequent tokens get a full-size head, rare ones low-rank tail clusters (the vocabulary is sorted by
            # frequency); probabilities stay exact and normalised.
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(
                config.hidden_size, vocab_size, adaptive_cutoffs(config, vocab_size),
                div_value=config.adaptive_div_value,
            )
        else:
            self.decoder = nn.Linear(config.hidden_size, vocab_size)
        if config.init_range is not None:
            for param in self.parameters():
                nn.init.uniform_(param, -config.init_range, config.init_range)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight

    def init_state(self, batch_size: int) -> State:
        """The zero state for `batch_size` streams, on the model's device."""
        weight = self.embedding.weight
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        h = weight.new_zeros(shape)
        return (h, weight.new_zeros(shape)) if self.config.cell == "lstm" else h

    @torch.no_grad()
    def step(
        self, token: torch.Tensor, state: State, weights: StepWeights | None = None, direction: str | None = None
    ) -> tuple[torch.Tensor, State]:
        """One token per stream, for generation: (B,) ids -> (B, V) scores. Equal to `forward` on a length-1
        input, but computed with PyTorch's single-step cell functions instead of the sequence kernel, whose
        set-up costs more than the step. Pass `weights=model.step_weights()` when stepping many times: without
        them each call reads the weights in PyTorch's layout (copying them into a faster one would cost more than
        one step)."""
        weights = weights if weights is not None else self.step_weights(direction, relayout=False)
        hidden, state = self.step_hidden(token, state, weights, direction)
        return self.step_scores(hidden, weights), state

    def step_scores(self, hidden: torch.Tensor, weights: StepWeights) -> torch.Tensor:
        """`scores` for a generation step's (B, H) outputs, in `weights`' output layout: outputs of bf16 layers are
        read in the output layer's own dtype (fp32 for a trained model), or in bf16 by a packed bf16 output layer,
        whose scores come back in fp32."""
        if weights.output_major is None:
            full = self.config.softmax == "full"  # the adaptive softmax reads fp32 itself
            return self.scores(hidden.to(self.decoder.weight.dtype) if full else hidden)
        weight_t, bias = weights.output_major
        return times(hidden.to(weight_t.dtype), weight_t, bias).float()  # bf16 products: fp32 for the softmax

    @torch.no_grad()
    def step_hidden(
        self, token: torch.Tensor, state: State, weights: StepWeights | None = None, direction: str | None = None
    ) -> tuple[torch.Tensor, State]:
        """`step` up to the top layer's output (B, H), before the output layer."""
        weights = weights if weights is not None else self.step_weights(direction, relayout=False)
        output, layers = self.step_layers(token, self.layer_states(state), weights)
        return output, self.stacked_state(layers)

    @torch.no_grad()
    def step_layers(self, token: torch.Tensor, layers: list, weights: StepWeights) -> tuple[torch.Tensor, list]:
        """`step_hidden` on the state kept as one entry per layer ((h, c) for an LSTM, else h; see
        `layer_states`): a generation loop then never splits and restacks it. At batch 1 the per-operation
        overhead is what costs, so this is plain functional calls."""
        lstm = self.config.cell == "lstm"
        cell_step, from_input = (TRANSPOSED_STEPS[self.config.cell] if weights.gate_major
                                 else (CELL_STEPS[self.config.cell], None))
        new_layers = []
        if weights.input_table is not None:  # the first layer's input product, looked up (a copy: overwritten)
            new_layers.append(from_input(weights.input_table.index_select(0, token), layers[0], *weights.layers[0]))
            x = new_layers[0][0] if lstm else new_layers[0]
        else:
            x = F.embedding(token, weights.embedding)  # (B, E)
        for w, layer in zip(weights.layers[len(new_layers):], layers[len(new_layers):]):
            new_layers.append(cell_step(x, layer, *w))  # (h, c) for an LSTM, else h; (B, H) each
            x = new_layers[-1][0] if lstm else new_layers[-1]
        return x, new_layers  # dropout is off in generation

    def layer_states(self, state: State) -> list:
        """A stack's state, (layers, B, H) or an LSTM's pair of them, as one entry per layer."""
        if self.config.cell == "lstm":
            return list(zip(state[0].unbind(0), state[1].unbind(0)))
        return list(state.unbind(0))

    def stacked_state(self, layers: list) -> State:
        """The inverse of `layer_states`."""
        if self.config.cell == "lstm":
            return torch.stack([h for h, _ in layers]), torch.stack([c for _, c in layers])
        return torch.stack(layers)

    @torch.no_grad()
    def step_weights(self, direction: str | None = None, dtype: torch.dtype | None = None,
                     streams: int = 1, relayout: bool = True) -> StepWeights:
        """The embedding and each layer's (w_ih, w_hh, b_ih, b_hh), detached, for `step` in that direction;
        cast to `dtype` if given (bf16 generation). On a CPU an fp32 model's recurrent layers and full softmax step
        in faster layouts (copies, see StepWeights): in bf16, where the CPU has native bf16 and oneDNN packs bf16
        matrices, transposed (an LSTM gate-major) with every matrix packed (lmtool.packed_weights) and the output
        layer packed too; in fp32, an LSTM gate-major where that is the CPU's faster layout for that many streams
        (MKL_ON_AMD), the other cells transposed there too but only where MKL_ON_AMD, and where MKL_ON_AMD
        a full softmax's output weights come transposed for fewer than GATE_MAJOR_MIN_STREAMS, or for any count
        from OUTPUT_MAJOR_MIN_VOCAB tokens; there the transposed matrices come packed from PACKED_FP32_MIN_STREAMS
        streams and PACKED_FP32_MIN_ELEMENTS elements, else in column blocks where large enough
        (lmtool.column_blocks). relayout=False keeps PyTorch's layout (no copies)."""
        rnn = self.stack(direction)

        def ready(t: torch.Tensor) -> torch.Tensor:
            return t.detach() if dtype is None else t.detach().to(dtype)

        plain = [tuple(w.detach() for w in _layer_weights(rnn, layer)) for layer in range(self.config.num_layers)]
        layers = [tuple(ready(w) for w in weights) for weights in plain]
        # The faster layouts on this CPU for that many streams; other devices keep PyTorch's.
        on_cpu = relayout and self.device.type == "cpu"
        few = streams < GATE_MAJOR_MIN_STREAMS
        looks_up = self.vocab_size <= self.config.embedding_size  # gate-major would look the input product up
        large = OUTPUT_MAJOR_MIN_VOCAB is not None and self.vocab_size >= OUTPUT_MAJOR_MIN_VOCAB
        amd = on_cpu and MKL_ON_AMD
        fp32 = layers[0][0].dtype == torch.float32
        packed_bf16 = (on_cpu and dtype == torch.bfloat16 and self.embedding.weight.dtype == torch.float32
                       and bf16_is_native(self.device) and packing_works(torch.bfloat16))
        packed_fp32 = amd and fp32 and PACKED_FP32_MIN_ELEMENTS is not None and packing_works(torch.float32)

        def relaid(matrix: torch.Tensor) -> Matrix:
            """A transposed fp32 matrix in the form it multiplies fastest in: packed, in blocks, or whole."""
            if packed_bf16:
                return pack(matrix.to(torch.bfloat16), streams)
            if packed_fp32 and streams >= PACKED_FP32_MIN_STREAMS and matrix.numel() >= PACKED_FP32_MIN_ELEMENTS:
                return pack(matrix, streams)
            return in_column_blocks(matrix) if amd else matrix.contiguous()

        transposed = packed_bf16 or (fp32 and ((few or looks_up) if amd else (on_cpu and not few)))
        gate_major = transposed and (self.config.cell == "lstm" or (OTHER_CELLS_TRANSPOSED and (amd or packed_bf16)))
        input_table = None
        embedding_rows = ready(self.embedding.weight)
        if gate_major:
            # bf16 packs from the fp32 weights: the bias sums and the input table are rounded once, at the end
            source = plain if packed_bf16 else layers
            embedding = self.embedding.weight.detach() if packed_bf16 else embedding_rows
            relaid_layers = []
            for layer, weights in enumerate(source):
                table, matrices, biases = transposed_layer(self.config.cell, *weights,
                                                           embedding if layer == 0 and looks_up else None)
                if table is not None:  # the input product is looked up; the step multiplies h alone
                    input_table = ready(table)
                # where MKL_ON_AMD, MKL multiplies a few rows by a whole matrix on one thread: blocks (or oneDNN's
                # packed products) use every thread
                relaid_layers.append((*map(relaid, matrices), *map(ready, biases)))
            layers = relaid_layers
        output_major = None
        if self.config.softmax == "full" and (packed_bf16 or (amd and (few or large)
                                                              and self.decoder.weight.dtype == torch.float32)):
            bias = self.decoder.bias  # in bf16 only beside bf16 packed weights
            if bias is not None:
                bias = bias.detach().to(torch.bfloat16) if packed_bf16 else bias.detach()
            # tied weights in bf16: pack the embedding's bf16 copy, the same rounding, instead of converting again
            tied = packed_bf16 and self.decoder.weight is self.embedding.weight
            output_major = (relaid((embedding_rows if tied else self.decoder.weight.detach()).t()), bias)
        return StepWeights(embedding=embedding_rows, layers=layers, gate_major=gate_major,
                           output_major=output_major, input_table=input_table)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def direction_of(self, direction: str | None = None) -> str:
        """The direction asked for (default: the model's first, or only, one); a clear error for one it lacks."""
        direction = direction or self.directions[0]
        if direction not in self.directions:
            raise LmtoolError(
                f"this model reads {' and '.join(self.directions)} only: it has no {direction} direction "
                f"(train one with --set model.direction={direction} or bidirectional)"
            )
        return direction

    def stack(self, direction: str | None = None) -> nn.RNNBase:
        """The recurrent stack that reads in `direction` (default: the model's first, or only, direction)."""
        return self.rnn if self.direction_of(direction) == self.directions[0] else self.rnn_backward

    def forward(
        self,
        tokens: torch.Tensor,
        state: State | None = None,
        targets: torch.Tensor | None = None,
        direction: str | None = None,
        packed_output: PackedSlices | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Scores (B, T, V) for the next token at every position or, with `targets` (B, T), their negative
        log-likelihoods (B, T) in float32; and the state after the last position. `direction` picks the stack
        (a backward one gets tokens already reversed). direction="both" runs every stack of the model in one
        call (so DistributedDataParallel sees one forward): tokens and targets (D, B, T), state a D-tuple.
        `packed_output`: this model's `packed_output_layer`, for the NLL without gradients."""
        if direction == "both":
            states = state if state is not None else (None,) * len(self.directions)
            outputs = [self.forward(tokens[d], states[d], None if targets is None else targets[d], name,
                                    packed_output) for d, name in enumerate(self.directions)]
            return torch.stack([out for out, _ in outputs]), tuple(s for _, s in outputs)
        output, state = self.read(tokens, state, direction)  # (B, T, H)
        if targets is None:
            return self.scores(output), state
        return self.nll(output, targets, packed_output), state

    def read(
        self, tokens: torch.Tensor, state: State | None = None, direction: str | None = None
    ) -> tuple[torch.Tensor, State]:
        """The top layer's outputs (B, T, H) at every position, before the output layer, and the final state."""
        if tokens.dtype not in (torch.int32, torch.int64):
            tokens = tokens.int()  # the data pipeline stores ids in 1 or 2 bytes; the embedding wants int32/64
        emb = dropout(self.embedding(tokens), self.config.dropout, self.training)  # (B, T, E)
        if state is None:
            state = self.init_state(tokens.size(0))
        stack = self.stack(direction)
        if emb.device.type in FP32_RECURRENCE_UNDER_AUTOCAST and torch.is_autocast_enabled(emb.device.type):
            with _autocast_off(emb):  # the embedding is fp32 under autocast; a carried state may not be
                output, state = stack(emb, map_state(lambda t: t.float(), state))  # (B, T, H)
        elif self.training and stack.dropout > 0 and fast_dropout_applies(stack.dropout, emb.device):
            output, state = self._layer_by_layer(stack, emb, state)  # (B, T, H)
        else:
            output, state = stack(emb, state)  # (B, T, H)
        return dropout(output, self.config.dropout, self.training), state

    def _layer_by_layer(self, stack: nn.RNNBase, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """`stack(x, state)` in training, one layer per call with lmtool's dropout between layers instead of the
        stack's own: the same kernels and results, with cheaper masks on a CPU."""
        function = LAYER_FUNCTIONS[self.config.cell]
        finals = []
        for layer in range(stack.num_layers):
            if layer:
                x = dropout(x, stack.dropout, True)
            start = map_state(lambda t: t[layer : layer + 1], state)
            # (input, state, weights, has_biases, layers, dropout, train, bidirectional, batch_first)
            x, *final = function(x, start, _layer_weights(stack, layer), True, 1, 0.0, True, False, True)
            finals.append(tuple(final) if len(final) > 1 else final[0])  # an LSTM's (h, c), else h
        return x, map_state(lambda *layers: torch.cat(layers), *finals)

    def scores(self, output: torch.Tensor) -> torch.Tensor:
        """(..., H) top-layer outputs -> (..., V) scores whose softmax is the next-token distribution."""
        if self.config.softmax == "adaptive":
            flat = output.float().reshape(-1, output.size(-1))  # log_prob wants (N, H)
            with _autocast_off(output):
                return self.adaptive.log_prob(flat).view(*output.shape[:-1], self.vocab_size)
        return F.linear(output, self.decoder.weight, self.decoder.bias)

    def nll(self, output: torch.Tensor, targets: torch.Tensor, packed_output: PackedSlices | None = None
            ) -> torch.Tensor:
        """-log P(target) at every position: (B, T, H), (B, T) -> (B, T), in float32 whatever the precision.
        `packed_output`: this model's `packed_output_layer` (used only without gradients)."""
        flat_targets = targets.reshape(-1).long()
        if self.config.softmax == "adaptive":
            # PyTorch's adaptive softmax mixes dtypes under CPU autocast; its layers are small, so run it in float32.
            with _autocast_off(output):
                logprob = self.adaptive(output.float().reshape(-1, output.size(-1)), flat_targets).output
            return -logprob.view(targets.shape)
        if output.device.type == "cpu" and saves_traffic(flat_targets.numel(), self.vocab_size):
            # A CPU spends as long moving large (B*T, V) scores through memory as computing them: score the
            # vocabulary a cache-sized slice at a time instead. GPUs keep PyTorch's path (measured on CPUs only).
            nll = linear_nll(output.reshape(-1, output.size(-1)), self.decoder.weight, self.decoder.bias,
                             flat_targets, compute_dtype=self._output_dtype(), packed=packed_output)
            return nll.view(targets.shape)
        logits = self.decoder(output)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), flat_targets, reduction="none").view(targets.shape)

    def _output_dtype(self) -> torch.dtype:
        """The dtype of a full softmax's products on the CPU: the autocast's around the call, else the weights'."""
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else self.decoder.weight.dtype

    @torch.no_grad()
    def packed_output_layer(self, rows: int, batches: int) -> PackedSlices | None:
        """The full-softmax output layer cut into slices and packed once by oneDNN, for scoring `batches` batches
        of about `rows` positions without gradients in the precision of the autocast around this call (`nll`
        then skips re-arranging the weights on every batch); None where that was not measured faster or does not
        apply: an adaptive softmax, a device other than the CPU, a vocabulary that keeps PyTorch's path, bf16
        without native support or for a single batch (its one product re-arranges the weights once anyway, so
        packing first would only add a copy), fp32 where not MKL_ON_AMD or for fewer than GATE_MAJOR_MIN_STREAMS
        rows, or PACKED_SCORING off. The weights must not change while it is used."""
        if not PACKED_SCORING or self.config.softmax != "full" or self.device.type != "cpu":
            return None
        if not saves_traffic(rows, self.vocab_size):
            return None
        dtype = self._output_dtype()
        if dtype == torch.bfloat16:
            usable = batches > 1 and bf16_is_native(self.device) and packing_works(dtype)
        else:
            usable = (dtype == torch.float32 and MKL_ON_AMD and rows >= GATE_MAJOR_MIN_STREAMS
                      and packing_works(dtype))
        return pack_slices(self.decoder.weight, self.decoder.bias, dtype, rows) if usable else None


def _autocast_off(tensor: torch.Tensor) -> torch.autocast:
    return torch.autocast(tensor.device.type, enabled=False)


def _layer_weights(stack: nn.RNNBase, layer: int) -> list[torch.Tensor]:
    """One layer's (w_ih, w_hh, b_ih, b_hh) of a stack, in the order PyTorch's RNN functions take them."""
    return [getattr(stack, f"{kind}_l{layer}") for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


def _stack(config: ModelConfig) -> nn.RNNBase:
    rnn_class, rnn_kwargs = CELLS[config.cell]
    # nn.RNNBase warns when given dropout with a single layer: inter-layer dropout exists only between layers.
    return rnn_class(
        config.embedding_size,
        config.hidden_size,
        num_layers=config.num_layers,
        dropout=config.dropout if config.num_layers > 1 else 0.0,
        batch_first=True,
        **rnn_kwargs,
    )


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
