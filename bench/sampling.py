"""Generation speed: lmtool's per-token step against the bare matrix-vector products and a naive nn.LSTM loop.

Usage: python bench/sampling.py [--tokens 400] [--device cuda --streams 1,8,64,256]
Builds untrained models of the reference sizes (char 2x512 LSTM, 66 symbols; word 2x200 LSTM with the
WikiText-2 vocabulary of 33,278, with full and adaptive softmax) and times, in one process: the bare products of
one step (each layer's input and hidden weights, then the output layer), with the weights as PyTorch stores
them, transposed, transposed in column blocks, one per thread (lmtool.column_blocks), and packed by oneDNN
(lmtool.packed_weights; the fastest of these, round by round, is the bare cost), the same products packed in
bf16 (the bare cost of --precision bf16), a naive loop that calls nn.LSTM on length-1 inputs, and
`lmtool.sample.generate` in fp32 and in bf16 (sampling included; whole calls of --tokens, and the steady
per-token time: what a call of --tokens takes beyond one of a quarter as many, per extra token), and generate
again with the weights in PyTorch's layout (`lmtool_pytorch_layout_ms_per_token`: the cell's LSTM step and
F.linear) and with its LSTM stepped by LanguageModel.step_layers instead of lmtool.lstm_stepper's fixed buffers
(`lmtool_step_layers_ms_per_token`, fp32 and bf16; `stepper_speedup_median_of_rounds`), all in turn round after
round, so the
lmtool / bare ratio is a median of per-round ratios on a drifting machine; for the word models also the PyTorch
example's generator (bench/peer_example.py) of the same size; for the plain output layers also the megabytes of
weights the bare products read per token and at what rate. Then batched generation for 1..64 streams, fp32 and
--precision bf16, with the model FLOP/s against the matrix-multiply peak of that precision measured in the same
run. One JSON line each; in fp32 on a CPU both of the LSTM's step layouts (the cell's, and the gate-major one,
which lmtool uses from 4 streams, and where MKL_ON_AMD below 4 and, for the char model, at every count) at every
count, timed in alternating rounds, and where MKL_ON_AMD the gate-major one with nothing packed and with whole
matrices as well; where MKL_ON_AMD, also the full-softmax word model's generation from 2 streams with its output
layer transposed whole, in column blocks and packed, from 4 also in PyTorch's layout
(lmtool.model.OUTPUT_MAJOR_MIN_VOCAB, PACKED_FP32_MIN_STREAMS, PACKED_FP32_MIN_ELEMENTS), and in bf16; on the
CPU, that word model from lmtool.sample.DRAW_BLOCKS_MIN_STREAMS streams, in fp32 and bf16, with its next words
drawn in blocks (as lmtool does) and from the cumsum of the whole row (only the stream counts of --streams from
DRAW_BLOCKS_MIN_STREAMS); a generation call's fixed costs on the CPU (preparing the step's weights, taking in a
prompt of 1-16 tokens by reading it and by stepping it); and the GRU and plain RNN with their weights transposed against PyTorch's cells
(lmtool.model.OTHER_CELLS_TRANSPOSED). `--device cuda` runs only the batched generation, on the GPU (`--streams`
picks the stream counts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import alternating, counts, machine_info, matmul_peak_gflops, require_cuda  # noqa: E402
from peer_example import PeerModel, generate_words_per_s  # noqa: E402

import torch  # noqa: E402

import lmtool.column_blocks  # noqa: E402
import lmtool.step_products  # noqa: E402
from lmtool.step_products import Matrix  # noqa: E402
from lmtool.column_blocks import in_column_blocks  # noqa: E402
from lmtool.config import ModelConfig  # noqa: E402
import lmtool.model  # noqa: E402
from lmtool.model import GATE_MAJOR_MIN_STREAMS, MKL_ON_AMD, PACKED_FP32_MIN_STREAMS, LanguageModel  # noqa: E402
from lmtool.packed_weights import pack, packing_works  # noqa: E402
import lmtool.sample  # noqa: E402
from lmtool.sample import SamplingOptions, generate  # noqa: E402


def faster_by(slow: list[float], fast: list[float]) -> float:
    """The median over rounds of slow / fast times: how many times faster `fast` ran, round by round."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def interleaved_ms(fns: dict, tokens: int, rounds: int = 9) -> tuple[dict[str, float], dict[str, float]]:
    """Per-token milliseconds of each function, timed in turn round after round (the order alternating), so that
    all see the same moments of a drifting machine; and the medians over rounds of lmtool's time / bare's, for
    fp32 ("whole", "steady") and bf16 ("bf16-whole", "bf16-steady", against the bare products in bf16): "whole"
    for whole generation calls (their fixed set-up included), and "steady" for the time each further token adds,
    where `fns` has NAME-quarter beside NAME (a call of a quarter as many tokens): the two calls' difference over
    the difference of their tokens, the per-token latency once generation runs."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    quarter = tokens // 4
    for name, fn in alternating(fns, rounds):
        count = quarter if name.endswith("-quarter") else tokens
        start = time.perf_counter()
        fn(count)
        times[name].append((time.perf_counter() - start) / count * 1000)
    for name in [name[: -len("-quarter")] for name in times if name.endswith("-quarter")]:
        times[f"{name}-steady"] = [(full * tokens - part * quarter) / (tokens - quarter)
                                   for full, part in zip(times[name], times[f"{name}-quarter"])]
    # the bare products in whichever weight layout was faster in that round; the first round warms up
    bare_times = [min(layouts) for layouts in zip(*(times[name][1:] for name in times if name.startswith("bare-")))]
    ratios = {kind: faster_by(times[name][1:], bare_times)
              for kind, name in (("whole", "lmtool"), ("steady", "lmtool-steady")) if name in times}
    # how much faster lmtool's fixed-buffer LSTM step made whole calls than step_layers, round by round
    ratios.update({kind: faster_by(times[f"{name}-step-layers"][1:], times[name][1:])
                   for kind, name in (("stepper", "lmtool"), ("bf16-stepper", "lmtool-bf16"))
                   if f"{name}-step-layers" in times})
    if "bf16-bare" in times:
        ratios.update({kind: faster_by(times[name][1:], times["bf16-bare"][1:])
                       for kind, name in (("bf16-whole", "lmtool-bf16"), ("bf16-steady", "lmtool-bf16-steady"))
                       if name in times})
    return {name: statistics.median(t[1:]) for name, t in times.items()}, ratios


def per_token_ms(fn, tokens: int, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(tokens)
        times.append((time.perf_counter() - start) / tokens * 1000)
    return statistics.median(times[1:])


def bare_weights(model: LanguageModel, layout: str = "rows") -> tuple[list, Matrix]:
    """Each layer's (input, hidden) weights and the output layer's, each to be multiplied as `v @ w`: as PyTorch
    stores them ("rows": (outputs, inputs), a row times the transpose), copied into (inputs, outputs) matrices
    ("transposed"), those cut into column blocks, one per thread where large enough ("blocks", as lmtool
    steps where MKL_ON_AMD; lmtool.column_blocks), or packed by oneDNN ("packed", and "bf16-packed" in bf16, as
    lmtool steps with --precision bf16; lmtool.packed_weights). Made once, outside the timed calls."""
    weights = [getattr(model.rnn, f"weight_{kind}_l{i}").detach() for i in range(model.config.num_layers)
               for kind in ("ih", "hh")] + [model.decoder.weight.detach()]
    relayout = {"rows": torch.Tensor.t, "transposed": lambda w: w.t().contiguous(),
                "blocks": lambda w: in_column_blocks(w.t()), "packed": lambda w: pack(w.t()),
                "bf16-packed": lambda w: pack(w.t().bfloat16())}[layout]
    weights = [relayout(w) for w in weights]
    return list(zip(weights[:-1:2], weights[1:-1:2])), weights[-1]


@torch.inference_mode()
def bare(model: LanguageModel, tokens: int, weights: tuple[list, Matrix]) -> None:
    """The products of one step, `tokens` times: each layer's input and hidden weights, then the output layer,
    in the layout of `weights` (bare_weights). Which layout is faster depends on the CPU's BLAS."""
    layers, decoder = weights
    product = lmtool.step_products.times
    hidden = model.config.hidden_size
    dtype = decoder.dtype
    x = torch.randn(1, model.config.embedding_size, dtype=dtype)
    h = torch.randn(1, hidden, dtype=dtype)
    for _ in range(tokens):
        v = x
        for w_ih, w_hh in layers:
            v = (product(v, w_ih) + product(h, w_hh))[:, :hidden]
        product(v, decoder)


