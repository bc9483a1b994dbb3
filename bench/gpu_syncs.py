"""Host synchronisations per training step on CUDA, counted by PyTorch's own sync detector.

Usage: python bench/gpu_syncs.py [--data ../shared/data]
Trains the PTB-small model through `lmtool.train` for 20 and then 60 steps with logging, validation and
checkpoints out of the way, counting the warnings `torch.cuda.set_sync_debug_mode("warn")` raises for every
operation that waits for the GPU. The difference over the 40 extra steps, divided by 40, is the number of
host syncs in one step of the hot loop (the target is 0). Prints one JSON line per precision.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import absolute_path, machine_info, require_cuda, scratch_dir  # noqa: E402

import torch  # noqa: E402

from lmtool.config import load_config  # noqa: E402
from lmtool.train import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def syncs_during(steps: int, precision: str, data: Path) -> int:
    cfg = load_config(None, ["data.level=word", "data.batch_size=20", "data.bptt=20", "model.hidden_size=200",
                             "model.embedding_size=200", "model.num_layers=2", f"train.max_steps={steps}",
                             "train.log_every=100000", "train.eval_every=null", "train.checkpoint_every=null",
                             "train.checkpoint_time=null", f"train.precision={precision}", "train.device=cuda"])
    with scratch_dir() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(cfg, data / "ptb" / "train.txt", valid_path=data / "ptb" / "valid.txt", out=Path(tmp) / "run")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=absolute_path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    require_cuda()
    info = machine_info()
    for precision in ("fp32", "bf16"):
        short, long = syncs_during(20, precision, args.data), syncs_during(60, precision, args.data)
        print(json.dumps({**info, "check": "host syncs per training step", "precision": precision,
                          "syncs_in_20_step_run": short, "syncs_in_60_step_run": long,
                          "syncs_per_step": round((long - short) / 40, 3)}), flush=True)


if __name__ == "__main__":
    main()
