"""lmtool's CPU dropout against PyTorch's: the operation alone, and a training step of the default char model.

Usage: python bench/dropout.py [--rounds 12] [--precision bf16|fp32]
1. The operation: dropout(p=0.2) of the default character model's (32, 128, 512) activations, forward and
   backward, lmtool.dropout.dropout against F.dropout, in turn round after round (medians of 20 calls each).
2. The step: the default character model (2x512 LSTM, embedding 128, dropout 0.2, batch 32 x BPTT 128, Adam,
   66 symbols) trained on random windows, one step with lmtool's dropout (its own masks, the stack run layer by
   layer) and one with PyTorch's (lmtool.dropout.FAST_DEVICES emptied: F.dropout and nn.LSTM's own dropout), in
   turn, the order alternating; the figure is the median of the per-pair time ratios. Freed memory is kept, as
   CPU training does. One JSON line per part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import alternating, machine_info, require_at_least  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lmtool.dropout  # noqa: E402
from lmtool.config import ModelConfig  # noqa: E402
from lmtool.data import windows  # noqa: E402
from lmtool.host_memory import keep_freed_memory  # noqa: E402
from lmtool.model import LanguageModel, detach_state  # noqa: E402

P, BATCH, BPTT, VOCAB = 0.2, 32, 128, 66


def in_turn(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn round after round, the order alternating."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in alternating(fns, rounds):
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
    return times


def operation(dtype: torch.dtype, rounds: int, info: dict) -> None:
    x = torch.randn(BATCH, BPTT, 512, dtype=dtype, requires_grad=True)

    def calls(drop):
        def run():
            for _ in range(20):
                drop(x).backward(torch.ones_like(x))
        return run

    times = in_turn({"lmtool": calls(lambda t: lmtool.dropout.dropout(t, P, True)),
                     "pytorch": calls(lambda t: F.dropout(t, P, True))}, rounds)
    ours, theirs = (statistics.median(times[k][1:]) * 1000 / 20 for k in ("lmtool", "pytorch"))
    print(json.dumps({**info, "part": "operation, forward + backward", "shape": [BATCH, BPTT, 512],
                      "dtype": str(dtype).removeprefix("torch."), "lmtool_ms": round(ours, 3),
                      "pytorch_ms": round(theirs, 3), "pytorch_over_lmtool": round(theirs / ours, 2)}), flush=True)


def step(precision: str, rounds: int, info: dict) -> None:
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(embedding_size=128, hidden_size=512, dropout=P), VOCAB).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, fused=True)
    data = torch.randint(0, VOCAB, (BATCH, BPTT * (rounds + 1) + 1), dtype=torch.int32)
    batches = iter(windows(data, BPTT))
    state = [model.init_state(BATCH)]

    def train_step(fast: bool):
        def run():
            lmtool.dropout.FAST_DEVICES = {"cpu"} if fast else set()
            x, y = next(batches, None) or (data[:, :BPTT], data[:, 1 : BPTT + 1])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                nll, next_state = model(x, state[0], targets=y)
            optimizer.zero_grad(set_to_none=True)
            nll.mean().backward()
            optimizer.step()
            state[0] = detach_state(next_state)
        return run

    try:
        times = in_turn({"lmtool": train_step(True), "pytorch": train_step(False)}, rounds)
    finally:
        lmtool.dropout.FAST_DEVICES = {"cpu"}
    ratios = [theirs / ours for ours, theirs in zip(times["lmtool"][1:], times["pytorch"][1:])]
    tokens = BATCH * BPTT
    print(json.dumps({**info, "part": "default char model training step", "precision": precision,
                      "pairs": len(ratios), "lmtool_tokens_per_s": round(tokens / statistics.median(times["lmtool"][1:])),
                      "pytorch_dropout_tokens_per_s": round(tokens / statistics.median(times["pytorch"][1:])),
                      "pytorch_over_lmtool_median_of_pairs": round(statistics.median(ratios), 3),
                      "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    require_at_least(parser, args.rounds, 2, "--rounds", "the first round warms up and is not counted")
    keep_freed_memory()
    info = machine_info()
    for dtype in (torch.float32, torch.bfloat16):
        operation(dtype, args.rounds, info)
    step(args.precision, args.rounds, info)


if __name__ == "__main__":
    main()
