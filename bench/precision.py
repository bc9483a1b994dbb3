"""bf16 autocast against fp32 for the same training tokens: speed ratio and validation loss.

Usage: python bench/precision.py [--steps 150] [--corpus data/tinyshakespeare.txt] [--device cpu|cuda]
                                 [--set key=value ...] [--speed-rounds 3] [--speed-steps 40]
Trains the default character model in this process, fp32 then bf16, for the same number of steps (same
seed, same batches), and prints one JSON line: median training tokens/s of each, their ratio, and the
validation loss of each after the same tokens. Since those two trainings run one after the other, the
machine's drift moves that ratio; so then, for --speed-rounds rounds, a shorter training of --speed-steps steps
in each precision, in turn, the order alternating, and `speedup_bf16_median_of_rounds` is the median of their
per-round ratios (0 rounds: skipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (  # noqa: E402
    absolute_path, alternating, log_every, machine_info, matmul_peak_gflops, median_tokens_per_s, require_at_least,
    scratch_dir,
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
    parser.add_argument("--speed-rounds", type=int, default=3, help="shorter trainings in turn, fp32 and bf16")
    parser.add_argument("--speed-steps", type=int, default=40, help="steps of each of those trainings")
    args = parser.parse_args()
    require_at_least(parser, args.speed_rounds, 0, "--speed-rounds", "0 skips the trainings in turn")
    # 4 steps log 4 times (bench/machine.py's log_every): 3 speeds after the warm-up one
    require_at_least(parser, args.speed_steps, 4, "--speed-steps", "each training needs speeds after its warm-up")

    def trained(precision: str, steps: int) -> tuple[float, object]:
        """(the median training tokens/s, the result) of one training of `steps` steps in `precision`."""
        records: list[dict] = []
        cfg = load_config(None, [*args.overrides, f"train.max_steps={steps}", f"train.precision={precision}",
                                 f"train.log_every={log_every(steps, 10)}", f"train.device={args.device}"])
        with scratch_dir() as tmp:
            result = train(cfg, Path(args.corpus), out=Path(tmp) / "run", on_event=records.append)
        return median_tokens_per_s(records), result

    results = {}
    for precision in ("fp32", "bf16"):
        speed, result = trained(precision, args.steps)
        results[precision] = {"median_tokens_per_s": round(speed), "valid_loss": round(result.best_valid.loss, 4),
                              "tokens": result.tokens_seen}
    fp32, bf16 = results["fp32"], results["bf16"]
    rounds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for precision, _ in alternating({"fp32": None, "bf16": None}, args.speed_rounds):
        rounds[precision].append(trained(precision, args.speed_steps)[0])
    interleaved = {}
    if args.speed_rounds > 0:
        interleaved = {
            "speed_rounds": args.speed_rounds, "speed_steps": args.speed_steps,
            "fp32_tokens_per_s_by_round": [round(t) for t in rounds["fp32"]],
            "bf16_tokens_per_s_by_round": [round(t) for t in rounds["bf16"]],
            "speedup_bf16_median_of_rounds": round(statistics.median(
                b / f for f, b in zip(rounds["fp32"], rounds["bf16"])), 2),
        }
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
        **interleaved,
    }))


if __name__ == "__main__":
    main()
