"""Training tokens/s and model-FLOP utilisation: lmtool's loop against a bare PyTorch loop, fp32 and bf16.

Usage: python bench/train_throughput.py [--steps 30] [--rounds 3] [--data ../shared/data]
                                       [--only char,ptb,wt2,ptb-medium] [--device cpu|cuda]
Three reference workloads: char 2x512 LSTM on tinyshakespeare (batch 64, BPTT 128); Zaremba-small on PTB
(2x200, 10k words, batch 20, BPTT 20); 2x200 LSTM on WikiText-2 (33k words, batch 20, BPTT 35). For each, in
one process: the bare loop (nn.Embedding -> nn.LSTM -> nn.Linear -> cross-entropy, SGD) and `lmtool.train`
with the same sizes, each in fp32 and bf16 autocast, and the machine's matrix-multiply peak measured before
each workload and once more at the end (the highest is used: a shared machine's speed drifts). The two loops
run in turn --rounds times each, the order alternating (lmtool, bare, bare, lmtool, ...), so that drift between
two loops timed one after the other does not decide the ratio: tokens/s are medians over the rounds, and the
ratio is the median of the per-round ratios.
Utilisation = tokens/s x 6 x (multiply-adds per token) / peak of the precision used.
Prints one JSON line per workload and precision.
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
    absolute_path, log_every, machine_info, matmul_peak_gflops, median_tokens_per_s, scratch_dir,
)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lmtool.config import load_config  # noqa: E402
from lmtool.data import batchify, load_corpus, windows  # noqa: E402
from lmtool.train import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

WORKLOADS = {
    "char": ("tinyshakespeare/input.txt", None, ["data.level=char", "data.batch_size=64", "data.bptt=128",
             "model.embedding_size=128", "model.hidden_size=512", "model.num_layers=2", "model.dropout=0.0"]),
    "ptb": ("ptb/train.txt", "ptb/valid.txt", ["data.level=word", "data.batch_size=20", "data.bptt=20",
            "data.max_size=null", "model.embedding_size=200", "model.hidden_size=200", "model.num_layers=2",
            "model.tie_weights=false", "model.dropout=0.0"]),
    "ptb-medium": ("ptb/train.txt", "ptb/valid.txt", ["data.level=word", "data.batch_size=20", "data.bptt=35",
                   "data.max_size=null", "model.embedding_size=650", "model.hidden_size=650", "model.num_layers=2",
                   "model.tie_weights=false", "model.dropout=0.0"]),
    "wt2": ("wikitext-2/train.txt", "wikitext-2/valid.txt", ["data.level=word", "data.batch_size=20",
            "data.bptt=35", "data.max_size=null", "model.embedding_size=200", "model.hidden_size=200",
            "model.num_layers=2", "model.tie_weights=false", "model.dropout=0.0"]),
}


def multiply_adds_per_token(emb: int, hidden: int, layers: int, vocab: int) -> int:
    inputs = [emb] + [hidden] * (layers - 1)
    return sum(4 * hidden * (i + hidden) for i in inputs) + hidden * vocab


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_loop(streams: torch.Tensor, vocab: int, emb: int, hidden: int, layers: int, bptt: int, steps: int,
              bf16: bool, device: str, block: int) -> float:
    """Tokens/s of the plainest training loop PyTorch offers. On a CPU, timed as lmtool's log times itself: the
    median over blocks of `block` steps, leaving out the first block (warm-up). On a GPU the steps after the
    first two are timed as one block (a sync after every step would stop the host from queueing ahead, which
    lmtool's loop never does)."""
    torch.manual_seed(0)
    embedding, lstm, out = nn.Embedding(vocab, emb), nn.LSTM(emb, hidden, layers, batch_first=True), nn.Linear(hidden, vocab)
    embedding, lstm, out = embedding.to(device), lstm.to(device), out.to(device)
    streams = streams.to(device)
    params = [*embedding.parameters(), *lstm.parameters(), *out.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    state, block_times, tokens, block_start = None, [], 0, 0.0
    for n, (x, y) in enumerate(windows(streams, bptt)):
        if device == "cpu" and n % block == 0:
            if n >= 2 * block:  # the block that just ended, after the first
                block_times.append(time.perf_counter() - block_start)
            block_start = time.perf_counter()
        if n >= steps:
            break
        if n == 2 and device != "cpu":
            sync(device)
            block_start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            h, state = lstm(embedding(x.long()), state)
            logits = out(h)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.long().flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = tuple(s.detach() for s in state)
        if device != "cpu" and n >= 2:
            tokens += x.numel()
    if device == "cpu":
        return block * x.numel() / statistics.median(block_times)
    sync(device)
    return tokens / (time.perf_counter() - block_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each loop, in turn")
    parser.add_argument("--data", type=absolute_path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--only", default="char,ptb,wt2")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    info = machine_info()
    peaks = {"fp32": 0.0, "bf16": 0.0}

    def measure_peaks() -> None:
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peaks[precision] = max(peaks[precision], matmul_peak_gflops(dtype, args.device))

    rows = []
    for name in args.only.split(","):
        measure_peaks()
        train_file, valid_file, overrides = WORKLOADS[name]
        valid = args.data / valid_file if valid_file else None
        for precision in ("fp32", "bf16"):
            cfg = load_config(None, [*overrides, f"train.max_steps={args.steps}",
                                     f"train.log_every={log_every(args.steps, 5)}",
                                     f"train.precision={precision}", "train.optimizer=sgd", "train.lr=0.1",
                                     "train.checkpoint_every=null", "train.checkpoint_time=null",
                                     f"train.device={args.device}"])
            # the bare loop trains on the same token stream (read through the library: the same ids)
            corpus = load_corpus(args.data / train_file, valid, None, cfg.data.level, 1, None, False, "<unk>", 0.05)
            streams = batchify(corpus.train, cfg.data.batch_size)
            m = cfg.model
            vocab = len(corpus.tokenizer)

            def lmtool_run() -> float:
                records = []
                with scratch_dir() as tmp:
                    train(cfg, args.data / train_file, valid_path=valid, out=Path(tmp) / "run", on_event=records.append)
                return median_tokens_per_s(records)  # the first interval warms up

            def bare_run() -> float:
                return bare_loop(streams, vocab, m.embedding_size, m.hidden_size, m.num_layers, cfg.data.bptt,
                                 args.steps, precision == "bf16", args.device, cfg.train.log_every)

            runs: dict[str, list[float]] = {"lmtool": [], "bare": []}
            for r in range(args.rounds):
                order = [("lmtool", lmtool_run), ("bare", bare_run)]
                for which, run in (order if r % 2 == 0 else order[::-1]):
                    runs[which].append(run())
            macs = multiply_adds_per_token(m.embedding_size, m.hidden_size, m.num_layers, vocab)
            rows.append((name, precision, cfg, vocab, runs, 6 * macs))
    measure_peaks()
    for name, precision, cfg, vocab, runs, flops in rows:
        lmtool_tps, bare_tps = statistics.median(runs["lmtool"]), statistics.median(runs["bare"])
        ratios = [ours / bare for ours, bare in zip(runs["lmtool"], runs["bare"])]
        print(json.dumps({
            **info, "workload": name, "device": args.device, "precision": precision, "vocab": vocab,
            "batch": cfg.data.batch_size, "bptt": cfg.data.bptt, "rounds": args.rounds,
            "lmtool_tokens_per_s": round(lmtool_tps), "bare_loop_tokens_per_s": round(bare_tps),
            "lmtool_over_bare": round(statistics.median(ratios), 2),
            "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)],
            "model_gflop_per_s": round(lmtool_tps * flops / 1e9, 1),
            "peak_gflop_per_s": round(peaks[precision], 1),
            "utilisation": round(lmtool_tps * flops / 1e9 / peaks[precision], 3),
        }), flush=True)


if __name__ == "__main__":
    main()
