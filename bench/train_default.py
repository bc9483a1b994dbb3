"""How far `lmtool train data/tinyshakespeare.txt` (the built-in defaults) gets in a given wall time.

Usage: python bench/train_default.py [--max-time 10m] [--corpus data/tinyshakespeare.txt] [-- extra train args]
Runs the real command in a fresh directory and prints one JSON line: the machine, the command, every
validation (elapsed seconds, loss in nats/char), the best loss, when it first fell below 1.75, and the median
training tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", default="10m")
    parser.add_argument("--corpus", default=str(REPO / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--target", type=float, default=1.75, help="validation loss to reach (nats/token)")
    parser.add_argument("--keep", type=Path, help="keep the run directory here (default: a temporary one)")
    parser.add_argument("extra", nargs="*", help="more arguments for lmtool train (after --)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.keep.resolve() if args.keep else Path(tmp) / "run"
        command = [sys.executable, "-m", "lmtool", "train", str(Path(args.corpus).resolve()),
                   "--max-time", args.max_time, "--out", str(run), *args.extra]
        subprocess.run(command, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    valid = [(round(r["elapsed"], 1), round(r["loss"], 4)) for r in records if r["event"] == "valid"]
    speeds = [r["tokens_per_s"] for r in records if r["event"] == "train"][1:]  # the first interval warms up
    below = [t for t, loss in valid if loss < args.target]
    end = records[-1]
    print(json.dumps({
        **machine_info(),
        "lmtool_command": "lmtool train " + " ".join(command[4:]),
        "validations_s_loss": valid,
        "best_valid_loss": end["best_valid_loss"],
        f"first_below_{args.target}_s": below[0] if below else None,
        "median_train_tokens_per_s": round(statistics.median(speeds)) if speeds else None,
        "tokens_seen": end["tokens_seen"],
        "stop_reason": end["stop_reason"],
    }))


if __name__ == "__main__":
    main()
