import os
from pathlib import Path

import pytest

# The suite tests the CPU path, whose results it checks to float precision: a GPU, where `--device auto` and
# `load_model` would pick it, computes in TF32 and needs its inputs on it. So the suite never sees one (nor do
# the commands it runs in subprocesses, which inherit this); the GPU path has its own check, bench/gpu.sh.
# Set before anything initialises CUDA.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from lmtool.cli import main  # noqa: E402 (after the environment above)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
SMALL_CHARS = 6000  # small_corpus's length


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own directory, so runs/ and runs/latest never touch the repository."""
    monkeypatch.chdir(tmp_path)


def train_run(root: Path, corpus_name: str, text: str, overrides: list[str] = ()) -> Path:
    """Train the tiny config (plus `overrides`) on `text` written to root/corpus_name, into root/run, with the
    working directory at root, so runs/latest stays there too (module fixtures run before `_in_tmp_dir`);
    returns the run directory."""
    from lmtool.config import load_config
    from lmtool.train import train

    corpus = root / corpus_name
    corpus.write_text(text, encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        return train(load_config(CONFIGS / "tiny.yaml", list(overrides)), corpus, out=root / "run").run_dir


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """About 6,000 characters of Shakespeare."""
    path = tmp_path / "small.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:SMALL_CHARS], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """`reference_run(overrides)`: tiny.yaml + overrides trained without a break on small_corpus's text, once per
    session for each list of overrides: the run that interrupted, resumed or graphed runs must match. Read-only."""
    import lmtool.train
    from lmtool.config import load_config
    from lmtool.graphed_step import GraphedStep

    # Taken before any test patches them: a reference trained inside a test must not go through its patches.
    unpatched = [(lmtool.train, name, getattr(lmtool.train, name)) for name in ("uses_cuda_graph", "step_capture")]
    unpatched.append((GraphedStep, "__call__", GraphedStep.__call__))
    results = {}

    def run(overrides: list[str]):
        key = tuple(overrides)
        if key not in results:
            root = tmp_path_factory.mktemp("reference")
            corpus = root / "small.txt"
            corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:SMALL_CHARS], encoding="utf-8")
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(root)  # keeps runs/latest out of the repository
                for owner, name, value in unpatched:
                    patch.setattr(owner, name, value)
                results[key] = lmtool.train.train(load_config(CONFIGS / "tiny.yaml", list(overrides)), corpus,
                                                  out=root / "run")
        return results[key]

    return run


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def run_cli(capsys):
    """Run `lmtool ARGS` in-process; returns exit code, stdout and stderr."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
