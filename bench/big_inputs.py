"""Tokenising speed and peak memory on big corpora (issue: big inputs stay within a stated memory bound).

Usage: python bench/big_inputs.py [--mb 100] [--train-mb 200] [--source data/tinyshakespeare.txt]
Builds corpora of the given sizes by repeating the source text in a temporary directory, then, each in a
fresh process, measures: load_corpus (read + vocabulary + encode) at char and word level (MB/s and peak
RSS); `lmtool train BIG --max-steps 3` (peak RSS); `lmtool evaluate-perplexity` of a small and a 10x larger
file with the same model (peak RSS must not grow with the file). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

LOAD = """
import resource, sys, time, json
from pathlib import Path
from lmtool.data import load_corpus
path, level = Path(sys.argv[1]), sys.argv[2]
baseline = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
start = time.perf_counter()
corpus = load_corpus(path, None, None, level, 1, None, False, "<unk>", 0.05)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tokens": corpus.train.numel() + corpus.valid.numel(),
                  "dtype": str(corpus.train.dtype), "vocab": len(corpus.tokenizer),
                  "baseline_rss_mb": baseline,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_corpus(source: Path, target: Path, megabytes: float) -> int:
    text = source.read_bytes()
    size = int(megabytes * 1e6)
    with open(target, "wb") as out:
        written = 0
        while written < size:
            out.write(text)
            written += len(text)
    return target.stat().st_size


def peak_of(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """Peak RSS (MB) and wall seconds of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the maximum over all of them: run the smallest measurements first.
    return max(peak, before) / 1024, seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100, help="size of the tokenising corpus")
    parser.add_argument("--train-mb", type=float, default=200, help="size of the training corpus")
    parser.add_argument("--source", type=Path, default=REPO / "data" / "tinyshakespeare.txt")
    args = parser.parse_args()
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # evaluate-perplexity first (smallest processes), so the children's maximum RSS is attributable
        small, large = tmp / "small.txt", tmp / "large.txt"
        make_corpus(args.source, small, 1)
        make_corpus(args.source, large, 10)
        subprocess.run([sys.executable, "-m", "lmtool", "train", str(args.source), "--config",
                        str(REPO / "configs" / "tiny.yaml"), "--max-steps", "3", "--out", str(tmp / "tiny")],
                       cwd=tmp, check=True, capture_output=True)
        for path in (small, large):
            peak, seconds, _ = peak_of([sys.executable, "-m", "lmtool", "evaluate-perplexity", str(path), "--model",
                                        str(tmp / "tiny"), "--batch-size", "64", "--json"], tmp)
            print(json.dumps({**info, "measure": "evaluate-perplexity peak memory", "file_mb": path.stat().st_size / 1e6,
                              "peak_rss_mb": round(peak), "seconds": round(seconds, 1)}), flush=True)
        corpus = tmp / "corpus.txt"
        size = make_corpus(args.source, corpus, args.mb)
        for level in ("char", "word"):
            _, _, out = peak_of([sys.executable, "-c", LOAD, str(corpus), level], tmp)
            result = json.loads(out)
            print(json.dumps({**info, "measure": f"load_corpus {level} level", "file_mb": round(size / 1e6, 1),
                              "mb_per_s": round(size / 1e6 / result["seconds"], 1),
                              "peak_rss_mb": round(result["peak_rss_mb"]),
                              "rss_before_loading_mb": round(result["baseline_rss_mb"]),
                              "added_over_file_size": round(
                                  (result["peak_rss_mb"] - result["baseline_rss_mb"]) * 1024 * 1024 / size, 2),
                              "tokens": result["tokens"], "id_dtype": result["dtype"],
                              "vocab": result["vocab"]}), flush=True)
        corpus.unlink()
        big = tmp / "big.txt"
        size = make_corpus(args.source, big, args.train_mb)
        # A tiny validation split: this measures memory, and scoring 5% of 200 MB would take minutes.
        peak, seconds, _ = peak_of([sys.executable, "-m", "lmtool", "train", str(big), "--max-steps", "3",
                                    "--set", "data.valid_fraction=0.0005", "--out", str(tmp / "big-run")], tmp)
        print(json.dumps({**info, "measure": "lmtool train BIG --max-steps 3 --set data.valid_fraction=0.0005: peak memory", "file_mb": round(size / 1e6, 1),
                          "peak_rss_mb": round(peak), "peak_over_file_size": round(peak * 1024 * 1024 / size, 2),
                          "seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
