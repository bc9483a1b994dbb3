import json
import os
import subprocess
import sys

import pytest

from lmtool.model import CELLS
from lmtool.run_paths import BEST_MODEL

from conftest import CONFIGS, REPO, SHAKESPEARE, train_run

TINY = CONFIGS / "tiny.yaml"


def assert_one_line_error(result, *fragments, code=2):
    assert result.code == code
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("lmtool: error: ")
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_train_end_to_end_for_every_cell(run_cli, small_corpus, tmp_path, cell):
    result = run_cli("train", small_corpus, "--config", TINY, "--cell", cell, "--out", tmp_path / "run")
    assert result.code == 0, result.err
    assert "training summary" in result.out and "best validation perplexity" in result.out
    assert "validation epoch 2" in result.err  # progress goes to stderr, one plain line per interval here
    saved = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert saved["cell"] == cell
    assert (tmp_path / "runs" / "latest").resolve() == (tmp_path / "run").resolve()


def test_word_level_and_default_run_directory(run_cli, small_corpus, tmp_path):
    result = run_cli("train", small_corpus, "--config", TINY, "--level", "word", "--max-steps", "3")
    assert result.code == 0, result.err
    runs = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]
    assert len(runs) == 1 and runs[0].name.startswith("small-")
    assert "vocab.json" in {p.name for p in runs[0].iterdir()}
    assert "words" in result.err and "bits per word" in result.out


def test_config_error_is_one_line_with_exit_2(run_cli, small_corpus, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hiden_size: 64\n")
    result = run_cli("train", small_corpus, "--config", bad)
    assert_one_line_error(result, "unknown config key 'model.hiden_size'", "did you mean 'model.hidden_size'")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "model.dropout=1.5"], ["model.dropout: 1.5 is out of range"]),
        (["--set", "train.lr=-1"], ["train.lr: -1.0 is out of range"]),
        (["--level", "byte"], ["data.level: 'byte' is not one of char | word"]),
        (["--device", "tpu"], ["train.device: 'tpu' is not one of"]),
        (["--max-time", "soon"], ["not a duration"]),
        (["--seed", "x"], ["Invalid value for '--seed'"]),
        (["--bogus"], ["No such option: --bogus"]),
    ],
)
def test_bad_flags_are_one_line_errors(run_cli, small_corpus, args, fragments):
    assert_one_line_error(run_cli("train", small_corpus, "--config", TINY, *args), *fragments)


def test_missing_and_undecodable_corpus(run_cli, tmp_path):
    assert_one_line_error(run_cli("train", tmp_path / "nope.txt"), "training file not found")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n" * 10)
    assert_one_line_error(run_cli("train", latin, "--config", TINY), "not UTF-8", "offset 3")
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_a_clear_error(run_cli, small_corpus):
    assert_one_line_error(run_cli("train", small_corpus, "--config", TINY, "--device", "cuda"), "no CUDA GPU")


def test_existing_run_is_not_overwritten(run_cli, small_corpus, tmp_path):
    args = ("train", small_corpus, "--config", TINY, "--max-steps", "2", "--out", tmp_path / "run")
    assert run_cli(*args).code == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert_one_line_error(run_cli(*args), "already exists", "--overwrite")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    assert run_cli(*args, "--overwrite").code == 0


def test_console_script_and_python_dash_m(small_corpus, tmp_path):
    from importlib.metadata import entry_points

    import lmtool.launch

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lmtool"]
    assert script.load() is lmtool.launch.main  # the installed `lmtool` command runs the same entry point
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "lmtool", "train", str(small_corpus), "--config", str(TINY), "--max-steps", "2",
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "training summary" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lmtool", "train", str(tmp_path / "missing.txt")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "not found" in bad.stderr


