"""Training-step variants on a GPU, timed in turn: how fast lmtool's CUDA step is now, and what the next
changes (bf16 recurrence, CUDA graphs) would gain. An experiment for a lent GPU; it runs on a CPU too
(`--device cpu`), without the graph variants.

Usage: python bench/gpu_steps.py [--workload ptb-medium|char|ptb] [--rounds 8] [--block 10] [--device cuda]
Every variant trains its own copy of the same 2-layer LSTM (no dropout) from the same seed on the same random
windows, SGD at lr 0.1. Variants:
  bare-fp32        nn.Embedding -> nn.LSTM -> nn.Linear -> cross-entropy, SGD: the reference loop;
  lmtool-fp32      lmtool's trainer step (bench/step_ab.py: clipping, bad-step guard, fused SGD, running loss);
  lmtool-bf16      the same under bf16 autocast (on CUDA lmtool keeps the recurrence in fp32);
  bare-autocast    the bare step under bf16 autocast, where PyTorch runs cuDNN's LSTM in float16;
  bare-bf16-lstm   the bare step with the LSTM's weights and inputs cast to bfloat16 (cuDNN RNNs take bf16 from
                   cuDNN 9.13 and PyTorch 2.10);
  lmtool-fp32-graph, lmtool-bf16-graph
                   lmtool's step through the trainer's own GraphedStep (lmtool/graphed_step.py; CUDA only): 3
                   eager warm-up steps, then the step captured once as a CUDA graph and replayed, so the host
                   launches one graph instead of hundreds of kernels.
After 3 warm-up steps, round 0 runs every variant for `--block` steps uncounted (the graphs are captured in
it); then each round runs every variant for `--block` steps (synchronised before and after), in an order that
rotates each round; a variant's figure is the median over the counted rounds. Each variant's last loss is
printed beside lmtool-fp32's on the same windows: the graphed steps should match it to float rounding (the
bare loop's model is initialised differently, so its loss differs). Until 2026-11-26 21:00 this bench captured
the step with its own code, whose losses drifted from lmtool-fp32's when other variants trained between
replays; the trainer's capture never did (bench/gpu_replay_check.py, bench/cuda_graph.py), and this bench
now uses it.
One JSON line per variant, then one with the GPU's matmul peaks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, matmul_peak_gflops, require_cuda  # noqa: E402
from step_ab import bare_step, lmtool_step  # noqa: E402
from train_throughput import multiply_adds_per_token  # noqa: E402

import torch  # noqa: E402

import lmtool.data  # noqa: E402
from lmtool.graphed_step import WARMUP_STEPS, capture_cuda_graph  # noqa: E402

# name -> (vocabulary, embedding, hidden, batch, bptt)
WORKLOADS = {
    "ptb-medium": (10000, 650, 650, 20, 35),
    "ptb": (10000, 200, 200, 20, 20),
    "char": (66, 128, 512, 64, 128),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="ptb-medium", choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    require_cuda(args.device)
    vocab, emb, hidden, batch, bptt = WORKLOADS[args.workload]
    device = args.device
    fp32 = dict(device_type=device, enabled=False)
    bf16 = dict(device_type=device, dtype=torch.bfloat16, enabled=True)
    steps = WARMUP_STEPS + (args.rounds + 1) * args.block
    torch.manual_seed(1)
    data = torch.randint(0, vocab, (batch, bptt * steps + 1), device=device)
    windows = list(lmtool.data.windows(data, bptt))

    makers = {
        "bare-fp32": lambda: bare_step(vocab, emb, hidden, fp32, device),
        "lmtool-fp32": lambda: lmtool_step(vocab, emb, hidden, batch, fp32, device),
        "lmtool-bf16": lambda: lmtool_step(vocab, emb, hidden, batch, bf16, device),
        "bare-autocast": lambda: bare_step(vocab, emb, hidden, bf16, device),
        "bare-bf16-lstm": lambda: bare_step(vocab, emb, hidden, bf16, device, bf16_lstm=True),
    }
    if device == "cuda":
        makers["lmtool-fp32-graph"] = lambda: lmtool_step(vocab, emb, hidden, batch, fp32, device, capture_cuda_graph)
        makers["lmtool-bf16-graph"] = lambda: lmtool_step(vocab, emb, hidden, batch, bf16, device, capture_cuda_graph)
    variants, failures = {}, {}
    for name, make in makers.items():
        try:
            step = make()
            for x, y in windows[:WARMUP_STEPS]:  # a graphed step's eager warm-up steps
                step(x, y)
            variants[name] = step
        except Exception as error:  # an experiment: report what does not work and measure the rest
            failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in variants}
    last_loss = {}
    for r in range(args.rounds + 1):  # round 0 is not counted: the graphed steps are captured in it
        block = windows[WARMUP_STEPS + r * args.block:WARMUP_STEPS + (r + 1) * args.block]
        names = list(variants)
        for name in names[r % len(names):] + names[:r % len(names)]:
            try:
                sync()
                start = time.perf_counter()
                for x, y in block:
                    loss = variants[name](x, y)
                sync()
                if r > 0:
                    times[name].append((time.perf_counter() - start) / len(block))
                last_loss[name] = float(loss)
            except Exception as error:
                failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                del variants[name]

    flops_per_token = 6 * multiply_adds_per_token(emb, hidden, 2, vocab)
    info = {**machine_info(), "workload": f"{args.workload}: 2x{hidden} LSTM, {vocab} words, batch {batch} x BPTT {bptt}"}
    reference = statistics.median(times["bare-fp32"]) if times.get("bare-fp32") else None
    for name, measured in times.items():
        if name not in variants or not measured:
            continue
        ms = statistics.median(measured)
        print(json.dumps({**info, "variant": name, "ms_per_step": round(1000 * ms, 3),
                          "tokens_per_s": round(batch * bptt / ms),
                          "over_bare_fp32": round(reference / ms, 3) if reference else None,
                          "model_tflop_per_s": round(batch * bptt * flops_per_token / ms / 1e12, 3),
                          "last_loss": round(last_loss[name], 5),
                          "lmtool_fp32_last_loss": round(last_loss.get("lmtool-fp32", float("nan")), 5)}), flush=True)
    for name, why in failures.items():
        print(json.dumps({**info, "variant": name, "failed": why}), flush=True)
    print(json.dumps({**info, "peak_tflop_per_s": {"fp32": round(matmul_peak_gflops(torch.float32, device) / 1e3, 1),
                                                   "bf16": round(matmul_peak_gflops(torch.bfloat16, device) / 1e3, 1)}}))


if __name__ == "__main__":
    main()
