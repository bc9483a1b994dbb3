"""The run directory: atomic writes of config, vocabulary, metrics and self-describing safetensors weights."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from lmtool.atomic_files import atomic_write, write_failed
from lmtool.config import Config, config_from_dict, save_config_yaml
from lmtool.errors import LmtoolError
from lmtool.model import LanguageModel
from lmtool.run_paths import (
    CONFIG_FILE, LATEST, LOCK_FILE, METRICS_FILE, RUN_FILES, RUNS_ROOT, TRAINING_STATE, VOCAB_FILE, is_run_dir,
    named_by_pointer,
)
from lmtool.tokenizer import Tokenizer

MODEL_FORMAT = "lmtool-model"
MODEL_FORMAT_VERSION = 1
TRAINING_STATE_VERSION = 1
def default_run_path(corpus: Path, now: datetime | None = None) -> Path:
    """runs/<corpus-name>-<timestamp>."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return RUNS_ROOT / f"{Path(corpus).stem or 'corpus'}-{stamp}"


def claim_default_run_path(corpus: Path, now: datetime | None = None) -> Path:
    """A new, empty runs/<corpus-name>-<timestamp>[-N] directory, made here: runs started in the same second
    (a sweep script) each get their own instead of colliding."""
    base = default_run_path(corpus, now)
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)  # exclusive: exactly one process makes each name
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        except OSError as err:
            raise LmtoolError(f"cannot create run directory {path}: {err.strerror}") from None


def check_run_target(path: Path, overwrite: bool) -> None:
    """Refuse to write a run where it would destroy something (before any expensive work starts)."""
    path = Path(path)
    if os.path.abspath(path) == os.path.abspath(RUNS_ROOT / LATEST):
        raise LmtoolError(f"--out {path} is the link lmtool points at the newest run; choose another name")
    if path.exists() and not path.is_dir():
        raise LmtoolError(f"--out {path} is a file, not a directory; choose another --out")
    if path.is_dir() and any(entry.name != LOCK_FILE for entry in path.iterdir()):
        if not is_run_dir(path):
            raise LmtoolError(f"--out {path} exists and is not an lmtool run; choose an empty or new directory")
        if not overwrite:
            raise LmtoolError(f"run directory {path} already exists; pass --overwrite to replace it, or choose --out")


