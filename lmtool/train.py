"""The training loop: optimiser, schedule, clipping, validation, early stop, best and last models."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lmtool.checkpoint import BEST_MODEL, LAST_MODEL, RunDir, check_run_target, default_run_path
from lmtool.config import Config
from lmtool.data import Corpus, batchify, fit_batch_size, load_corpus, num_windows, windows
from lmtool.devices import resolve_device
from lmtool.evaluate import StreamScore, stream_nll, token_nll
from lmtool.model import LanguageModel, count_parameters, detach_state
from lmtool.schedule import PlateauTracker, learning_rate

Event = dict[str, Any]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
}


@dataclass(frozen=True)
class TrainResult:
    """What a finished run achieved and where it is."""

    run_dir: Path
    best_valid: StreamScore | None
    test: StreamScore | None
    steps: int
    epochs: int
    tokens_seen: int
    seconds: float
    stop_reason: str


def train(
    config: Config,
    corpus_path: Path,
    valid_path: Path | None = None,
    test_path: Path | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    on_event: Callable[[Event], None] | None = None,
) -> TrainResult:
    """Train a language model on a text file and leave a run directory; events go to `on_event` and metrics.jsonl."""
    run_path = Path(out) if out is not None else default_run_path(corpus_path)
    check_run_target(run_path, overwrite)  # fail before the slow part
    device = resolve_device(config.train.device)
    d = config.data
    corpus = load_corpus(
        corpus_path, valid_path, test_path, d.level, d.min_freq, d.max_size, d.lowercase, d.unk_marker, d.valid_fraction
    )
    run = RunDir.create(run_path, overwrite)
    run.write_config(config)
    run.write_vocab(corpus.tokenizer)
    run.mark_latest()

    def emit(record: Event) -> None:
        run.append_metrics(record)
        if on_event is not None:
            on_event(record)

    return _Trainer(config, corpus, run, device, emit).run()


class _Trainer:
    """State of one training run; `run` is the whole loop."""

    def __init__(self, config: Config, corpus: Corpus, run: RunDir, device: torch.device, emit) -> None:
        self.config, self.corpus, self.run_dir, self.device, self.emit = config, corpus, run, device, emit
        tc = config.train
        torch.manual_seed(tc.seed)
        self.model = LanguageModel(config.model, vocab_size=len(corpus.tokenizer)).to(device)
        self.optimizer = OPTIMIZERS[tc.optimizer](self.model.parameters(), tc)
        batch_size = fit_batch_size(corpus.train.numel(), config.data.batch_size, config.data.bptt, "training")
        self.streams = batchify(corpus.train, batch_size).to(device)  # (B, N // B)
        self.steps_per_epoch = num_windows(self.streams, config.data.bptt)
        self.eval_batch = {
            name: fit_batch_size(stream.numel(), config.data.eval_batch_size, config.data.bptt, name)
            for name, stream in (("validation", corpus.valid), ("test", corpus.test))
            if stream is not None
        }
        limits = [tc.max_steps, tc.max_epochs * self.steps_per_epoch if tc.max_epochs else None]
        self.total_steps = min((n for n in limits if n is not None), default=None)
        self.plateau = PlateauTracker()
        self.best: StreamScore | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.step = 0
        self.epoch = 0
        self.tokens_seen = 0
        self.last_validated_step = -1
        self.start_time = time.perf_counter()

    # --- the loop ---------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        tc = self.config.train
        self.emit(self._start_record())
        stop_reason = None
        while stop_reason is None:
            self.epoch += 1
            stop_reason = self._train_epoch()
            if stop_reason is None and tc.eval_every is None:
                stop_reason = self._validate()
            if stop_reason is None and tc.max_epochs is not None and self.epoch >= tc.max_epochs:
                stop_reason = f"reached max_epochs={tc.max_epochs}"
        if self.last_validated_step != self.step:
            self._validate()  # the final weights are always scored and saved
        return self._finish(stop_reason)

    def _train_epoch(self) -> str | None:
        """One pass over the training streams; returns a stop reason if a limit was hit inside it."""
        tc, dc = self.config.train, self.config.data
        self.model.train()
        state = self.model.init_state(self.streams.size(0))
        running_nll = torch.zeros((), device=self.device)
        running_tokens = 0
        window_start = time.perf_counter()
        for x, y in windows(self.streams, dc.bptt):
            lr = learning_rate(tc, self.step, self.epoch, self.plateau.divisions, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            logits, state = self.model(x, state)  # (B, T, V)
            nll = token_nll(logits, y)  # (B, T)
            loss = nll.mean() if tc.loss_reduction == "mean" else nll.sum(dim=1).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_grad_norm)
            self.optimizer.step()
            state = detach_state(state)
            self.step += 1
            running_nll += nll.detach().sum()  # stays on the device: no host sync per step
            running_tokens += y.numel()
            self.tokens_seen += y.numel()

            if self.step % tc.log_every == 0:
                seconds = time.perf_counter() - window_start
                self.emit(self._train_record(float(running_nll) / running_tokens, lr, running_tokens / seconds))
                running_nll.zero_()
                running_tokens, window_start = 0, time.perf_counter()
            if tc.eval_every is not None and self.step % tc.eval_every == 0:
                reason = self._validate()
                if reason:
                    return reason
                self.model.train()
            reason = self._limit_reached()
            if reason:
                return reason
        return None

    def _limit_reached(self) -> str | None:
        tc = self.config.train
        if tc.max_steps is not None and self.step >= tc.max_steps:
            return f"reached max_steps={tc.max_steps}"
        if tc.max_time is not None and self.elapsed >= tc.max_time:
            return f"reached max_time={tc.max_time:g}s"
        return None

    def _validate(self) -> str | None:
        """Score the validation text, keep the best model, save the last; returns a stop reason for early stop."""
        tc, dc = self.config.train, self.config.data
        self.last_validated_step = self.step
        score = stream_nll(self.model, self.corpus.valid, self.eval_batch["validation"], dc.bptt)
        improved = self.plateau.update(score.loss, tc.plateau_patience)
        if improved:
            self.best = score
            self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self._save(BEST_MODEL, score)
        self._save(LAST_MODEL, score)
        self.emit(
            {
                "event": "valid",
                "epoch": self.epoch,
                "step": self.step,
                "loss": score.loss,
                "ppl": score.perplexity,
                "bits_per_token": score.bits_per_token,
                "tokens": score.tokens,
                "best": improved,
                "elapsed": self.elapsed,
            }
        )
        if tc.patience is not None and self.plateau.since_best >= tc.patience:
            return f"no improvement in {tc.patience} validations (early stop)"
        return None

    def _save(self, name: str, score: StreamScore) -> None:
        self.run_dir.save_model(
            name,
            self.model,
            self.config,
            self.corpus.tokenizer,
            step=self.step,
            epoch=self.epoch,
            valid_loss=score.loss,
        )

    def _finish(self, stop_reason: str) -> TrainResult:
        test = None
        if self.corpus.test is not None:
            if self.best_weights is not None:
                self.model.load_state_dict(self.best_weights)
            test = stream_nll(self.model, self.corpus.test, self.eval_batch["test"], self.config.data.bptt)
            self.emit(
                {
                    "event": "test",
                    "loss": test.loss,
                    "ppl": test.perplexity,
                    "bits_per_token": test.bits_per_token,
                    "tokens": test.tokens,
                }
            )
        result = TrainResult(
            run_dir=self.run_dir.path,
            best_valid=self.best,
            test=test,
            steps=self.step,
            epochs=self.epoch,
            tokens_seen=self.tokens_seen,
            seconds=self.elapsed,
            stop_reason=stop_reason,
        )
        best = self.best
        self.emit(
            {
                "event": "end",
                "stop_reason": stop_reason,
                "steps": self.step,
                "epochs": self.epoch,
                "tokens_seen": self.tokens_seen,
                "elapsed": self.elapsed,
                "best_valid_loss": best.loss if best else None,
                "best_valid_ppl": best.perplexity if best else None,
                "best_valid_bits_per_token": best.bits_per_token if best else None,
                "test_ppl": test.perplexity if test else None,
                "run": str(self.run_dir.path),
            }
        )
        return result

    # --- records ----------------------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def _start_record(self) -> Event:
        tc, dc = self.config.train, self.config.data
        return {
            "event": "start",
            "run": str(self.run_dir.path),
            "device": str(self.device),
            "level": dc.level,
            "cell": self.config.model.cell,
            "vocab_size": len(self.corpus.tokenizer),
            "parameters": count_parameters(self.model),
            "train_tokens": self.corpus.train.numel(),
            "valid_tokens": self.corpus.valid.numel(),
            "batch_size": self.streams.size(0),
            "bptt": dc.bptt,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "max_epochs": tc.max_epochs,
            "max_time": tc.max_time,
        }

    def _train_record(self, loss: float, lr: float, tokens_per_s: float) -> Event:
        return {
            "event": "train",
            "epoch": self.epoch,
            "step": self.step,
            "loss": loss,
            "ppl": math.exp(min(loss, 700.0)),
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed,
            "eta": self._eta(),
        }

    def _eta(self) -> float | None:
        """Seconds left until the nearest known limit."""
        candidates = []
        if self.total_steps is not None and self.step:
            candidates.append((self.total_steps - self.step) * self.elapsed / self.step)
        if self.config.train.max_time is not None:
            candidates.append(max(0.0, self.config.train.max_time - self.elapsed))
        return min(candidates) if candidates else None
