"""bf16 autocast against fp32 for the same training tokens: speed ratio and validation loss.

Usage: python bench/precision.py [--steps 150] [--corpus data/tinyshakespeare.txt] [--device cpu|cuda]
                                 [--set key=value ...]
Trains the default character model twice in this process, fp32 then bf16, for the same number of steps
(same seed, same batches), and prints one JSON line: median training tokens/s of each, their ratio, and
the validation loss of each after the same tokens.
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

import torch  # noqa: E402

from lmtool.config import load_config  # noqa: E402
from lmtool.train import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--corpus", type=absolute_path, default=REPO / "data" / "tinyshakespeare.txt")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    results = {}
    for precision in ("fp32", "bf16"):
        records = []
        cfg = load_config(None, [*args.overrides, f"train.max_steps={args.steps}", f"train.precision={precision}",
                                 f"train.log_every={log_every(args.steps, 10)}", f"train.device={args.device}"])
        with scratch_dir() as tmp:
            result = train(cfg, Path(args.corpus), out=Path(tmp) / "run", on_event=records.append)
        results[precision] = {"median_tokens_per_s": round(median_tokens_per_s(records)),
                              "valid_loss": round(result.best_valid.loss, 4), "tokens": result.tokens_seen}
    fp32, bf16 = results["fp32"], results["bf16"]
    print(json.dumps({
        **machine_info(),
        "device": args.device,
        "peak_gflops_fp32": round(matmul_peak_gflops(torch.float32, args.device)),
        "peak_gflops_bf16": round(matmul_peak_gflops(torch.bfloat16, args.device)),
        "steps": args.steps,
        "fp32": fp32,
        "bf16": bf16,
        "speedup_bf16": round(bf16["median_tokens_per_s"] / fp32["median_tokens_per_s"], 2),
        "valid_loss_difference_pct": round(100 * (bf16["valid_loss"] - fp32["valid_loss"]) / fp32["valid_loss"], 2),
    }))


if __name__ == "__main__":
    main()