@pytest.mark.parametrize("command, message", [
    (["--help"], None),
    (["sample"], "no trained model found"),
    (["score", "a sentence"], "no trained model found"),
    (["evaluate-perplexity", "held-out.txt", "--model", "nowhere"], "model not found: nowhere"),
    (["evaluate-perplexity", "corpus.txt", "missing.txt", "--model", "run"], "evaluation file not found: missing.txt"),
    (["score", "--file", "missing.txt", "--model", "run"], "sentence file not found: missing.txt"),
    (["score", "--file", "corpus.txt", "--precision", "fp16", "--model", "run"], "--precision must be fp32 or bf16"),
    (["score", "--file", "binary.txt", "--model", "run"], "sentence file binary.txt looks binary (NUL byte at offset 2)"),
    (["train", "missing.txt"], "training file not found: missing.txt"),
    (["train", "corpus.txt", "--valid", "missing.txt"], "validation file not found: missing.txt"),
    (["train", "corpus.txt", "--set", "model.bogus=1"], "unknown config key 'model.bogus'"),
])
def test_help_and_common_mistakes_answer_without_importing_torch(command, message, tmp_path):
    """torch takes seconds to import: `--help` and the commonest mistakes (no model yet, a mistyped file or
    setting) do not wait for it."""
    (tmp_path / "corpus.txt").write_text("to be or not to be\n", encoding="utf-8")
    (tmp_path / "binary.txt").write_bytes(b"to\x00be\n")
    (tmp_path / "run").mkdir()  # a model that is there (never loaded: the mistakes are found first)
    (tmp_path / "run" / BEST_MODEL).write_bytes(b"")
    probe = ("import sys\nfrom lmtool.cli import main\ncode = 0\ntry:\n    main(sys.argv[1:])\n"
             "except SystemExit as stop:\n    code = stop.code\nprint('exit', code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, cwd=tmp_path)
    expected_code = 2 if message else 0
    assert done.stdout.strip().splitlines()[-1] == f"exit {expected_code} False", done.stdout + done.stderr
    if message is None:
        assert "Usage: lmtool" in done.stdout and "evaluate-perplexity" in done.stdout
    else:
        assert message in done.stderr


def test_bare_lmtool_prints_help(run_cli):
    result = run_cli()
    assert result.code == 0 and "train" in result.out and "evaluate-perplexity" in result.out


def test_resume_refuses_even_falsy_options(run_cli, small_corpus, tmp_path):
    assert run_cli("train", small_corpus, "--config", TINY, "--max-steps", "2", "--out", tmp_path / "run").code == 0
    result = run_cli("train", "--resume", tmp_path / "run", "--seed", "0", "--overwrite")
    assert result.code == 2 and "drop --seed, --overwrite" in result.err


def test_runs_latest_only_points_at_a_run_with_a_model(run_cli, small_corpus, tmp_path):
    from lmtool.config import load_config
    from lmtool.train import train

    def crash(record):
        if record["event"] == "train":
            raise RuntimeError("crash before any validation")

    with pytest.raises(RuntimeError):
        train(load_config(TINY), small_corpus, out=tmp_path / "run", on_event=crash)
    assert not (tmp_path / "runs" / "latest").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:4000]
    return train_run(tmp_path_factory.mktemp("tiny"), "corpus.txt", text, ["train.max_steps=2"])


