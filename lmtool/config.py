"""Typed, frozen configuration: defaults < YAML file < --set overrides < flags, validated once."""

from __future__ import annotations

import dataclasses
import difflib
import decimal
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from lmtool.errors import LmtoolError

FORMAT_VERSION = 1

Level = Literal["char", "word"]
Cell = Literal["rnn_tanh", "rnn_relu", "gru", "lstm"]
Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "plateau", "decay", "cosine"]
LossReduction = Literal["mean", "time_sum"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["fp32", "bf16", "auto"]
Softmax = Literal["full", "adaptive"]
Direction = Literal["forward", "backward", "bidirectional"]


# The largest seed a new run or sample may choose: PyTorch's CPU generator keeps only a seed's low 32 bits, so
# seeds 7 and 7 + 2**32 would give the same run or sample.
MAX_SEED = 2**32 - 1
# The largest seed a saved config may hold: runs made before the limit above still load and resume.
MAX_STORED_SEED = 2**64 - 1


# Widest embedding or recurrent layer: far beyond any machine's memory already (a 2^20-wide LSTM layer holds
# 2^43 weights), and low enough that sizes computed from it never overflow torch's 64-bit shapes.
MAX_WIDTH = 2**20
# Deepest stack: far beyond what trains (nothing carries a gradient past the layers in between), and building
# thousands of layers alone takes minutes before any error could show.
MAX_LAYERS = 256


def _opt(default: Any, help: str, **bounds: float) -> Any:
    """A config field with its one-line help and numeric bounds (gt, ge, lt, le)."""
    return field(default=default, metadata={"help": help, **bounds})


@dataclass(frozen=True)
class DataConfig:
    level: Level = _opt("char", "tokens are characters (Unicode code points) or whitespace-separated words")
    lowercase: bool = _opt(False, "lowercase all text before tokenizing")
    min_freq: int = _opt(1, "tokens seen fewer times in the training split become <UNK>", ge=1)
    max_size: int | None = _opt(None, "largest vocabulary, <EOS> and <UNK> included (null: no limit)", ge=3)
    unk_marker: str | None = _opt("<unk>", "a word already in the corpus that means 'unknown' (PTB's <unk>); read as <UNK>")
    valid_fraction: float = _opt(0.05, "without --valid, this last fraction of the lines is held out", gt=0, lt=1)
    batch_size: int = _opt(32, "parallel streams the token sequence is cut into", ge=1)
    bptt: int = _opt(128, "truncated back-propagation window, in tokens", ge=1)
    eval_batch_size: int = _opt(16, "streams used for validation and test", ge=1)


@dataclass(frozen=True)
class ModelConfig:
    cell: Cell = _opt("lstm", "recurrent cell: rnn_tanh | rnn_relu | gru | lstm")
    embedding_size: int = _opt(128, "size of the token embedding", ge=1, le=MAX_WIDTH)
    hidden_size: int = _opt(512, "size of each recurrent layer's state", ge=1, le=MAX_WIDTH)
    num_layers: int = _opt(2, "stacked recurrent layers", ge=1, le=MAX_LAYERS)
    dropout: float = _opt(0.2, "dropout between layers and before the output layer", ge=0, lt=1)
    tie_weights: bool = _opt(False, "share the embedding and output weights (needs embedding_size == hidden_size)")
    init_range: float | None = _opt(0.1, "initialise every weight uniformly in [-r, r] (null: PyTorch's default)", gt=0,
                                    le=1000)
    direction: Direction = _opt(
        "forward", "forward | backward (reads the text right to left) | bidirectional (both stacks, trained jointly)"
    )
    softmax: Softmax = _opt(
        "full", "full | adaptive (adaptive softmax: exact probabilities, much faster for vocabularies of 10k+ words)"
    )
    adaptive_cutoffs: tuple[int, ...] | None = _opt(
        None, "adaptive: token ranks where the tail clusters start, e.g. [2000, 10000] (null: 2000, 10000, 50000 "
        "where below the vocabulary size)", ge=1,
    )
    adaptive_div_value: float = _opt(4.0, "adaptive: each tail cluster's projection is this many times smaller", ge=1)


@dataclass(frozen=True)
class TrainConfig:
    optimizer: Optimizer = _opt("adam", "sgd | adam | adamw")
    lr: float = _opt(2.0e-3, "learning rate", gt=0)
    momentum: float = _opt(0.0, "SGD momentum", ge=0, lt=1)
    weight_decay: float = _opt(0.0, "L2 penalty (decoupled for adamw)", ge=0)
    loss_reduction: LossReduction = _opt(
        "mean", "mean: per-token mean; time_sum: summed over the window, mean over the batch (Zaremba et al.)"
    )
    clip_grad_norm: float | None = _opt(5.0, "clip the gradient norm to this (null: no clipping)", gt=0)
    schedule: Schedule = _opt("plateau", "constant | plateau | decay | cosine")
    plateau_factor: float = _opt(2.0, "plateau: divide lr by this when validation loss stops improving", gt=1)
    plateau_patience: int = _opt(0, "plateau: validations without improvement before lr is divided", ge=0)
    decay_factor: float = _opt(0.5, "decay: multiply lr by this each epoch after decay_start_epoch", gt=0, le=1)
    decay_start_epoch: int = _opt(4, "decay: the last epoch trained at the initial lr", ge=0)
    warmup_steps: int = _opt(0, "cosine: steps of linear warm-up", ge=0)
    min_lr: float = _opt(0.0, "lower bound of the learning rate for every schedule", ge=0)
    max_epochs: int | None = _opt(20, "stop after this many passes over the training text", ge=1)
    max_steps: int | None = _opt(None, "stop after this many optimiser steps", ge=1)
    max_time: float | None = _opt(None, "stop after this wall-clock time: seconds, or '90s', '10m', '2h'", gt=0)
    patience: int | None = _opt(3, "early stop after this many validations without improvement (null: never)", ge=1)
    eval_every: int | None = _opt(None, "validate every N steps (null: at the end of each epoch)", ge=1)
    log_every: int = _opt(10, "report training loss every N steps", ge=1)
    checkpoint_every: int | None = _opt(500, "write a resumable training checkpoint every N steps (null: never)", ge=1)
    checkpoint_time: float | None = _opt(
        120.0, "and whenever this much wall time passed since the last one: seconds or '2m' (null: never)", gt=0
    )
    max_bad_steps: int = _opt(5, "stop after this many bad steps in a row (non-finite, or a loss blow-up)", ge=1)
    blowup_factor: float | None = _opt(
        5.0, "a step whose loss exceeds this many times the running mean is skipped as bad (before 50 good steps, "
        "20 times as many times the larger of it and ln V; null: never)", gt=1
    )
    seed: int = _opt(1234, "random seed: the same seed and config give the same run", ge=0, le=MAX_STORED_SEED)
    device: Device = _opt("auto", "auto (cuda if present, else cpu) | cpu | cuda | mps")
    precision: Precision = _opt(
        "auto", "fp32 | bf16 (autocast; weights, optimiser and loss stay fp32) | auto (bf16 on CPUs with native bf16)"
    )
    cuda_graph: bool = _opt(
        True, "on one CUDA GPU, replay each training step as one captured CUDA graph (full softmax; every "
        "schedule but cosine), and each window of validation and evaluation (full softmax); false: launch their "
        "kernels one by one"
    )


@dataclass(frozen=True)
class Config:
    format_version: int = _opt(FORMAT_VERSION, "config format; files from a newer lmtool are refused", ge=1)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, ready for YAML or JSON."""
        return _lists_for_tuples(dataclasses.asdict(self))


def _lists_for_tuples(tree: Any) -> Any:
    """YAML's safe dumper writes lists, not tuples."""
    if isinstance(tree, dict):
        return {k: _lists_for_tuples(v) for k, v in tree.items()}
    return list(tree) if isinstance(tree, tuple) else tree


DURATION_KEYS = {"train.max_time", "train.checkpoint_time"}

SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}

