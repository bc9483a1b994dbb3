"""lmtool's training with its step captured as a CUDA graph, against the same run without one
(train.cuda_graph=false): speed, and whether both learn the same.

Usage: python bench/cuda_graph.py [--data ../shared/data] [--steps 300] [--only ptb-medium,char,...]
Each case trains twice in this process from the same seed on the same batches, graph first, and prints one JSON
line: the median training tokens/s of each (the first log interval, which includes warm-up and capture, is
left out), their ratio, the training loss at every log and the validation loss at the end of both, and any
notice the trainer gave (a failed capture says so there). Without dropout the two runs do the same arithmetic
and their losses should agree to float rounding; with dropout the masks differ, so only the losses' level can.
Cases: ptb-medium (2x650 LSTM on PTB, SGD lr 1, no dropout, fp32), char (2x512 LSTM, batch 64 x 128, no dropout,
fp32), char-bf16 (the same in bf16), char-default (the default character model: Adam, dropout 0.2, plateau
schedule), bidirectional (a small bidirectional GRU with dropout, SGD).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import absolute_path, log_every, machine_info, median_tokens_per_s, scratch_dir  # noqa: E402

from lmtool.config import load_config  # noqa: E402
from lmtool.train import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHAR = ["data.level=char", "data.batch_size=64", "data.bptt=128", "model.embedding_size=128", "model.hidden_size=512",
        "model.dropout=0.0", "train.optimizer=sgd", "train.lr=1.0", "train.schedule=constant"]
# name -> (corpus, validation file or None, config file or None, overrides)
CASES = {
    "ptb-medium": ("ptb/train.txt", "ptb/valid.txt", None,
                   ["data.level=word", "data.batch_size=20", "data.bptt=35", "data.max_size=null",
                    "model.embedding_size=650", "model.hidden_size=650", "model.tie_weights=false", "model.dropout=0.0",
                    "train.optimizer=sgd", "train.lr=1.0", "train.schedule=constant", "train.precision=fp32"]),
    "char": ("tinyshakespeare/input.txt", None, None, [*CHAR, "train.precision=fp32"]),
    "char-bf16": ("tinyshakespeare/input.txt", None, None, [*CHAR, "train.precision=bf16"]),
    "char-default": ("tinyshakespeare/input.txt", None, REPO / "configs" / "char-default.yaml", []),
    "bidirectional": ("tinyshakespeare/input.txt", None, None,
                      ["data.level=char", "model.direction=bidirectional", "model.cell=gru", "model.hidden_size=256",
                       "model.dropout=0.2", "train.optimizer=sgd", "train.lr=0.5", "train.schedule=constant"]),
}


def run(case: str, data: Path, steps: int, graph: bool, device: str) -> dict:
    corpus, valid, config_file, overrides = CASES[case]
    cfg = load_config(config_file, [*overrides, f"train.max_steps={steps}", f"train.eval_every={steps}",
                                    f"train.log_every={log_every(steps, 25)}", "train.checkpoint_every=null", "train.checkpoint_time=null",
                                    f"train.device={device}", f"train.cuda_graph={str(graph).lower()}"])
    records = []
    with scratch_dir() as tmp:
        train(cfg, data / corpus, valid_path=data / valid if valid else None, out=Path(tmp) / "run",
              on_event=records.append)
    return {"cuda_graph": records[0].get("cuda_graph"),
            "tokens_per_s": round(median_tokens_per_s(records)),
            "train_losses": [round(r["loss"], 5) for r in records if r["event"] == "train"],
            "valid_loss": [round(r["loss"], 5) for r in records if r["event"] == "valid"][-1],
            "notices": [r["message"] for r in records if r["event"] == "notice"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=absolute_path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", default=",".join(CASES))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    info = machine_info()
    for case in args.only.split(","):
        try:
            graphed = run(case, args.data, args.steps, True, args.device)
            eager = run(case, args.data, args.steps, False, args.device)
        except Exception as error:  # a benchmark: report the case that broke and go on with the next
            print(json.dumps({**info, "case": case, "failed": f"{type(error).__name__}: {error}"[:500]}), flush=True)
            continue
        pairs = list(zip(graphed["train_losses"], eager["train_losses"]))
        print(json.dumps({
            **info, "case": case, "steps": args.steps,
            "graph_over_eager": round(graphed["tokens_per_s"] / eager["tokens_per_s"], 3),
            "max_train_loss_difference": round(max(abs(a - b) for a, b in pairs), 6) if pairs else None,
            "graph": graphed, "eager": eager}), flush=True)


if __name__ == "__main__":
    main()