def _lmtool(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lmtool", *map(str, args)], capture_output=True, env=env, **kwargs)


def test_a_large_file_at_batch_1_gets_one_hint_line_and_its_numbers(run_cli, tiny_run, tmp_path, monkeypatch):
    import lmtool.cli

    held = tmp_path / "held.txt"
    held.write_text(SHAKESPEARE.read_text(encoding="utf-8")[4000:7000], encoding="utf-8")
    monkeypatch.setattr(lmtool.cli, "EXACT_STREAM_HINT_BYTES", 2000)  # the real line is 2 MB
    hinted = run_cli("evaluate-perplexity", held, "--model", tiny_run, "--json")
    assert hinted.code == 0 and json.loads(hinted.out)["tokens"] > 0
    assert hinted.err.count("\n") == 1 and hinted.err.startswith("lmtool: hint: 0 MB scored as one exact stream")
    assert "--batch-size 64" in hinted.err
    quiet = run_cli("evaluate-perplexity", held, "--model", tiny_run, "--json", "--batch-size", "2")
    assert quiet.code == 0 and quiet.err == ""  # batched: no hint


def test_score_reads_stdin_with_the_checks_a_file_gets(tiny_run):
    ok = _lmtool("score", "--file", "-", "--json", "--model", tiny_run, input="\ufeffthe cat\nto be\n".encode())
    assert ok.returncode == 0, ok.stderr
    assert [json.loads(line)["sentence"] for line in ok.stdout.decode().splitlines()] == ["the cat", "to be"]
    for data, message in ((b"abc\x00def\n", "standard input looks binary (NUL byte at offset 3)"),
                          ("caf\u00e9\n".encode("latin-1"), "standard input is not UTF-8: undecodable byte 0xe9"),
                          (b"", "standard input holds no sentences")):
        bad = _lmtool("score", "--file", "-", "--model", tiny_run, input=data)
        err = bad.stderr.decode().strip()
        assert bad.returncode == 2 and len(err.splitlines()) == 1 and message in err, err


def test_a_reader_that_goes_away_ends_sample_quietly(tiny_run):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "lmtool", "sample", "--model", str(tiny_run), "--length",
                                "200000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert len(process.stdout.read(10)) == 10  # like `| head -c 10`
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1 and err == "", err  # click stops quietly on a closed pipe


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_behind_standard_output_is_an_error_not_a_bug(tiny_run):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-m", "lmtool", "score", "the cat", "--json", "--model", str(tiny_run)],
                              stdout=full, stderr=subprocess.PIPE, env=env)
    err = done.stderr.decode().strip()
    assert done.returncode == 1 and err == "lmtool: error: cannot write the output: No space left on device", err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_training_summary_that_cannot_be_printed_loses_no_checkpoint(small_corpus, tmp_path, run_cli):
    """The final checkpoint is saved before the summary goes to stdout: a full disk there leaves a resumable run."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = tmp_path / "run"
    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-m", "lmtool", "train", str(small_corpus), "--config", str(TINY),
                               "--max-steps", "3", "--out", str(run)], stdout=full, stderr=subprocess.PIPE, env=env)
    assert done.returncode == 1 and "cannot write the output: No space left on device" in done.stderr.decode()
    more = run_cli("train", "--resume", run, "--max-steps", "5")
    assert more.code == 0 and "resuming" in more.err, more.err


def test_progress_that_cannot_be_written_does_not_stop_training(small_corpus, tmp_path, run_cli):
    """`lmtool train ... 2>&1 | head -1`: once the reader has left, the progress lines and warnings are dropped and
    the run trains to its end and saves, rather than dying on its first line with no model and no checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    (tmp_path / "runs" / "latest").mkdir(parents=True)  # not lmtool's link: saving the best model warns
    run = tmp_path / "run"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before the first line
    done = subprocess.run([sys.executable, "-m", "lmtool", "train", str(small_corpus), "--config", str(TINY),
                           "--max-steps", "4", "--set", "train.log_every=1", "--out", str(run)],
                          stdout=subprocess.PIPE, stderr=write_end, env=env)
    os.close(write_end)
    assert done.returncode == 0 and "training summary" in done.stdout.decode()
    assert (run / "model-best.safetensors").is_file() and (run / "train-state.pt").is_file()
    assert run_cli("sample", "--model", run, "--length", "5").code == 0


