"""The training loop: optimiser, schedule, clipping, validation, early stop, checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import shlex
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lmtool.checkpoint import (
    RunDir,
    check_run_target,
    claim_default_run_path,
    default_run_path,
    load_model_file,
    load_training_state,
    open_run,
    TRAINING_STATE_VERSION,
)
from lmtool.config import Config, check_new_seed, flat_settings, revalidated
from lmtool.data import Corpus, batchify, file_digest, fit_batch_size, load_corpus, num_windows, oriented, windows
from lmtool.devices import device_name, resolve_device, resolve_precision
from lmtool.distributed import DistributedContext, distributed_session
from lmtool.errors import Interrupted, LmtoolError, TrainingFailed, counted
from lmtool.evaluate import StreamScore, combined, safe_exp, stream_nll
from lmtool.graphed_step import Capture, GraphedStep, capture_cuda_graph
from lmtool.host_memory import keep_freed_memory
from lmtool.model import LanguageModel, State, check_fits, count_parameters, detach_state, map_state
from lmtool.schedule import PlateauTracker, learning_rate
from lmtool.run_paths import BEST_MODEL, LAST_MODEL, VOCAB_FILE, path_argument
from lmtool.step_guard import SKIPS_ON_DEVICE, StepGuard, guarded_update, start_momentum
from lmtool.tokenizer import Tokenizer

Event = dict[str, Any]

# (parameters, train config, fused, capturable) -> optimiser; fused kernels can skip a bad step without the
# host, and Adam's step must be told it runs inside a CUDA graph (SGD has nothing to keep on the device).
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, c, fused, capturable=False: torch.optim.SGD(
        params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, fused=fused),
    "adam": lambda params, c, fused, capturable=False: torch.optim.Adam(
        params, lr=c.lr, weight_decay=c.weight_decay, fused=fused, capturable=capturable),
    "adamw": lambda params, c, fused, capturable=False: torch.optim.AdamW(
        params, lr=c.lr, weight_decay=c.weight_decay, fused=fused, capturable=capturable),
}


def step_capture(device: torch.device) -> Capture | None:
    """How the training step is captured on `device`: as a CUDA graph on CUDA; elsewhere it runs uncaptured."""
    return capture_cuda_graph if device.type == "cuda" else None


def uses_cuda_graph(config: Config, device: torch.device, ctx: DistributedContext) -> bool:
    """Whether the training step is captured as a CUDA graph: asked for, on one CUDA GPU, with a full softmax
    (the adaptive one picks rows by their targets, so its shapes change every step) and a learning rate that
    changes rarely (a graph is captured again for each new one; cosine changes it every step)."""
    tc = config.train
    return (tc.cuda_graph and device.type == "cuda" and not ctx.enabled and config.model.softmax == "full"
            and tc.schedule != "cosine")


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
    """Train a language model on a text file and leave a run directory; events go to `on_event` and metrics.jsonl.

    Launched by torchrun, every process calls this: they train one model with DistributedDataParallel, and
    rank 0 alone writes the run directory and sends events (the others return a result without a test score).
    """
    if not isinstance(config, Config):
        raise LmtoolError(f"config must be a Config (from lmtool.config.load_config), got {type(config).__name__}")
    config = revalidated(config)  # a Config edited by hand, before anything is written
    check_new_seed("train.seed", config.train.seed)  # a Config built by hand too; resumed runs keep theirs
    if not isinstance(overwrite, bool):  # "no" would be true
        raise LmtoolError(f"overwrite must be True or False, got {overwrite!r}")
    _check_on_event(on_event)
    corpus_path = path_argument(corpus_path, "corpus_path")
    valid_path, test_path, out = (None if value is None else path_argument(value, name) for value, name in
                                  ((valid_path, "valid_path"), (test_path, "test_path"), (out, "out")))
    device = resolve_device(config.train.device)
    with distributed_session(device) as ctx:
        def build(corpus: Corpus) -> _Trainer:
            return _Trainer(config, corpus, None, ctx.device(device), on_event, None, ctx)

        trainer, run = _start_run(ctx, config, corpus_path, valid_path, test_path, out, overwrite, build)
        try:
            try:
                with ctx.reported_by_main():
                    return trainer.run()
            finally:
                trainer.close()
        finally:
            run.release()


def _start_run(ctx: DistributedContext, config: Config, corpus_path, valid_path, test_path, out, overwrite,
               build: Callable[[Corpus], _Trainer]) -> tuple[_Trainer, RunDir]:
    """Rank 0 checks the target, reads the corpus and builds the vocabulary; the other ranks read the corpus with
    rank 0's vocabulary (sent over the process group: no shared disk needed); every rank builds its trainer (the
    model and optimiser: a model too big for memory fails here, before --overwrite has replaced the old run);
    then rank 0 alone creates the run."""
    trainer = None
    run_path = Path(out) if out is not None else default_run_path(corpus_path)
    corpus = error = None
    if ctx.is_main:
        try:
            if out is not None:
                check_run_target(run_path, overwrite)  # fail before the slow part
            corpus = _load_corpus(config, corpus_path, valid_path, test_path)
            check_fits(config.model, len(corpus.tokenizer))  # e.g. adaptive cutoffs above the vocabulary size
            if out is None:
                run_path = claim_default_run_path(corpus_path)  # made now: unique even among runs started together
        except LmtoolError as err:
            error = err
    ctx.agree(error)
    try:
        if ctx.enabled:
            shared = json.loads(ctx.broadcast_bytes(
                json.dumps({"run": str(run_path), "vocab": corpus.tokenizer.to_dict()}).encode() if ctx.is_main
                else None
            ))
            if not ctx.is_main:
                run_path = Path(shared["run"])  # named in messages; only rank 0 writes to it
                try:
                    corpus = _load_corpus(config, corpus_path, valid_path, test_path,
                                          Tokenizer.from_dict(shared["vocab"]))
                except LmtoolError as err:
                    error = err
            ctx.agree(error)
        error = None
        try:
            trainer = build(corpus)
        except Exception as err:
            if not ctx.enabled:
                raise
            # Every rank must know before rank 0 creates the run: --overwrite would replace the old one first.
            error = err if isinstance(err, LmtoolError) else LmtoolError(
                f"building the model failed on rank {ctx.rank}: {type(err).__name__}: {str(err).splitlines()[0]}",
                exit_code=1)
        ctx.agree(error)  # the lowest failing rank reports; a failure every rank shares is printed once
        run, sources = _create_run(ctx, config, corpus, run_path, overwrite,
                                   {"train": corpus_path, "valid": valid_path, "test": test_path})
    except BaseException:
        if trainer is not None:
            trainer.close()
        if ctx.is_main and out is None and run_path.is_dir() and not any(run_path.iterdir()):
            run_path.rmdir()  # the default directory claimed above, never used
        raise
    trainer.attach(run, sources)
    return trainer, run


def _create_run(ctx: DistributedContext, config: Config, corpus: Corpus, run_path: Path, overwrite: bool,
                paths: dict[str, Path | None]) -> tuple[RunDir, dict | None]:
    """Rank 0 creates and locks the run directory and writes its config, vocabulary and the sources' digests;
    the lock is dropped again if any of that fails."""
    run, sources, error = RunDir(run_path), None, None
    if ctx.is_main:
        try:
            run = RunDir.create(run_path, overwrite)
            run.write_config(config)
            run.write_vocab(corpus.tokenizer)
            sources = {name: {"path": str(Path(path).resolve()), "sha256": file_digest(path)}
                       for name, path in paths.items() if path is not None}
        except BaseException as err:
            run.release()
            if not isinstance(err, LmtoolError):
                raise
            error = err
    ctx.agree(error)
    return run, sources


def resume(
    run_path: Path,
    on_event: Callable[[Event], None] | None = None,
    limits: dict[str, Any] | None = None,
    device: str | None = None,
) -> TrainResult:
    """Continue a run from its last training checkpoint; the result is the same as if it had never stopped.
    `limits` may raise or lower max_time, max_epochs and max_steps; `device` may move it (cpu, cuda, ...)."""
    run_path = path_argument(run_path, "the run to resume")
    if limits is not None and (not isinstance(limits, dict) or not set(limits) <= set(LIMITS)):
        raise LmtoolError(f"limits must be a dict of {', '.join(LIMITS)}, got {limits!r}")
    _check_on_event(on_event)
    if device is not None:
        device = device_name(device)
    run, config, tokenizer = open_run(run_path)
    try:
        return _resume(run, config, tokenizer, on_event, limits, device)
    finally:
        run.release()


def _check_on_event(on_event) -> None:
    """Before any file is touched: a wrong callback would otherwise fail at the first event, mid-way."""
    if on_event is not None and not callable(on_event):
        raise LmtoolError(f"on_event must be a function that takes each event (a dict), got {type(on_event).__name__}")


def _resume(run: RunDir, config: Config, tokenizer, on_event, limits, device) -> TrainResult:
    changed = {k: v for k, v in (limits or {}).items() if v is not None}
    if changed or device:
        from lmtool.config import config_from_dict

        tree = config.to_dict()
        tree["train"].update(changed)
        if device:
            tree["train"]["device"] = device
        config = config_from_dict(tree)
    torch_device = resolve_device(config.train.device)
    with distributed_session(torch_device) as ctx:
        # Every rank reads the run directory and the corpus (on several machines: a shared disk, same paths).
        saved = corpus = error = None
        try:
            if ctx.is_main:
                run.lock()  # before the checkpoint is read: another process may be writing this run
            saved, corpus = _resumable(run, config, tokenizer, changed, ctx)
        except LmtoolError as err:
            error = err
        ctx.agree(error)
        if ctx.is_main:
            if changed or device:
                run.write_config(config)  # only now that the run is known to be resumable
            if (run.path / BEST_MODEL).is_file():
                run.mark_latest()
        with ctx.reported_by_main():
            trainer = _Trainer(config, corpus, run, ctx.device(torch_device), on_event, saved["sources"], ctx)
            trainer.restore(saved)
        try:
            with ctx.reported_by_main():
                return trainer.run()
        finally:
            trainer.close()


LIMITS = ("max_time", "max_epochs", "max_steps")  # in the order the command line lists them


def _limit_reason(limit: str, value: Any) -> str:
    """The stop reason of a run that reached one of its LIMITS (shown to the user, kept in the checkpoint)."""
    return f"reached {limit}={value}"


def _flag(limit: str) -> str:
    """The command-line option of one of the LIMITS: max_steps -> --max-steps."""
    return "--" + limit.replace("_", "-")


def _epochs_done(saved: dict[str, Any]) -> int:
    """Whole epochs a checkpointed run has trained (and validated)."""
    return saved["epoch"] if saved["epoch_closed"] else saved["epoch"] - 1


def _limits_reached(saved: dict[str, Any], tc) -> list[str]:
    """The LIMITS of `tc` that a checkpointed run has reached already."""
    reached = {"max_steps": tc.max_steps is not None and saved["step"] >= tc.max_steps,
               "max_epochs": tc.max_epochs is not None and _epochs_done(saved) >= tc.max_epochs,
               "max_time": tc.max_time is not None and saved["elapsed"] >= tc.max_time}
    return [limit for limit in LIMITS if reached[limit]]


def _resumable(run: RunDir, config: Config, tokenizer, changed: dict[str, Any], ctx: DistributedContext):
    """The training checkpoint and the corpus of a run that can go on, or the reason it cannot."""
    saved = load_training_state(run.path)
    edited = _edited_settings(saved.get("config"), config.to_dict())  # checkpoints before 2026-11-27 hold none
    if edited:
        raise LmtoolError(f"{run.path / 'config.yaml'} was edited since the run's last checkpoint ({edited}); "
                          "put it back to resume, or start a new run with the new settings")
    vocab = tokenizer.to_dict()
    if saved.get("vocab", vocab) != vocab:  # checkpoints before 2026-11-27 hold none
        raise LmtoolError(f"{run.path / VOCAB_FILE} was edited since the run's last checkpoint: the model's token ids "
                          "would no longer match; put it back to resume")
    tc = config.train
    # A finished run given a limit it has reached would only rewrite its config. (A run stopped early may be
    # resumed at its limit: it then validates, saves its best model and finishes.)
    if saved["finished"]:
        if not changed:
            raise LmtoolError(
                f"run {run.path} already finished ({saved['stop_reason']}); to train it further, raise its "
                "limit with --max-epochs, --max-steps or --max-time"
            )
        stoppers = _limits_reached(saved, tc)
        too_low = [limit for limit in stoppers if limit in changed]
        if too_low:
            limit = too_low[0]
            done = {"max_steps": f"at step {saved['step']:,}",
                    "max_epochs": f"after {counted(_epochs_done(saved), 'epoch')}",
                    "max_time": f"after {saved['elapsed']:.0f}s of training"}[limit]
            value = f"{tc.max_time:g}s" if limit == "max_time" else getattr(tc, limit)
            raise LmtoolError(f"run {run.path} already finished {done}; {_flag(limit)} {value} would train it no "
                              "further: give a higher limit")
        if stoppers:  # another limit, reached too, would stop it again at once, having trained nothing
            raise LmtoolError(f"run {run.path} already finished ({saved['stop_reason']}); "
                              f"{', '.join(map(_flag, changed))} would train it no further: "
                              f"raise {' and '.join(map(_flag, stoppers))}")
        saved["finished"] = False
    trained_by = saved.get("world_size", 1)
    if trained_by != ctx.world_size:
        # Each rank carries its own rows of the hidden state and its own dropout RNG: another split changes the run.
        raise LmtoolError(
            f"cannot resume: run {run.path} was trained by {counted(trained_by, 'process', 'processes')} and this is "
            f"{counted(ctx.world_size, 'process', 'processes')}; resume it with the same number "
            f"({f'e.g. torchrun --nproc-per-node {trained_by} -m lmtool' if trained_by > 1 else 'plain lmtool'} "
            f"train --resume {run.path})"
        )
    sources = saved["sources"]
    for name, source in sources.items():
        path = Path(source["path"])
        if not path.is_file():
            raise LmtoolError(f"cannot resume: the {name} file {path} of this run is gone; put it back to resume")
        if file_digest(path) != source["sha256"]:
            raise LmtoolError(f"cannot resume: the {name} file {path} changed since the run started; put the "
                              "original back to resume, or train a new run on the new text")
    paths = {name: Path(source["path"]) for name, source in sources.items()}
    corpus = _load_corpus(config, paths["train"], paths.get("valid"), paths.get("test"), tokenizer)
    return saved, corpus


# What --resume may change; any other setting would make the resumed run differ from an uninterrupted one.
RESUMABLE_SETTINGS = {"train.max_steps", "train.max_epochs", "train.max_time", "train.device"}


def _edited_settings(recorded: dict[str, Any] | None, current: dict[str, Any]) -> str:
    """The settings that differ between the checkpoint's config and the run's config.yaml, as 'key: old -> new'
    (the first three), other than those --resume may change; empty when they agree or nothing was recorded."""
    if recorded is None:
        return ""
    before, after = flat_settings(recorded), flat_settings(current)
    changed = sorted(key for key in before.keys() | after.keys()
                     if key not in RESUMABLE_SETTINGS and before.get(key) != after.get(key))
    return ", ".join(f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in changed[:3])


def _load_corpus(config: Config, train_path, valid_path, test_path, tokenizer=None) -> Corpus:
    d = config.data
    return load_corpus(
        train_path, valid_path, test_path, d.level, d.min_freq, d.max_size, d.lowercase, d.unk_marker,
        d.valid_fraction, tokenizer=tokenizer,
    )


class TrainingClock:
    """Training time since the last log line, pauses (validation, checkpoints, between epochs) left out.
    Stopping it first waits for the device (`wait`), so steps the host queued ahead of the GPU, many of them
    with a CUDA graph, count as training time and are not left to the pause that follows."""

    def __init__(self, wait: Callable[[], Any]) -> None:
        self.wait = wait
        self.seconds = 0.0  # counted since the last lap
        self.since: float | None = None  # when it was last started, if it runs

    def start(self) -> None:
        self.since = time.perf_counter()

    def stop(self) -> None:
        if self.since is not None:
            self.wait()
            self.seconds += time.perf_counter() - self.since
            self.since = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        running = self.since is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()

    def counted(self) -> float:
        """Seconds counted since the last lap, so far (without waiting for the device)."""
        return self.seconds + (time.perf_counter() - self.since if self.since is not None else 0.0)

    def lap(self) -> float:
        """Seconds counted since the last lap; counting starts again from zero (a running clock keeps running)."""
        running = self.since is not None
        self.stop()
        seconds, self.seconds = self.seconds, 0.0
        if running:
            self.start()
        return seconds


class _Trainer:
    """State of one training run; `run` is the whole loop, `snapshot`/`restore` make it resumable exactly."""

    def __init__(self, config: Config, corpus: Corpus, run: RunDir | None, device: torch.device, on_event, sources,
                 ctx: DistributedContext | None = None) -> None:
        """`run` may be None (and `sources` with it) until `attach`: a new run's directory is created once its
        trainer has been built."""
        self.config, self.corpus, self.device = config, corpus, device
        self.run_dir, self.sources, self.on_event = run, sources, on_event
        self.ctx = ctx = ctx or DistributedContext()
        tc = config.train
        torch.manual_seed(tc.seed)
        self.model = LanguageModel(config.model, vocab_size=len(corpus.tokenizer)).to(device)
        if ctx.enabled:  # the same weights everywhere, but each rank its own dropout masks
            torch.manual_seed(int(torch.randint(2**62, (ctx.world_size,))[ctx.rank]))
        # Adaptive softmax leaves the tail clusters that no target of a batch falls in without a gradient.
        self.train_model = ctx.wrap(self.model, find_unused_parameters=config.model.softmax == "adaptive")
        self.autocast_dtype = resolve_precision(tc.precision, device)  # master weights and the loss stay fp32
        self.skips_on_device = device.type in SKIPS_ON_DEVICE
        self.parameters = list(self.model.parameters())
        self.graphed = (GraphedStep(self._train_step, config.data.bptt, step_capture(device))
                        if uses_cuda_graph(config, device, ctx) else None)
        self.graph_failure_reported = False
        self.optimizer = OPTIMIZERS[tc.optimizer](self.parameters, tc, self.skips_on_device or None,
                                                  self.captures_steps)
        if self.captures_steps:
            # Warm-up steps and short windows run Adam uncaptured, as they must: PyTorch's warning that this
            # "can impair performance" would only alarm the user.
            self.optimizer._warned_capturable_if_run_uncaptured = True
        start_momentum(self.optimizer)
        # data.batch_size is per process: the streams are cut as one process with the global batch would cut
        # them, and rank r trains the contiguous rows [r*B, (r+1)*B), carrying their hidden state.
        world = ctx.world_size
        global_batch = fit_batch_size(corpus.train.numel(), config.data.batch_size * world, config.data.bptt, "training")
        if global_batch < world:
            raise LmtoolError(f"the training text is too short to give each of {world} processes a stream; give a longer text")
        global_batch -= global_batch % world
        # One set of streams per direction (a backward model reads the text reversed), trained in one step.
        self.directions = self.model.directions
        rows = ctx.rows(global_batch)
        per_direction = [batchify(oriented(corpus.train, d), global_batch)[rows] for d in self.directions]  # (B, W)
        self.streams = (per_direction[0] if len(per_direction) == 1 else torch.stack(per_direction)).to(device)
        self.batch_size = per_direction[0].size(0)  # this process's streams
        self.steps_per_epoch = num_windows(self.streams, config.data.bptt)
        self.eval_batch = {
            name: fit_batch_size(stream.numel(), config.data.eval_batch_size, config.data.bptt, name)
            for name, stream in (("validation", corpus.valid), ("test", corpus.test))
            if stream is not None
        }
        limits = [tc.max_steps, tc.max_epochs * self.steps_per_epoch if tc.max_epochs else None]
        self.total_steps = min((n for n in limits if n is not None), default=None)
        # Everything below is the position of the run: saved in a training checkpoint, restored on resume.
        self.plateau = PlateauTracker()
        self.best: StreamScore | None = None
        self.step = 0
        self.epoch = 1
        self.window = 0  # next window of the current epoch
        self.epoch_closed = False  # the end-of-epoch validation is done
        self.hidden: State | None = None
        self.tokens_seen = 0
        self.last_validated_step = -1
        self.running_nll = torch.zeros((), device=device)  # since the last log, on the device: no per-step sync
        self.running_tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.guard = StepGuard(device, tc.blowup_factor, tc.max_bad_steps,
                               uniform_loss=math.log(len(corpus.tokenizer)))
        self.clock = TrainingClock(lambda: self.running_tokens.cpu())
        self.elapsed_before = 0.0  # training time of earlier sessions of this run
        self.resumed = False
        self.start_time = time.perf_counter()
        self.last_checkpoint_time = self.start_time
        self.signal_received: int | None = None

    def attach(self, run: RunDir, sources: dict | None) -> None:
        """The run directory it trains into, and the digests of its source files (None on ranks other than 0).
        The run's clock starts now: creating the directory (hashing the corpus) is not training time."""
        self.run_dir, self.sources = run, sources
        self.start_time = self.last_checkpoint_time = time.perf_counter()

    def close(self) -> None:
        """Drop the DistributedDataParallel wrapper now: freed later, after its process group is destroyed (at
        interpreter exit), its pending gloo work can abort the process."""
        self.train_model = self.model

    # --- the loop ---------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        tc = self.config.train
        if self.device.type == "cpu":
            keep_freed_memory()  # every step frees and allocates the same large tensors again
        self.emit(self._resume_record() if self.resumed else self._start_record())
        with self._signals_caught():
            stop_reason = None
            while stop_reason is None:
                if not self.epoch_closed:
                    stop_reason = self._train_epoch()
                    if stop_reason is not None:
                        break
                    if tc.eval_every is None:
                        stop_reason = self._validate()
                    self.epoch_closed = True
                    if stop_reason is None:
                        self._stop_if_signalled(self._agreed_step_end()[1])
                    if stop_reason is not None:
                        break
                if tc.max_epochs is not None and self.epoch >= tc.max_epochs:
                    stop_reason = _limit_reason("max_epochs", tc.max_epochs)
                else:
                    self.epoch, self.window, self.hidden, self.epoch_closed = self.epoch + 1, 0, None, False
            if self.last_validated_step != self.step:
                self._validate()  # the final weights are always scored and saved
            # A stop on an epoch's last step closes it (its last validation was the one just done, or an eval_every
            # one at that step): a resume counts it as trained.
            self.epoch_closed = self.epoch_closed or self.window >= self.steps_per_epoch
            result, end = self._finish(stop_reason)  # a Ctrl-C now changes nothing: the run is finishing anyway
            self.save_checkpoint(finished=True, stop_reason=stop_reason)
        self.show(end)  # after the checkpoint: a summary that cannot be printed (a full disk) loses nothing
        return result

    def _train_epoch(self) -> str | None:
        """Train from the current window to the end of the epoch; returns a stop reason if a limit was hit."""
        self.model.train()
        state = self.hidden if self.hidden is not None else self._zero_state()
        if self.window < self.steps_per_epoch:  # after that, each step checks the limits when it ends
            reason = self._limit_reached(self._agreed_step_end()[0])  # a run resumed at its limit trains nothing
            if reason:
                return reason
        self.clock.start()
        try:
            return self._train_windows(state)
        finally:
            self.clock.stop()

    def _train_windows(self, state: State) -> str | None:
        """The steps of `_train_epoch`, while the training clock runs."""
        tc, dc = self.config.train, self.config.data
        for x, y in windows(self.streams, dc.bptt, start=self.window * dc.bptt):
            lr = learning_rate(tc, self.step, self.epoch, self.plateau.divisions, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.graphed is not None:
                state = self.graphed(x, y, state, self.step + 1, lr)
                self._report_graph_failure()
            else:
                state = self._train_step(x, y, state, self.step + 1)
            self.hidden = state
            self.step += 1
            self.window += 1
            # Tokens of the text, whatever the number of directions, over all processes.
            self.tokens_seen += y.numel() // len(self.directions) * self.ctx.world_size

            if self.step % tc.log_every == 0:
                self._log_train(lr)
            if tc.eval_every is not None and self.step % tc.eval_every == 0:
                with self.clock.paused():  # tokens/s counts training time only
                    reason = self._validate()
                self.model.train()
                if reason:
                    return reason
            time_up, signum, checkpoint_due = self._agreed_step_end()  # one collective per step under torchrun
            reason = self._limit_reached(time_up)
            if reason:
                return reason
            self._stop_if_signalled(signum)
            if self._checkpoint_due(checkpoint_due):
                with self.clock.paused():
                    self.save_checkpoint()
        return None

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, state: State, step: int | torch.Tensor) -> State:
        """One optimiser step on window (x, y) from `state`; returns the state to carry on. `step` is its 1-based
        number. Everything it keeps is updated in place, so that it can run as a captured CUDA graph."""
        tc = self.config.train
        both = "both" if len(self.directions) > 1 else None
        # The autocast context lies wholly inside a captured step, so its cache of cast weights does too.
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            nll, next_state = self.train_model(x, state, targets=y, direction=both)  # ([D,] B, T), float32
        loss = nll.mean() if tc.loss_reduction == "mean" else nll.sum(dim=-1).mean()
        if len(self.directions) > 1:
            loss = loss * len(self.directions)  # a bidirectional model trains on the sum of both losses
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # A non-finite or exploding step must never reach the weights. Decided on the device (the host does
        # not wait for it); the gradients are averaged over ranks, so the norm and this mean agree everywhere.
        step_loss = self.ctx.average(nll.detach().mean())
        bad = guarded_update(self.optimizer, self.parameters, self.guard, step_loss, tc.clip_grad_norm, step,
                             self.skips_on_device)
        self.running_nll += torch.where(bad, 0.0, nll.detach().sum())
        self.running_tokens += (~bad) * y.numel()
        # Never carry an inf/NaN state on: zeros after a bad step, chosen on the device.
        return map_state(lambda t: t.masked_fill(bad, 0.0), detach_state(next_state))

    @property
    def captures_steps(self) -> bool:
        """Whether optimiser steps run inside CUDA graphs (Adam must be built for that)."""
        return self.graphed is not None and self.device.type == "cuda" and self.graphed.failure is None

    @property
    def evaluation_graphs(self) -> bool:
        """Whether validation and test scoring may replay their windows as CUDA graphs: as the training step,
        only on one GPU (not checked with several processes)."""
        return self.config.train.cuda_graph and not self.ctx.enabled

    def _report_graph_failure(self) -> None:
        """Once, if the step could not be captured as a CUDA graph (training goes on without one)."""
        if self.graphed.failure is not None and not self.graph_failure_reported:
            self.graph_failure_reported = True
            for group in self.optimizer.param_groups:
                if "capturable" in group:
                    group["capturable"] = False
            self.emit({"event": "notice", "message": "the training step could not be captured as a CUDA graph "
                       f"({self.graphed.failure}); training goes on without one (train.cuda_graph=false skips "
                       "the attempt)"})

    def _agreed_step_end(self) -> tuple[bool, int, bool]:
        """Whether max_time is reached, the signal received (0: none) and whether checkpoint_time is due: every
        rank's view merged in one collective, so that all ranks act on them at the same step."""
        tc = self.config.train
        time_up = tc.max_time is not None and self.elapsed >= tc.max_time
        due = tc.checkpoint_time is not None and time.perf_counter() - self.last_checkpoint_time >= tc.checkpoint_time
        time_up, signum, due = self.ctx.max_each([int(time_up), self.signal_received or 0, int(due)])
        return bool(time_up), signum, bool(due)

    def _stop_if_diverged(self) -> None:
        """Raise once `max_bad_steps` bad steps came in a row (the weights have not moved since)."""
        problem = self.guard.failure()
        if problem is None:
            return
        tc = self.config.train
        advice = "Lower train.lr" + (" or set train.clip_grad_norm" if tc.clip_grad_norm is None else "")
        if self.guard.failed_by_blowup:  # the guard's own threshold stopped it: that may be what to change
            advice += (f", or raise train.blowup_factor ({tc.blowup_factor:g}; null turns the check off) if the loss "
                       "swings that much by nature")
        raise self._diverged(problem, advice)

    def _diverged(self, problem: str, advice: str) -> TrainingFailed:
        """The error that ends a diverged run: what went wrong, what was kept, what to change."""
        if (self.run_dir.path / BEST_MODEL).is_file():
            kept = f"the best model in {self.run_dir.path} is intact. {advice}"
        else:
            kept = f"no model was saved before it. {advice}, and add --overwrite to train again into {self.run_dir.path}"
        return TrainingFailed(f"training diverged: {problem}; {kept}")

    def _log_train(self, lr: float) -> None:
        """Report the steps since the last log: their loss, and their tokens over the training clock's time."""
        self._stop_if_diverged()
        local_nll, local_tokens = float(self.running_nll.cpu()), int(self.running_tokens.cpu())
        seconds = self.clock.lap()
        nll, all_tokens = self.ctx.sum_in_rank_order([local_nll, local_tokens])  # every rank's
        tokens = max(1, all_tokens)
        loss = nll / tokens
        self.emit(
            {
                "event": "train",
                "epoch": self.epoch,
                "step": self.step,
                "loss": loss,
                "ppl": safe_exp(loss),
                "lr": lr,
                "tokens_per_s": all_tokens / len(self.directions) / seconds if seconds > 0 else 0.0,
                "tokens_seen": self.tokens_seen,
                "skipped_steps": self.guard.skipped_steps,
                "elapsed": self.elapsed,
                "eta": self._eta(),
            }
        )
        self.running_nll.zero_()
        self.running_tokens.zero_()

    def _stop_if_signalled(self, signum: int) -> None:
        """After Ctrl-C or SIGTERM: save a checkpoint here, at a step boundary, and stop with the resume command.
        `signum`: the signal as every rank agreed on it (a signal to one rank stops every rank at this step)."""
        if not signum:
            return
        self.save_checkpoint()
        name = signal.Signals(signum).name
        raise Interrupted(
            f"training stopped by {name} at step {self.step:,}; a checkpoint is saved. Resume with: "
            f"lmtool train --resume {shlex.quote(str(self.run_dir.path))}",
            exit_code=128 + signum,
        )

    def _limit_reached(self, time_up: bool) -> str | None:
        """Why training must stop now, if a limit is reached. `time_up`: max_time as every rank agreed on it."""
        tc = self.config.train
        if tc.max_steps is not None and self.step >= tc.max_steps:
            return _limit_reason("max_steps", tc.max_steps)
        # Only a resume with a lowered limit gets here: a run stops at the end of its last epoch.
        if tc.max_epochs is not None and self.epoch > tc.max_epochs:
            return _limit_reason("max_epochs", tc.max_epochs)
        if time_up:
            return _limit_reason("max_time", f"{tc.max_time:g}s")
        return None

    def _checkpoint_due(self, due_time: bool) -> bool:
        """Whether a checkpoint is due now: every checkpoint_every steps, or `due_time` (checkpoint_time)."""
        tc = self.config.train
        return due_time or (tc.checkpoint_every is not None and self.step % tc.checkpoint_every == 0)

    def _validate(self) -> str | None:
        """Score the validation text, keep the best model, save the last; returns a stop reason for early stop."""
        tc = self.config.train
        self._stop_if_diverged()
        self.last_validated_step = self.step
        scores = {d: self._score_shared(self.corpus.valid, self.eval_batch["validation"], d) for d in self.directions}
        score = combined(list(scores.values()))
        if not math.isfinite(score.loss):  # weights made non-finite by a step the guard could not see (weight decay)
            raise self._diverged(f"the validation loss is {score.loss} at step {self.step:,}",
                                 "Lower train.weight_decay or train.lr")
        improved = self.plateau.update(score.loss, tc.plateau_patience)
        if improved:
            self.best = score
            self._save(BEST_MODEL, score)
            if self.ctx.is_main:
                self.run_dir.mark_latest()  # runs/latest only ever points at a run with a model
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
                **self._per_direction(scores),
            }
        )
        if tc.patience is not None and self.plateau.since_best >= tc.patience:
            return f"no improvement in {counted(tc.patience, 'validation')} (early stop)"
        return None

    def _score(self, model, stream: torch.Tensor, batch_size: int) -> dict[str, StreamScore]:
        """The stream's score in each direction of the model, by this process alone."""
        bptt, graphs = self.config.data.bptt, self.evaluation_graphs
        return {d: stream_nll(model, stream, batch_size, bptt, d, cuda_graph=graphs) for d in self.directions}

    def _per_direction(self, scores: dict[str, StreamScore]) -> dict[str, Any]:
        """For a bidirectional model, each direction's loss and perplexity beside the combined ones."""
        if len(scores) < 2:
            return {}
        return {"directions": {d: {"loss": s.loss, "ppl": s.perplexity} for d, s in scores.items()}}

    def _zero_state(self):
        states = tuple(self.model.init_state(self.batch_size) for _ in self.directions)
        return states[0] if len(states) == 1 else states

    def _score_shared(self, stream: torch.Tensor, batch_size: int, direction: str) -> StreamScore:
        """Each rank scores its share of the streams; summed in rank order, every rank gets the same score."""
        part = stream_nll(self.model, stream, batch_size, self.config.data.bptt, direction, self.ctx.rows(batch_size),
                          cuda_graph=self.evaluation_graphs)
        nll, tokens, unknown, nll_unknown = self.ctx.sum_in_rank_order(
            [part.nll, part.tokens, part.unknown, part.nll_unknown]
        )
        return StreamScore(nll=nll, tokens=int(tokens), unknown=int(unknown), nll_unknown=nll_unknown)

    def _save(self, name: str, score: StreamScore) -> None:
        if not self.ctx.is_main:
            return
        self.run_dir.save_model(
            name, self.model, self.config, self.corpus.tokenizer, step=self.step, epoch=self.epoch, valid_loss=score.loss
        )

    def _finish(self, stop_reason: str) -> tuple[TrainResult, Event]:
        """Score the test text with the best model and record the end of the run; returns the result and the end
        record, which is shown once the final checkpoint is saved."""
        self._stop_if_diverged()
        test = None
        if self.corpus.test is not None and self.ctx.is_main:  # the best model is on rank 0's disk only
            with torch.random.fork_rng(devices=[]):  # building the model must not move the training RNG
                best_model = load_model_file(self.run_dir.path / BEST_MODEL).model.to(self.device)
            test_scores = self._score(best_model, self.corpus.test, self.eval_batch["test"])
            test = combined(list(test_scores.values()))
            self.emit(
                {
                    "event": "test",
                    "loss": test.loss,
                    "ppl": test.perplexity,
                    "bits_per_token": test.bits_per_token,
                    "tokens": test.tokens,
                    **self._per_direction(test_scores),
                }
            )
        best = self.best
        end = self.record(
            {
                "event": "end",
                "stop_reason": stop_reason,
                "steps": self.step,
                "epochs": self.epoch,
                "tokens_seen": self.tokens_seen,
                "skipped_steps": self.guard.skipped_steps,
                "elapsed": self.elapsed,
                "best_valid_loss": best.loss if best else None,
                "best_valid_ppl": best.perplexity if best else None,
                "best_valid_bits_per_token": best.bits_per_token if best else None,
                "test_ppl": test.perplexity if test else None,
                "run": str(self.run_dir.path),
            }
        )
        return TrainResult(
            run_dir=self.run_dir.path,
            best_valid=self.best,
            test=test,
            steps=self.step,
            epochs=self.epoch,
            tokens_seen=self.tokens_seen,
            seconds=self.elapsed,
            stop_reason=stop_reason,
        ), end

    # --- checkpoints ------------------------------------------------------------------------------------

    def snapshot(self, finished: bool = False, stop_reason: str | None = None) -> dict[str, Any]:
        """Everything needed to continue exactly: only tensors and plain values (loadable with weights_only)."""
        # Every rank's rows, (num_layers, B * world_size, H), as one process would carry them; nested lists.
        hidden = _as_lists(self._gathered(self.hidden))
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        best = self.best
        ranks = None
        if self.ctx.enabled:  # what differs between ranks, in rank order
            rngs = {key: self.ctx.gather(value) for key, value in rng.items()}
            running = self.ctx.gather(torch.tensor([float(self.running_nll.cpu()), int(self.running_tokens.cpu())],
                                                   dtype=torch.float64))
            ranks = {
                "rng": [{key: parts[i] for key, parts in rngs.items()} for i in range(self.ctx.world_size)],
                "running_nll": [float(r[0]) for r in running],
                "running_tokens": [int(r[1]) for r in running],
            }
        return {
            "world_size": self.ctx.world_size,
            "version": TRAINING_STATE_VERSION,
            "precision": "bf16" if self.autocast_dtype is not None else "fp32",
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "window": self.window,
            "epoch_closed": self.epoch_closed,
            "hidden": hidden,
            "tokens_seen": self.tokens_seen,
            "last_validated_step": self.last_validated_step,
            "running_nll": self.running_nll.detach().cpu(),
            "running_tokens": int(self.running_tokens),
            "clock_seconds": self.clock.counted(),  # the training time of those running tokens
            **self.guard.state_dict(),  # good_steps, bad_steps, skipped_steps, loss_ema
            "plateau": {"best_loss": self.plateau.best_loss, "since_best": self.plateau.since_best,
                        "divisions": self.plateau.divisions},
            "best": None if best is None else {"nll": best.nll, "tokens": best.tokens, "unknown": best.unknown,
                                               "nll_unknown": best.nll_unknown},
            "elapsed": self.elapsed,
            "rng": rng,
            "metrics_bytes": self.run_dir.metrics_size(),
            "sources": self.sources,
            "finished": finished,
            "config": self.config.to_dict(),  # to tell a hand-edited config.yaml on resume
            "vocab": self.corpus.tokenizer.to_dict(),  # and a hand-edited vocab.json
            "stop_reason": stop_reason,
            "ranks": ranks,
        }

    def _gathered(self, state):
        """Every rank's rows of `state`, in rank order."""
        return None if state is None else map_state(lambda t: torch.cat(self.ctx.gather(t), dim=1), state)

    def save_checkpoint(self, finished: bool = False, stop_reason: str | None = None) -> None:
        self._stop_if_diverged()  # a diverged run is never checkpointed: its last good checkpoint stays
        snapshot = self.snapshot(finished, stop_reason)  # every rank takes part; rank 0 writes it
        if self.ctx.is_main:
            self.run_dir.save_training_state(snapshot)
        self.last_checkpoint_time = time.perf_counter()

    def restore(self, saved: dict[str, Any]) -> None:
        """Put the run back where `snapshot` left it."""
        try:
            self._restore(saved)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise LmtoolError(
                f"the training checkpoint {self.run_dir.path / 'train-state.pt'} is damaged or does not fit the "
                f"run's config ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from None

    def _restore(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        for group in saved["optimizer"]["param_groups"]:
            # load_state_dict takes these from the checkpoint; they must be this machine's: a checkpoint from an
            # older lmtool (or another device) was saved unfused, and only fused kernels can skip a bad step here.
            group["fused"], group["foreach"] = self.skips_on_device or None, None
            if "capturable" in group:  # Adam's: whether this run's steps are captured, not the saving run's
                group["capturable"] = self.captures_steps
        self.optimizer.load_state_dict(saved["optimizer"])
        start_momentum(self.optimizer)  # a checkpoint taken before the first step holds no buffers
        # A run keeps the precision it started with, even on another machine.
        self.autocast_dtype = torch.bfloat16 if saved.get("precision", "fp32") == "bf16" else None
        self.step, self.epoch, self.window = saved["step"], saved["epoch"], saved["window"]
        self.epoch_closed = saved["epoch_closed"]
        # This rank's rows of the global state.
        self.hidden = _as_tuples(saved["hidden"], self.device, self.ctx.rows(self.batch_size * self.ctx.world_size))
        self.tokens_seen = saved["tokens_seen"]
        self.last_validated_step = saved["last_validated_step"]
        self.running_nll = saved["running_nll"].to(self.device)
        self.running_tokens = torch.tensor(saved["running_tokens"], device=self.device)
        # Without it, the first log line after a resume divided the interval's tokens by the time since the resume.
        self.clock.seconds = saved.get("clock_seconds", 0.0)
        rng = saved["rng"]
        ranks = saved.get("ranks")
        if ranks is not None:
            rng = ranks["rng"][self.ctx.rank]
            self.running_nll = torch.tensor(ranks["running_nll"][self.ctx.rank], device=self.device)
            self.running_tokens = torch.tensor(ranks["running_tokens"][self.ctx.rank], device=self.device)
        self.guard.load(saved)
        self.plateau = PlateauTracker(**saved["plateau"])
        self.best = None if saved["best"] is None else StreamScore(**saved["best"])
        self.elapsed_before = saved["elapsed"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.ctx.is_main:
            self.run_dir.truncate_metrics(saved["metrics_bytes"])  # records after the checkpoint will be redone
        self.resumed = True

    @contextmanager
    def _signals_caught(self) -> Iterator[None]:
        """Ctrl-C or SIGTERM: finish the step, checkpoint, exit; a second one stops at once, by an exception raised
        where the program is, not by ending the process: a Python caller (a notebook's kernel) lives on, and every
        file stays whole (each is written to a temporary file that an exception removes)."""
        def handler(signum, frame):
            if self.signal_received is not None:
                raise Interrupted(f"training stopped at once by a second {signal.Signals(signum).name}; the run keeps "
                                  "what it saved last", exit_code=128 + signum)
            self.signal_received = signum

        previous = {}
        try:  # restored even if a signal lands between the two installs
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # --- records ----------------------------------------------------------------------------------------

    def emit(self, record: Event) -> None:
        """Record an event in metrics.jsonl and show it (rank 0)."""
        self.show(self.record(record))

    def record(self, record: Event) -> Event:
        """Append an event to metrics.jsonl (rank 0) without showing it yet; returns it."""
        if self.ctx.is_main:
            self.run_dir.append_metrics(record)
        return record

    def show(self, record: Event) -> None:
        """Pass an event to `on_event` (rank 0)."""
        if self.ctx.is_main and self.on_event is not None:
            self.on_event(record)

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def _start_record(self) -> Event:
        tc, dc = self.config.train, self.config.data
        return {
            "event": "start",
            "run": str(self.run_dir.path),
            "device": str(self.device),
            "precision": "bf16" if self.autocast_dtype is not None else "fp32",
            "cuda_graph": self.graphed is not None,
            "level": dc.level,
            "cell": self.config.model.cell,
            "vocab_size": len(self.corpus.tokenizer),
            "parameters": count_parameters(self.model),
            "train_tokens": self.corpus.train.numel(),
            "valid_tokens": self.corpus.valid.numel(),
            "batch_size": self.batch_size * self.ctx.world_size,  # the global batch
            "world_size": self.ctx.world_size,
            "directions": list(self.directions),
            "bptt": dc.bptt,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "max_epochs": tc.max_epochs,
            "max_time": tc.max_time,
        }

    def _resume_record(self) -> Event:
        return {**self._start_record(), "event": "resume", "step": self.step, "epoch": self.epoch}

    def _eta(self) -> float | None:
        """Seconds left until the nearest known limit."""
        candidates = []
        if self.total_steps is not None and self.step:
            candidates.append((self.total_steps - self.step) * self.elapsed / self.step)
        if self.config.train.max_time is not None:
            candidates.append(max(0.0, self.config.train.max_time - self.elapsed))
        return min(candidates) if candidates else None


def _as_lists(state):
    """A (nested) tuple state as nested lists of tensors: what a weights_only checkpoint stores."""
    return [_as_lists(s) for s in state] if isinstance(state, tuple) else state


def _as_tuples(saved, device: torch.device, rows: slice):
    """The state `_as_lists` stored, with only the streams in `rows`, on `device`."""
    if saved is None:
        return None
    return tuple(_as_tuples(s, device, rows) for s in saved) if isinstance(saved, list) else saved[:, rows].to(device)
