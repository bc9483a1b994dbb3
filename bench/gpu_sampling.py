"""Generation on a GPU with each token's step replayed as a CUDA graph, against the same steps launched one kernel
at a time (generate's cuda_graph=False): speed, and whether the tokens agree.

Usage: python bench/gpu_sampling.py [--rounds 3] [--tokens 400] [--streams 1,64,1024] [--device cuda]
Models, with random weights: the char model of the training benchmarks (2x512 LSTM, 66 symbols) and the word
model of the issue's reference (2x200 LSTM, 33,278 words, full softmax). For each model and number of streams, in
fp32 and bf16 (--precision bf16), both ways in turn for --rounds rounds (the order reversed every other round),
seeded alike; one JSON line each: the median tokens/s of each way (a call's warm-up and capture included), the
median of the rounds' ratios, whether the two ways drew the same tokens, and the captures made and failed.
`--device cpu` runs the same with a stand-in for the capture that runs each step again: a check of the script
itself, not a timing. Written on 2026-11-27 when no GPU could be lent any more: not yet run on one. Model.sample
uses the graph only once a run here shows the same tokens both ways.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import alternating, machine_info, require_at_least, require_cuda  # noqa: E402

import torch  # noqa: E402

import lmtool.sample  # noqa: E402
from lmtool.config import ModelConfig  # noqa: E402
from lmtool.model import LanguageModel  # noqa: E402
from lmtool.sample import SamplingOptions, generate  # noqa: E402

MODELS = {
    "char": (ModelConfig(embedding_size=128, hidden_size=512, dropout=0.0), 66),
    "word": (ModelConfig(embedding_size=200, hidden_size=200, dropout=0.0, tie_weights=True), 33278),
}


def timed(model: LanguageModel, options: SamplingOptions, graph: bool) -> tuple[float, list[list[int]]]:
    """(seconds, tokens) of one generate call, the device caught up at both ends (tolist() waits for it)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    ids = generate(model, [], options, cuda_graph=graph)
    return time.perf_counter() - start, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--streams", default="1,64,1024")
    parser.add_argument("--only", default=",".join(MODELS))
    parser.add_argument("--device", default="cuda", help="cpu: check the script with a stand-in capture")
    args = parser.parse_args()
    require_at_least(parser, args.rounds, 1, "--rounds", "each way is timed once per round")
    require_at_least(parser, args.tokens, lmtool.sample.GRAPH_MIN_TOKENS, "--tokens", "shorter samples stay eager")
    unknown = set(args.only.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--only takes {', '.join(MODELS)}; not {', '.join(sorted(unknown))}")
    require_cuda(args.device)
    info = machine_info()
    outcomes = {"captures": 0, "capture_failures": []}
    decides = lmtool.sample.token_capture

    def counting(model, options, two_level, cuda_graph, generator):  # a failed capture would run eagerly, unseen
        capture = decides(model, options, two_level, cuda_graph, generator)
        if args.device == "cpu" and cuda_graph:
            capture = lambda run: run  # noqa: E731 - the stand-in: each "replay" runs the step again
        if capture is None:
            return None

        def counted(run):
            try:
                replay = capture(run)
            except Exception as error:
                outcomes["capture_failures"].append(f"{type(error).__name__}: {error}"[:300])
                raise
            outcomes["captures"] += 1
            return replay

        return counted

    lmtool.sample.token_capture = counting
    for name in args.only.split(","):
        config, vocab = MODELS[name]
        torch.manual_seed(0)
        model = LanguageModel(config, vocab).to(args.device).eval()
        for streams in [int(n) for n in args.streams.split(",")]:
            for precision in ("fp32", "bf16"):
                options = SamplingOptions(length=args.tokens, num_samples=streams, seed=1, precision=precision)
                timed(model, options, True)  # cuDNN, cuBLAS and the allocator set up
                seconds: dict[str, list[float]] = {"graph": [], "eager": []}
                drawn: dict[str, list[list[int]]] = {}
                for way, graph in alternating({"graph": True, "eager": False}, args.rounds):
                    took, drawn[way] = timed(model, options, graph)
                    seconds[way].append(took)
                tokens = streams * args.tokens
                print(json.dumps({
                    **info, "model": name, "vocab": vocab, "streams": streams, "precision": precision,
                    "tokens": tokens, "rounds": args.rounds,
                    "graph_tokens_per_s": round(tokens / statistics.median(seconds["graph"])),
                    "eager_tokens_per_s": round(tokens / statistics.median(seconds["eager"])),
                    "graph_over_eager": round(statistics.median(
                        e / g for g, e in zip(seconds["graph"], seconds["eager"])), 2),
                    "same_tokens": drawn["graph"] == drawn["eager"],
                    "streams_with_other_tokens": sum(a != b for a, b in zip(drawn["graph"], drawn["eager"])),
                    **outcomes,
                }), flush=True)
                outcomes.update(captures=0, capture_failures=[])


if __name__ == "__main__":
    main()
