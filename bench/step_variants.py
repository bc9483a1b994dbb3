"""lmtool's training step against the same step without one of its parts, interleaved: what each part costs.

Usage: python bench/step_variants.py [--variant unsliced|unguarded|small-slices|rescaled-exps|natural-exp|
                                     foreach-norm|frozen-embedding]
                                     [--workload ptb|wt2|word|char] [--precision fp32|bf16] [--rounds 22]
                                     [--keep-freed-memory]
Variants:
- unsliced: PyTorch's linear + cross-entropy instead of the sliced output layer. On a CPU `LanguageModel.nll`
  scores a large vocabulary a cache-sized slice at a time (lmtool/chunked_nll.py), where PyTorch writes the
  (B*T, V) scores to memory and moves matrices of that size several times more.
- unguarded: a plain optimiser step instead of the bad-step guard and gradient-norm clipping (which read
  every gradient once for the norm), i.e. what the bare loop does.
- small-slices: the output layer always in cache-sized slices, even where its scores are small enough
  (chunked_nll.WHOLE_BYTES) to be handled whole.
- rescaled-exps: the sliced output layer's backward pass rescaling each slice of kept exponentials in memory
  into g * (softmax - one-hot), as it does under bf16, instead of applying each row's factor to the small
  operands (lmtool/chunked_nll.py `folds_row_factors`; fp32 only, bf16 steps are the same either way).
- natural-exp: PyTorch's exp for the sliced output layer's exponentials instead of 2^(x log2 e)
  (lmtool/chunked_nll.py `exp_`).
- foreach-norm: PyTorch's multi-tensor norm (`torch.nn.utils.get_total_norm`) for the clipping norm instead of
  lmtool's dot products on the CPU (lmtool/step_guard.py `gradient_norm`).
- frozen-embedding: the embedding not trained (no gradient): the most a sparse embedding gradient could save,
  since a step then neither fills, clips nor updates the dense (V, E) gradient of the input embedding.
One step of each in turn on the same windows (the order alternating); prints the median of the per-pair time
ratios, variant / lmtool (> 1: lmtool's step is faster), with the size of the scores matrix, as one JSON line.
Workloads: PTB-small (10k words, batch 20 x 20), WikiText-2 at the PyTorch example's size (33,278 words,
20 x 35), the word defaults (2x256 LSTM, 30,000 words, batch 32 x 35) and the char 2x512 model; random tokens,
since only speed is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, require_at_least  # noqa: E402
from step_ab import WORKLOADS, add_step_options, lmtool_step, step_inputs  # noqa: E402

import torch  # noqa: E402

import lmtool.chunked_nll  # noqa: E402
import lmtool.model  # noqa: E402
import lmtool.step_guard  # noqa: E402
import step_ab  # noqa: E402

ALL_WORKLOADS = {**WORKLOADS,
                 "word": (30000, 256, 256, 32, 35, "word defaults 2x256 LSTM, 30,000 words, batch 32 x BPTT 35")}


def patched(step, module, name, value):
    """`step` with `module.name` set to `value` while it runs."""
    def run(x, y):
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            step(x, y)
        finally:
            setattr(module, name, saved)

    return run


def plain_update(optimizer, parameters, guard, step_loss, max_norm, step_number, on_device):
    """An optimiser step with no norm, no clipping and no bad-step check."""
    optimizer.step()
    return torch.zeros((), dtype=torch.bool)


VARIANTS = {
    # no vocabulary counts as worth slicing
    "unsliced": lambda step: patched(step, lmtool.model, "saves_traffic", lambda rows, vocab_size: False),
    "unguarded": lambda step: patched(step, step_ab, "guarded_update", plain_update),
    "small-slices": lambda step: patched(step, lmtool.chunked_nll, "WHOLE_BYTES", 0),
    "rescaled-exps": lambda step: patched(step, lmtool.chunked_nll, "folds_row_factors", lambda dtype: False),
    "natural-exp": lambda step: patched(step, lmtool.chunked_nll, "exp_", torch.Tensor.exp_),
    "foreach-norm": lambda step: patched(step, lmtool.step_guard, "gradient_norm", torch.nn.utils.get_total_norm),
    "frozen-embedding": lambda step: step,  # the change is to the model (MODEL_CHANGES)
}
# Variants that change the model itself, before its optimiser is made.
MODEL_CHANGES = {
    "frozen-embedding": lambda model: model.embedding.weight.requires_grad_(False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="unsliced", choices=sorted(VARIANTS))
    add_step_options(parser, ALL_WORKLOADS, workload="wt2", rounds=22, precision="fp32")
    args = parser.parse_args()
    require_at_least(parser, args.rounds, 3, "--rounds", "the first two pairs warm up and are not counted")
    (vocab, emb, hidden, batch, bptt, description), pairs, autocast = step_inputs(args, ALL_WORKLOADS)
    ours = lmtool_step(vocab, emb, hidden, batch, autocast)
    variant = VARIANTS[args.variant](lmtool_step(vocab, emb, hidden, batch, autocast,
                                                 prepare=MODEL_CHANGES.get(args.variant)))

    ratios, our_times, variant_times = [], [], []
    for i, (x, y) in enumerate(pairs):
        times = {}
        for step in (ours, variant) if i % 2 == 0 else (variant, ours):
            start = time.perf_counter()
            step(x, y)
            times[step] = time.perf_counter() - start
        if i >= 2:  # warm-up
            our_times.append(times[ours])
            variant_times.append(times[variant])
            ratios.append(times[variant] / times[ours])
    tokens = batch * bptt
    print(json.dumps({**machine_info(), "workload": description, "precision": args.precision,
                      "variant": args.variant, "keep_freed_memory": args.keep_freed_memory, "pairs": len(ratios),
                      "slices_output_layer": lmtool.model.saves_traffic(tokens, vocab),
                      "scores_matrix_mb": round(tokens * vocab * 4 / 2**20, 1),
                      "lmtool_tokens_per_s": round(tokens / statistics.median(our_times)),
                      "variant_tokens_per_s": round(tokens / statistics.median(variant_times)),
                      "variant_time_over_lmtool_median_of_pairs": round(statistics.median(ratios), 3),
                      "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}), flush=True)


if __name__ == "__main__":
    main()
