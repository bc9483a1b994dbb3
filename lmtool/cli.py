"""The command line: parse, make one library call, render. User mistakes become one line and an exit code."""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import click
import typer

from lmtool.errors import Interrupted, LmtoolError
# torch-free: a missing model or file, or a binary one, is reported before torch is imported (seconds)
from lmtool.atomic_files import can_write_beside
from lmtool.run_paths import BEST_MODEL, LOCK_FILE, RUN_FILES, TRAINING_STATE, is_run_dir, resolve_model_path
from lmtool.text_files import check_readable_file, iter_lines, stdin_lines

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


# Path("") is the current directory, so `-o ""` was read as `.`: an empty name is refused as it is parsed.
def _name(value: str) -> str:
    if value == "":
        raise typer.BadParameter("is an empty name; give a path")
    return value


def _path(value: str) -> Path:
    return Path(_name(value))


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="print the version"),
) -> None:
    """Train character- and word-level RNN/GRU/LSTM language models on a text file."""


@app.command(short_help="Train a model on a text file; the run becomes runs/latest.")
def train(
    corpus: Optional[Path] = typer.Argument(
        None, parser=_path, metavar="CORPUS", help="training text: a UTF-8 file, one sentence or line per line"),
    resume: Optional[Path] = typer.Option(
        None, "--resume", parser=_path, metavar="<path>", help="continue RUN from its last checkpoint, exactly"),
    configs: List[Path] = typer.Option([], "--config", "-c", metavar="<path>", parser=_path,
                                       help="YAML config (default: built-in char or word defaults)"),
    set_: List[str] = typer.Option([], "--set", metavar="<key=value>",
                                   help="override one config key: section.key=value (repeatable)"),
    level: Optional[str] = typer.Option(None, help="char | word  (data.level)"),
    cell: Optional[str] = typer.Option(None, help="rnn_tanh | rnn_relu | gru | lstm  (model.cell)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | mps  (train.device)"),
    seed: Optional[int] = typer.Option(None, help="random seed  (train.seed)"),
    max_time: Optional[str] = typer.Option(None, "--max-time", help="stop after this long: 600, 90s, 10m, 2h  (train.max_time)"),
    max_epochs: Optional[int] = typer.Option(None, "--max-epochs", help="train.max_epochs"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="train.max_steps"),
    valid: Optional[Path] = typer.Option(
        None, parser=_path, metavar="<path>",
        help="validation text (default: the last data.valid_fraction of the corpus)"),
    test: Optional[Path] = typer.Option(
        None, parser=_path, metavar="<path>", help="test text, scored with the best model at the end"),
    out: Optional[Path] = typer.Option(
        None, parser=_path, metavar="<path>", help="run directory (default: runs/<corpus>-<timestamp>)"),
    overwrite: bool = typer.Option(False, help="replace an existing run directory"),
) -> None:
    """Train a language model on CORPUS and save it as a run directory (runs/latest points at it).

    Ctrl-C or SIGTERM saves a checkpoint and prints the command that resumes the run exactly.
    """
    from lmtool.config import load_config
    from lmtool.display import TrainDisplay

    if len(configs) > 1:  # files are not layered: the last one alone would count
        raise LmtoolError(f"--config given {len(configs)} times; give one file, and change single settings with --set")
    config = configs[0] if configs else None
    limits = {"max_time": max_time, "max_epochs": max_epochs, "max_steps": max_steps}
    display = TrainDisplay()
    try:
        if resume is not None:
            extra = {"CORPUS": corpus, "--config": config, "--set": set_ or None, "--level": level, "--cell": cell,
                     "--seed": seed, "--valid": valid, "--test": test, "--out": out, "--overwrite": overwrite or None}
            given = [name for name, value in extra.items() if value is not None]
            if given:
                raise LmtoolError(
                    f"--resume continues a run with its own data and config; drop {', '.join(given)} "
                    "(only --max-time, --max-epochs, --max-steps and --device may change)"
                )
            from lmtool.config import parse_duration

            if max_time is not None:
                try:
                    limits["max_time"] = parse_duration(max_time)
                except ValueError:
                    raise LmtoolError(f"--max-time: {max_time!r} is not a duration (seconds, or like '90s', '10m', '2h')") from None
            from lmtool.train import resume as resume_training

            resume_training(resume, on_event=display, limits=limits, device=device)
            return
        if corpus is None:
            raise LmtoolError("give the training text: lmtool train CORPUS (or --resume RUN to continue a run)")
        flags = {
            "data.level": level,
            "model.cell": cell,
            "train.device": device,
            "train.seed": seed,
            **{f"train.{key}": value for key, value in limits.items()},
        }
        cfg = load_config(config, set_, flags)
        # One process checks its input files before importing the trainer (and torch, seconds), so that a typo is
        # answered at once; under torchrun the trainer checks them on every rank and rank 0 alone reports.
        if os.environ.get("WORLD_SIZE", "1") == "1":
            for path, what in ((corpus, "training"), (valid, "validation"), (test, "test")):
                if path is not None:
                    check_readable_file(path, what)
        from lmtool.train import train as run_training

        run_training(cfg, corpus, valid_path=valid, test_path=test, out=out, overwrite=overwrite, on_event=display)
    except KeyboardInterrupt:
        # Before the run starts, `out` may still hold an earlier run that --overwrite was about to replace.
        run_dir = display.run_dir or resume or (None if overwrite else out)
        terminated = _sigterm["received"]
        how = "stopped by SIGTERM" if terminated else "interrupted"
        raise Interrupted(f"training {how}{_what_was_kept(run_dir)}",
                          exit_code=128 + signal.SIGTERM if terminated else 130) from None
    finally:
        display.close()


