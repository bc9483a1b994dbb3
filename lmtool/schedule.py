"""Learning-rate schedules as one pure function of the training position (so a resumed run gets the same lr)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmtool.config import TrainConfig


@dataclass
class PlateauTracker:
    """Counts validations without improvement, for the plateau schedule and for early stopping."""

    best_loss: float = math.inf
    since_best: int = 0  # validations since the best one
    divisions: int = 0  # times the plateau schedule divided the lr

    def update(self, loss: float, plateau_patience: int) -> bool:
        """Record a validation loss; returns whether it is a new best."""
        if loss < self.best_loss:
            self.best_loss, self.since_best = loss, 0
            return True
        self.since_best += 1
        if self.since_best % (plateau_patience + 1) == 0:
            self.divisions += 1
        return False


def _constant(cfg: TrainConfig, step: int, epoch: int, divisions: int, total: int | None) -> float:
    return cfg.lr


def _decay(cfg: TrainConfig, step: int, epoch: int, divisions: int, total: int | None) -> float:
    # Zaremba et al.: epochs 1..k at lr, then multiplied by the factor once per further epoch.
    return cfg.lr * cfg.decay_factor ** max(0, epoch - cfg.decay_start_epoch)


def _plateau(cfg: TrainConfig, step: int, epoch: int, divisions: int, total: int | None) -> float:
    return cfg.lr / cfg.plateau_factor**divisions


def _cosine(cfg: TrainConfig, step: int, epoch: int, divisions: int, total: int | None) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    assert total is not None, "cosine needs a known length (checked by the config)"
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES = {"constant": _constant, "decay": _decay, "plateau": _plateau, "cosine": _cosine}


def learning_rate(cfg: TrainConfig, step: int, epoch: int, plateau_divisions: int, total_steps: int | None) -> float:
    """The lr for optimiser step `step` (0-based) in epoch `epoch` (1-based), never below min_lr."""
    return max(SCHEDULES[cfg.schedule](cfg, step, epoch, plateau_divisions, total_steps), cfg.min_lr)