def test_a_closed_standard_output_is_refused_before_any_work(tiny_run):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "lmtool", "sample", "--model", str(tiny_run), "--length", "3"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, preexec_fn=lambda: os.close(1))
    err = done.stderr.decode().strip()
    assert done.returncode == 2 and err == ("lmtool: error: standard output is closed; redirect it to a file "
                                            "(or /dev/null) instead"), err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_is_refused_rather_than_read_twice(run_cli, small_corpus, tiny_run, tmp_path):
    """A pipe can be read once, and training reads its corpus in several passes: it would hang or come back empty."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for args, what in ((["train", pipe, "--config", TINY, "--out", tmp_path / "run"], "training"),
                       (["train", small_corpus, "--valid", pipe, "--out", tmp_path / "run"], "validation"),
                       (["evaluate-perplexity", pipe, "--model", tiny_run], "evaluation"),
                       (["score", "--file", pipe, "--model", tiny_run], "sentence")):
        result = run_cli(*args)
        assert result.code == 2 and f"{what} path {pipe} is not a regular file" in result.err, result.err
    assert not (tmp_path / "run").exists()


def test_overwrite_leaves_the_old_run_whole_when_the_new_model_cannot_be_built(run_cli, small_corpus, tmp_path,
                                                                                 monkeypatch):
    import lmtool.train

    run = tmp_path / "run"
    assert run_cli("train", small_corpus, "--config", TINY, "--max-steps", "3", "--out", run).code == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 16000000000000 bytes.")

    monkeypatch.setattr(lmtool.train._Trainer, "__init__", no_memory)
    result = run_cli("train", small_corpus, "--config", TINY, "--out", run, "--overwrite")
    assert result.code == 1 and "ran out of memory (tried to allocate 16000000000000 bytes)" in result.err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_ctrl_c_outside_training_says_so(run_cli, tiny_run, monkeypatch):
    import lmtool.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lmtool.api.Model, "score", interrupted)
    result = run_cli("score", "the cat", "--model", tiny_run)
    assert result.code == 130 and result.err == "lmtool: interrupted\n", result.err


def test_ctrl_c_before_a_model_is_saved_says_how_to_start_again(run_cli, small_corpus, tmp_path, monkeypatch):
    import lmtool.train

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(lmtool.train._Trainer, "run", interrupted)  # after the run directory is made
    result = run_cli("train", small_corpus, "--config", CONFIGS / "tiny.yaml", "--out", tmp_path / "run")
    assert result.code == 130
    assert result.err.strip() == (f"lmtool: training interrupted before any model was saved; to start again, add "
                                  f"--overwrite (run {tmp_path / 'run'})")
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_sigterm_outside_training_says_so_exits_143_and_leaves_no_file(run_cli, tiny_run, small_corpus, tmp_path,
                                                                         monkeypatch):
    """It used to kill the process silently (the default action), leaving a half-made run or a temporary file."""
    import signal
    import time

    import lmtool.api
    import lmtool.train

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(lmtool.api.Model, "sample", terminated)
    result = run_cli("sample", "--model", tiny_run, "--output", tmp_path / "out.txt")
    assert result.code == 143 and result.err == "lmtool: stopped by SIGTERM\n", result.err
    assert [p.name for p in tmp_path.iterdir()] == [small_corpus.name]  # no out.txt, no temporary beside it
    monkeypatch.setattr(lmtool.train._Trainer, "run", terminated)  # after the run directory is made
    result = run_cli("train", small_corpus, "--config", CONFIGS / "tiny.yaml", "--out", tmp_path / "run")
    assert result.code == 143
    assert result.err.strip() == (f"lmtool: training stopped by SIGTERM before any model was saved; to start again, "
                                  f"add --overwrite (run {tmp_path / 'run'})")
    assert signal.getsignal(signal.SIGTERM) is before  # the test process's own handler is back
    # under torchrun SIGTERM keeps its default: it is how torchrun stops the other ranks when one fails
    seen = []

    def record_the_handler(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        return ["text"]

    monkeypatch.setattr(lmtool.api.Model, "sample", record_the_handler)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_cli("sample", "--model", tiny_run).code == 0
    assert seen == [before]


def test_a_resume_stopped_before_its_loop_says_to_resume_not_to_overwrite(run_cli, small_corpus, tmp_path,
                                                                           monkeypatch):
    """--overwrite, the advice for a new run stopped before any model, would have deleted this run's checkpoint."""
    import lmtool.train

    run = tmp_path / "run"
    assert run_cli("train", small_corpus, "--config", CONFIGS / "tiny.yaml", "--set", "train.max_steps=2",
                   "--out", run).code == 0

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(lmtool.train._Trainer, "run", interrupted)  # after the resume is announced
    result = run_cli("train", "--resume", run, "--max-steps", "4")
    assert result.code == 130
    assert result.err.strip().splitlines()[-1] == (f"lmtool: training interrupted; its last checkpoint is kept: "
                                                   f"continue with 'lmtool train --resume {run}'")


def test_a_model_that_scores_nan_is_refused_not_printed(run_cli, tiny_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_run / BEST_MODEL), framework="pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    tensors = {key: t.clone() for key, t in tensors.items()}
    next(t for key, t in tensors.items() if "decoder" in key or "output" in key).fill_(float("nan"))
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    (tmp_path / "held-out.txt").write_text("the cat sat\non the mat\n" * 20)
    for args in (("score", "the cat", "--json"), ("evaluate-perplexity", tmp_path / "held-out.txt", "--json")):
        result = run_cli(*args, "--model", tmp_path / "nan.safetensors")
        assert result.code == 2 and result.out == "", result.out
        assert result.err.strip() == ("lmtool: error: the model produced non-finite scores; the model file may be "
                                      "damaged: retrain or restore it")


def test_ctrl_c_while_the_command_loads_is_one_line(monkeypatch, capsys):
    import builtins

    import lmtool.launch

    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):
        if name == "lmtool.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    with pytest.raises(SystemExit) as exit_:
        lmtool.launch.main()
    assert exit_.value.code == 130 and capsys.readouterr().err == "lmtool: interrupted\n"


def test_a_sample_is_written_as_shown_even_when_it_is_empty():
    from lmtool.cli import _line

    # a prime ending a line, then a sample stopped at once by <EOS>: on screen the prime, then an empty line
    assert _line("ROMEO:\n", "") == "ROMEO:\n\n"
    assert _line("ROMEO:", " speaks") == "ROMEO: speaks\n"
    assert _line("", "to be\n") == "to be\n"  # a sample that reached its length just as a line ended
