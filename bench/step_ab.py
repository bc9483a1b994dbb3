"""lmtool's training step against the bare loop's, interleaved step by step: a fairer "never slower" check.

Usage: python bench/step_ab.py [--rounds 12] [--precision bf16|fp32] [--workload char|ptb|wt2] [--keep-freed-memory]
On a shared machine whose speed drifts by tens of percent within a minute, timing two loops one after the
other mostly measures the drift. Here one step of each runs in turn, on the same windows, so both see the
same moments; the figure is the median of the per-pair time ratios. lmtool's step is the trainer's hot path:
`LanguageModel(x, state, targets=y)` (the one loss), mean, backward, gradient-norm clipping, the bad-step
guard decided on the device, the fused optimiser step that skips a bad step, and the running loss. The bare step: nn.Embedding -> nn.LSTM -> nn.Linear ->
cross-entropy, SGD. Workloads (no dropout; random tokens, since only speed is measured): the char 2x512 LSTM at
batch 64 x BPTT 128, Zaremba-small on PTB's 10k words (2x200, batch 20 x BPTT 20), 2x200 on WikiText-2's 33,278
words (batch 20 x BPTT 35). After each pair, one 2048x2048 matrix product in the precision used probes the
machine's matrix-multiply peak at that moment, so utilisation (model FLOP/s / peak, 6 x multiply-adds per
token) is also a median of per-pair figures, robust to the drift. One JSON line.
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
from train_throughput import multiply_adds_per_token  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lmtool.config import ModelConfig  # noqa: E402
from lmtool.config import TrainConfig  # noqa: E402
from lmtool.data import windows  # noqa: E402
from lmtool.graphed_step import Capture, GraphedStep  # noqa: E402
from lmtool.host_memory import keep_freed_memory  # noqa: E402
from lmtool.model import LanguageModel, detach_state, map_state  # noqa: E402
from lmtool.step_guard import StepGuard, guarded_update  # noqa: E402
from lmtool.train import OPTIMIZERS  # noqa: E402

# name -> (vocabulary, embedding, hidden, batch, bptt, description)
WORKLOADS = {
    "char": (66, 128, 512, 64, 128, "char 2x512 LSTM, batch 64 x BPTT 128"),
    "ptb": (10000, 200, 200, 20, 20, "PTB-small 2x200 LSTM, 10k words, batch 20 x BPTT 20"),
    "wt2": (33278, 200, 200, 20, 35, "WikiText-2 2x200 LSTM, 33,278 words, batch 20 x BPTT 35"),
}


def lmtool_step(vocab: int, emb: int, hidden: int, batch: int, autocast: dict, device: str = "cpu",
                capture: Capture | None = None, prepare=None):
    """The trainer's hot path for a 2-layer LSTM without dropout (`_Trainer._train_step`: one loss, backward,
    clipping, the bad-step guard, the fused optimiser, the running sums, a zeroed state after a bad step), as a
    function of one (x, y) window that returns the step's loss (a device tensor, overwritten by the next step).
    With `capture` (lmtool.graphed_step.capture_cuda_graph) the step runs through the trainer's GraphedStep:
    WARMUP_STEPS eager steps, then one captured CUDA graph replayed on every full-width window. `prepare`, if
    given, is called with the model before its optimiser is made (bench/step_variants.py changes it there)."""
    torch.manual_seed(0)
    config = ModelConfig(embedding_size=emb, hidden_size=hidden, dropout=0.0, tie_weights=False)
    model = LanguageModel(config, vocab).to(device)
    if prepare is not None:
        prepare(model)
    params = list(model.parameters())
    opt = OPTIMIZERS["sgd"](params, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0), True)
    guard = StepGuard(torch.device(device), blowup_factor=5.0, max_bad_steps=5)
    running_nll = torch.zeros((), device=device)
    running_tokens = torch.zeros((), dtype=torch.int64, device=device)
    last_loss = torch.zeros((), device=device)

    def body(x, y, state, number):
        with torch.autocast(**autocast):
            nll, next_state = model(x, state, targets=y)
        loss = nll.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        step_loss = nll.detach().mean()
        bad = guarded_update(opt, params, guard, step_loss, 5.0, number, on_device=True)
        running_nll.add_(torch.where(bad, 0.0, nll.detach().sum()))
        running_tokens.add_((~bad) * y.numel())
        last_loss.copy_(step_loss)
        return map_state(lambda t: t.masked_fill(bad, 0.0), detach_state(next_state))

    state = model.init_state(batch)
    number = 0
    graphed: GraphedStep | None = None

    def step(x, y):
        nonlocal state, number, graphed
        number += 1
        if capture is None:
            state = body(x, y, state, number)
        else:
            graphed = graphed or GraphedStep(body, x.size(-1), capture)
            state = graphed(x, y, state, number, 0.1)
        return last_loss

    return step


def bare_step(vocab: int, emb: int, hidden: int, autocast: dict, device: str = "cpu", bf16_lstm: bool = False):
    """The bare loop's step (nn.Embedding -> 2-layer nn.LSTM -> nn.Linear -> cross-entropy, SGD) as a function of
    one (x, y) window that returns the loss. `bf16_lstm` runs the LSTM in bfloat16 as autocast would if it chose
    bf16 for cuDNN's recurrent layers: the weights are cast inside the graph, so the fp32 master weights get the
    gradients, and the state is carried in bf16."""
    torch.manual_seed(0)
    embedding, lstm, out = nn.Embedding(vocab, emb), nn.LSTM(emb, hidden, 2, batch_first=True), nn.Linear(hidden, vocab)
    embedding, lstm, out = embedding.to(device), lstm.to(device), out.to(device)
    opt = torch.optim.SGD([*embedding.parameters(), *lstm.parameters(), *out.parameters()], lr=0.1)
    state = [None]

    def recurrence(inputs):
        if not bf16_lstm:
            return lstm(inputs, state[0])
        weights = [w.to(torch.bfloat16) for w in lstm._flat_weights]
        carried = state[0] or tuple(inputs.new_zeros(2, inputs.size(0), hidden, dtype=torch.bfloat16) for _ in "hc")
        with torch.autocast(inputs.device.type, enabled=False):
            output, h, c = torch._VF.lstm(inputs.to(torch.bfloat16), carried, weights, True, 2, 0.0, True, False, True)
        return output, (h, c)

    def step(x, y):
        with torch.autocast(**autocast):
            h, next_state = recurrence(embedding(x.long()))
            logits = out(h)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.long().flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        state[0] = tuple(s.detach() for s in next_state)
        return loss.detach()

    return step


def add_step_options(parser: argparse.ArgumentParser, workloads: dict, workload: str, rounds: int, precision: str):
    """The options every interleaved step bench takes: --rounds, --precision, --workload, --keep-freed-memory."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--precision", default=precision, choices=["bf16", "fp32"])
    parser.add_argument("--workload", default=workload, choices=sorted(workloads))
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="first set malloc to keep freed memory, as lmtool's CPU training does (both steps gain)")


