"""Does a replayed CUDA-graph training step stay exact when other GPU work runs between its replays?

Usage: python bench/gpu_replay_check.py [--workload ptb-medium|char|ptb] [--steps 20] [--device cuda]
On 2026-11-26 bench/gpu_steps.py's captured steps drifted from eager ones (once to NaN) when other models
trained in the same process between replays, and matched exactly when replayed alone. This check narrows that
down with lmtool's own capture (lmtool/graphed_step.py): it trains one model eagerly as the reference (the
trainer's step as bench/step_ab.py's lmtool_step builds it), then, for each kind of interference, the same
model from the same seed through GraphedStep, doing that between
every two steps: nothing; allocating, filling with NaN and freeing 1 GiB; reseeding the RNG; training another
LSTM of the same size; synchronising and emptying PyTorch's cache. One JSON line per kind: the first step
whose loss differs from the reference by more than 1e-4 (null: none) and the largest difference.
`--device cpu` runs the same through GraphedStep with a stand-in for the capture (a check of the script
itself). On an H200 (2026-11-26 21:01) no kind moved any loss.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_steps import WORKLOADS  # noqa: E402
from machine import machine_info, require_cuda  # noqa: E402
from step_ab import bare_step, lmtool_step  # noqa: E402

import torch  # noqa: E402

import lmtool.data  # noqa: E402
from lmtool.graphed_step import WARMUP_STEPS, capture_cuda_graph  # noqa: E402


def run_uncaptured(run):
    """A stand-in for capture_cuda_graph off CUDA: its "replay" runs the step again."""
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="ptb-medium", choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    require_cuda(args.device)
    vocab, emb, hidden, batch, bptt = WORKLOADS[args.workload]
    device = args.device
    torch.manual_seed(1)
    total = WARMUP_STEPS + args.steps
    data = torch.randint(0, vocab, (batch, bptt * total + 1), device=device)
    windows = list(lmtool.data.windows(data, bptt))
    fp32 = dict(device_type=device, enabled=False)
    capture = capture_cuda_graph if device == "cuda" else run_uncaptured
    reference_step = lmtool_step(vocab, emb, hidden, batch, fp32, device)
    reference = [float(reference_step(x, y)) for x, y in windows]
    del reference_step

    other = bare_step(vocab, emb, hidden, fp32, device)

    def garbage():
        torch.empty(2**28, device=device).fill_(float("nan"))

    def sync_and_empty():
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    interference = {"nothing": lambda: None, "1 GiB of NaN allocated and freed": garbage,
                    "RNG reseeded": lambda: torch.manual_seed(0),
                    "another LSTM trained one step": lambda: other(*windows[0]),
                    "synchronised, cache emptied": sync_and_empty}
    info = {**machine_info(), "workload": args.workload, "steps": args.steps}
    for name, between in interference.items():
        step = lmtool_step(vocab, emb, hidden, batch, fp32, device, capture)
        losses = []
        for x, y in windows:
            losses.append(float(step(x, y)))
            between()
        diffs = [abs(a - b) if a == a else float("inf") for a, b in zip(losses, reference)]
        first = next((n for n, d in enumerate(diffs) if not d <= 1e-4), None)
        print(json.dumps({**info, "between_steps": name, "first_differing_step": first,
                          "largest_difference": max(diffs)}), flush=True)


if __name__ == "__main__":
    main()
