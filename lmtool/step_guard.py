"""Keep bad training steps (a non-finite loss or gradient, or a loss blow-up) away from the weights, deciding
on the device so that the host never waits for the GPU inside the training loop."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lmtool.errors import counted

# Optimisers whose fused kernels skip an update, step count included, when their `found_inf` tensor is
# non-zero: PyTorch's own mechanism for mixed-precision loss scaling, used here for every bad step. Recent
# PyTorch also fuses on MPS, but that is unchecked here, so MPS takes the host-side path.
SKIPS_ON_DEVICE = ("cpu", "cuda")
# Before the running mean settles, a loss this many times blowup_factor times the reference is a blow-up. A skipped
# step leaves the weights as they are, so an early spike caught here repeats and ends the run: only a loss far past
# the 7-10x ln V that runs have spiked to after their first updates and recovered from counts.
EARLY_BLOWUP_MULTIPLE = 20


class StepGuard:
    """Per-step decisions and counters, all as device tensors; the host reads them only at log, validation and
    checkpoint time (`failure`, `skipped_steps`, `state_dict`), so a diverged run stops there, with the step it
    diverged at."""

    def __init__(self, device: torch.device, blowup_factor: float | None, max_bad_steps: int, warmup: int = 50,
                 uniform_loss: float | None = None):
        """`uniform_loss`: the loss of a uniform guess over the vocabulary, ln V. After the first good step and
        before `warmup` of them, while the running mean settles, a loss EARLY_BLOWUP_MULTIPLE x `blowup_factor`
        times the larger of the two is a blow-up (a learning rate that breaks the weights at the first update
        would otherwise go unnoticed there); without it, the check starts after them. The first step is never
        judged: no update has been made, so there is nothing to skip that would help."""
        self.device, self.blowup_factor, self.max_bad_steps, self.warmup = device, blowup_factor, max_bad_steps, warmup
        self.uniform_loss = uniform_loss
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.good_steps, self.bad_run, self.skipped = zero.clone(), zero.clone(), zero.clone()
        self.loss_ema = torch.zeros((), dtype=torch.float32, device=device)  # running mean of the step loss
        # The first time `max_bad_steps` came in a row: the step (-1: never), why, and the loss and mean then.
        self.failed_at = torch.full((), -1, dtype=torch.int64, device=device)
        self.failed_blowup = torch.zeros((), dtype=torch.bool, device=device)
        self.failed_loss, self.failed_ema = self.loss_ema.clone(), self.loss_ema.clone()
        self.failed_by_blowup = False  # set by `failure`: whether the loss blow-up check, not a NaN, stopped the run

    def check(self, loss: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether this step must be skipped, and whether its loss or gradient is non-finite (bool tensors).
        A step is skipped when non-finite, when its loss blows up, or when the run has already failed."""
        loss, norm = loss.detach().float(), norm.detach().float()
        non_finite = ~(torch.isfinite(loss) & torch.isfinite(norm))
        bad = non_finite | (self.failed_at >= 0)
        if self.blowup_factor is not None:
            bad = bad | (loss > self.threshold())
        return bad, non_finite

    def threshold(self) -> torch.Tensor:
        """The loss above which a step is a blow-up (`check`): inf where none is judged. Settled, blowup_factor x
        the running mean; before that, with `uniform_loss`, EARLY_BLOWUP_MULTIPLE x as much x the larger of the
        mean and ln V."""
        settled = self.good_steps >= self.warmup
        if self.uniform_loss is None:
            return torch.where(settled, self.blowup_factor * self.loss_ema, float("inf"))
        early = EARLY_BLOWUP_MULTIPLE * self.blowup_factor * self.loss_ema.clamp(min=self.uniform_loss)
        return torch.where(settled, self.blowup_factor * self.loss_ema,
                           torch.where(self.good_steps > 0, early, float("inf")))

    def record(self, bad: torch.Tensor, non_finite: torch.Tensor, loss: torch.Tensor, step: int | torch.Tensor) -> None:
        """Count the step `check` judged; `step` is its 1-based number (a device tensor in a CUDA graph).
        Every counter is updated in place: a captured step reads and writes the same tensors on each replay."""
        loss = loss.detach().float()
        good = ~bad
        ema = torch.where(self.good_steps == 0, loss, 0.98 * self.loss_ema + 0.02 * loss)
        self.loss_ema.copy_(torch.where(good, ema, self.loss_ema))
        self.good_steps += good
        self.skipped += bad
        self.bad_run.copy_(torch.where(bad, self.bad_run + 1, 0))
        newly_failed = (self.bad_run >= self.max_bad_steps) & (self.failed_at < 0)
        self.failed_at.copy_(torch.where(newly_failed, step, self.failed_at))
        self.failed_blowup.copy_(torch.where(newly_failed, ~non_finite, self.failed_blowup))
        self.failed_loss.copy_(torch.where(newly_failed, loss, self.failed_loss))
        self.failed_ema.copy_(torch.where(newly_failed, self.loss_ema, self.failed_ema))

    def failure(self) -> str | None:
        """Why the run diverged, if `max_bad_steps` bad steps came in a row (reads the device: call rarely)."""
        # Moved to the CPU before any conversion: MPS has no float64, and int64 keeps counts exact.
        # Every step after the failure is bad, so good_steps still counts those before it: whether it came early.
        failed_at, blowup, good_steps = torch.stack(
            [self.failed_at, self.failed_blowup.long(), self.good_steps]).cpu().tolist()
        if failed_at < 0:
            return None
        self.failed_by_blowup = bool(blowup)
        if blowup:
            loss, ema = torch.stack([self.failed_loss, self.failed_ema]).cpu().tolist()
            if good_steps < self.warmup and self.uniform_loss is not None:
                factor, reference = EARLY_BLOWUP_MULTIPLE * self.blowup_factor, max(ema, self.uniform_loss)
                problem = (f"loss {loss:.3g} above {factor:g} x {reference:.3g}, the larger of the running mean and "
                           f"a uniform guess's loss (ln V), the limit before {self.warmup} good steps")
            else:
                problem = f"loss {loss:.3g} above {self.blowup_factor:g} x the running mean {ema:.3g}"
        else:
            problem = "non-finite loss or gradient"
        return f"{counted(self.max_bad_steps, 'bad step')} in a row up to step {failed_at:,} ({problem})"

    @property
    def skipped_steps(self) -> int:
        return int(self.skipped)

    def state_dict(self) -> dict[str, Any]:
        """Plain values for the training checkpoint (the keys earlier checkpoints used, read by `load`)."""
        good_steps, bad_run, skipped = torch.stack([self.good_steps, self.bad_run, self.skipped]).cpu().tolist()
        ema = float(self.loss_ema.cpu())
        return {"good_steps": good_steps, "bad_steps": bad_run, "skipped_steps": skipped,
                "loss_ema": ema if good_steps else None}

    def load(self, saved: dict[str, Any]) -> None:
        as_int = lambda value: torch.tensor(value, dtype=torch.int64, device=self.device)  # noqa: E731
        self.good_steps, self.bad_run = as_int(saved["good_steps"]), as_int(saved["bad_steps"])
        self.skipped = as_int(saved["skipped_steps"])
        ema = saved["loss_ema"]
        self.loss_ema = torch.tensor(0.0 if ema is None else ema, dtype=torch.float32, device=self.device)


