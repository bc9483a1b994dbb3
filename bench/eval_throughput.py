"""Evaluation and scoring speed against training speed for the same model.

Usage: python bench/eval_throughput.py [--train-steps 20] [--sentences 10000] [--batch-size 64] [--level char|word]
                                      [--rounds 3]
Trains the default character model (with --level word, the default word model) on tinyshakespeare for a few
steps (its tokens/s is the reference; then the same steps in fp32 for a second reference), then, with that
model: `evaluate-perplexity` of the corpus's first 200,000 characters (batch 1, on the first 20,000 at word
level, and --batch-size), and `score` of 10,000 lines of it in padded batches. For the fp32 evaluation its
model FLOP/s (2 x multiply-adds per token, forward only) is also given against the fp32 matrix-multiply
peak measured around it. Then the same evaluations and scores with `--precision bf16`, with how far their
perplexities and log-probabilities moved. Training and the --batch-size evaluations (fp32 and bf16) run in
turn --rounds times, the order alternating, so that the evaluate/train ratios are medians of per-round ratios
on a machine whose speed drifts; their tokens/s are medians too. Scoring and the --batch-size evaluation then
run in turn --rounds times in each precision, so score/evaluate is a median of per-round ratios too; and the
batch-1 and --batch-size evaluations with the output layer packed once (the default where lmtool packs it) and
without, in turn, and a one-sentence `score` call both ways; and the batch-1 evaluation in the default window
(512 tokens on a CPU) against the model's own window, in turn; and the --batch-size evaluation with the sliced
output layer's exponentials as powers of two (lmtool.chunked_nll.exp_) and with PyTorch's exp, in turn. Prints
one JSON line with the tokens/s of each and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (  # noqa: E402
    alternating, log_every, machine_info, matmul_peak_gflops, median_tokens_per_s, scratch_dir,
)
from train_throughput import multiply_adds_per_token  # noqa: E402

import torch  # noqa: E402

import lmtool  # noqa: E402
import lmtool.chunked_nll  # noqa: E402
import lmtool.model as model_module  # noqa: E402
from lmtool.api import FileEvaluation, Model  # noqa: E402
from lmtool.evaluate import evaluation_window  # noqa: E402
from lmtool.config import load_config  # noqa: E402
from lmtool.train import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--sentences", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="training and evaluation in turn, this many times")
    parser.add_argument("--level", default="char", choices=["char", "word"],
                        help="word: the word defaults (a 2x256 LSTM over up to 30,000 words, full softmax)")
    args = parser.parse_args()
    level = [f"data.level={args.level}"]
    corpus = REPO / "data" / "tinyshakespeare.txt"
    with scratch_dir() as tmp:
        tmp = Path(tmp)
        logs = f"train.log_every={log_every(args.train_steps, 5)}"
        cfg = load_config(None, [f"train.max_steps={args.train_steps}", logs, *level])
        sample = tmp / "eval.txt"
        sample.write_text(corpus.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
        runs: dict[str, list[float]] = {"train": [], "fp32": [], "bf16": []}
        records: list[dict] = []

        def train_round(r: int) -> None:
            records.clear()
            train(cfg, corpus, out=tmp / f"run{r}", on_event=records.append)
            runs["train"].append(median_tokens_per_s(records))

        def evaluate_round(r: int) -> None:
            lm = lmtool.load_model(tmp / "run0")
            runs["fp32"].append(lm.perplexity(sample, batch_size=args.batch_size).tokens_per_s)
            runs["bf16"].append(lm.perplexity(sample, batch_size=args.batch_size, precision="bf16").tokens_per_s)

        for r in range(args.rounds):
            for part in ((train_round, evaluate_round) if r % 2 == 0 else (evaluate_round, train_round)):
                part(r)
        train_tps = statistics.median(runs["train"])
        over_train = {p: [e / t for e, t in zip(runs[p], runs["train"])] for p in ("fp32", "bf16")}
        fp32_records = []
        fp32_cfg = load_config(None, [f"train.max_steps={args.train_steps}", logs, "train.precision=fp32", *level])
        train(fp32_cfg, corpus, out=tmp / "fp32", on_event=fp32_records.append)
        fp32_train_tps = median_tokens_per_s(fp32_records)
        lm = lmtool.load_model(tmp / "run0")
        # One exact stream reads one token at a time; over 30,000 words that takes minutes for 200,000 characters.
        stream = sample if args.level == "char" else tmp / "eval-start.txt"
        if args.level == "word":
            stream.write_text(corpus.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
        eval_1 = lm.perplexity(stream, batch_size=1)
        eval_1_bf16 = lm.perplexity(stream, batch_size=1, precision="bf16")
        peak = matmul_peak_gflops(torch.float32)
        eval_b = lm.perplexity(sample, batch_size=args.batch_size)
        eval_b_bf16 = lm.perplexity(sample, batch_size=args.batch_size, precision="bf16")
        peak = max(peak, matmul_peak_gflops(torch.float32))
        m = cfg.model
        forward_flops = 2 * multiply_adds_per_token(m.embedding_size, m.hidden_size, m.num_layers, records[0]["vocab_size"])
        lines = [l for l in corpus.read_text(encoding="utf-8").split("\n") if l][: args.sentences]
        # Scoring against evaluation in the same precision, the two in turn --rounds times (the order alternating):
        # bf16's speed on this kind of VM moves by 2x within minutes, so only ratios taken side by side hold.
        scored: dict[str, list] = {}
        score_runs: dict[str, list[float]] = {"fp32": [], "bf16": []}
        score_ratios: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for r in range(args.rounds):
            for precision in ("fp32", "bf16"):
                times = {}
                for part in (("evaluate", "score") if r % 2 == 0 else ("score", "evaluate")):
                    if part == "evaluate":
                        times[part] = lm.perplexity(sample, batch_size=args.batch_size, precision=precision).tokens_per_s
                    else:
                        start = time.perf_counter()
                        scored[precision] = lm.score(lines, batch_size=args.batch_size, precision=precision)
                        tokens = sum(s.num_tokens for s in scored[precision])
                        times[part] = tokens / (time.perf_counter() - start)
                score_runs[precision].append(times["score"])
                score_ratios[precision].append(times["score"] / times["evaluate"])
        packing = {f"batch{size}": packed_over_unpacked(lm, text, size, args.rounds)
                   for size, text in ((1, stream), (args.batch_size, sample))}
        sentence = next((l for l in lines if len(l.split()) >= 8), lines[0])  # a line of eight words or more
        packing["score_one_sentence_ms"] = one_sentence_packed_and_not(lm, sentence, args.rounds)
        exponentials = exp2_over_exp(lm, sample, args.batch_size, args.rounds)
        window = default_window_over_model_window(lm, stream, args.rounds)
        score_tps, score_bf16_tps = statistics.median(score_runs["fp32"]), statistics.median(score_runs["bf16"])
        score_bf16_gap = max(abs(a.logprob - b.logprob) / abs(a.logprob) for a, b in zip(scored["fp32"], scored["bf16"]))

    def relative(a: float, b: float) -> float:
        return round(100 * (b - a) / a, 5)
    # the batch evaluations' speed: the medians of the rounds (the single pass above gives the perplexities)
    eval_tps, eval_bf16_tps = statistics.median(runs["fp32"]), statistics.median(runs["bf16"])
    print(json.dumps({
        **machine_info(),
        "level": args.level, "vocab_size": records[0]["vocab_size"],
        "train_tokens_per_s": round(train_tps), "train_precision": records[0]["precision"],
        "evaluate_batch1_tokens_per_s": round(eval_1.tokens_per_s),
        f"evaluate_batch{args.batch_size}_tokens_per_s": round(eval_tps),
        "score_tokens_per_s": round(score_tps), "sentences": len(lines),
        "rounds": args.rounds, "train_tokens_per_s_rounds": [round(t) for t in runs["train"]],
        f"evaluate_batch{args.batch_size}_tokens_per_s_rounds": [round(t) for t in runs["fp32"]],
        "evaluate_over_train": round(statistics.median(over_train["fp32"]), 2),
        "evaluate_over_train_range": [round(min(over_train["fp32"]), 2), round(max(over_train["fp32"]), 2)],
        "fp32_train_tokens_per_s": round(fp32_train_tps),
        "evaluate_over_fp32_train": round(eval_tps / fp32_train_tps, 2),
        "evaluate_gflop_per_s": round(eval_tps * forward_flops / 1e9, 1),
        "fp32_peak_gflop_per_s": round(peak, 1),
        "evaluate_utilisation": round(eval_tps * forward_flops / 1e9 / peak, 3),
        "score_over_evaluate": round(statistics.median(score_ratios["fp32"]), 2),
        "score_over_evaluate_rounds": [round(x, 2) for x in score_ratios["fp32"]],
        "packed_output_layer": packing,
        "batch1_window": window,
        "sliced_exponentials": exponentials,
        "batch64_over_batch1": round(eval_tps / eval_1.tokens_per_s, 2),
        "perplexity_batch1": round(eval_1.score.perplexity, 6),
        f"perplexity_batch{args.batch_size}": round(eval_b.score.perplexity, 6),
        "bf16": {
            "evaluate_batch1_tokens_per_s": round(eval_1_bf16.tokens_per_s),
            f"evaluate_batch{args.batch_size}_tokens_per_s": round(eval_bf16_tps),
            f"evaluate_batch{args.batch_size}_tokens_per_s_rounds": [round(t) for t in runs["bf16"]],
            "evaluate_over_train": round(statistics.median(over_train["bf16"]), 2),
            "evaluate_over_train_range": [round(min(over_train["bf16"]), 2), round(max(over_train["bf16"]), 2)],
            "evaluate_over_fp32_evaluate": round(eval_bf16_tps / eval_tps, 2),
            "perplexity_batch1": round(eval_1_bf16.score.perplexity, 6),
            f"perplexity_batch{args.batch_size}": round(eval_b_bf16.score.perplexity, 6),
            "perplexity_change_pct_batch1": relative(eval_1.score.perplexity, eval_1_bf16.score.perplexity),
            f"perplexity_change_pct_batch{args.batch_size}": relative(eval_b.score.perplexity,
                                                                     eval_b_bf16.score.perplexity),
            "score_tokens_per_s": round(score_bf16_tps),
            "score_over_evaluate": round(statistics.median(score_ratios["bf16"]), 2),
            "score_over_evaluate_rounds": [round(x, 2) for x in score_ratios["bf16"]],
            "score_largest_logprob_change_pct": round(100 * score_bf16_gap, 5),
        },
    }))


def both_ways(run: Callable[[bool, str], FileEvaluation], rounds: int, on: str, off: str, ratio: str) -> dict:
    """run(True, precision) against run(False, precision), in turn `rounds` times per precision, the order
    alternating: the medians of their tokens/s (`{on}_tokens_per_s`, `{off}_tokens_per_s`), the median of the
    per-round ratios (`ratio`, and its rounds), and how far the perplexity moved from off to on."""
    result = {}
    for precision in ("fp32", "bf16"):
        runs: dict[bool, list[FileEvaluation]] = {True: [], False: []}
        for setting, _ in alternating({True: None, False: None}, rounds):
            runs[setting].append(run(setting, precision))
        ratios = [a.tokens_per_s / b.tokens_per_s for a, b in zip(runs[True], runs[False])]
        ppl = {setting: runs[setting][0].score.perplexity for setting in runs}
        result[precision] = {
            f"{on}_tokens_per_s": round(statistics.median(e.tokens_per_s for e in runs[True])),
            f"{off}_tokens_per_s": round(statistics.median(e.tokens_per_s for e in runs[False])),
            ratio: round(statistics.median(ratios), 3),
            f"{ratio}_rounds": [round(x, 3) for x in ratios],
            "perplexity_change_pct": round(100 * (ppl[True] - ppl[False]) / ppl[False], 6),
        }
    return result


def with_setting_and_without(lm: Model, sample: Path, batch_size: int, rounds: int, module, name: str,
                             on_value, off_value, on: str, off: str) -> dict:
    """An evaluation of `sample` with `module.name` set to `on_value` (lmtool's default) against `off_value`, by
    `both_ways`; the ratio is named `{on}_over_{off}`. Where the setting does not apply (a model that does not
    pack, a character vocabulary that is not sliced), both sides run the same code."""
    def evaluate(setting: bool, precision: str) -> FileEvaluation:
        with mock.patch.object(module, name, on_value if setting else off_value):
            return lm.perplexity(sample, batch_size=batch_size, precision=precision)

    return both_ways(evaluate, rounds, on, off, f"{on}_over_{off}")


def packed_over_unpacked(lm: Model, sample: Path, batch_size: int, rounds: int) -> dict:
    """The output layer packed once (lmtool.model.PACKED_SCORING, the default) against not packed."""
    return with_setting_and_without(lm, sample, batch_size, rounds, model_module, "PACKED_SCORING", True, False,
                                    "packed", "unpacked")


def exp2_over_exp(lm: Model, sample: Path, batch_size: int, rounds: int) -> dict:
    """The sliced output layer's exponentials computed as powers of two (lmtool.chunked_nll.exp_, the default)
    against PyTorch's exp."""
    return with_setting_and_without(lm, sample, batch_size, rounds, lmtool.chunked_nll, "exp_",
                                    lmtool.chunked_nll.exp_, torch.Tensor.exp_, "exp2", "exp")


def default_window_over_model_window(lm: Model, stream: Path, rounds: int) -> dict:
    """The batch-1 evaluation in the default window (lmtool.evaluate.evaluation_window: 512 tokens on a CPU) against
    the model's own training window (`bptt`), by `both_ways`."""
    bptt = lm.config.data.bptt
    return {"default_window": evaluation_window(bptt, 1, lm.device), "model_window": bptt,
            **both_ways(lambda default, precision: lm.perplexity(stream, batch_size=1, bptt=None if default else bptt,
                                                                 precision=precision),
                        rounds, "default", "model_window", "default_over_model_window")}


def one_sentence_packed_and_not(lm: Model, line: str, rounds: int, calls: int = 10) -> dict:
    """Milliseconds per `score` call of one sentence, with PACKED_SCORING on (where lmtool packs one batch: in
    fp32 where MKL runs on an AMD processor, not in bf16) and off, in turn: the median of `rounds` x 2 rounds of
    `calls` calls each."""
    result = {}
    for precision in ("fp32", "bf16"):
        runs: dict[bool, list[float]] = {True: [], False: []}
        for packed, _ in alternating({True: None, False: None}, 2 * rounds):
            with mock.patch.object(model_module, "PACKED_SCORING", packed):
                start = time.perf_counter()
                for _ in range(calls):
                    lm.score(line, precision=precision)
                runs[packed].append(1000 * (time.perf_counter() - start) / calls)
        result[precision] = {"on": round(statistics.median(runs[True]), 2),
                             "off": round(statistics.median(runs[False]), 2)}
    return result


if __name__ == "__main__":
    main()
