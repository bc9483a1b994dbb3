"""Does a replayed CUDA-graph training step stay exact when other GPU work runs between its replays?

Usage: python bench/gpu_replay_check.py [--workload ptb-medium|char|ptb] [--steps 20] [--device cuda]
On 2026-11-26 bench/gpu_steps.py's captured steps drifted from eager ones (once to NaN) when other models
trained in the same process between replays, and matched exactly when replayed alone. This check narrows that
down with lmtool's own capture (lmtool/graphed_step.py): it trains one model eagerly as the reference, then,
for each kind of interference, the same model from the same seed through GraphedStep, doing that between
every two steps: nothing; allocating, filling with NaN and freeing 1 GiB; reseeding the RNG; training another
LSTM of the same size; synchronising and emptying PyTorch's cache. One JSON line per kind: the first step
whose loss differs from the reference by more than 1e-4 (null: none) and the largest difference.
`--device cpu` runs the same with lmtool's uncaptured path (a check of the script itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_steps import WORKLOADS  # noqa: E402
from machine import machine_info  # noqa: E402
from step_ab import bare_step  # noqa: E402

import torch  # noqa: E402

import lmtool.data  # noqa: E402

from lmtool.config import ModelConfig, TrainConfig  # noqa: E402
from lmtool.graphed_step import WARMUP_STEPS, GraphedStep, capture_cuda_graph  # noqa: E402
from lmtool.model import LanguageModel, detach_state, map_state  # noqa: E402
from lmtool.step_guard import StepGuard, guarded_update  # noqa: E402
from lmtool.train import OPTIMIZERS  # noqa: E402


def trainer_like(vocab: int, emb: int, hidden: int, batch: int, bptt: int, device: str, graphed: bool):
    """lmtool's training step (clipping, guard, fused SGD, running loss) through GraphedStep, or called
    directly; returns step(x, y, number) -> the step's loss (a float)."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(embedding_size=emb, hidden_size=hidden, dropout=0.0, tie_weights=False),
                          vocab).to(device)
    params = list(model.parameters())
    optimizer = OPTIMIZERS["sgd"](params, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0), True)
    guard = StepGuard(torch.device(device), blowup_factor=5.0, max_bad_steps=5)
    last_loss = torch.zeros((), device=device)

    def body(x, y, state, number):
        nll, next_state = model(x, state, targets=y)
        optimizer.zero_grad(set_to_none=True)
        nll.mean().backward()
        bad = guarded_update(optimizer, params, guard, nll.detach().mean(), 5.0, number, True)
        last_loss.copy_(nll.detach().mean())
        return map_state(lambda t: t.masked_fill(bad, 0.0), detach_state(next_state))

    capture = capture_cuda_graph if device == "cuda" else None
    runner = GraphedStep(body, bptt, capture) if graphed else None
    state = [model.init_state(batch)]

    def step(x, y, number):
        state[0] = runner(x, y, state[0], number, 0.1) if runner else body(x, y, state[0], number)
        return float(last_loss)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="ptb-medium", choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    vocab, emb, hidden, batch, bptt = WORKLOADS[args.workload]
    device = args.device
    torch.manual_seed(1)
    total = WARMUP_STEPS + args.steps
    data = torch.randint(0, vocab, (batch, bptt * total + 1), device=device)
    windows = list(lmtool.data.windows(data, bptt))
    reference_step = trainer_like(vocab, emb, hidden, batch, bptt, device, graphed=False)
    reference = [reference_step(x, y, n + 1) for n, (x, y) in enumerate(windows)]
    del reference_step

    other = bare_step(vocab, emb, hidden, dict(device_type=device, enabled=False), device)

    def garbage():
        torch.empty(2**28, device=device).fill_(float("nan"))

    def sync_and_empty():
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    interference = {"nothing": lambda: None, "1 GiB of NaN allocated and freed": garbage,
                    "RNG reseeded": lambda: torch.manual_seed(0),
                    "another LSTM trained one step": lambda: other(*windows[0]),
                    "synchronised, cache emptied": sync_and_empty}
    info = {**machine_info(), "workload": args.workload, "steps": args.steps}
    for name, between in interference.items():
        step = trainer_like(vocab, emb, hidden, batch, bptt, device, graphed=True)
        losses = []
        for n, (x, y) in enumerate(windows):
            losses.append(step(x, y, n + 1))
            between()
        diffs = [abs(a - b) if a == a else float("inf") for a, b in zip(losses, reference)]
        first = next((n for n, d in enumerate(diffs) if not d <= 1e-4), None)
        print(json.dumps({**info, "between_steps": name, "first_differing_step": first,
                          "largest_difference": max(diffs)}), flush=True)


if __name__ == "__main__":
    main()
