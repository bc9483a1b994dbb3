"""The names of a run directory's files and which model file `--model` means. No torch here: the commands
resolve the model first, so that a missing one is reported before torch takes seconds to import."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from lmtool.errors import LmtoolError

CONFIG_FILE = "config.yaml"
VOCAB_FILE = "vocab.json"
METRICS_FILE = "metrics.jsonl"
BEST_MODEL = "model-best.safetensors"
LAST_MODEL = "model-last.safetensors"
TRAINING_STATE = "train-state.pt"
RUN_FILES = (CONFIG_FILE, VOCAB_FILE, METRICS_FILE, BEST_MODEL, LAST_MODEL, TRAINING_STATE)
LOCK_FILE = ".lock"  # held by the process training the run, so that no second one writes into it
RUNS_ROOT = Path("runs")
LATEST = "latest"


def is_run_dir(path: Path) -> bool:
    """Whether a directory was written by lmtool train: its vocabulary, and a config.yaml that is lmtool's (a
    mapping with format_version, however edited since), so that --overwrite never takes another program's
    config.yaml for a run."""
    config = Path(path) / CONFIG_FILE
    if not (config.is_file() and (Path(path) / VOCAB_FILE).is_file()):
        return False
    import yaml  # only here: the commands that never look at a run directory do not pay for it

    try:
        tree = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(tree, dict) and "format_version" in tree


def path_argument(value, name: str) -> Path:
    """A path a library caller passed, as a Path, with a leading ~ expanded as a shell would; a clear error for
    another type or an empty name."""
    if not isinstance(value, (str, os.PathLike)):
        raise LmtoolError(f"{name} must be a path (str or Path), got {type(value).__name__}")
    if os.fspath(value) == "":  # Path("") would be the current directory
        raise LmtoolError(f"{name} is an empty name; give a path")
    try:
        return Path(value).expanduser()
    except RuntimeError:  # ~someone who has no home here: the path as written, which the checks then report
        return Path(value)


def named_by_pointer(pointer: Path) -> Path:
    """The run that runs/latest.txt names (where symlinks are unavailable), or a clear error if it is damaged."""
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not name:
        raise LmtoolError(f"{pointer} is damaged: it should name the latest run; name the run itself instead of "
                          "runs/latest (training a run rewrites the file)")
    return Path(name)


def resolve_model_path(ref: str | Path | None) -> Path:
    """The model file meant by `--model`: a file, a run directory (its best model), or runs/latest when absent."""
    if ref is None:
        latest = RUNS_ROOT / LATEST
        pointer = RUNS_ROOT / f"{LATEST}.txt"
        if latest.exists():
            ref = latest
        elif pointer.is_file():
            ref = named_by_pointer(pointer)
        else:
            raise LmtoolError(
                "no trained model found (runs/latest does not exist here); train one first with "
                "'lmtool train data/tinyshakespeare.txt', or name one with --model RUN"
            )
    path = path_argument(ref, "the model (a run directory or model file)")
    if path.is_dir():
        if (path / BEST_MODEL).is_file():
            return path / BEST_MODEL
        if (path / LAST_MODEL).is_file():  # every validation writes both: the best one was removed or damaged
            warnings.warn(f"{path} has no {BEST_MODEL}; using {LAST_MODEL}, the weights at the last validation")
            return path / LAST_MODEL
        if is_run_dir(path):  # a run being trained (or retrained with --overwrite) before its first validation
            resume = f", resume it with 'lmtool train --resume {path}'" if (path / TRAINING_STATE).is_file() else ""
            raise LmtoolError(f"{path} is a run that has saved no model yet (it does after its first validation); "
                              f"wait for it if it is training{resume}, or name another run")
        raise LmtoolError(f"{path} holds no model file ({BEST_MODEL}); is it an lmtool run directory?")
    if not path.exists():
        raise LmtoolError(f"model not found: {path} (give a run directory or a .safetensors model file)")
    return path
