"""What lmtool's training loop adds around its step: time inside the step against time in the whole loop.

Usage: python bench/trainer_overhead.py [--workload ptb|char|wt2] [--steps 60] [--data ../shared/data]
Trains one reference workload of bench/train_throughput.py in fp32 for --steps steps and times, with
perf_counter, every call of the trainer's step (`_Trainer._train_step`: forward, backward, clipping, the guard,
the optimiser) and the training loop that calls it (`_Trainer._train_windows`: windows, counters, the clock,
logging every 5 steps, signal and checkpoint checks). The difference is the loop's own cost; validation and
start-up lie outside both. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import absolute_path, machine_info, scratch_dir  # noqa: E402
from train_throughput import REPO, WORKLOADS  # noqa: E402

import lmtool.train as trainer  # noqa: E402
from lmtool.config import load_config  # noqa: E402


def timed(method, totals: dict, key: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="ptb", choices=["char", "ptb", "wt2"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--data", type=absolute_path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    train_file, valid_file, overrides = WORKLOADS[args.workload]
    cfg = load_config(None, [*overrides, f"train.max_steps={args.steps}", "train.log_every=5", "train.precision=fp32",
                             "train.optimizer=sgd", "train.lr=0.1", "train.checkpoint_every=null",
                             "train.checkpoint_time=null", "train.device=cpu"])
    totals = {"step": 0.0, "loop": 0.0}
    trainer._Trainer._train_step = timed(trainer._Trainer._train_step, totals, "step")
    trainer._Trainer._train_windows = timed(trainer._Trainer._train_windows, totals, "loop")
    with scratch_dir() as tmp:
        trainer.train(cfg, args.data / train_file, valid_path=args.data / valid_file if valid_file else None,
                      out=Path(tmp) / "run")
    print(json.dumps({
        **machine_info(), "workload": args.workload, "steps": args.steps,
        "seconds_in_steps": round(totals["step"], 3), "seconds_in_loop": round(totals["loop"], 3),
        "loop_overhead_ms_per_step": round((totals["loop"] - totals["step"]) * 1000 / args.steps, 3),
        "loop_overhead_fraction": round((totals["loop"] - totals["step"]) / totals["loop"], 4),
    }), flush=True)


if __name__ == "__main__":
    main()
