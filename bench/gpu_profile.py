"""Where a training step's time goes on a GPU: kernels launched and GPU busy time per step, lmtool against the
bare loop, so a gap in tokens/s can be told apart as GPU work or host (launch and Python) overhead.

Usage: python bench/gpu_profile.py [--data ../shared/data] [--only ptb-medium,char] [--precision fp32]
For each workload of bench/train_throughput.py: runs lmtool's trainer and the bare loop for 10 and for 40 steps
under torch.profiler, and divides the difference by 30: kernels per step, GPU kernel time per step (ms), and the
host's wall time per step (ms). A step whose wall time is well above its kernel time waits on the host.
Prints one JSON line per workload and loop, then the ten kernels that cost lmtool most per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import absolute_path, machine_info, require_cuda, scratch_dir  # noqa: E402
from train_throughput import WORKLOADS, bare_loop  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from lmtool.config import load_config  # noqa: E402
from lmtool.data import batchify, load_corpus  # noqa: E402
from lmtool.train import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def kernels(prof) -> dict[str, tuple[int, float]]:
    """Kernel name -> (launches, total device milliseconds)."""
    found: dict[str, tuple[int, float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            count, ms = found.get(event.name, (0, 0.0))
            found[event.name] = (count + 1, ms + event.device_time_total / 1000)
    return found


def profiled(run) -> tuple[dict[str, tuple[int, float]], float]:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    return kernels(prof), wall


def per_step(short, long, steps: int) -> dict:
    (k_short, wall_short), (k_long, wall_long) = short, long
    names = set(k_short) | set(k_long)
    launches = sum(k_long.get(n, (0, 0))[0] - k_short.get(n, (0, 0))[0] for n in names) / steps
    busy = sum(k_long.get(n, (0, 0.0))[1] - k_short.get(n, (0, 0.0))[1] for n in names) / steps
    return {"kernels_per_step": round(launches, 1), "gpu_ms_per_step": round(busy, 3),
            "wall_ms_per_step": round(1000 * (wall_long - wall_short) / steps, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=absolute_path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--only", default="ptb-medium,char")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    require_cuda()
    info = machine_info()
    for name in args.only.split(","):
        train_file, valid_file, overrides = WORKLOADS[name]
        valid = args.data / valid_file if valid_file else None

        def lmtool_run(steps: int):
            cfg = load_config(None, [*overrides, f"train.max_steps={steps}", "train.log_every=100000",
                                     f"train.precision={args.precision}", "train.optimizer=sgd", "train.lr=0.1",
                                     "train.eval_every=null", "train.checkpoint_every=null",
                                     "train.checkpoint_time=null", "train.device=cuda"])
            with scratch_dir() as tmp:
                return profiled(lambda: train(cfg, args.data / train_file, valid_path=valid, out=Path(tmp) / "r"))

        cfg = load_config(None, overrides)
        corpus = load_corpus(args.data / train_file, valid, None, cfg.data.level, 1, None, False, "<unk>", 0.05)
        streams = batchify(corpus.train, cfg.data.batch_size)
        m = cfg.model

        def bare_run(steps: int):
            return profiled(lambda: bare_loop(streams, len(corpus.tokenizer), m.embedding_size, m.hidden_size,
                                              m.num_layers, cfg.data.bptt, steps, args.precision == "bf16", "cuda",
                                              cfg.train.log_every))

        lmtool_run(5)  # warm up cuDNN and the allocator
        ours = (lmtool_run(10), lmtool_run(40))
        bare = (bare_run(10), bare_run(40))
        for loop, pair in (("lmtool", ours), ("bare", bare)):
            print(json.dumps({**info, "workload": name, "precision": args.precision, "loop": loop,
                              **per_step(*pair, steps=30)}), flush=True)
        (k_short, _), (k_long, _) = ours
        costs = sorted(((k_long[n][1] - k_short.get(n, (0, 0.0))[1]) / 30, (k_long[n][0] - k_short.get(n, (0, 0))[0]) / 30, n)
                       for n in k_long)
        for ms, count, kernel in reversed(costs[-10:]):
            print(f"  {ms:8.3f} ms/step  {count:5.1f} launches/step  {kernel[:110]}")


if __name__ == "__main__":
    main()