# Word models want other sizes than character models; `--level word` starts from these.
WORD_LEVEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"level": "word", "batch_size": 32, "bptt": 35, "min_freq": 1, "max_size": 30000},
    "model": {"embedding_size": 256, "hidden_size": 256, "num_layers": 2, "dropout": 0.3, "tie_weights": True},
    "train": {"lr": 3.0e-3},
}


def defaults_for_level(level: str) -> dict[str, Any]:
    """The built-in default config tree for a tokenization level."""
    tree = Config().to_dict()
    if level == "word":
        tree = _merge(tree, WORD_LEVEL_DEFAULTS)
    return tree


def load_config(
    config_file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve defaults < file < `--set section.key=value` overrides < flags into a validated Config."""
    if isinstance(overrides, str):  # one "key=value" string would be read a character at a time
        raise LmtoolError(f"overrides must be a list of 'section.key=value' strings, got the string {overrides!r}")
    if config_file is not None and (not isinstance(config_file, (str, os.PathLike)) or os.fspath(config_file) == ""):
        raise LmtoolError(f"config_file must be the path of a YAML file (str or Path), got {config_file!r}")
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(item, str) for item in overrides):
        raise LmtoolError(f"overrides must be a list of 'section.key=value' strings, got {overrides!r}")
    if flags is not None and (not isinstance(flags, Mapping) or not all(isinstance(key, str) for key in flags)):
        raise LmtoolError(f"flags must be a mapping of 'section.key' names to values, got {flags!r}")
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_file is not None:
        layers.append((str(config_file), read_yaml_mapping(config_file)))
    if overrides:
        layers.append(("--set", _parse_overrides(overrides)))
    if flags:
        layers.append(("flag", _nest({k: v for k, v in flags.items() if v is not None})))
    # An empty section (`model:` with nothing under it) means "no changes", not "no section".
    layers = [(source, {k: v for k, v in tree.items() if v is not None}) for source, tree in layers]
    for source, tree in layers:
        _check_keys(tree, source)

    level = "char"
    for _, tree in layers:
        level = tree.get("data", {}).get("level", level)
    resolved = defaults_for_level(level if level in ("char", "word") else "char")
    for _, tree in layers:
        resolved = _merge(resolved, tree)
    tie_asked = any("tie_weights" in (tree.get("model") or {}) for _, tree in layers)
    if resolved["model"].get("softmax") == "adaptive" and not tie_asked:
        resolved["model"]["tie_weights"] = False  # the word defaults tie; an adaptive softmax has no matrix to tie
    seed = resolved.get("train", {}).get("seed")
    if seed is not None:  # before the field's own bound, which admits the larger seeds of older saved runs
        check_new_seed("train.seed", _coerce("train.seed", seed, int))
    return config_from_dict(resolved)


def revalidated(config: Config) -> Config:
    """A Config built or edited by hand, checked as a loaded one is: `dataclasses.replace` skips every check."""
    for name, cls in SECTIONS.items():
        section = getattr(config, name, None)
        if not isinstance(section, cls):
            raise LmtoolError(f"config.{name} must be a {cls.__name__}, got {type(section).__name__}")
    return config_from_dict(config.to_dict())


def check_new_seed(name: str, seed: int) -> None:
    """A seed chosen now (a new run's, a sample's) must fit the 32 bits that PyTorch's CPU generator keeps."""
    if not 0 <= seed <= MAX_SEED:
        raise LmtoolError(f"{name} must be between 0 and {MAX_SEED:,} (PyTorch's CPU generator keeps only 32 bits), "
                          f"got {seed:,}")


def config_from_dict(tree: Mapping[str, Any], source: str = "config") -> Config:
    """Validate a complete or partial nested dict into a Config (missing keys take defaults)."""
    _check_keys(tree, source)
    version = _coerce("format_version", tree.get("format_version", FORMAT_VERSION), int)
    if version < 1:
        raise LmtoolError(f"{source}: format_version {version} is out of range (lmtool's formats start at 1)")
    if version > FORMAT_VERSION:
        raise LmtoolError(
            f"{source}: format_version {version} is newer than this lmtool understands ({FORMAT_VERSION}); "
            "upgrade lmtool to use it"
        )
    sections = {name: _build_section(cls, name, tree.get(name) or {}) for name, cls in SECTIONS.items()}
    config = Config(format_version=version, **sections)
    _check_cross_field(config)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping: YAML would silently keep the last,
    so a second `model:` section would drop every setting of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def safe_load_unique(text: str) -> Any:
    """yaml.safe_load (no code runs), with a key given twice in one mapping an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping, with safe_load (no code runs)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmtoolError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise LmtoolError(f"config path is a directory, not a YAML file: {path}") from None
    except PermissionError:
        raise LmtoolError(f"cannot read config file {path}: permission denied") from None
    except UnicodeDecodeError as err:
        raise LmtoolError(f"config file {path} is not UTF-8 text (byte {err.start})") from None
    try:
        tree = safe_load_unique(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise LmtoolError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise LmtoolError(f"config file {path} must hold a mapping of sections (data, model, train)")
    return tree


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as '90', '90s', '10m', '1.5h'."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            raise ValueError("too large") from None
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*", str(value))
    if not match:
        raise ValueError("not a duration")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * unit


def field_help() -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every config key: the config reference."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rows.append((f"{section}.{f.name}", _type_name(hints[f.name]), f.default, f.metadata.get("help", "")))
    return rows


# --- internals -------------------------------------------------------------------------------------------


def _valid_keys() -> dict[str, set[str]]:
    return {name: {f.name for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}


def _all_dotted_keys() -> list[str]:
    return ["format_version"] + [f"{s}.{k}" for s, keys in _valid_keys().items() for k in sorted(keys)]


def _unknown_key(dotted: str, source: str) -> LmtoolError:
    candidates = _all_dotted_keys() if "." in dotted else ["format_version", *SECTIONS]
    near = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.5)
    if not near:  # a right key in the wrong section: match on the last part alone
        leaf = dotted.rsplit(".", 1)[-1]
        near = [k for k in _all_dotted_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return LmtoolError(f"{source}: unknown config key '{dotted}'{hint}")


def _check_keys(tree: Mapping[str, Any], source: str) -> None:
    if not isinstance(tree, Mapping):
        raise LmtoolError(f"{source}: the config must be a mapping of sections (data, model, train)")
    valid = _valid_keys()
    for key, value in tree.items():
        if key == "format_version":
            continue
        if key not in valid:
            if isinstance(value, Mapping) and value:  # name the whole key: 'modle.cell' suggests 'model.cell'
                raise _unknown_key(f"{key}.{next(iter(value))}", source)
            raise _unknown_key(str(key), source)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise LmtoolError(f"{source}: '{key}' must be a mapping of keys, got {value!r}")
        for sub in value:
            if sub not in valid[key]:
                raise _unknown_key(f"{key}.{sub}", source)


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def flat_settings(tree: Mapping[str, Any]) -> dict[str, Any]:
    """{"section.key": value} for every key of every section: the inverse of `_nest` (format_version left out)."""
    return {f"{section}.{key}": value for section, values in tree.items() if isinstance(values, Mapping)
            for key, value in values.items()}


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        section, _, key = dotted.partition(".")
        if not key:
            tree[section] = value
        else:
            tree.setdefault(section, {})[key] = value
    return tree


def _parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    flat = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise LmtoolError(f"--set expects section.key=value, got '{item}'")
        if key in SECTIONS:
            raise LmtoolError(f"--set expects section.key=value (e.g. model.cell=gru), got '{item}': '{key}' is a "
                              "section, not a key")
        if "." not in key and key != "format_version":
            raise _unknown_key(key, "--set")
        try:
            flat[key] = safe_load_unique(raw) if raw.strip() else raw
        except yaml.YAMLError:
            flat[key] = raw
    return _nest(flat)


def _build_section(cls: type, name: str, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        dotted = f"{name}.{f.name}"
        value = _coerce(dotted, values[f.name], hints[f.name])
        _check_bounds(dotted, value, f.metadata)
        kwargs[f.name] = value
    return cls(**kwargs)


def _coerce(dotted: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or fail naming key and value."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(dotted, value, inner)
    if origin is Literal:
        if value in args:
            return value
        raise LmtoolError(f"{dotted}: {value!r} is not one of {' | '.join(map(str, args))}")
    if dotted in DURATION_KEYS:
        try:
            return parse_duration(value)
        except ValueError:
            raise LmtoolError(f"{dotted}: {value!r} is not a duration (seconds, or like '90s', '10m', '2h')") from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        raise LmtoolError(f"{dotted}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy's integers too
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # YAML reads 1e4 as a string; a whole number written so is one
            try:
                number = decimal.Decimal(value.strip())
            except decimal.InvalidOperation:
                number = None
            if number is not None and number.is_finite():
                if number.adjusted() >= 30:  # its power of ten: past every bound (and int() of 1e999999 takes ages)
                    raise LmtoolError(f"{dotted}: {value.strip()} is too large a number")
                if number == int(number):
                    return int(number)
        raise LmtoolError(f"{dotted}: expected a whole number, got {value!r}")
    if annotation is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise LmtoolError(f"{dotted}: {value} is too large a number") from None
        if isinstance(value, str):  # YAML reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise LmtoolError(f"{dotted}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise LmtoolError(f"{dotted}: expected text, got {value!r}")
    if origin is tuple:  # tuple[int, ...]: a YAML list, or "2000,10000" from the command line
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(items, int) and not isinstance(items, bool):
            items = [items]  # one cut point
        if not isinstance(items, (list, tuple)) or not items:
            raise LmtoolError(f"{dotted}: expected a list like [2000, 10000], got {value!r}")
        return tuple(_coerce(dotted, item, args[0]) for item in items)
    raise AssertionError(f"no coercion for {annotation}")


def _check_bounds(dotted: str, value: Any, rules: Mapping[str, Any]) -> None:
    if isinstance(value, tuple):
        for item in value:
            _check_bounds(dotted, item, rules)
        if list(value) != sorted(set(value)):
            raise LmtoolError(f"{dotted}: {list(value)} must be increasing, without repeats")
        return
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if value != value or value in (float("inf"), float("-inf")):
        raise LmtoolError(f"{dotted}: {value} is not a finite number")
    checks = {
        "gt": (lambda v, b: v > b, "greater than"),
        "ge": (lambda v, b: v >= b, "at least"),
        "lt": (lambda v, b: v < b, "less than"),
        "le": (lambda v, b: v <= b, "at most"),
    }
    for rule, (ok, words) in checks.items():
        if rule in rules and not ok(value, rules[rule]):
            raise LmtoolError(f"{dotted}: {value} is out of range (must be {words} {rules[rule]})")


def _check_cross_field(config: Config) -> None:
    model, train = config.model, config.train
    if model.tie_weights and model.embedding_size != model.hidden_size:
        raise LmtoolError(
            f"model.tie_weights needs model.embedding_size == model.hidden_size "
            f"(got {model.embedding_size} and {model.hidden_size}); set both to the same value, or set "
            "model.tie_weights=false"
        )
    if model.softmax == "adaptive" and model.tie_weights:
        raise LmtoolError(
            "model.tie_weights cannot be combined with model.softmax=adaptive (its clusters have their own "
            "shapes); add --set model.tie_weights=false"
        )
    if train.schedule == "cosine" and train.max_steps is None and train.max_epochs is None:
        raise LmtoolError("train.schedule=cosine needs train.max_steps or train.max_epochs to know its length")
    if train.max_epochs is None and train.max_steps is None and train.max_time is None and train.patience is None:
        raise LmtoolError("training would never stop: set train.max_epochs, max_steps, max_time or patience")
    if train.min_lr >= train.lr:
        raise LmtoolError(f"train.min_lr ({train.min_lr}) must be below train.lr ({train.lr})")


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args if a is not type(None)) + " | null"
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


def save_config_yaml(config: Config) -> str:
    """The resolved config as YAML text, in field order."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)