def step_inputs(args: argparse.Namespace, workloads: dict) -> tuple[tuple, list, dict]:
    """(the workload's sizes, --rounds random (x, y) windows, the autocast settings), once --keep-freed-memory
    is applied."""
    if args.keep_freed_memory and not keep_freed_memory():
        sys.exit("this C library cannot keep freed memory (needs glibc's mallopt)")
    sizes = workloads[args.workload]
    vocab, _, _, batch, bptt, _ = sizes
    torch.manual_seed(0)
    data = torch.randint(0, vocab, (batch, bptt * args.rounds + 1), dtype=torch.int32)
    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    return sizes, list(windows(data, bptt)), autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_options(parser, WORKLOADS, workload="char", rounds=12, precision="bf16")
    args = parser.parse_args()
    require_at_least(parser, args.rounds, 3, "--rounds", "the first two pairs warm up and are not counted")
    (VOCAB, EMB, HIDDEN, BATCH, BPTT, description), pairs, autocast = step_inputs(args, WORKLOADS)

    bare = bare_step(VOCAB, EMB, HIDDEN, autocast)
    ours = lmtool_step(VOCAB, EMB, HIDDEN, BATCH, autocast)

    probe_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    probe_a, probe_b = torch.randn(2048, 2048, dtype=probe_dtype), torch.randn(2048, 2048, dtype=probe_dtype)
    probe_a @ probe_b
    flops_per_token = 6 * multiply_adds_per_token(EMB, HIDDEN, 2, VOCAB)
    ratios, bare_times, our_times, bare_use, our_use, peaks = [], [], [], [], [], []
    for i, (x, y) in enumerate(pairs):
        pair = []
        for step in (bare, ours) if i % 2 == 0 else (ours, bare):  # alternate which goes first
            start = time.perf_counter()
            step(x, y)
            pair.append((step, time.perf_counter() - start))
        times = dict(pair)
        start = time.perf_counter()
        probe_a @ probe_b
        peak = 2 * 2048**3 / (time.perf_counter() - start)  # FLOP/s now
        if i >= 2:  # warm-up
            bare_times.append(times[bare])
            our_times.append(times[ours])
            ratios.append(times[bare] / times[ours])
            peaks.append(peak)
            bare_use.append(BATCH * BPTT * flops_per_token / times[bare] / peak)
            our_use.append(BATCH * BPTT * flops_per_token / times[ours] / peak)
    print(json.dumps({**machine_info(), "workload": description, "precision": args.precision,
                      "keep_freed_memory": args.keep_freed_memory,
                      "pairs": len(ratios), "bare_tokens_per_s": round(BATCH * BPTT / statistics.median(bare_times)),
                      "lmtool_tokens_per_s": round(BATCH * BPTT / statistics.median(our_times)),
                      "lmtool_over_bare_median_of_pairs": round(statistics.median(ratios), 3),
                      "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
                      "peak_gflop_per_s_median": round(statistics.median(peaks) / 1e9, 1),
                      "lmtool_utilisation_median": round(statistics.median(our_use), 3),
                      "bare_utilisation_median": round(statistics.median(bare_use), 3)}), flush=True)


if __name__ == "__main__":
    main()