@dataclass
class RunDir:
    """One training run's directory."""

    path: Path
    lock_handle: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def create(cls, path: Path, overwrite: bool) -> "RunDir":
        """Make the directory and lock it (clearing an old run's files only when overwrite is allowed, and
        only once no other process holds the run)."""
        check_run_target(path, overwrite)
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LmtoolError(f"cannot create run directory {path}: {err.strerror}") from None
        run = cls(path)
        run.lock()
        try:
            for name in RUN_FILES:
                (path / name).unlink(missing_ok=True)
        except OSError as err:
            run.release()
            raise LmtoolError(f"cannot clear run directory {path}: {err.strerror}") from None
        return run

    def lock(self) -> None:
        """Hold the run's lock until `release` (or this process ends); another process holding it is an error.
        Advisory (flock): on systems without it, nothing is locked."""
        if self.lock_handle is not None:
            return
        try:
            import fcntl
        except ImportError:  # Windows
            return
        try:
            handle = open(self.path / LOCK_FILE, "a+", encoding="utf-8")
        except OSError as err:
            raise self._cannot_lock(err) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held elsewhere
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            by = f" (pid {holder})" if holder else ""
            raise LmtoolError(f"run {self.path} is in use by another lmtool process{by}; wait for it to stop, or "
                              "choose another run") from None
        except OSError:  # a file system without locks (some network mounts): train unlocked, as on Windows
            handle.close()
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))  # for the message another process gets
            handle.flush()
        except OSError as err:
            with contextlib.suppress(OSError):  # closing flushes the same write again (a full disk)
                handle.close()
            raise self._cannot_lock(err) from None
        self.lock_handle = handle

    def _cannot_lock(self, err: OSError) -> LmtoolError:
        return LmtoolError(f"cannot lock run directory {self.path}: {err.strerror}; training writes into the run "
                           "directory, so it must lie on a disk this process can write to, with free space")

    def release(self) -> None:
        """Drop the run's lock, if this object holds it."""
        if self.lock_handle is not None:
            self.lock_handle.close()  # closing the file drops the lock
            self.lock_handle = None

    def write_config(self, config: Config) -> None:
        atomic_write(self.path / CONFIG_FILE, save_config_yaml(config).encode())

    def write_vocab(self, tokenizer: Tokenizer) -> None:
        atomic_write(self.path / VOCAB_FILE, json.dumps(tokenizer.to_dict(), ensure_ascii=False).encode())

    def append_metrics(self, record: dict[str, Any]) -> None:
        try:
            with open(self.path / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as err:
            raise write_failed(self.path / METRICS_FILE, err) from None

    def metrics_size(self) -> int:
        path = self.path / METRICS_FILE
        return path.stat().st_size if path.exists() else 0

    def truncate_metrics(self, size: int) -> None:
        """Drop records written after a checkpoint (a resumed run writes them again), and a last record cut short
        (by hand, or a crash), which no reader could parse and the next record would be appended to."""
        path = self.path / METRICS_FILE
        if not path.exists():
            return
        with open(path, "r+b") as f:
            size = min(size, f.seek(0, os.SEEK_END))
            f.seek(max(0, size - (1 << 20)))  # one record is far shorter than a megabyte
            tail = f.read(size - f.tell())
            if tail and not tail.endswith(b"\n"):
                size -= len(tail) - (tail.rfind(b"\n") + 1)
            f.truncate(size)

    def save_training_state(self, state: dict[str, Any]) -> None:
        """One file holds everything a resume needs, so a checkpoint becomes visible all at once."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(self.path / TRAINING_STATE, buffer.getvalue())

    def save_model(self, name: str, model: LanguageModel, config: Config, tokenizer: Tokenizer, **info: Any) -> Path:
        path = self.path / name
        save_model_file(path, model, config, tokenizer, info)
        return path

    def mark_latest(self) -> None:
        """Point runs/latest at this run."""
        mark_latest(self.path)


def mark_latest(run_path: Path) -> None:
    """Atomically repoint runs/latest (a symlink) at `run_path`; a warning if ./runs cannot be written."""
    try:
        RUNS_ROOT.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        warnings.warn(f"runs/latest not updated ({err.strerror}); name the run with --model {run_path}")
        return
    run_path = Path(run_path).resolve()
    root = RUNS_ROOT.resolve()
    target = run_path.relative_to(root) if run_path.parent == root else run_path
    link = RUNS_ROOT / LATEST
    tmp = RUNS_ROOT / f".{LATEST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    if link.exists() and not link.is_symlink():  # made by hand: the fallback file would go unread
        warnings.warn(f"runs/latest is not a link lmtool made, so it was not updated; name this run with "
                      f"--model {run_path}")
        return
    try:
        os.symlink(target, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # no symlinks (some Windows set-ups): a one-line file naming the run instead
        tmp.unlink(missing_ok=True)
        atomic_write(RUNS_ROOT / f"{LATEST}.txt", str(run_path).encode())


def _unique_tensors(model: LanguageModel) -> dict[str, torch.Tensor]:
    """The state dict without aliases (tied weights are stored once), contiguous and on the CPU."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors


def save_model_file(path: Path, model: LanguageModel, config: Config, tokenizer: Tokenizer, info: dict) -> None:
    """Weights in safetensors with the config and vocabulary in its metadata: the file describes itself."""
    metadata = {
        "format": MODEL_FORMAT,
        "format_version": str(MODEL_FORMAT_VERSION),
        "config": json.dumps(config.to_dict()),
        "vocab": json.dumps(tokenizer.to_dict(), ensure_ascii=False),
        "info": json.dumps(info),
    }
    atomic_write(Path(path), safetensors_bytes(_unique_tensors(model), metadata=metadata))


@dataclass(frozen=True)
class LoadedModel:
    """A model read back from a model file, on the CPU and in eval mode."""

    model: LanguageModel
    config: Config
    tokenizer: Tokenizer
    info: dict[str, Any]
    path: Path


def load_model_file(path: Path) -> LoadedModel:
    """Read a model file written by `save_model_file`; nothing in it is executed, damage is a clear error."""
    path = Path(path)
    if not path.exists():
        raise LmtoolError(f"model file not found: {path}")
    if not path.is_file():
        raise LmtoolError(f"model path {path} is not a regular file; give a run directory or a .safetensors model file")
    try:
        open(path, "rb").close()  # the system's reason (permissions...), which safetensors would not give
    except OSError as err:
        raise LmtoolError(f"cannot read model file {path}: {err.strerror or err}") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise LmtoolError(f"{path} is not a readable lmtool model file ({err}); retrain or restore it") from None
    if metadata.get("format") != MODEL_FORMAT:
        raise LmtoolError(f"{path} is a safetensors file but not an lmtool model (no lmtool metadata)")
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError:
        raise LmtoolError(f"{path}: the model's format version is damaged") from None
    if version > MODEL_FORMAT_VERSION:
        raise LmtoolError(f"{path} was written by a newer lmtool (model format {version}); upgrade lmtool")
    try:
        config = config_from_dict(json.loads(metadata["config"]), source="its config")  # prefixed with the path below
        tokenizer = Tokenizer.from_dict(json.loads(metadata["vocab"]))
        info = json.loads(metadata.get("info", "{}"))
    except (KeyError, json.JSONDecodeError):
        raise LmtoolError(f"{path}: the model's config or vocabulary metadata is damaged") from None
    except LmtoolError as err:
        raise LmtoolError(f"{path}: {err}") from None
    model = LanguageModel(config.model, vocab_size=len(tokenizer))
    tied = {"decoder.weight"} if config.model.tie_weights and config.model.softmax == "full" else set()
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError:
        raise LmtoolError(
            f"{path}: the weights do not match the model's config and vocabulary "
            f"({len(tokenizer)} tokens); the file is damaged or mixed from two runs"
        ) from None
    if set(missing) - tied or unexpected:
        raise LmtoolError(f"{path}: weights missing or unexpected ({sorted(set(missing) - tied) or unexpected})")
    model.eval()
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, info=info, path=path)


