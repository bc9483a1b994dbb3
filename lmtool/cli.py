"""The command line: parse, make one library call, render. User mistakes become one line and an exit code."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import click
import typer

from lmtool.errors import LmtoolError

# Newer typer vendors its own click; usage errors may come from either.
_CLICK_ERRORS = tuple({click.ClickException, getattr(typer, "TyperException", click.ClickException)})

app = typer.Typer(
    name="lmtool",
    help="Train character- and word-level RNN/GRU/LSTM language models on a text file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from lmtool import __version__

        print(f"lmtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="print the version"),
) -> None:
    """Train character- and word-level RNN/GRU/LSTM language models on a text file."""


@app.command()
def train(
    corpus: Path = typer.Argument(..., help="training text: a UTF-8 file, one sentence or line per line"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (default: built-in char or word defaults)"),
    set_: List[str] = typer.Option([], "--set", help="override one config key: section.key=value (repeatable)"),
    level: Optional[str] = typer.Option(None, help="char | word  (data.level)"),
    cell: Optional[str] = typer.Option(None, help="rnn_tanh | rnn_relu | gru | lstm  (model.cell)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | mps  (train.device)"),
    seed: Optional[int] = typer.Option(None, help="random seed  (train.seed)"),
    max_time: Optional[str] = typer.Option(None, "--max-time", help="stop after this long: 600, 90s, 10m, 2h  (train.max_time)"),
    max_epochs: Optional[int] = typer.Option(None, "--max-epochs", help="train.max_epochs"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="train.max_steps"),
    valid: Optional[Path] = typer.Option(None, help="validation text (default: the last data.valid_fraction of the corpus)"),
    test: Optional[Path] = typer.Option(None, help="test text, scored with the best model at the end"),
    out: Optional[Path] = typer.Option(None, help="run directory (default: runs/<corpus>-<timestamp>)"),
    overwrite: bool = typer.Option(False, help="replace an existing run directory"),
) -> None:
    """Train a language model on CORPUS and save it as a run directory (runs/latest points at it)."""
    from lmtool.config import load_config
    from lmtool.display import TrainDisplay
    from lmtool.train import train as run_training

    flags = {
        "data.level": level,
        "model.cell": cell,
        "train.device": device,
        "train.seed": seed,
        "train.max_time": max_time,
        "train.max_epochs": max_epochs,
        "train.max_steps": max_steps,
    }
    cfg = load_config(config, set_, flags)
    display = TrainDisplay()
    try:
        run_training(cfg, corpus, valid_path=valid, test_path=test, out=out, overwrite=overwrite, on_event=display)
    finally:
        display.close()


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"lmtool: warning: {_one_line(str(message))}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every user mistake into one line on stderr and an exit code."""
    warnings.showwarning = _show_warning
    try:
        result = app(args=argv, prog_name="lmtool", standalone_mode=False)
    except LmtoolError as err:
        print(f"lmtool: error: {_one_line(str(err))}", file=sys.stderr)
        sys.exit(err.exit_code)
    except _CLICK_ERRORS as err:
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"lmtool: error: {_one_line(err.format_message())}{hint}", file=sys.stderr)
        sys.exit(err.exit_code)
    except (typer.Abort, click.Abort, KeyboardInterrupt):
        print("lmtool: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # a bug, not a user mistake: still one line unless asked for the trace
        if os.environ.get("LMTOOL_DEBUG"):
            raise
        print(f"lmtool: internal error: {type(err).__name__}: {_one_line(str(err))} "
              "(set LMTOOL_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
        sys.exit(1)
    if isinstance(result, int) and result != 0:
        sys.exit(result)