def guarded_update(
    optimizer: torch.optim.Optimizer,
    parameters: Sequence[torch.nn.Parameter],
    guard: StepGuard,
    step_loss: torch.Tensor,
    max_norm: float | None,
    step: int,
    on_device: bool,
) -> torch.Tensor:
    """Clip the gradients to `max_norm`, judge the step and update the weights unless it is bad; returns `bad`.

    With fused optimisers (`on_device`) nothing waits for the device, and clipping costs one read of the
    gradients: the fused kernel divides each gradient by the clipping factor as it updates (its `grad_scale`
    input, which mixed-precision loss scaling uses), instead of a separate pass rescaling them in memory.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = gradient_norm(grads)
    bad, non_finite = guard.check(step_loss, norm)
    # clip_grad_norm_'s factor, as a divisor: max_norm / (norm + 1e-6), at most 1
    divisor = None if max_norm is None else torch.clamp((norm + 1e-6) / max_norm, min=1.0)
    if on_device:
        optimizer.grad_scale = divisor
        optimizer.found_inf = bad.float()  # no update and no step count where 1
        optimizer.step()
    else:
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        if not bool(bad):
            optimizer.step()
    guard.record(bad, non_finite, step_loss, step)
    return bad


def gradient_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all the gradients together, as `clip_grad_norm_` computes it; inf or NaN where they are.

    On a CPU each gradient's sum of squares is a BLAS dot product: one read of the gradients that ran in half the
    time of PyTorch's norm kernel and rounds less (bench/step_variants.py --variant foreach-norm). Other devices
    keep PyTorch's fused multi-tensor norm."""
    if not grads or grads[0].device.type != "cpu":
        return torch.nn.utils.get_total_norm(grads)
    flat = [g.reshape(-1) for g in grads]
    return torch.stack([torch.dot(g, g) for g in flat]).sum().sqrt()


def start_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give SGD with momentum zero buffers before its first step. A fused SGD whose very first update is skipped
    otherwise keeps uninitialised buffers and uses them next step; from zeros, the first real update is the
    same as PyTorch's (the buffer becomes the gradient, since lmtool uses no dampening)."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0) == 0:
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