def bare_weight_bytes(model: LanguageModel) -> int:
    """Bytes of fp32 weights the bare products read per token: every layer's matrices and the output layer's."""
    return 4 * (sum(w.numel() for w in model.rnn.parameters() if w.dim() == 2) + model.decoder.weight.numel())


# Column blocks never used: every matrix has fewer elements than this per block.
NO_BLOCKS = 2**62
# Never drawing in blocks: fewer streams than this.
NO_DRAW_BLOCKS = 2**62


@contextmanager
def layout_rule(**settings) -> Iterator[None]:
    """lmtool's layout settings (lmtool.model's GATE_MAJOR_MIN_STREAMS, MKL_ON_AMD, OUTPUT_MAJOR_MIN_VOCAB,
    PACKED_FP32_MIN_ELEMENTS, OTHER_CELLS_TRANSPOSED, lmtool.column_blocks' MIN_BLOCK_ELEMENTS and lmtool.sample's
    BUFFERED_LSTM_STEPS and DRAW_BLOCKS_MIN_STREAMS)
    forced to these values for the block, then restored: how the bench times a layout lmtool would not pick
    here."""
    homes = {"MIN_BLOCK_ELEMENTS": lmtool.column_blocks, "BUFFERED_LSTM_STEPS": lmtool.sample,
             "DRAW_BLOCKS_MIN_STREAMS": lmtool.sample}
    modules = {name: homes.get(name, lmtool.model) for name in settings}
    saved = {name: getattr(modules[name], name) for name in settings}
    for name, value in settings.items():
        setattr(modules[name], name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(modules[name], name, value)


def stepper_ratio(model: LanguageModel, dtype: torch.dtype | None, ratio: float) -> float | None:
    """The stepper's speed-up, rounded, where lmtool steps one stream of this model on lmtool.lstm_stepper's
    buffers (a gate-major LSTM); None where it does not, and the ratio timed only noise."""
    uses = model.config.cell == "lstm" and model.step_weights(dtype=dtype, streams=1).gate_major
    return round(ratio, 3) if uses else None


def step_layers(generate_tokens, tokens: int) -> None:
    """lmtool's generation with a gate-major LSTM stepped by LanguageModel.step_layers, which makes new tensors at
    every step, instead of lmtool.lstm_stepper's fixed buffers (the same tokens)."""
    with layout_rule(BUFFERED_LSTM_STEPS=False):
        generate_tokens(tokens)


def pytorch_layout(generate_tokens, tokens: int) -> None:
    """lmtool's generation of one to three streams with the weights as PyTorch stores them, on any CPU (as it
    runs where MKL is not on an AMD processor)."""
    with layout_rule(MKL_ON_AMD=False):
        generate_tokens(tokens)


@torch.inference_mode()
def naive(model: LanguageModel, tokens: int) -> None:
    token, state = torch.zeros(1, 1, dtype=torch.long), None
    for _ in range(tokens):
        logits, state = model(token, state)
        token = torch.multinomial(torch.softmax(logits[:, -1], -1), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--device", default="cpu", help="cuda: only the batched generation, on the GPU")
    parser.add_argument("--streams", type=counts, default=[1, 8, 64],
                        help="stream counts of the batched generation (1 is always run)")
    args = parser.parse_args()
    require_cuda(args.device)
    info = machine_info()
    torch.manual_seed(0)
    models = {
        "char 2x512 LSTM, V=66": LanguageModel(ModelConfig(embedding_size=128, hidden_size=512), 66).eval(),
        "word 2x200 LSTM, V=33278": LanguageModel(
            ModelConfig(embedding_size=200, hidden_size=200, tie_weights=True), 33278).eval(),
        "word 2x200 LSTM, V=33278, adaptive softmax": LanguageModel(
            ModelConfig(embedding_size=200, hidden_size=200, softmax="adaptive"), 33278).eval(),
    }
    if args.device == "cpu":
        single_stream(models, args.tokens, info)
        set_up(models, info)
        other_cells(args.tokens, info)
    if args.device == "cpu" and MKL_ON_AMD:
        word_output_layouts(models["word 2x200 LSTM, V=33278"], args.tokens, args.streams,
                            info)
    if args.device == "cpu":
        word_draws(models["word 2x200 LSTM, V=33278"], args.tokens, args.streams, info)
    batched(models["char 2x512 LSTM, V=66"].to(args.device), args.tokens, args.streams,
            args.device, info)


def single_stream(models: dict, tokens: int, info: dict) -> None:
    """One stream of each model on the CPU: lmtool against the bare products, the naive loop and the example,
    in fp32 and with --precision bf16 (against the bare products packed in bf16)."""
    peer_words_per_s = generate_words_per_s(PeerModel(33278), tokens)  # the example's generator, now
    packs = packing_works(torch.float32) and packing_works(torch.bfloat16)
    for name, model in models.items():
        def ours(n: int, precision: str = "fp32") -> None:
            generate(model, [], SamplingOptions(length=n, seed=1, precision=precision))

        def bf16(n: int) -> None:
            ours(n, "bf16")

        if model.config.softmax == "full":  # the bare products are defined for the plain output layer
            layouts = ("rows", "transposed", "blocks", "packed", "bf16-packed") if packs else (
                "rows", "transposed", "blocks")
            weights = {layout: bare_weights(model, layout) for layout in layouts}
            fns = {"lmtool": ours, "lmtool-quarter": ours, "lmtool-bf16": bf16, "lmtool-bf16-quarter": bf16,
                   "lmtool-pytorch-layout": lambda n: pytorch_layout(ours, n), "naive": lambda n: naive(model, n),
                   "lmtool-step-layers": lambda n: step_layers(ours, n),
                   "lmtool-bf16-step-layers": lambda n: step_layers(bf16, n)}
            for layout, layout_weights in weights.items():  # bf16-packed -> "bf16-bare", the others "bare-*"
                fns["bf16-bare" if layout.startswith("bf16") else f"bare-{layout}"] = (
                    lambda n, w=layout_weights: bare(model, n, w))
            ms, ratios = interleaved_ms(fns, tokens)
            lmtool_ms = ms["lmtool"]
            ms["bare"] = min(ms[f"bare-{layout}"] for layout in layouts if not layout.startswith("bf16"))
        else:
            lmtool_ms = per_token_ms(ours, tokens)
            ms = {"lmtool-bf16": per_token_ms(bf16, tokens)}
        record = {**info, "model": name, "streams": 1, "lmtool_ms_per_token": round(lmtool_ms, 4),
                  "lmtool_tokens_per_s": round(1000 / lmtool_ms),
                  "lmtool_bf16_ms_per_token": round(ms["lmtool-bf16"], 4),
                  "lmtool_bf16_tokens_per_s": round(1000 / ms["lmtool-bf16"])}
        if model.config.softmax == "full":
            weight_mb = bare_weight_bytes(model) / 1e6
            record.update(bare_matvec_ms_per_token=round(ms["bare"], 4), naive_nn_lstm_ms_per_token=round(ms["naive"], 4),
                          lmtool_over_bare_median_of_rounds=round(ratios["whole"], 2),
                          speedup_over_naive=round(ms["naive"] / lmtool_ms, 2),
                          lmtool_steady_ms_per_token=round(ms["lmtool-steady"], 4),
                          lmtool_steady_over_bare_median_of_rounds=round(ratios["steady"], 2),
                          steady_speedup_over_naive=round(ms["naive"] / ms["lmtool-steady"], 2),
                          naive_over_bare=round(ms["naive"] / ms["bare"], 2),
                          bare_weight_mb_per_token=round(weight_mb, 1),
                          bare_gb_per_s=round(weight_mb / ms["bare"], 1),
                          lmtool_pytorch_layout_ms_per_token=round(ms["lmtool-pytorch-layout"], 4),
                          lmtool_step_layers_ms_per_token=round(ms["lmtool-step-layers"], 4),
                          stepper_speedup_median_of_rounds=stepper_ratio(model, None, ratios["stepper"]),
                          lmtool_bf16_step_layers_ms_per_token=round(ms["lmtool-bf16-step-layers"], 4),
                          bf16_stepper_speedup_median_of_rounds=stepper_ratio(model, torch.bfloat16,
                                                                              ratios["bf16-stepper"]),
                          mkl_on_amd=MKL_ON_AMD,
                          **{f"bare_{layout}_ms_per_token": round(ms[f"bare-{layout}"], 4)
                             for layout in layouts if not layout.startswith("bf16")},
                          lmtool_bf16_steady_ms_per_token=round(ms["lmtool-bf16-steady"], 4),
                          bf16_speedup_over_naive=round(ms["naive"] / ms["lmtool-bf16"], 2))
            if "bf16-bare" in ms:
                record.update(bare_bf16_packed_ms_per_token=round(ms["bf16-bare"], 4),
                              bare_bf16_over_fp32=round(ms["bf16-bare"] / ms["bare"], 2),
                              lmtool_bf16_over_bf16_bare_median_of_rounds=round(ratios["bf16-whole"], 2),
                              lmtool_bf16_steady_over_bf16_bare_median_of_rounds=round(ratios["bf16-steady"], 2))
        if name.startswith("word"):
            record.update(example_generator_words_per_s=round(peer_words_per_s),
                          over_example_generator=round(1000 / lmtool_ms / peer_words_per_s, 2),
                          over_reference_185=round(1000 / lmtool_ms / 185, 2),
                          bf16_over_example_generator=round(1000 / ms["lmtool-bf16"] / peer_words_per_s, 2),
                          bf16_over_reference_185=round(1000 / ms["lmtool-bf16"] / 185, 2))
            if model.config.softmax == "full":
                record["steady_over_reference_185"] = round(1000 / ms["lmtool-steady"] / 185, 2)
                record["bf16_steady_over_reference_185"] = round(1000 / ms["lmtool-bf16-steady"] / 185, 2)
        print(json.dumps(record), flush=True)


@torch.inference_mode()
def set_up(models: dict, info: dict, prompt_lengths: tuple[int, ...] = (1, 4, 8, 16)) -> None:
    """A generation call's fixed costs for one stream, per model with a plain output layer: preparing the step's
    weights (`step_weights`, copies in the CPU's layout, in fp32 and for --precision bf16) and taking in a prompt
    of 1 to 16 tokens either way: read by the sequence kernel (`LanguageModel.read`) or stepped like generated
    tokens (`step_layers`; lmtool.sample.STEPPED_PROMPT_TOKENS picks). Medians of 9 calls after one uncounted."""
    def median_ms(fn) -> float:
        return per_token_ms(lambda _: fn(), 1, repeats=10)

    for name, model in models.items():
        if model.config.softmax != "full":
            continue
        weights = model.step_weights(streams=1)
        record = {**info, "model": name, "streams": 1, "step_weights_ms": round(median_ms(lambda: model.step_weights()), 3),
                  "step_weights_bf16_ms": round(median_ms(lambda: model.step_weights(dtype=torch.bfloat16)), 3),
                  "stepped_prompt_tokens": lmtool.sample.STEPPED_PROMPT_TOKENS}
        for length in prompt_lengths:
            prompt = torch.randint(0, model.vocab_size, (1, length))

            def stepped() -> None:
                layers = model.layer_states(model.init_state(1))
                for t in range(length):
                    _, layers = model.step_layers(prompt[:, t], layers, weights)

            record[f"prompt_{length}_read_ms"] = round(median_ms(lambda: model.read(prompt)), 3)
            record[f"prompt_{length}_stepped_ms"] = round(median_ms(stepped), 3)
        print(json.dumps(record), flush=True)


def other_cells(tokens: int, info: dict) -> None:
    """The GRU and the plain RNN on the CPU, fp32 and --precision bf16: lmtool generating with their weights
    transposed (lmtool.transposed_steps, where lmtool.model.OTHER_CELLS_TRANSPOSED applies) against PyTorch's
    single-step cells, everything else alike, timed in alternating rounds; one stream of the char 2x512 and the
    33k-word 2x200 sizes, and 64 streams of the char size. One JSON line per case."""
    torch.manual_seed(0)
    models = {f"char 2x512 {cell}, V=66": LanguageModel(ModelConfig(cell=cell, embedding_size=128, hidden_size=512),
                                                        66).eval() for cell in ("gru", "rnn_tanh")}
    models["word 2x200 gru, V=33278"] = LanguageModel(
        ModelConfig(cell="gru", embedding_size=200, hidden_size=200, tie_weights=True), 33278).eval()
    for name, model in models.items():
        for streams in (1, 64) if name.startswith("char") else (1,):
            for precision in ("fp32", "bf16"):
                options = SamplingOptions(length=tokens // 2 if streams == 1 else tokens // 8, num_samples=streams,
                                          seed=1, precision=precision)
                dtype = torch.bfloat16 if precision == "bf16" else None
                transposed = model.step_weights(dtype=dtype, streams=streams).gate_major
                times: dict[str, list[float]] = {"transposed": [], "cells": []}
                for way, _ in alternating({way: None for way in times}, 7):
                    with layout_rule(OTHER_CELLS_TRANSPOSED=way == "transposed"):
                        times[way].append(per_token_ms(lambda n: generate(model, [], options), options.length,
                                                       repeats=2))
                print(json.dumps({
                    **info, "model": name, "streams": streams, "precision": precision,
                    "lmtool_steps_transposed": transposed,
                    **{f"{way}_tokens_per_s": round(streams * 1000 / statistics.median(t)) for way, t in times.items()},
                    "transposed_over_cells_median_of_rounds": round(faster_by(times["cells"], times["transposed"]), 3),
                }), flush=True)


def word_output_layouts(model: LanguageModel, tokens: int, stream_counts: list[int], info: dict) -> None:
    """Where MKL_ON_AMD: the full-softmax word model generating for PACKED_FP32_MIN_STREAMS streams and more in
    fp32, its output layer transposed: packed by oneDNN as lmtool runs it (lmtool.model.PACKED_FP32_MIN_ELEMENTS),
    in column blocks and whole; from GATE_MAJOR_MIN_STREAMS also in PyTorch's layout
    (lmtool.model.OUTPUT_MAJOR_MIN_VOCAB; fewer streams always score transposed there); and with --precision
    bf16; timed in alternating rounds. One JSON line per stream count."""
    blocks = lmtool.column_blocks.MIN_BLOCK_ELEMENTS
    for streams in sorted(n for n in stream_counts if n >= PACKED_FP32_MIN_STREAMS):
        options = SamplingOptions(length=tokens // 4, num_samples=streams, seed=1)
        bf16 = dataclasses.replace(options, precision="bf16")
        packed = lmtool.model.PACKED_FP32_MIN_ELEMENTS
        # (OUTPUT_MAJOR_MIN_VOCAB, MIN_BLOCK_ELEMENTS, PACKED_FP32_MIN_ELEMENTS, options) forced
        layouts = {"transposed": (0, blocks, packed, options), "transposed-blocks": (0, blocks, None, options),
                   "transposed-whole": (0, NO_BLOCKS, None, options), "bf16": (0, blocks, packed, bf16)}
        if streams >= GATE_MAJOR_MIN_STREAMS:  # fewer streams score transposed whatever OUTPUT_MAJOR_MIN_VOCAB says
            layouts["pytorch"] = (None, blocks, packed, options)
        times: dict[str, list[float]] = {name: [] for name in layouts}
        for name, (min_vocab, min_block, min_packed, how) in alternating(layouts, 5):
            with layout_rule(OUTPUT_MAJOR_MIN_VOCAB=min_vocab, MIN_BLOCK_ELEMENTS=min_block,
                             PACKED_FP32_MIN_ELEMENTS=min_packed):
                times[name].append(per_token_ms(lambda n: generate(model, [], how), tokens // 4, repeats=2))
        output = model.step_weights(streams=streams).output_major  # what lmtool runs
        form = "pytorch" if output is None else type(output[0]).__name__
        print(json.dumps({
            **info, "model": "word 2x200 LSTM, V=33278", "device": "cpu", "streams": streams, "precision": "fp32",
            "output_layout": form,
            **{f"{name}_output_words_per_s": round(streams * 1000 / statistics.median(t)) for name, t in times.items()},
            **({"transposed_over_pytorch_median_of_rounds": round(faster_by(times["pytorch"], times["transposed"]), 2)}
               if "pytorch" in times else {}),
            "packed_over_blocks_median_of_rounds": round(faster_by(times["transposed-blocks"], times["transposed"]), 2),
            "blocks_over_whole_median_of_rounds": round(
                faster_by(times["transposed-whole"], times["transposed-blocks"]), 2),
            "bf16_over_fp32_median_of_rounds": round(faster_by(times["transposed"], times["bf16"]), 2),
        }), flush=True)


def word_draws(model: LanguageModel, tokens: int, stream_counts: list[int], info: dict) -> None:
    """The full-softmax word model generating for DRAW_BLOCKS_MIN_STREAMS streams and more on the CPU, in fp32 and
    with --precision bf16, each next word drawn as lmtool does (in blocks: lmtool.sample._draw_in_blocks) and
    from the cumsum of the whole row, timed in alternating rounds. One JSON line per stream count and precision."""
    for streams in sorted(n for n in stream_counts if n >= lmtool.sample.DRAW_BLOCKS_MIN_STREAMS):
        for precision in ("fp32", "bf16"):
            options = SamplingOptions(length=tokens // 4, num_samples=streams, seed=1, precision=precision)
            draws = {"blocks": lmtool.sample.DRAW_BLOCKS_MIN_STREAMS, "cumsum": NO_DRAW_BLOCKS}
            times: dict[str, list[float]] = {name: [] for name in draws}
            for name, min_streams in alternating(draws, 5):
                with layout_rule(DRAW_BLOCKS_MIN_STREAMS=min_streams):
                    times[name].append(per_token_ms(lambda n: generate(model, [], options), tokens // 4, repeats=2))
            print(json.dumps({
                **info, "model": "word 2x200 LSTM, V=33278", "device": "cpu", "streams": streams,
                "precision": precision, "draw_block": lmtool.sample.DRAW_BLOCK,
                **{f"{name}_draw_words_per_s": round(streams * 1000 / statistics.median(t))
                   for name, t in times.items()},
                "blocks_over_cumsum_median_of_rounds": round(faster_by(times["cumsum"], times["blocks"]), 3),
            }), flush=True)


def batched(model: LanguageModel, tokens: int, stream_counts: list[int], device: str, info: dict) -> None:
    """The char model generating for many streams at once, fp32 and --precision bf16, against one fp32 stream,
    and the scaling the matmul peak would allow at most (`scaling_at_the_peak`: at the peak, the model's tokens/s
    over one fp32 stream's).
    In fp32 on a CPU, where lmtool picks the LSTM's step layout by the number of streams
    (lmtool.model.GATE_MAJOR_MIN_STREAMS and MKL_ON_AMD), both layouts are timed at every count, in alternating
    rounds; the gate-major layout also stepped by LanguageModel.step_layers instead of lmtool.lstm_stepper's
    buffers (`stepper_speedup_median_of_rounds`)."""
    # Many streams turn the matrix-vector products into matrix products: the ceiling is then the matmul peak.
    # The model's nominal multiply-adds: the first layer's input product counts, though lmtool looks it up.
    peak = matmul_peak_gflops(torch.float32, device)
    macs = sum(w.numel() for w in model.rnn.parameters() if w.dim() == 2) + model.decoder.weight.numel()
    bf16_peak = matmul_peak_gflops(torch.bfloat16, device)
    one_stream = None  # lmtool's fp32 tokens/s for one stream, the first count measured
    for streams in sorted({1, *stream_counts}):
        for precision in ("fp32", "bf16"):  # --precision bf16: the recurrent layers step in bfloat16
            options = SamplingOptions(length=tokens // 2, num_samples=streams, seed=1, precision=precision)
            both = precision == "fp32" and device == "cpu"  # elsewhere lmtool always steps in the cell layout
            # Each layout forced through the rule's settings (GATE_MAJOR_MIN_STREAMS, MKL_ON_AMD; the forms of the
            # matrices, MIN_BLOCK_ELEMENTS and PACKED_FP32_MIN_ELEMENTS, as lmtool picks them unless named). The cell:
            # the other CPUs' rule for few streams. Gate-major: theirs for many, or where MKL_ON_AMD the way lmtool
            # runs it there (below 4 streams with the output layer transposed; from 4, the char model's own rule:
            # its input table, the output layer untransposed). bf16 runs as lmtool does.
            # Where MKL_ON_AMD the gate-major layout is also timed with nothing packed in fp32 (column blocks), and
            # with its matrices whole.
            blocks, packed = lmtool.column_blocks.MIN_BLOCK_ELEMENTS, lmtool.model.PACKED_FP32_MIN_ELEMENTS
            dtype = torch.bfloat16 if precision == "bf16" else None
            # what lmtool runs
            chosen = "gate-major" if model.step_weights(dtype=dtype, streams=streams).gate_major else "cell"
            rule = dict(GATE_MAJOR_MIN_STREAMS=GATE_MAJOR_MIN_STREAMS, MKL_ON_AMD=MKL_ON_AMD,
                        MIN_BLOCK_ELEMENTS=blocks, PACKED_FP32_MIN_ELEMENTS=packed)
            if not both:  # named after what lmtool runs (bf16 on a CPU: gate-major, packed)
                layouts = {chosen: rule}
            else:
                amd_gate_major = dict(rule, GATE_MAJOR_MIN_STREAMS=min(streams + 1, GATE_MAJOR_MIN_STREAMS),
                                      MKL_ON_AMD=True)
                layouts = {"gate-major": amd_gate_major if MKL_ON_AMD else dict(rule, GATE_MAJOR_MIN_STREAMS=1,
                                                                                MKL_ON_AMD=False),
                           "cell": dict(rule, GATE_MAJOR_MIN_STREAMS=streams + 1, MKL_ON_AMD=False)}
                if MKL_ON_AMD:
                    layouts["gate-major-blocks"] = dict(amd_gate_major, PACKED_FP32_MIN_ELEMENTS=None)
                    layouts["gate-major-whole"] = dict(amd_gate_major, MIN_BLOCK_ELEMENTS=NO_BLOCKS,
                                                       PACKED_FP32_MIN_ELEMENTS=None)
            if "gate-major" in layouts:  # also stepped by step_layers instead of lmtool.lstm_stepper's buffers
                layouts["gate-major-step-layers"] = dict(layouts["gate-major"], BUFFERED_LSTM_STEPS=False)
            times: dict[str, list[float]] = {name: [] for name in layouts}
            for name, settings in alternating(layouts, 5):
                with layout_rule(**settings):
                    times[name].append(per_token_ms(lambda n: generate(model, [], options), tokens // 2, repeats=2))
            throughput = streams * 1000 / statistics.median(times[chosen])
            one_stream = one_stream or throughput
            gflops = throughput * 2 * macs / 1e9
            peak_now = peak if precision == "fp32" else bf16_peak
            record = {**info, "model": "char 2x512 LSTM, V=66", "device": device, "streams": streams,
                      "precision": precision, "layout": chosen, "tokens_per_s": round(throughput),
                      "scaling_vs_one_fp32_stream": round(throughput / one_stream, 1),
                      # the most scaling the peak allows: the model's tokens/s at the matmul peak of this precision
                      # over one fp32 stream's (near-linear scaling needs this to be at least the stream count)
                      "scaling_at_the_peak": round(peak_now * 1e9 / (2 * macs) / one_stream, 1),
                      "model_gflop_per_s": round(gflops, 1), "peak_gflop_per_s": round(peak_now, 1),
                      "fraction_of_peak": round(gflops / peak_now, 4)}
            if chosen == "gate-major":  # lmtool steps it on lmtool.lstm_stepper's buffers
                record["stepper_speedup_median_of_rounds"] = round(
                    faster_by(times["gate-major-step-layers"], times["gate-major"]), 3)
            if both:
                record.update({f"{name}_tokens_per_s": round(streams * 1000 / statistics.median(t))
                               for name, t in times.items()})
                record["gate_major_over_cell_median_of_rounds"] = round(
                    faster_by(times["cell"], times["gate-major"]), 2)
                if "gate-major-whole" in times:
                    record["packed_over_blocks_median_of_rounds"] = round(
                        faster_by(times["gate-major-blocks"], times["gate-major"]), 2)
                    record["blocks_over_whole_median_of_rounds"] = round(
                        faster_by(times["gate-major-whole"], times["gate-major-blocks"]), 2)
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
