"""Where lmtool's CPU training step spends its time, by kind of work, against the machine's matmul peak.

Usage: python bench/step_profile.py [--workload ptb|wt2|char] [--precision fp32|bf16] [--rounds 20]
Runs bench/step_ab.py's lmtool step (the trainer's hot path) with freed memory kept, as CPU training does, for
--rounds windows under PyTorch's profiler, after 5 warm-up steps, and sorts each operator's own time into:
  output-layer products  aten::mm / addmm / addmm_ (the step's only matrix products outside the recurrence:
                         the scores, and the gradients of the hidden states and the output weights);
  recurrent kernels      oneDNN's LSTM layers, forward and backward (mkldnn_rnn_layer*);
  optimiser              the fused SGD update;
  gradient norm          the clipping norm (one dot product per gradient on a CPU; PyTorch's norms
                         elsewhere);
  other operators        everything else: the output layer's exp/sum passes, the embedding's gradient,
                         the guard, fills and copies;
  outside operators      wall time minus all operators' own time (Python, autograd bookkeeping).
For the two kinds of matrix work it also prints their model FLOP/s (6 x multiply-adds per token for the
whole step; the output layer's and the recurrence's share of them) against the peak measured right after.
One JSON line. Profiling adds a little overhead, so the step's wall time here is slightly above
bench/step_ab.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, matmul_peak_gflops  # noqa: E402
from step_ab import WORKLOADS, lmtool_step, step_inputs  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

KINDS = {
    "output-layer products": ("aten::mm", "aten::addmm", "aten::addmm_"),
    "recurrent kernels": ("aten::mkldnn_rnn_layer", "aten::mkldnn_rnn_layer_backward"),
    "optimiser": ("aten::_fused_sgd_",),
    "gradient norm": ("aten::dot", "aten::linalg_vector_norm", "aten::_foreach_norm"),
}
WARMUP = 5


def kind_of(name: str) -> str:
    return next((kind for kind, names in KINDS.items() if name in names), "other operators")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="ptb", choices=sorted(WORKLOADS))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    # freed memory kept, as CPU training does; the warm-up windows first
    inputs = argparse.Namespace(workload=args.workload, precision=args.precision, rounds=WARMUP + args.rounds,
                                keep_freed_memory=True)
    (vocab, emb, hidden, batch, bptt, description), windows, autocast = step_inputs(inputs, WORKLOADS)
    step = lmtool_step(vocab, emb, hidden, batch, autocast)
    for x, y in windows[:WARMUP]:
        step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for x, y in windows[WARMUP:]:
            step(x, y)
        wall_ms = (time.perf_counter() - start) * 1000 / args.rounds
    peak = matmul_peak_gflops(torch.float32 if args.precision == "fp32" else torch.bfloat16)

    ms = {kind: 0.0 for kind in [*KINDS, "other operators"]}
    for event in profiler.key_averages():
        ms[kind_of(event.key)] += event.self_cpu_time_total / 1000 / args.rounds
    ms["outside operators"] = wall_ms - sum(ms.values())

    tokens = batch * bptt
    output_flop = 6 * hidden * vocab * tokens
    recurrent_flop = 6 * (4 * hidden * (emb + hidden) + 4 * hidden * (hidden + hidden)) * tokens
    gflops = lambda flop, t: flop / (t / 1000) / 1e9  # noqa: E731
    print(json.dumps({
        **machine_info(), "workload": description, "precision": args.precision, "steps": args.rounds,
        "ms_per_step": round(wall_ms, 2),
        "ms_per_step_by_kind": {kind: round(t, 2) for kind, t in ms.items()},
        "share_of_step": {kind: round(t / wall_ms, 3) for kind, t in ms.items()},
        "output_layer_gflop_per_s": round(gflops(output_flop, ms["output-layer products"]), 1),
        "recurrence_gflop_per_s": round(gflops(recurrent_flop, ms["recurrent kernels"]), 1),
        "step_gflop_per_s": round(gflops(output_flop + recurrent_flop, wall_ms), 1),
        "peak_gflop_per_s": round(peak, 1),
        "utilisation": round(gflops(output_flop + recurrent_flop, wall_ms) / peak, 3),
    }), flush=True)


if __name__ == "__main__":
    main()
