"""lmtool's training step with the sliced output layer against the same step with PyTorch's, interleaved.

Usage: python bench/sliced_nll.py [--workload ptb|wt2|word] [--precision fp32|bf16] [--rounds 22]
On a CPU, `LanguageModel.nll` scores a large vocabulary a cache-sized slice at a time (lmtool/chunked_nll.py)
instead of PyTorch's linear + cross-entropy, which writes the (B*T, V) scores to memory and moves matrices of
that size several times more. This times both versions of lmtool's whole training step, one step of each in
turn on the same windows (the order alternating), and prints the median of the per-pair time ratios
(> 1: slicing is faster) with the size of the scores matrix, as one JSON line. Workloads: PTB-small (10k words,
batch 20 x 20), WikiText-2 at the PyTorch example's size (33,278 words, 20 x 35), and the word defaults
(2x256 LSTM, a 30,000-word vocabulary, batch 32 x 35); random tokens, since only speed is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402
from step_ab import WORKLOADS, lmtool_step  # noqa: E402

import torch  # noqa: E402

import lmtool.model  # noqa: E402

WORD_WORKLOADS = {**{k: WORKLOADS[k] for k in ("ptb", "wt2")},
                  "word": (30000, 256, 256, 32, 35, "word defaults 2x256 LSTM, 30,000 words, batch 32 x BPTT 35")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=22)
    parser.add_argument("--precision", default="fp32", choices=["bf16", "fp32"])
    parser.add_argument("--workload", default="wt2", choices=sorted(WORD_WORKLOADS))
    args = parser.parse_args()
    vocab, emb, hidden, batch, bptt, description = WORD_WORKLOADS[args.workload]
    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    torch.manual_seed(0)
    data = torch.randint(0, vocab, (batch, bptt * args.rounds + 1), dtype=torch.int32)
    sliced, pytorch = lmtool_step(vocab, emb, hidden, batch, autocast), lmtool_step(vocab, emb, hidden, batch, autocast)
    assert lmtool.model.saves_traffic(batch * bptt, vocab), "this workload would not use the sliced path"
    chooses_slices = lmtool.model.saves_traffic

    def unsliced(x, y):
        lmtool.model.saves_traffic = lambda rows, vocab_size: False
        try:
            pytorch(x, y)
        finally:
            lmtool.model.saves_traffic = chooses_slices

    ratios, sliced_times, pytorch_times = [], [], []
    for i in range(args.rounds):
        x, y = data[:, i * bptt:(i + 1) * bptt], data[:, i * bptt + 1:(i + 1) * bptt + 1]
        times = {}
        for step in (sliced, unsliced) if i % 2 == 0 else (unsliced, sliced):
            start = time.perf_counter()
            step(x, y)
            times[step] = time.perf_counter() - start
        if i >= 2:  # warm-up
            sliced_times.append(times[sliced])
            pytorch_times.append(times[unsliced])
            ratios.append(times[unsliced] / times[sliced])
    tokens = batch * bptt
    print(json.dumps({**machine_info(), "workload": description, "precision": args.precision, "pairs": len(ratios),
                      "scores_matrix_mb": round(tokens * vocab * 4 / 2**20, 1),
                      "sliced_tokens_per_s": round(tokens / statistics.median(sliced_times)),
                      "pytorch_tokens_per_s": round(tokens / statistics.median(pytorch_times)),
                      "sliced_over_pytorch_median_of_pairs": round(statistics.median(ratios), 3),
                      "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}), flush=True)


if __name__ == "__main__":
    main()
