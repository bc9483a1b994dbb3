import dataclasses

import pytest
import yaml

from lmtool.config import Config, config_from_dict, defaults_for_level, load_config, parse_duration
from lmtool.errors import LmtoolError

from conftest import CONFIGS


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)


@pytest.mark.parametrize("level", ["char", "word"])
def test_default_yaml_files_are_exactly_the_built_in_defaults(level):
    shipped = yaml.safe_load((CONFIGS / f"{level}-default.yaml").read_text())
    assert shipped == defaults_for_level(level)


def test_published_recipes_match_the_paper():
    small = load_config(CONFIGS / "word-ptb-small.yaml")
    assert (small.model.num_layers, small.model.hidden_size, small.model.dropout) == (2, 200, 0.0)
    assert (small.train.optimizer, small.train.lr, small.train.schedule, small.train.decay_factor) == ("sgd", 1.0, "decay", 0.5)
    assert (small.train.decay_start_epoch, small.train.max_epochs, small.data.bptt, small.data.batch_size) == (4, 13, 20, 20)
    assert (small.train.clip_grad_norm, small.model.init_range) == (5.0, 0.1)
    medium = load_config(CONFIGS / "word-ptb-medium.yaml")
    assert (medium.model.hidden_size, medium.model.dropout, medium.train.max_epochs, medium.data.bptt) == (650, 0.5, 39, 35)
    assert medium.train.decay_factor == pytest.approx(1 / 1.2) and medium.train.decay_start_epoch == 6
    assert medium.model.init_range == 0.05


def test_precedence_defaults_file_set_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 100\n  num_layers: 3\ntrain:\n  lr: 3e-3\n")
    cfg = load_config(path, ["model.hidden_size=200", "train.seed=7"], {"train.seed": 9, "model.cell": None})
    assert cfg.model.hidden_size == 200  # --set beats file
    assert cfg.model.num_layers == 3  # file beats defaults
    assert cfg.train.seed == 9  # flag beats --set
    assert cfg.train.lr == 3e-3  # '3e-3' is a string to YAML: coerced by field type
    assert cfg.model.cell == "lstm"  # a flag left unset changes nothing


def test_word_level_starts_from_word_defaults():
    cfg = load_config(flags={"data.level": "word"})
    assert cfg.data.level == "word" and cfg.data.bptt == defaults_for_level("word")["data"]["bptt"]
    assert cfg.model.tie_weights is True


def test_max_time_accepts_durations():
    assert load_config(flags={"train.max_time": "10m"}).train.max_time == 600
    assert parse_duration("1.5h") == 5400 and parse_duration(90) == 90
    with pytest.raises(LmtoolError, match="train.max_time: 'soon' is not a duration"):
        load_config(flags={"train.max_time": "soon"})


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"model": {"hiden_size": 3}}, "unknown config key 'model.hiden_size' (did you mean 'model.hidden_size'?)"),
        ({"modle": {}}, "unknown config key 'modle' (did you mean 'model'"),
        ({"train": {"hidden_size": 3}}, "unknown config key 'train.hidden_size' (did you mean 'model.hidden_size'?)"),
        ({"model": {"hidden_size": 0}}, "model.hidden_size: 0 is out of range (must be at least 1)"),
        ({"model": {"dropout": 1.5}}, "model.dropout: 1.5 is out of range (must be less than 1)"),
        ({"train": {"lr": -1}}, "train.lr: -1.0 is out of range (must be greater than 0)"),
        ({"model": {"hidden_size": "big"}}, "model.hidden_size: expected a whole number, got 'big'"),
        ({"model": {"hidden_size": 1.5}}, "model.hidden_size: expected a whole number, got 1.5"),
        ({"model": {"hidden_size": "2.5e0"}}, "model.hidden_size: expected a whole number, got '2.5e0'"),
        ({"train": {"seed": "1e400"}}, "train.seed: 1e400 is too large a number"),
        ({"train": {"max_steps": "1e-4"}}, "train.max_steps: expected a whole number, got '1e-4'"),
        ({"train": {"max_steps": "nan"}}, "train.max_steps: expected a whole number, got 'nan'"),
        ({"model": {"cell": "transformer"}}, "model.cell: 'transformer' is not one of rnn_tanh | rnn_relu | gru | lstm"),
        ({"model": {"tie_weights": "maybe"}}, "model.tie_weights: expected true or false, got 'maybe'"),
        ({"model": {"tie_weights": True, "embedding_size": 4, "hidden_size": 8}}, "model.tie_weights needs"),
        ({"format_version": 99}, "format_version 99 is newer than this lmtool understands"),
        ({"model": 3}, "'model' must be a mapping"),
        ({"train": {"lr": float("nan")}}, "train.lr: nan is not a finite number"),
    ],
)
def test_bad_values_name_the_key_and_the_value(tree, message):
    with pytest.raises(LmtoolError) as err:
        config_from_dict(tree)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: [unclosed", "is not valid YAML at line 1"),
        ("- a\n- b\n", "must hold a mapping"),
        ("model:\n  hidden_size: 0\n", "model.hidden_size: 0 is out of range"),
    ],
)
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(LmtoolError) as err:
        load_config(path)
    assert message in str(err.value)


def test_set_needs_key_equals_value():
    with pytest.raises(LmtoolError, match="--set expects section.key=value"):
        load_config(overrides=["model.hidden_size"])


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().model.hidden_size = 3  # type: ignore[misc]


def test_readme_documents_every_config_key():
    from lmtool.config import field_help

    from conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [key for key, *_ in field_help() if f"| `{key}` |" not in readme]
    assert not missing, f"README's config table lacks {missing}"


def test_an_empty_section_changes_nothing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  level: word\nmodel:\ntrain:\n")
    cfg = load_config(path)
    assert cfg.model.tie_weights is True and cfg.model.hidden_size == defaults_for_level("word")["model"]["hidden_size"]
    path.write_text("data:\n")
    assert load_config(path) == load_config()


def test_a_whole_number_may_be_written_with_an_exponent():
    # YAML reads 1e4 as a string, and people write step counts so
    cfg = load_config(None, ["train.max_steps=1e4", "model.hidden_size=2.5e2", "train.seed= +7 ", "data.bptt=64"])
    assert (cfg.train.max_steps, cfg.model.hidden_size, cfg.train.seed, cfg.data.bptt) == (10_000, 250, 7, 64)


@pytest.mark.parametrize("args, message", [
    ((b"configs/tiny.yaml",), "config_file must be the path of a YAML file (str or Path), got b'configs/tiny.yaml'"),
    (("",), "config_file must be the path of a YAML file (str or Path), got ''"),
    ((None, [None]), "overrides must be a list of 'section.key=value' strings, got [None]"),
    ((None, b"train.lr=1"), "overrides must be a list of 'section.key=value' strings, got b'train.lr=1'"),
    ((None, [], ["model.cell=gru"]),
     "flags must be a mapping of 'section.key' names to values, got ['model.cell=gru']"),
    ((None, [], {3: "gru"}), "flags must be a mapping of 'section.key' names to values, got {3: 'gru'}"),
])
def test_load_config_names_the_argument_of_the_wrong_type(args, message):
    with pytest.raises(LmtoolError) as err:
        load_config(*args)
    assert str(err.value) == message
