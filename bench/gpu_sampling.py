"""Generation on a GPU with each token's step replayed as a CUDA graph, against the same steps launched one kernel
at a time (generate's cuda_graph=False): speed, and whether the tokens agree.

Usage: python bench/gpu_sampling.py [--rounds 3] [--tokens 400] [--streams 1,64,1024] [--device cuda]
Models, with random weights: the char model of the training benchmarks (2x512 LSTM, 66 symbols) and the word
model of the issue's reference (2x200 LSTM, 33,278 words, full softmax). For each model and number of streams, in
fp32 and bf16 (--precision bf16), both ways in turn for --rounds rounds (the order reversed every other round),
seeded alike; one JSON line each: the median tokens/s of each way (a call's warm-up and capture included), the
median of the rounds' ratios, whether the two ways drew the same tokens in every round, and the captures made and
failed (one per graphed call: the warm-up call's and each round's). Then, once each way at 8 streams, whether
the tokens agree under other settings (greedy, top-k and top-p at a temperature, stop at <EOS>, unseeded from the
same torch.manual_seed, bf16, an adaptive softmax at a temperature), and whether a capture that fails (it
synchronises) falls back to eager steps that draw the same tokens, with the warning.
`--device cpu` runs the same with a stand-in for the capture that runs each step again: a check of the script
itself, not a timing. Written on 2026-11-27 when no GPU could be lent any more: not yet run on one. Model.sample
uses the graph only once a run here shows the same tokens both ways.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (  # noqa: E402
    CaptureCounter, alternating, counts, graph_and_eager, known_names, machine_info, require_at_least, require_cuda)

import torch  # noqa: E402

import lmtool.sample  # noqa: E402
from lmtool.config import ModelConfig  # noqa: E402
from lmtool.graphed_step import capture_cuda_graph  # noqa: E402
from lmtool.model import LanguageModel  # noqa: E402
from lmtool.sample import GRAPH_MIN_TOKENS, SamplingOptions, generate  # noqa: E402

MODELS = {
    "char": (ModelConfig(embedding_size=128, hidden_size=512, dropout=0.0), 66),
    "word": (ModelConfig(embedding_size=200, hidden_size=200, dropout=0.0, tie_weights=True), 33278),
}
ADAPTIVE = (ModelConfig(embedding_size=200, hidden_size=200, dropout=0.0, softmax="adaptive"), 33278)
# name -> the sampling options of one agreement check (8 streams, 100 tokens); seed None: from torch.manual_seed(7)
SETTINGS = {
    "greedy": dict(temperature=0, seed=1),
    "top-k and top-p": dict(temperature=0.8, top_k=10, top_p=0.9, seed=1),
    "stop at <EOS>": dict(stop_at_eos=True, seed=1),
    "unseeded": dict(seed=None),
    "bf16": dict(precision="bf16", seed=1),
}


def timed(model: LanguageModel, options: SamplingOptions, graph: bool) -> tuple[float, list[list[int]]]:
    """(seconds, tokens) of one generate call, the device caught up at both ends (tolist() waits for it). An
    unseeded call starts from torch's seed 7."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    if options.seed is None:
        torch.manual_seed(7)  # the CPU's and every GPU's default generator
    start = time.perf_counter()
    ids = generate(model, [], options, cuda_graph=graph)
    return time.perf_counter() - start, ids


def agreement(models: dict[str, LanguageModel], info: dict) -> None:
    """Whether both ways draw the same tokens under SETTINGS (and the adaptive softmax at a temperature)."""
    cases = [(name, models[name], setting) for name in MODELS for setting in SETTINGS]
    cases.append(("word-adaptive", models["word-adaptive"], "temperature 0.8"))  # at 1 it draws in two levels
    for name, model, setting in cases:
        options = SamplingOptions(length=100, num_samples=8, **SETTINGS.get(setting, dict(temperature=0.8, seed=1)))
        drawn = [timed(model, options, graph)[1] for graph in (True, False)]
        print(json.dumps({**info, "check": "same tokens", "model": name, "setting": setting,
                          "same_tokens": drawn[0] == drawn[1]}), flush=True)