MODEL_HELP = "run directory or model file (default: runs/latest)"
DIRECTION_HELP = "forward | backward | both (default: every direction the model has; both adds their mixture)"
PRECISION_HELP = ("fp32 (exact) | bf16: products in bfloat16 (autocast), 2-3.6x faster than fp32 for evaluation "
                  "on a CPU with native bf16 in the README's runs, where perplexities moved by 0.04% or less; not exact")


def _check_direction(direction: Optional[str]) -> None:
    if direction is not None and direction not in ("forward", "backward", "both"):
        raise LmtoolError(f"--direction must be forward, backward or both, got '{direction}'")


def _check_precision(precision: str) -> None:
    # the name, before torch is imported (lmtool.devices.inference_dtype checks it again for library callers); the
    # device is checked once the model is on it
    if precision not in ("fp32", "bf16"):
        raise LmtoolError(f"--precision must be fp32 or bf16, got {precision!r}")


@app.command(short_help="Generate text from a trained model.")
def sample(
    model: Optional[str] = typer.Option(None, "--model", "-m", parser=_name, metavar="<path>", help=MODEL_HELP),
    temperature: float = typer.Option(1.0, help="> 0 flattens (>1) or sharpens (<1) the distribution; 0 is greedy"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="sample among the k most probable tokens only"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="sample among the smallest set reaching probability p"),
    prime: str = typer.Option("", help="text to start from (the prompt); newlines are line ends"),
    ending: Optional[str] = typer.Option(
        None, help="backward or bidirectional models: write the text that leads to this ending (right to left)"
    ),
    length: int = typer.Option(200, help="tokens to generate per sample"),
    num_samples: int = typer.Option(1, "--num-samples", "-n", help="samples generated together as one batch"),
    seed: Optional[int] = typer.Option(None, help="same seed, same text"),
    stop_at_eos: bool = typer.Option(False, "--stop-at-eos", help="end a sample at its first line end (<EOS>)"),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", parser=_path, metavar="<path>", help="also write the samples to this file"),
    overwrite: bool = typer.Option(False, help="let --output replace an existing file"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
    precision: str = typer.Option(
        "fp32", help="fp32 (exact) | bf16: the recurrent layers, and on a CPU the output layer, in bfloat16; on "
        "CPUs with native bf16 1.5-1.7x fp32 for one word-model sample, 1.0-2.3x for 4-64 (bench/sampling.py)"
    ),
) -> None:
    """Generate text from a trained model, one token at a time (the RNN state is carried, never re-read)."""
    model_path = resolve_model_path(model)  # before torch is imported: a missing model is told at once
    if output is not None:
        _check_output(output, overwrite, model_path)
    from lmtool.api import load_model
    from lmtool.atomic_files import atomic_write
    from lmtool.sample import SamplingOptions, encode_prime

    options = SamplingOptions(
        temperature=temperature, top_k=top_k, top_p=top_p, length=length, num_samples=num_samples,
        stop_at_eos=stop_at_eos, seed=seed, precision=precision,
    )
    if ending is not None and prime:
        raise LmtoolError("give --prime or --ending, not both: a model writes in one direction at a time")
    lm = load_model(model_path, device)
    if ending is not None:
        _sample_toward(lm, ending, options, output)
        return
    if "forward" not in lm.directions:
        raise LmtoolError("this model reads backward only: give --ending TEXT to write the text that leads to it "
                          "(--ending \"\" for a line that leads to a line end)")
    _, unknown = encode_prime(lm.tokenizer, prime)
    if unknown:
        warnings.warn(f"{unknown} token(s) of --prime are not in the vocabulary and are read as <UNK>")
    streamer = _Streamer(lm.tokenizer, prime) if num_samples == 1 else None
    if streamer is not None:
        sys.stdout.write(prime)
        sys.stdout.flush()
    texts = lm.sample(prime, options, on_token=streamer)
    if streamer is not None:
        if not streamer.at_line_start:
            sys.stdout.write("\n")
    else:
        for n, text in enumerate(texts, start=1):
            sys.stdout.write(f"--- sample {n} ---\n{_line(prime, _joined(lm.tokenizer, prime, text))}")
    if output is not None:
        body = "".join(_line(prime, _joined(lm.tokenizer, prime, t)) for t in texts)
        atomic_write(output, body.encode("utf-8"))


def _what_was_kept(run_dir: str | Path | None) -> str:
    """For the message of a training stopped by Ctrl-C before its own handler could save a checkpoint."""
    if not run_dir or not is_run_dir(Path(run_dir)):
        return ""
    if (Path(run_dir) / TRAINING_STATE).is_file():  # a resume stopped before its loop: --overwrite would lose it
        return f"; its last checkpoint is kept: continue with 'lmtool train --resume {run_dir}'"
    if (Path(run_dir) / BEST_MODEL).is_file():
        return f"; the best model so far is in {run_dir}"
    return f" before any model was saved; to start again, add --overwrite (run {run_dir})"


def _check_output(output: Path, overwrite: bool, model_path: Path) -> None:
    """Fail before any work if the samples could not be written to `output`, or would replace the model."""
    if output.is_dir():
        raise LmtoolError(f"--output {output} is a directory; give a file name")
    if output.exists() and not output.is_file():  # a device or a pipe: --overwrite would put a plain file there
        raise LmtoolError(f"--output {output} is not a regular file (a device or a pipe); write to standard output "
                          "and redirect it there instead")
    if os.path.lexists(output) and not overwrite:  # a link, even a dangling one, is the user's too
        raise LmtoolError(f"--output {output} already exists; pass --overwrite to replace it or choose another file")
    if output.exists() and os.path.samefile(output, model_path):  # not even with --overwrite
        raise LmtoolError(f"--output {output} is the model being sampled from; choose another file")
    if output.name in (*RUN_FILES, LOCK_FILE) and is_run_dir(output.parent):  # its model, config, checkpoint, lock
        raise LmtoolError(f"--output {output} is a file of the run {output.parent}; choose a file outside it")
    if not output.parent.is_dir():
        raise LmtoolError(f"--output {output}: the directory {output.parent} does not exist; create it first")
    refused = can_write_beside(output)
    if refused is not None:
        raise LmtoolError(f"--output {output}: cannot create a file in {output.parent} ({refused.strerror}); "
                          "choose another place")


def _sample_toward(lm, ending: str, options, output: Optional[Path]) -> None:
    """Backward generation ends at `ending`: nothing can be shown before the whole sample exists."""
    from lmtool.atomic_files import atomic_write
    from lmtool.sample import encode_prime

    if "backward" not in lm.directions:
        raise LmtoolError(
            "--ending needs a backward or bidirectional model (this one reads forward only); "
            "train one with --set model.direction=backward or bidirectional"
        )
    _, unknown = encode_prime(lm.tokenizer, ending)
    if unknown:
        warnings.warn(f"{unknown} token(s) of --ending are not in the vocabulary and are read as <UNK>")
    texts = [t + _joined(lm.tokenizer, t, ending) for t in lm.sample(options=options, ending=ending)]
    if len(texts) == 1:
        sys.stdout.write(_line("", texts[0]))
    else:
        for n, text in enumerate(texts, start=1):
            sys.stdout.write(f"--- sample {n} ---\n{_line('', text)}")
    if output is not None:
        atomic_write(output, "".join(_line("", t) for t in texts).encode("utf-8"))


def _line(prime: str, text: str) -> str:
    """A sample as its own line(s): the prime, the text, and a line end unless the text ends with its <EOS> (a
    sample stopped at a line end comes without it, so an empty one still gets its line, as on screen)."""
    return prime + text + ("" if text.endswith("\n") else "\n")


def _joined(tokenizer, before: str, text: str) -> str:
    """`text` as it follows `before` (a prime, or a sample before its ending): word-level text needs a space
    between the two, unless `before` ends with a space or a line end already."""
    if tokenizer.level == "word" and before and not before[-1].isspace() and text and not text.startswith("\n"):
        return " " + text
    return text


class _Streamer:
    """Writes each new token of a single sample to stdout as soon as it exists."""

    def __init__(self, tokenizer, prime: str) -> None:
        from lmtool.tokenizer import EOS_ID

        self.tokenizer, self.eos_id = tokenizer, EOS_ID
        self.at_line_start = not prime or prime.endswith("\n")
        self.spaced = not prime or prime[-1].isspace()  # a word written now needs no space before it

    def __call__(self, token) -> None:
        i = int(token[0])
        if i == self.eos_id:
            piece = "\n"
        elif self.tokenizer.level == "word":
            piece = self.tokenizer.tokens[i] if self.spaced else " " + self.tokenizer.tokens[i]
        else:
            piece = self.tokenizer.tokens[i]
        self.at_line_start = self.spaced = i == self.eos_id
        sys.stdout.write(piece)
        sys.stdout.flush()


@app.command("score", short_help="log P of sentences, ranked, with a per-token breakdown.")
def score(
    sentences: List[str] = typer.Argument(None, metavar="SENTENCE", help="sentences to score (or use --file)"),
    files: Optional[List[str]] = typer.Option(
        None, "--file", "-f", metavar="<path>", parser=_name,
        help="score each line of this file ('-' for stdin); repeat it for several files, scored in order",
    ),
    model: Optional[str] = typer.Option(None, "--model", "-m", parser=_name, metavar="<path>", help=MODEL_HELP),
    tokens: bool = typer.Option(False, "--tokens", help="add a per-token table: probability, log-probability, bits"),
    json_out: bool = typer.Option(False, "--json", help="write JSON Lines, one object per sentence"),
    fmt: str = typer.Option("table", "--format", help="table | kenlm (KenLM query-style lines)"),
    batch_size: int = typer.Option(64, "--batch-size", help="sentences scored together in one padded batch"),
    direction: Optional[str] = typer.Option(None, help=DIRECTION_HELP),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
) -> None:
    """Score sentences: log P(w1 .. wT, <EOS>), each starting from the sentence-start state (after an <EOS>).

    Prints log P in nats and base 10, perplexity, token and unknown-token counts, and ranks several
    sentences most probable first (say, to pick the likeliest of competing transcripts).
    """
    _check_direction(direction)
    if fmt not in ("table", "kenlm"):
        raise LmtoolError(f"--format must be table or kenlm, got '{fmt}'")
    if fmt == "kenlm" and (json_out or tokens):
        raise LmtoolError(f"--format kenlm is its own output format (every token listed); drop "
                          f"{'--json' if json_out else '--tokens'}")
    if batch_size < 1:
        raise LmtoolError(f"--batch-size must be at least 1, got {batch_size}")
    model_path = resolve_model_path(model)  # before torch is imported: a missing model is told at once
    _check_precision(precision)
    # read and checked before torch is imported too; "$(head -1 windows.txt)" keeps the CR that --file drops
    texts = [s.removesuffix("\r") for s in sentences or []]
    files = files or []
    if files.count("-") > 1:
        raise LmtoolError("--file - (standard input) can be given once: it can be read only once")
    for file in files:
        from_file = stdin_lines() if file == "-" else list(iter_lines(Path(file), "sentence"))
        if not any(line.strip() for line in from_file):
            raise LmtoolError(f"{'standard input' if file == '-' else file} holds no sentences (one per line)")
        texts += from_file
    if not texts:
        raise LmtoolError("no sentences to score; give them as arguments, or with --file FILE (or - for stdin)")
    from rich.console import Console

    from lmtool.api import load_model
    from lmtool.report import print_scores, score_json_lines, score_kenlm_lines

    lm = load_model(model_path, device)
    scores = lm.score(texts, batch_size=batch_size, direction=direction, precision=precision)
    if fmt == "kenlm" and not hasattr(scores[0], "tokens"):
        raise LmtoolError("--format kenlm lists one direction's tokens: add --direction forward or backward")
    if json_out:
        print("\n".join(score_json_lines(scores, with_tokens=tokens, precision=precision)))
    elif fmt == "kenlm":
        print("\n".join(score_kenlm_lines(scores, lm.tokenizer)))
    else:
        print_scores(Console(highlight=False, markup=False), scores, with_tokens=tokens, level=lm.level, precision=precision)


app.command("score-sentence-probability", help="Same as 'score'.")(score)


# Above this much text, scoring one exact stream takes minutes on a CPU: say how to go faster.
EXACT_STREAM_HINT_BYTES = 2_000_000


@app.command("evaluate-perplexity", short_help="Perplexity, bits per token and unknown rate of text files.")
def evaluate_perplexity(
    files: List[Path] = typer.Argument(..., parser=_path, metavar="FILE", help="held-out text files"),
    model: Optional[str] = typer.Option(None, "--model", "-m", parser=_name, metavar="<path>", help=MODEL_HELP),
    batch_size: int = typer.Option(1, "--batch-size", help="parallel streams; 1 gives the exact whole-file number"),
    bptt: Optional[int] = typer.Option(None, help="tokens per forward window (default: the model's data.bptt, on a "
                                       "CPU lengthened until batch size x window reaches 512)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    direction: Optional[str] = typer.Option(None, help=DIRECTION_HELP),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
) -> None:
    """Perplexity of text files, streamed through the model with the state carried across lines.

    A bidirectional model reports each direction and the per-line mixture of the two."""
    if batch_size < 1:
        raise LmtoolError(f"--batch-size must be at least 1, got {batch_size}")
    if bptt is not None and bptt < 1:
        raise LmtoolError(f"--bptt must be at least 1, got {bptt}")
    _check_direction(direction)
    model_path = resolve_model_path(model)  # before torch is imported: a missing model is told at once
    _check_precision(precision)
    for path in files:  # and a mistyped file name
        check_readable_file(path, "evaluation")
    import json

    from rich.console import Console

    from lmtool.api import load_model
    from lmtool.report import evaluation_record, print_evaluation

    lm = load_model(model_path, device)
    size = sum(f.stat().st_size for f in files if f.is_file())
    if batch_size == 1 and size > EXACT_STREAM_HINT_BYTES:
        # bench/eval_throughput.py: batch 64 over batch 1, 2.4x (char) and 1.1x (word) on a 2-core AMD EPYC; the
        # char model on an H200 through the CLI (bench/gpu.sh section 1), 17x with evaluation's CUDA graph
        print(f"lmtool: hint: {size / 1e6:.0f} MB scored as one exact stream, one token at a time; --batch-size 64 is "
              "up to 2.4x faster on a CPU (17x on a GPU) and changes the perplexity in about the fourth digit",
              file=sys.stderr)
    evaluation = lm.perplexity(files, batch_size=batch_size, bptt=bptt, direction=direction, precision=precision)
    if json_out:
        print(json.dumps(evaluation_record(evaluation, lm.level)))
    else:
        print_evaluation(Console(highlight=False, markup=False), evaluation, lm.level)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    try:
        print(f"lmtool: warning: {_one_line(str(message))}", file=sys.stderr)
    except OSError:  # stderr gone (`2>&1 | head`, a full disk): a warning must not stop a training run
        pass


# OSError numbers that mean a path cannot be reached as given (exit 2); other I/O failures, such as a full or
# read-only disk, are runtime failures (exit 1).
PATH_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EISDIR}
# Errors of a write with no file named: the disk behind standard output is full.
OUTPUT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _out_of_memory(err: Exception) -> bool:
    """Whether err is an allocation failure, on the host or a GPU (told apart without importing torch)."""
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(err))


