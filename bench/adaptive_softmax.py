"""Adaptive against full softmax on WikiText-2 (33k words), and lmtool against the PyTorch example, side by side.

Usage: python bench/adaptive_softmax.py [--steps 300] [--seconds 120] [--data ../shared/data]
Model: the example's size (2x200 LSTM, embedding 200, dropout 0.2, untied), its optimiser (SGD lr 20, gradient
norm clipped to 0.25), batch 20, BPTT 35. Two parts, one process, one JSON line each, both with the machine's
matrix-multiply peak measured in the same run:
1. same tokens: lmtool with model.softmax=full and =adaptive (float32), `--steps` steps each; tokens/s and the
   validation perplexity after those same tokens;
2. equal wall time: the example's loop (bench/peer_example.py) and lmtool with adaptive softmax + bf16, each
   trained for `--seconds` (at least about 10, so that its log records a speed); tokens/s and validation
   perplexity afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (  # noqa: E402
    absolute_path, log_every, machine_info, matmul_peak_gflops, median_tokens_per_s, scratch_dir,
)
from peer_example import PeerModel, perplexity, train_for  # noqa: E402

import torch  # noqa: E402

from lmtool.config import load_config  # noqa: E402
from lmtool.data import load_corpus  # noqa: E402
from lmtool.train import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PEER_TOKENS_PER_S = 1850  # the reference figure for the example on this machine
EXAMPLE = ["data.level=word", "data.max_size=null", "data.batch_size=20", "data.bptt=35", "data.eval_batch_size=10",
           "model.embedding_size=200", "model.hidden_size=200", "model.num_layers=2", "model.dropout=0.2",
           "model.tie_weights=false", "train.optimizer=sgd", "train.lr=20", "train.clip_grad_norm=0.25",
           "train.schedule=constant", "train.patience=null", "train.blowup_factor=null",
           "train.checkpoint_every=null", "train.checkpoint_time=null", "train.log_every=20"]


def run_lmtool(data: Path, overrides: list[str]) -> dict:
    records: list[dict] = []
    cfg = load_config(None, [*EXAMPLE, *overrides])
    with scratch_dir() as tmp:
        train(cfg, data / "wikitext-2/train.txt", valid_path=data / "wikitext-2/valid.txt", out=Path(tmp) / "run",
              on_event=records.append)
    valid = [r for r in records if r["event"] == "valid"][-1]
    end = [r for r in records if r["event"] == "end"][-1]
    return {"tokens_per_s": round(median_tokens_per_s(records)), "tokens_trained": end["tokens_seen"],
            "valid_ppl": round(valid["ppl"], 2), "vocab": records[0]["vocab_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--data", type=absolute_path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    info = machine_info()
    peaks = {"fp32": round(matmul_peak_gflops(torch.float32)), "bf16": round(matmul_peak_gflops(torch.bfloat16))}

    same = {softmax: run_lmtool(args.data, [f"model.softmax={softmax}", f"train.max_steps={args.steps}",
                                            "train.precision=fp32", f"train.log_every={log_every(args.steps, 20)}"])
            for softmax in ("full", "adaptive")}
    print(json.dumps({**info, "part": "same tokens, fp32", "steps": args.steps, "full": same["full"],
                      "adaptive": same["adaptive"],
                      "adaptive_over_full_tokens_per_s": round(same["adaptive"]["tokens_per_s"]
                                                              / same["full"]["tokens_per_s"], 2),
                      "valid_ppl_change": round(same["adaptive"]["valid_ppl"] / same["full"]["valid_ppl"] - 1, 4),
                      "matmul_peak_gflop_per_s": peaks}), flush=True)

    corpus = load_corpus(args.data / "wikitext-2/train.txt", args.data / "wikitext-2/valid.txt", None, "word", 1,
                         None, False, "<unk>", 0.05)
    torch.manual_seed(1234)
    peer = PeerModel(len(corpus.tokenizer))
    peer_tokens, peer_seconds = train_for(peer, corpus.train, args.seconds)
    peer_result = {"tokens_per_s": round(peer_tokens / peer_seconds), "tokens_trained": peer_tokens,
                   "valid_ppl": round(perplexity(peer, corpus.valid), 2)}
    ours = run_lmtool(args.data, ["model.softmax=adaptive", "train.precision=bf16", f"train.max_time={args.seconds}",
                                  "train.max_epochs=null"])
    print(json.dumps({**info, "part": "equal wall time", "seconds": args.seconds, "example": peer_result,
                      "lmtool_adaptive_bf16": ours,
                      "over_example_tokens_per_s": round(ours["tokens_per_s"] / peer_result["tokens_per_s"], 2),
                      "over_reference_1850": round(ours["tokens_per_s"] / PEER_TOKENS_PER_S, 2),
                      "matmul_peak_gflop_per_s": peaks}), flush=True)


if __name__ == "__main__":
    main()