def failed_capture(model: LanguageModel, capture, info: dict) -> None:
    """A capture that synchronises, which a real capture refuses: generation must go on eagerly, warn, and draw
    the eager tokens."""
    options = SamplingOptions(length=100, num_samples=8, seed=1)
    eager = timed(model, options, False)[1]

    def synchronising(run):
        def run_and_wait():
            run()
            torch.ones(1, device=model.device).sum().item()

        return capture(run_and_wait)

    decides = lmtool.sample.token_capture
    lmtool.sample.token_capture = lambda *args: synchronising if decides(*args) is not None else None
    record = {**info, "check": "a failed capture falls back"}
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            graphed = timed(model, options, True)[1]
        record.update(same_tokens=graphed == eager, warnings=[str(w.message)[:300] for w in warned])
    except Exception as error:  # a benchmark: say what broke
        cause = error.__context__ or error
        record["failed"] = f"{type(error).__name__}: {error}; cause {type(cause).__name__}: {cause}"[:600]
    finally:
        lmtool.sample.token_capture = decides
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--streams", type=counts, default=[1, 64, 1024])
    parser.add_argument("--only", default=",".join(MODELS))
    parser.add_argument("--device", default="cuda", help="cpu: check the script with a stand-in capture")
    args = parser.parse_args()
    require_at_least(parser, args.rounds, 1, "--rounds", "each way is timed once per round")
    require_at_least(parser, args.tokens, GRAPH_MIN_TOKENS, "--tokens", "shorter samples stay eager")
    only = known_names(parser, args.only, MODELS, "--only")
    require_cuda(args.device)
    info = machine_info()
    counter = CaptureCounter()
    decides = lmtool.sample.token_capture

    def counting(model, options, two_level, cuda_graph, generator):
        capture = decides(model, options, two_level, cuda_graph, generator)
        if args.device == "cpu" and cuda_graph and not two_level and options.length >= GRAPH_MIN_TOKENS:
            capture = lambda run: run  # noqa: E731 - the stand-in: each "replay" runs the step again
        return None if capture is None else counter.counting(capture)

    lmtool.sample.token_capture = counting
    models = {}
    for name, (config, vocab) in {**MODELS, "word-adaptive": ADAPTIVE}.items():
        torch.manual_seed(0)
        models[name] = LanguageModel(config, vocab).to(args.device).eval()
    for name in only:
        model, vocab = models[name], MODELS[name][1]
        for streams in args.streams:
            for precision in ("fp32", "bf16"):
                options = SamplingOptions(length=args.tokens, num_samples=streams, seed=1, precision=precision)
                timed(model, options, True)  # cuDNN, cuBLAS and the allocator set up
                seconds: dict[str, list[float]] = {"graph": [], "eager": []}
                drawn: dict[str, list[list[list[int]]]] = {"graph": [], "eager": []}
                for way, graph in alternating({"graph": True, "eager": False}, args.rounds):
                    took, ids = timed(model, options, graph)
                    seconds[way].append(took)
                    drawn[way].append(ids)
                tokens = streams * args.tokens
                print(json.dumps({
                    **info, "model": name, "vocab": vocab, "streams": streams, "precision": precision,
                    "tokens": tokens, "rounds": args.rounds, **graph_and_eager(tokens, seconds),
                    "same_tokens": all(ids == drawn["eager"][0] for ids in drawn["graph"] + drawn["eager"]),
                    "streams_with_other_tokens": max(sum(a != b for a, b in zip(ids, drawn["eager"][0]))
                                                     for ids in drawn["graph"]),
                    **counter.taken(),
                }), flush=True)
    agreement(models, info)
    failed_capture(models["char"], (lambda run: run) if args.device == "cpu" else capture_cuda_graph, info)


if __name__ == "__main__":
    main()