def open_run(path: Path) -> tuple[RunDir, Config, Tokenizer]:
    """An existing run directory with its config and vocabulary, or a clear error."""
    given = path = Path(path)
    # runs/latest: the run it names now, so that what is recorded and printed stays that run (one link followed,
    # as written: the user's own folders stay as they named them)
    pointer = RUNS_ROOT / f"{LATEST}.txt"  # where symlinks are unavailable
    if path.is_symlink():
        path = Path(os.path.normpath(path.parent / os.readlink(path)))
    elif path == RUNS_ROOT / LATEST and not path.exists() and pointer.is_file():
        path = named_by_pointer(pointer)
    named = f"{given} (which names {path})" if path != given else str(given)
    if path.is_file():
        holder = f" that holds it ({path.parent})" if is_run_dir(path.parent) else ""
        raise LmtoolError(f"--resume {named} is a file; give the run directory{holder}")
    if not path.is_dir():
        raise LmtoolError(f"--resume {named}: no such run directory")
    if not is_run_dir(path):
        raise LmtoolError(f"--resume {path}: not an lmtool run directory (it needs the {CONFIG_FILE} with format_version "
                          f"and the {VOCAB_FILE} that lmtool train writes)")
    from lmtool.config import read_yaml_mapping

    config = config_from_dict(read_yaml_mapping(path / CONFIG_FILE), source=str(path / CONFIG_FILE))
    try:
        tokenizer = Tokenizer.from_dict(json.loads((path / VOCAB_FILE).read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LmtoolError(f"{path / VOCAB_FILE} is damaged (not JSON)") from None
    except LmtoolError as err:
        raise LmtoolError(f"{path / VOCAB_FILE}: {err}") from None
    return RunDir(path), config, tokenizer


def load_training_state(run_path: Path) -> dict[str, Any]:
    """Read a training checkpoint with weights_only=True: tensors and plain values only, never code."""
    path = Path(run_path) / TRAINING_STATE
    if not path.is_file():
        raise LmtoolError(f"{run_path} has no training checkpoint ({TRAINING_STATE}); it cannot be resumed")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise LmtoolError(f"cannot read {path}: {err.strerror or err}") from None
    # torch.save writes a zip archive; anything else is damage, not an attack (a pickle inside is refused below)
    if magic != b"PK\x03\x04":
        raise LmtoolError(f"{path} is damaged or truncated (not a PyTorch checkpoint); it cannot be resumed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LmtoolError(
            f"{path} was refused: it holds objects that would run code when loaded, not an lmtool checkpoint"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        raise LmtoolError(f"{path} is damaged or truncated ({_first_line(err)}); it cannot be resumed") from None
    needed = ("version", "finished", "stop_reason", "sources", "model", "optimizer")
    if not isinstance(state, dict) or any(key not in state for key in needed):
        raise LmtoolError(f"{path} is not an lmtool training checkpoint (damaged or from another program)")
    if not isinstance(state["version"], int) or state["version"] > TRAINING_STATE_VERSION:
        raise LmtoolError(f"{path} was written by a newer lmtool (checkpoint version {state['version']}); upgrade")
    return state


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
