"""Evaluation on a GPU with its windows replayed as a CUDA graph, against the same windows launched one kernel
at a time (stream_nll's cuda_graph=False): speed, and whether the scores agree.

Usage: python bench/gpu_eval.py [--rounds 3] [--only char,ptb-medium] [--device cuda]
Models, with random weights (the speed does not depend on them): the char model of the training benchmarks (2x512
LSTM, 66 symbols, windows of 128) and PTB-medium (2x650 LSTM, 10,000 words, windows of 35), scoring random ids
as evaluate-perplexity does (ids on the host, one window at a time to the GPU). For each model, batch 1 and 64,
fp32 and bf16 (autocast), both ways in turn for --rounds rounds (the order reversed every other round); one JSON
line each: the median tokens/s of each way (a call's warm-up and capture included), the median of the rounds'
ratios, the largest relative difference between the two ways' NLL sums, and the captures made and failed (one
per call that captured: the warm-up call's and each round's).
`--windows 4,16` instead times one stream (batch 1) with the graph in windows of 4 and 16 times the model's, against
its own window, in turn: whether a longer default window would pay on a GPU, as it does on a CPU.
`--device cpu` runs the same with a stand-in for the capture that runs each window again: a check of the script
itself, not a timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (  # noqa: E402
    CaptureCounter, alternating, counts, graph_and_eager, known_names, machine_info, require_at_least, require_cuda)

import torch  # noqa: E402

import lmtool.evaluate  # noqa: E402
from lmtool.config import ModelConfig  # noqa: E402
from lmtool.devices import inference_autocast  # noqa: E402
from lmtool.evaluate import stream_nll  # noqa: E402
from lmtool.graphed_step import capture_cuda_graph  # noqa: E402
from lmtool.model import LanguageModel  # noqa: E402

# name -> (model, vocabulary, window, tokens scored at batch 1, at batch 64): about a second per eager call on an H200
MODELS = {
    "char": (ModelConfig(embedding_size=128, hidden_size=512, dropout=0.0), 66, 128, 40_000, 2_000_000),
    "ptb-medium": (ModelConfig(embedding_size=650, hidden_size=650, dropout=0.0, tie_weights=False), 10_000, 35,
                   20_000, 1_000_000),
}


def timed(model: LanguageModel, stream: torch.Tensor, batch_size: int, bptt: int, graph: bool) -> tuple[float, float]:
    """(seconds, NLL sum) of one stream_nll call, the device caught up at both ends."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    score = stream_nll(model, stream, batch_size, bptt, cuda_graph=graph)  # its float() waits for the device
    return time.perf_counter() - start, score.nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(MODELS))
    parser.add_argument("--device", default="cuda", help="cpu: check the script with a stand-in capture")
    parser.add_argument("--windows", type=counts, default=None,
                        help="instead: time one stream with the graph in windows of these multiples of the model's")
    args = parser.parse_args()
    require_at_least(parser, args.rounds, 1, "--rounds", "each way is timed once per round")
    only = known_names(parser, args.only, MODELS, "--only")
    require_cuda(args.device)
    info = machine_info()
    scale = 1.0
    capture = capture_cuda_graph
    if args.device == "cpu":  # a stand-in "graph" whose replays run the window again; few tokens
        capture, scale = (lambda run: run), 0.01
    counter = CaptureCounter()
    counted = counter.counting(capture)
    decides = lmtool.evaluate.window_capture
    lmtool.evaluate.window_capture = lambda model, count, cuda_graph: (
        counted if (args.device == "cpu" and cuda_graph) or decides(model, count, cuda_graph) else None)
    for name in only:
        config, vocab, bptt, *tokens = MODELS[name]
        torch.manual_seed(0)
        model = LanguageModel(config, vocab).to(args.device).eval()
        if args.windows:
            window_lengths(model, name, bptt, int(tokens[0] * scale), args.windows, args.rounds, info)
            continue
        for batch_size, count in zip((1, 64), tokens):
            stream = torch.randint(0, vocab, (int(count * scale),))
            for precision in ("fp32", "bf16"):
                seconds: dict[str, list[float]] = {"graph": [], "eager": []}
                nll: dict[str, list[float]] = {"graph": [], "eager": []}
                with inference_autocast(precision, model.device):
                    timed(model, stream[: batch_size * bptt * 20], batch_size, bptt, True)  # cuDNN and cuBLAS set up
                    for way, graph in alternating({"graph": True, "eager": False}, args.rounds):
                        took, total = timed(model, stream, batch_size, bptt, graph)
                        seconds[way].append(took)
                        nll[way].append(total)
                scored = batch_size * (stream.numel() // batch_size - 1)
                print(json.dumps({
                    **info, "model": name, "batch_size": batch_size, "window": bptt, "precision": precision,
                    "tokens": scored, "rounds": args.rounds, **graph_and_eager(scored, seconds),
                    "largest_relative_nll_difference": max(
                        abs(g - e) / abs(e) for g in nll["graph"] for e in nll["eager"]),
                    **counter.taken(),
                }), flush=True)


def window_lengths(model: LanguageModel, name: str, bptt: int, tokens: int, multiples: list[int], rounds: int,
                   info: dict) -> None:
    """One stream (batch 1) with the graph, in windows of `multiples` of the model's `bptt`, timed in turn; one
    JSON line: tokens/s per window, each over the model's window (median of the rounds' ratios), and the NLL's
    largest relative change from the model's window (float rounding: the state is carried across windows)."""
    stream = torch.randint(0, model.vocab_size, (tokens,))
    windows = {bptt * m: bptt * m for m in sorted({1, *multiples})}
    timed(model, stream[: bptt * 20], 1, bptt, True)  # cuDNN and cuBLAS set up
    seconds: dict[int, list[float]] = {w: [] for w in windows}
    nll: dict[int, float] = {}
    for window, _ in alternating(windows, rounds):
        took, nll[window] = timed(model, stream, 1, window, True)
        seconds[window].append(took)
    scored = tokens - 1
    print(json.dumps({
        **info, "model": name, "batch_size": 1, "precision": "fp32", "tokens": scored, "rounds": rounds,
        "model_window": bptt,
        "tokens_per_s": {w: round(scored / statistics.median(times)) for w, times in seconds.items()},
        "over_model_window": {w: round(statistics.median(b / t for b, t in zip(seconds[bptt], times)), 2)
                              for w, times in seconds.items()},
        "largest_relative_nll_change": max(abs(v - nll[bptt]) / abs(nll[bptt]) for v in nll.values()),
    }), flush=True)


if __name__ == "__main__":
    main()
