"""What keeping freed host memory (lmtool/host_memory.py, used by CPU training) does to a training step.

Usage: python bench/host_memory.py [--workload char|ptb|wt2] [--precision fp32|bf16] [--pairs 3] [--steps 8]
glibc's thresholds cannot be set back once changed, so each measurement is a fresh process: it runs lmtool's
step and the bare loop's step (bench/step_ab.py) for --steps steps after 3 of warm-up, with or without
keep_freed_memory(), and reports the median ms per step and the page faults per step of each. The two
settings alternate --pairs times (with first, then without, then with...), so both see the machine's drift.
Prints one JSON line per workload: the medians of each setting and the ratio without / with.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402
from step_ab import WORKLOADS  # noqa: E402

ONE_RUN = """
import json, resource, statistics, sys, time
sys.path.insert(0, {bench!r})
import torch
from lmtool.host_memory import keep_freed_memory
from step_ab import WORKLOADS, bare_step, lmtool_step
from lmtool.data import windows
vocab, emb, hidden, batch, bptt, _ = WORKLOADS[{workload!r}]
kept = keep_freed_memory() if {keep!r} else False
autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled={bf16!r})
data = torch.randint(0, vocab, (batch, bptt * ({steps} + 3) + 1), dtype=torch.int32)
result = {{"kept": kept}}
for name, step in (("lmtool", lmtool_step(vocab, emb, hidden, batch, autocast)), ("bare", bare_step(vocab, emb, hidden, autocast))):
    times = []
    for i, (x, y) in enumerate(windows(data, bptt)):
        if i == 3:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
    result[name] = {{"ms": 1000 * statistics.median(times[3:]),
                    "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / {steps}}}
print(json.dumps(result))
"""


def measure(workload: str, keep: bool, bf16: bool, steps: int) -> dict:
    code = ONE_RUN.format(bench=str(Path(__file__).resolve().parent), workload=workload, keep=keep, bf16=bf16,
                          steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="char", choices=sorted(WORKLOADS))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    runs = {True: [], False: []}
    for i in range(args.pairs):
        for keep in (True, False) if i % 2 == 0 else (False, True):
            runs[keep].append(measure(args.workload, keep, args.precision == "bf16", args.steps))
    summary = {}
    for keep, setting in ((False, "default_malloc"), (True, "kept_memory")):
        summary[setting] = {name: {"ms_per_step": round(statistics.median(r[name]["ms"] for r in runs[keep]), 1),
                                   "faults_per_step": round(statistics.median(r[name]["faults"] for r in runs[keep]))}
                            for name in ("lmtool", "bare")}
    summary["kept_effective"] = all(r["kept"] for r in runs[True])
    summary["speedup"] = {name: round(summary["default_malloc"][name]["ms_per_step"]
                                      / summary["kept_memory"][name]["ms_per_step"], 3) for name in ("lmtool", "bare")}
    print(json.dumps({**machine_info(), "workload": WORKLOADS[args.workload][-1], "precision": args.precision,
                      "pairs": args.pairs, "steps": args.steps, **summary}), flush=True)


if __name__ == "__main__":
    main()
