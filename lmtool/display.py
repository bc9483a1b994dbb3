"""Terminal rendering of training events: a live rich display on a terminal, plain lines elsewhere."""

from __future__ import annotations

import errno
import math
import os
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from lmtool.errors import counted

Event = dict[str, Any]


def format_duration(seconds: float | None) -> str:
    """'1h02m', '3m07s', '42s'."""
    if seconds is None or math.isnan(seconds) or math.isinf(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_perplexity(value: float, places: int = 2) -> str:
    """A perplexity with `places` decimals, or in scientific notation from a million on: a diverged model's
    perplexity (up to about 1e304) would otherwise print as hundreds of digits."""
    return f"{value:.{places}f}" if round(value, places) < 1e6 else f"{value:.3g}"


def token_unit(level: str) -> str:
    return "char" if level == "char" else "word"


class _ProgressConsole(Console):
    """A Console for stderr whose closed pipe raises BrokenPipeError, which TrainDisplay catches, instead of rich's
    default: exit at once, with standard output sent to /dev/null (the summary lost too)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


class TrainDisplay:
    """Consumes the events of `lmtool.train.train`; progress goes to stderr, the summary to stdout."""

    def __init__(self, live: bool | None = None, err: TextIO | None = None, out: TextIO | None = None) -> None:
        self.err = _ProgressConsole(file=err or sys.stderr, highlight=False, markup=False)
        self.out = Console(file=out or sys.stdout, highlight=False, markup=False)
        self.live = self.err.is_terminal if live is None else live
        if not self.live:  # log files want whole lines, not lines wrapped at 80 columns
            self.err = _ProgressConsole(file=err or sys.stderr, highlight=False, markup=False, soft_wrap=True,
                                        no_color=True)
        self.progress: Progress | None = None
        self.task = None
        self.unit = "token"
        self.run_dir: str | None = None
        self.progress_lost = False  # stderr failed once: no more progress lines

    def __call__(self, event: Event) -> None:
        getattr(self, f"_on_{event['event']}")(event)

    def _progress(self, text: str) -> None:
        """A line of progress on stderr. Where stderr cannot take it (a pipe whose reader left, as in `2>&1 | head`,
        or a full disk) progress stops and training goes on: losing the log must not lose the run."""
        if self.progress_lost:
            return
        try:
            self.err.print(text)  # the live bar's console too, which prints the line above the bar
        except OSError:
            self.progress_lost = True

    def close(self) -> None:
        if self.progress is not None:
            try:
                self.progress.stop()  # redraws the bar a last time
            except OSError:  # the terminal went away: the summary still goes to stdout
                self.progress_lost = True
            self.progress = None

    # --- events -----------------------------------------------------------------------------------------

    def _on_resume(self, e: Event) -> None:
        self._progress(f"resuming {e['run']} at epoch {e['epoch']}, step {e['step']:,}")
        self._on_start(e)

    def _on_start(self, e: Event) -> None:
        self.unit = token_unit(e["level"])
        self.run_dir = e["run"]
        total = e["total_steps"]
        world = e.get("world_size", 1)
        batch = f"{e['batch_size']} ({world} processes x {e['batch_size'] // world})" if world > 1 else e["batch_size"]
        self._progress(
            f"run {e['run']} | {_directions(e)}{e['cell']} {e['parameters']:,} parameters on {e['device']} "
            f"({e['precision']}{', CUDA graph' if e.get('cuda_graph') else ''}) | "
            f"vocabulary {e['vocab_size']:,} {self.unit}s | {e['train_tokens']:,} training / "
            f"{e['valid_tokens']:,} validation tokens | batch {batch} x {e['bptt']}, "
            f"{counted(e['steps_per_epoch'], 'step')} per epoch"
        )
        if self.live:
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]} ppl {task.fields[ppl]} lr {task.fields[lr]}"),
                TextColumn("{task.fields[speed]} tok/s ETA {task.fields[eta]}"),
                console=self.err,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=total, completed=e.get("step", 0), epoch=e.get("epoch", 1), loss="-", ppl="-", lr="-", speed="-", eta="?"
            )

    def _on_train(self, e: Event) -> None:
        loss, ppl, lr = f"{e['loss']:.4f}", format_perplexity(e["ppl"]), f"{e['lr']:.2e}"
        speed, eta = f"{e['tokens_per_s']:,.0f}", format_duration(e["eta"])
        if self.progress is not None:
            self.progress.update(
                self.task, completed=e["step"], epoch=e["epoch"], loss=loss, ppl=ppl, lr=lr, speed=speed, eta=eta
            )
        else:
            self._progress(
                f"epoch {e['epoch']} step {e['step']:,} | loss {loss} | ppl {ppl} | lr {lr} | "
                f"{speed} tok/s | elapsed {format_duration(e['elapsed'])} | eta {eta}"
            )

    def _on_notice(self, e: Event) -> None:
        self._progress(f"lmtool: note: {e['message']}")

    def _on_valid(self, e: Event) -> None:
        mark = " (best)" if e["best"] else ""
        line = (
            f"validation epoch {e['epoch']} step {e['step']:,} | loss {e['loss']:.4f} | "
            f"ppl {format_perplexity(e['ppl'])} | {e['bits_per_token']:.3f} bits/{self.unit}{mark}"
        )
        if "directions" in e:  # the loss above is the mean of the two directions
            line += " | " + " | ".join(f"{d} ppl {format_perplexity(v['ppl'])}" for d, v in e["directions"].items())
        self._progress(line)

    def _on_test(self, e: Event) -> None:
        self._progress(f"test | loss {e['loss']:.4f} | ppl {format_perplexity(e['ppl'])} | "
                       f"{e['bits_per_token']:.3f} bits/{self.unit}")

    def _on_end(self, e: Event) -> None:
        self.close()
        table = Table(title="training summary", show_header=False, title_justify="left")
        table.add_column("what", style="bold")
        table.add_column("value")
        rows = [("run", e["run"]), ("stopped", e["stop_reason"])]
        if e["best_valid_loss"] is not None:
            rows += [
                ("best validation loss", f"{e['best_valid_loss']:.4f} nats/{self.unit}"),
                ("best validation perplexity", format_perplexity(e["best_valid_ppl"])),
                (f"bits per {self.unit}", f"{e['best_valid_bits_per_token']:.3f}"),
            ]
        if e["test_ppl"] is not None:
            rows.append(("test perplexity", format_perplexity(e["test_ppl"])))
        rows += [
            ("tokens seen", f"{e['tokens_seen']:,}"),
            ("steps / epochs", f"{e['steps']:,} / {e['epochs']}"),
            ("time", format_duration(e["elapsed"])),
        ]
        for what, value in rows:
            table.add_row(what, value)
        self.out.print(table)


def _directions(e: Event) -> str:
    """'bidirectional ' or 'backward ' before the cell name; nothing for the usual forward model."""
    directions = e.get("directions", ["forward"])
    return "bidirectional " if len(directions) > 1 else ("" if directions == ["forward"] else f"{directions[0]} ")