def _internal_error(err: Exception) -> None:
    """A bug, not a user mistake: still one line and exit 1, unless LMTOOL_DEBUG asks for the traceback."""
    if os.environ.get("LMTOOL_DEBUG"):
        raise err
    print(f"lmtool: internal error: {type(err).__name__}: {_one_line(str(err))} "
          "(set LMTOOL_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
    sys.exit(1)


# Set by the handler: typer turns any KeyboardInterrupt into a plain exit code 130, losing which one it was.
_sigterm = {"received": False}


def _raise_terminated(signum, frame) -> None:
    """SIGTERM outside training's own handler (loading, sampling, scoring): unwound as Ctrl-C is, so temporary
    files go and the message says what was kept, but the exit code is 143, as for a process SIGTERM stopped."""
    _sigterm["received"] = True
    raise KeyboardInterrupt


def _stopped() -> None:
    """Ctrl-C or SIGTERM outside training: one line, and the exit code a shell expects of each."""
    if _sigterm["received"]:
        print("lmtool: stopped by SIGTERM", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    print("lmtool: interrupted", file=sys.stderr)
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every user mistake into one line on stderr and an exit code."""
    if sys.stdout is None or sys.stderr is None:  # started with `>&-` or `2>&-`: results or messages would be lost
        if sys.stderr is not None:
            print("lmtool: error: standard output is closed; redirect it to a file (or /dev/null) instead",
                  file=sys.stderr)
        sys.exit(2)
    warnings.showwarning = _show_warning
    _sigterm["received"] = False
    installed, previous_handler = False, None
    # Under torchrun the default stays: torchrun stops the other ranks with SIGTERM when one fails, and a rank
    # blocked in a collective would run a Python handler only once the collective returned.
    if os.environ.get("WORLD_SIZE", "1") == "1":
        try:  # the training loop installs its own handler while it runs, and puts this one back
            previous_handler, installed = signal.signal(signal.SIGTERM, _raise_terminated), True
        except ValueError:  # not the main thread
            pass
    try:
        _run(argv)
    finally:
        if installed:  # (None: a handler not set from Python, which the default stands for)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_handler is None else previous_handler)


def _run(argv: list[str] | None) -> None:
    try:
        result = app(args=argv, prog_name="lmtool", standalone_mode=False)
    except LmtoolError as err:
        kind = "" if isinstance(err, Interrupted) else "error: "
        if not getattr(err, "quiet", False):  # in distributed training, rank 0 prints what every rank raised
            print(f"lmtool: {kind}{_one_line(str(err))}", file=sys.stderr)
        sys.exit(err.exit_code)
    except _CLICK_ERRORS as err:
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:  # bare `lmtool`: the help, as is
            print(ctx.get_help())
            sys.exit(0)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"lmtool: error: {_one_line(err.format_message())}{hint}", file=sys.stderr)
        sys.exit(err.exit_code)
    except (typer.Abort, click.Abort, KeyboardInterrupt):
        _stopped()
    except OSError as err:
        if err.filename is None and err.errno in OUTPUT_ERRORS:  # writing to standard output or a pipe
            print(f"lmtool: error: cannot write the output: {err.strerror}", file=sys.stderr)
            sys.exit(1)
        if err.filename is None:
            _internal_error(err)
        paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
        if err.errno in PATH_ERRORS:  # a path the checks could not even look at: a usage error
            print(f"lmtool: error: cannot access {paths}: {err.strerror or err}", file=sys.stderr)
            sys.exit(2)
        print(f"lmtool: error: cannot read or write {paths}: {err.strerror or err}", file=sys.stderr)  # disk full...
        sys.exit(1)
    except Exception as err:
        if _out_of_memory(err):
            tried = re.search(r"allocate (\d+ bytes|[\d.]+ [KMGT]iB)", str(err), re.IGNORECASE)
            print(f"lmtool: error: ran out of memory{f' (tried to allocate {tried.group(1)})' if tried else ''}; "
                  "use smaller batches (--batch-size; data.batch_size in training), fewer --num-samples, a shorter "
                  "--bptt (data.bptt), or a smaller model", file=sys.stderr)
            sys.exit(1)
        _internal_error(err)
    if result == 130:  # Ctrl-C or SIGTERM outside training: typer turns KeyboardInterrupt into exit code 130
        _stopped()
    if isinstance(result, int) and result != 0:
        sys.exit(result)
