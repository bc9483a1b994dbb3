"""Exact resume, interrupts, non-finite steps and safe model files."""

import json
from pathlib import Path
import os
import signal
from types import SimpleNamespace
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lmtool.model import LanguageModel
from lmtool.checkpoint import load_model_file, load_training_state
from lmtool.run_paths import BEST_MODEL, LAST_MODEL, TRAINING_STATE
from lmtool.config import load_config
from lmtool.errors import LmtoolError, TrainingFailed
from lmtool.train import resume, train

from conftest import CONFIGS, REPO

TINY = CONFIGS / "tiny.yaml"
RESUMABLE = ["train.max_epochs=3", "train.checkpoint_every=7", "train.eval_every=25", "train.patience=null"]


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["event"], r["step"], r["loss"]) for r in records if r["event"] in ("train", "valid")]


def assert_same_weights(a, b):
    wa, wb = load_file(a / LAST_MODEL), load_file(b / LAST_MODEL)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


class Crash(Exception):
    pass


def crash_at_step(step):
    def on_event(record):
        if record["event"] == "train" and record["step"] == step:
            raise Crash
    return on_event


@pytest.mark.parametrize("dropout", [[], ["model.dropout=0.3"]], ids=["no-dropout", "dropout"])
def test_resume_after_a_crash_is_bitwise_identical(small_corpus, tmp_path, dropout, reference_run):
    cfg = load_config(TINY, RESUMABLE + dropout)
    whole = reference_run(RESUMABLE + dropout)
    with pytest.raises(Crash):
        train(cfg, small_corpus, out=tmp_path / "broken", on_event=crash_at_step(60))
    assert load_training_state(tmp_path / "broken")["step"] == 56  # the last checkpoint before the crash
    resumed = resume(tmp_path / "broken")
    assert resumed.steps == whole.steps
    assert_same_weights(whole.run_dir, resumed.run_dir)
    assert losses(whole.run_dir) == losses(resumed.run_dir)
    assert resumed.best_valid.loss == whole.best_valid.loss


def test_a_metrics_record_cut_short_is_dropped_before_the_resumed_records(small_corpus, tmp_path):
    cfg = load_config(TINY, RESUMABLE + ["train.max_epochs=1"])
    with pytest.raises(Crash):
        train(cfg, small_corpus, out=tmp_path / "run", on_event=crash_at_step(60))
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(lines[0] + lines[1][:10])  # cut inside the second record
    resume(tmp_path / "run")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line a whole record
    assert records[0] == json.loads(lines[0]) and records[1]["event"] == "resume" and records[-1]["event"] == "end"


def test_the_first_log_line_after_a_resume_counts_the_time_before_the_interruption(small_corpus, tmp_path,
                                                                                      monkeypatch):
    """On a fake clock that only moves during steps (one second each), every log line reads the same speed."""
    import lmtool.train as trainer

    now = [0.0]
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    step = trainer._Trainer._train_step

    def one_second_step(self, *args, **kwargs):
        now[0] += 1.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(trainer._Trainer, "_train_step", one_second_step)
    cfg = load_config(TINY, ["train.max_steps=150", "train.log_every=50", "train.checkpoint_every=45",
                             "train.max_epochs=null", "train.patience=null", "train.checkpoint_time=null"])
    train(cfg, small_corpus, out=tmp_path / "whole")
    with pytest.raises(Crash):
        train(cfg, small_corpus, out=tmp_path / "run", on_event=crash_at_step(100))  # checkpoint at step 90
    resume(tmp_path / "run")

    def speeds(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["tokens_per_s"] for r in records if r["event"] == "train"}

    # steps 51-100: 40 timed before the crash, 10 after the resume; counted against the last 10 alone, the
    # line read five times too fast
    assert speeds(tmp_path / "run") == speeds(tmp_path / "whole")
    assert set(speeds(tmp_path / "whole")) == {50, 100, 150} and 60 < speeds(tmp_path / "whole")[150] <= 64


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_resume_finishes_the_same_run(small_corpus, tmp_path, sig, code, run_cli,
                                                                  reference_run):
    args = ["--config", str(TINY), *sum([["--set", s] for s in RESUMABLE], [])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmtool", "train", str(small_corpus), *args, "--out", str(tmp_path / "run")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 60
    while not (tmp_path / "run" / TRAINING_STATE).exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"lmtool train --resume {tmp_path / 'run'}" in err and "Traceback" not in err
    stopped_at = load_training_state(tmp_path / "run")["step"]

    done = run_cli("train", "--resume", tmp_path / "run")
    assert done.code == 0, done.err
    assert f"step {stopped_at:,}" in done.err
    whole = reference_run(RESUMABLE)
    assert_same_weights(whole.run_dir, tmp_path / "run")
    assert losses(whole.run_dir) == losses(tmp_path / "run")


def test_sigkill_at_any_moment_then_resume(small_corpus, tmp_path, reference_run):
    args = ["--config", str(TINY), *sum([["--set", s] for s in RESUMABLE], [])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmtool", "train", str(small_corpus), *args, "--out", str(tmp_path / "run")],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while not (tmp_path / "run" / TRAINING_STATE).exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    resumed = resume(tmp_path / "run")
    whole = reference_run(RESUMABLE)
    assert resumed.steps == whole.steps
    assert_same_weights(whole.run_dir, resumed.run_dir)
    assert losses(whole.run_dir) == losses(resumed.run_dir)


def test_a_finished_run_resumes_only_with_a_raised_limit(small_corpus, tmp_path):
    cfg = load_config(TINY, ["train.max_epochs=1", "train.patience=null"])
    train(cfg, small_corpus, out=tmp_path / "run")
    with pytest.raises(LmtoolError, match="already finished"):
        resume(tmp_path / "run")
    # another limit raised would stop it again at once, having trained nothing
    with pytest.raises(LmtoolError, match=r"\(reached max_epochs=1\); --max-steps, --max-time would train it no "
                                          r"further: raise --max-epochs"):
        resume(tmp_path / "run", limits={"max_steps": 10_000, "max_time": 3600})
    # a lower or equal epoch limit would only rewrite its config
    with pytest.raises(LmtoolError, match=r"already finished after 1 epoch; --max-epochs 1 would train it no "
                                          r"further: give a higher limit"):
        resume(tmp_path / "run", limits={"max_epochs": 1})
    more = resume(tmp_path / "run", limits={"max_epochs": 2})
    assert more.epochs == 2
    whole = train(load_config(TINY, ["train.max_epochs=2", "train.patience=null"]), small_corpus, out=tmp_path / "w")
    assert_same_weights(whole.run_dir, more.run_dir)


def test_resuming_through_runs_latest_continues_the_run_it_names(small_corpus, tmp_path):
    train(load_config(TINY, ["train.max_steps=2"]), small_corpus, out=Path("runs") / "a")
    resumed = resume(Path("runs") / "latest", limits={"max_steps": 4})
    assert resumed.run_dir == Path("runs") / "a" and resumed.steps == 4
    records = [json.loads(line) for line in (tmp_path / "runs" / "a" / "metrics.jsonl").read_text().splitlines()]
    # recorded, and printed in the resume command, as the run itself: runs/latest moves to the next run trained
    assert {r["run"] for r in records if "run" in r} == {str(Path("runs") / "a")}
    # where symlinks are unavailable, runs/latest.txt names the run instead
    (tmp_path / "runs" / "latest").unlink()
    (tmp_path / "runs" / "latest.txt").write_text(str(tmp_path / "runs" / "a"))
    assert resume(Path("runs") / "latest", limits={"max_steps": 5}).run_dir == tmp_path / "runs" / "a"
    (tmp_path / "runs" / "loop").symlink_to("loop")  # a link to itself: a clear error, not an internal one
    with pytest.raises(LmtoolError, match=r"--resume runs/loop: no such run directory"):
        resume(Path("runs") / "loop")


def test_a_run_that_reached_two_limits_at_once_says_to_raise_both(small_corpus, tmp_path):
    cfg = load_config(TINY, ["train.max_epochs=1", "train.patience=null"])
    steps = train(cfg, small_corpus, out=tmp_path / "first").steps  # one epoch's steps
    train(load_config(TINY, ["train.max_epochs=1", "train.patience=null", f"train.max_steps={steps}"]), small_corpus,
          out=tmp_path / "run")
    config_before = (tmp_path / "run" / "config.yaml").read_bytes()
    with pytest.raises(LmtoolError, match=r"\(reached max_steps=\d+\); --max-steps would train it no further: "
                                          r"raise --max-epochs"):
        resume(tmp_path / "run", limits={"max_steps": 10 * steps})  # it used to exit 0, having trained nothing
    assert (tmp_path / "run" / "config.yaml").read_bytes() == config_before
    assert resume(tmp_path / "run", limits={"max_steps": steps + 5, "max_epochs": 2}).steps == steps + 5
    # the same when a validation every so many steps fell on that last step, so that no final one ran
    train(load_config(TINY, ["train.max_epochs=1", "train.patience=null", f"train.max_steps={steps}",
                             f"train.eval_every={steps}"]), small_corpus, out=tmp_path / "validated")
    with pytest.raises(LmtoolError, match="raise --max-epochs"):
        resume(tmp_path / "validated", limits={"max_steps": 10 * steps})


def test_an_interrupted_run_resumed_with_fewer_epochs_than_it_is_in_stops_at_once(small_corpus, tmp_path):
    cfg = load_config(TINY, RESUMABLE)  # 3 epochs, a checkpoint every 7 steps
    with pytest.raises(Crash):
        train(cfg, small_corpus, out=tmp_path / "run", on_event=crash_at_step(130))  # in epoch 2
    state = load_training_state(tmp_path / "run")
    assert state["epoch"] == 2 and not state["finished"]
    resumed = resume(tmp_path / "run", limits={"max_epochs": 1})
    assert resumed.steps == state["step"]  # it used to train on to the end of epoch 2
    end = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["stop_reason"] == "reached max_epochs=1"


def test_a_run_is_told_by_its_config_however_edited(small_corpus, tmp_path):
    """--overwrite replaces, and --resume continues, only a directory whose config.yaml lmtool wrote: with a
    comment added or its keys re-sorted it is still the run; another program's config.yaml is not."""
    import yaml

    from lmtool.run_paths import CONFIG_FILE, is_run_dir

    run = train(load_config(TINY, ["train.max_steps=2"]), small_corpus, out=tmp_path / "run").run_dir
    config = run / CONFIG_FILE
    text = config.read_text()
    assert is_run_dir(run)
    config.write_text("# my notes\n" + text)
    assert is_run_dir(run) and resume(run, limits={"max_steps": 3}).steps == 3
    config.write_text(yaml.safe_dump(yaml.safe_load(text), sort_keys=True))  # format_version no longer first
    assert is_run_dir(run)
    config.write_text("name: another program's settings\n")
    assert not is_run_dir(run)
    config.write_text("format_version: [unclosed\n")
    assert not is_run_dir(run)


def test_resume_refuses_what_is_not_a_run_and_a_changed_corpus(small_corpus, tmp_path, run_cli):
    result = run_cli("train", "--resume", tmp_path)
    assert result.code == 2 and "not an lmtool run directory" in result.err
    cfg = load_config(TINY, ["train.checkpoint_every=null", "train.checkpoint_time=null"])
    with pytest.raises(Crash):
        train(cfg, small_corpus, out=tmp_path / "run", on_event=crash_at_step(5))
    # no checkpoint yet: nothing to resume from
    assert "no training checkpoint" in run_cli("train", "--resume", tmp_path / "run").err
    train(load_config(TINY, ["train.max_steps=9"]), small_corpus, out=tmp_path / "run2")
    small_corpus.write_text(small_corpus.read_text() + "more text\n")
    changed = run_cli("train", "--resume", tmp_path / "run2", "--max-steps", "20").err
    assert ("changed since the run started; put the original back to resume, or train a new run on the new "
            "text") in changed
    assert "drop CORPUS" in run_cli("train", small_corpus, "--resume", tmp_path / "run2").err


def corrupt_loss(monkeypatch, factor_for_call):
    """Multiply the training loss of the n-th step (1-based) by factor_for_call(n)."""
    real = LanguageModel.forward
    calls = {"n": 0}

    def corrupted(self, tokens, state=None, targets=None, direction=None, packed_output=None):
        out, state = real(self, tokens, state, targets, direction, packed_output)
        if not self.training or targets is None:  # validation is left alone
            return out, state
        calls["n"] += 1
        return out * factor_for_call(calls["n"]), state

    monkeypatch.setattr(LanguageModel, "forward", corrupted)


def test_non_finite_steps_are_skipped_and_counted(small_corpus, tmp_path, monkeypatch):
    corrupt_loss(monkeypatch, lambda call: float("nan") if call in (3, 4) else 1.0)
    result = train(load_config(TINY, ["train.max_steps=10", "train.log_every=10"]), small_corpus, out=tmp_path / "r")
    end = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["skipped_steps"] == 2
    weights = load_file(result.run_dir / LAST_MODEL)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_many_non_finite_steps_in_a_row_stop_training_and_keep_the_best_model(small_corpus, tmp_path, monkeypatch):
    corrupt_loss(monkeypatch, lambda call: float("nan") if call > 20 else 1.0)
    cfg = load_config(TINY, ["train.eval_every=10", "train.max_bad_steps=3"])
    with pytest.raises(TrainingFailed, match="3 bad steps in a row up to step 23") as err:
        train(cfg, small_corpus, out=tmp_path / "run")
    assert err.value.exit_code == 1
    assert str(err.value).endswith("is intact. Lower train.lr")  # clipping is on already; no blow-up check to blame
    best = load_model_file(tmp_path / "run" / BEST_MODEL)
    assert best.info["step"] == 20
    assert all(torch.isfinite(p).all() for p in best.model.parameters())


def test_a_loss_blow_up_is_skipped_like_a_non_finite_step(small_corpus, tmp_path, monkeypatch):
    corrupt_loss(monkeypatch, lambda call: 100.0 if call == 70 else 1.0)
    result = train(load_config(TINY, ["train.max_steps=80"]), small_corpus, out=tmp_path / "run")
    end = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["skipped_steps"] == 1


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_would_run_code_is_refused_as_checkpoint_and_as_model(small_corpus, tmp_path, run_cli):
    cfg = load_config(TINY, ["train.max_steps=3"])
    train(cfg, small_corpus, out=tmp_path / "run")
    torch.save({"version": 1, "evil": _RunsCode()}, tmp_path / "run" / TRAINING_STATE)
    result = run_cli("train", "--resume", tmp_path / "run", "--max-steps", "5")
    assert result.code == 2 and "refused" in result.err
    torch.save({"evil": _RunsCode()}, tmp_path / "run" / BEST_MODEL)
    result = run_cli("sample", "--model", tmp_path / "run", "--length", "3")
    assert result.code == 2 and BEST_MODEL in result.err
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_overwritten_with_text_is_called_damaged(small_corpus, tmp_path, run_cli):
    train(load_config(TINY, ["train.max_steps=3"]), small_corpus, out=tmp_path / "run")
    (tmp_path / "run" / TRAINING_STATE).write_text("not a checkpoint\n" * 20)
    result = run_cli("train", "--resume", tmp_path / "run", "--max-steps", "5")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "damaged or truncated" in result.err and "run code" not in result.err


def test_damaged_model_files_are_refused_naming_the_file(small_corpus, tmp_path, run_cli):
    train(load_config(TINY, ["train.max_steps=3"]), small_corpus, out=tmp_path / "run")
    model = tmp_path / "run" / BEST_MODEL
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    result = run_cli("score", "hello", "--model", model)
    assert result.code == 2 and str(model) in result.err and len(result.err.strip().splitlines()) == 1
    # a vocabulary that does not match the weights
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    vocab = json.loads(header["__metadata__"]["vocab"])
    vocab["tokens"] = vocab["tokens"][:-3]
    header["__metadata__"]["vocab"] = json.dumps(vocab)
    new_header = json.dumps(header).encode()
    new_header += b" " * (-len(new_header) % 8)
    model.write_bytes(len(new_header).to_bytes(8, "little") + new_header + data[8 + header_len :])
    result = run_cli("score", "hello", "--model", model)
    assert result.code == 2 and "do not match" in result.err


def test_disk_full_during_a_save_keeps_the_previous_files(small_corpus, tmp_path, monkeypatch, run_cli):
    import errno

    import lmtool.checkpoint as checkpoint

    train(load_config(TINY, ["train.max_steps=5"]), small_corpus, out=tmp_path / "run")
    kept = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name != "metrics.jsonl"}
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full_disk)
    result = run_cli("train", "--resume", tmp_path / "run", "--max-steps", "12")
    monkeypatch.setattr(checkpoint.os, "fsync", real_fsync)
    assert result.code == 1
    assert len(result.err.strip().splitlines()) == 1 and "No space left on device" in result.err
    assert "previous version is intact" in result.err
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name != "metrics.jsonl"}
    assert after == kept  # no temporary file left behind, nothing overwritten
    load_model_file(tmp_path / "run" / BEST_MODEL)


def test_disk_full_mid_training_stops_cleanly(small_corpus, tmp_path, monkeypatch):
    import errno

    import lmtool.checkpoint as checkpoint

    real_fsync = os.fsync
    failing = {"on": False}

    def maybe_full(fd):
        if failing["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    def fill_disk(record):
        if record["event"] == "valid" and record["step"] == 10:
            failing["on"] = True

    monkeypatch.setattr(checkpoint.os, "fsync", maybe_full)
    cfg = load_config(TINY, ["train.eval_every=10", "train.checkpoint_every=1000"])
    with pytest.raises(LmtoolError, match="No space left on device") as err:
        train(cfg, small_corpus, out=tmp_path / "run", on_event=fill_disk)
    assert err.value.exit_code == 1
    assert load_model_file(tmp_path / "run" / BEST_MODEL).info["step"] == 10
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_unreadable_corpus_is_a_clear_error(small_corpus, monkeypatch, run_cli):
    import lmtool.text_files as text_files

    # root reads any file, so the check that a normal user meets is simulated
    real = text_files.os.access
    monkeypatch.setattr(text_files.os, "access",
                        lambda path, mode: False if path == small_corpus else real(path, mode))
    result = run_cli("train", small_corpus, "--config", TINY)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "permission denied" in result.err or "is not readable" in result.err


def test_unreadable_model_and_checkpoint_files_give_the_systems_reason(small_corpus, tmp_path, monkeypatch, run_cli):
    import builtins
    import errno

    import lmtool.checkpoint as checkpoint

    train(load_config(TINY, ["train.max_steps=3"]), small_corpus, out=tmp_path / "run")
    denied = {tmp_path / "run" / BEST_MODEL, tmp_path / "run" / TRAINING_STATE}

    def guarded_open(path, *args, **kwargs):  # root reads any file, so a normal user's refusal is simulated
        if Path(path) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", guarded_open, raising=False)
    result = run_cli("score", "hello", "--model", tmp_path / "run")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert f"cannot read model file {tmp_path / 'run' / BEST_MODEL}: Permission denied" in result.err
    result = run_cli("train", "--resume", tmp_path / "run", "--max-steps", "5")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert f"cannot read {tmp_path / 'run' / TRAINING_STATE}: Permission denied" in result.err


def test_resuming_a_run_on_a_read_only_disk_stops_before_touching_it(small_corpus, tmp_path, monkeypatch, run_cli):
    import builtins
    import errno

    import lmtool.checkpoint as checkpoint

    train(load_config(TINY, ["train.max_steps=3"]), small_corpus, out=tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}

    def read_only_open(path, mode="r", *args, **kwargs):  # root writes anywhere, so a read-only disk is simulated
        if any(flag in mode for flag in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", read_only_open, raising=False)
    result = run_cli("train", "--resume", tmp_path / "run", "--max-steps", "5")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert (f"cannot lock run directory {tmp_path / 'run'}: Read-only file system; training writes into the run "
            "directory, so it must lie on a disk this process can write to, with free space") in result.err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_a_full_disk_when_the_run_is_locked_is_one_line_that_names_the_run(small_corpus, tmp_path, monkeypatch,
                                                                          run_cli):
    import builtins
    import errno

    import lmtool.checkpoint as checkpoint

    class FullDisk:  # the lock file's pid is written to the buffer; flushing it, and so closing, needs space
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.handle.close()
            self.flush()

    def full_open(path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)
        return FullDisk(handle) if Path(path).name == ".lock" else handle

    monkeypatch.setattr(checkpoint, "open", full_open, raising=False)
    result = run_cli("train", small_corpus, "--config", CONFIGS / "tiny.yaml", "--max-steps", "1", "--out",
                     tmp_path / "new")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert f"lmtool: error: cannot lock run directory {tmp_path / 'new'}: No space left on device; " in result.err


def test_a_damaged_runs_latest_txt_is_one_line_that_says_what_to_do(tmp_path, run_cli):
    (tmp_path / "runs").mkdir()
    for content in (b"\xff\xfe", b"  \n"):  # not UTF-8; empty
        (tmp_path / "runs" / "latest.txt").write_bytes(content)
        result = run_cli("sample")
        assert result.code == 2 and result.err == (
            f"lmtool: error: {Path('runs') / 'latest.txt'} is damaged: it should name the latest run; name the run "
            "itself instead of runs/latest (training a run rewrites the file)\n"), result.err


def test_bf16_training_resumes_exactly_too(small_corpus, tmp_path):
    cfg = load_config(TINY, RESUMABLE + ["train.precision=bf16"])
    whole = train(cfg, small_corpus, out=tmp_path / "whole")
    assert json.loads((whole.run_dir / "metrics.jsonl").read_text().splitlines()[0])["precision"] == "bf16"
    with pytest.raises(Crash):
        train(cfg, small_corpus, out=tmp_path / "broken", on_event=crash_at_step(60))
    resumed = resume(tmp_path / "broken")
    assert_same_weights(whole.run_dir, resumed.run_dir)
    assert losses(whole.run_dir) == losses(resumed.run_dir)
    # the weights stay float32: bf16 is only the arithmetic of the forward pass
    assert all(w.dtype == torch.float32 for w in load_file(resumed.run_dir / LAST_MODEL).values())


def test_a_checkpoint_from_before_precision_was_recorded_still_resumes(small_corpus, tmp_path):
    cfg = load_config(TINY, RESUMABLE + ["train.precision=fp32"])
    with pytest.raises(Crash):
        train(cfg, small_corpus, out=tmp_path / "run", on_event=crash_at_step(60))
    state = load_training_state(tmp_path / "run")
    del state["precision"]
    torch.save(state, tmp_path / "run" / TRAINING_STATE)
    whole = train(cfg, small_corpus, out=tmp_path / "whole")
    assert_same_weights(whole.run_dir, resume(tmp_path / "run").run_dir)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_checkpoint_of_an_unfused_optimiser_resumes(small_corpus, tmp_path, optimizer):
    """Checkpoints of older lmtool versions (or of a device without fused optimisers) hold fused=None in their
    param groups; resuming must still train with the fused kernels that skip bad steps, to the same weights."""
    cfg = load_config(TINY, RESUMABLE + ["train.precision=fp32", f"train.optimizer={optimizer}", "train.momentum=0.5",
                                         "train.max_epochs=1"])
    with pytest.raises(Crash):
        train(cfg, small_corpus, out=tmp_path / "run", on_event=crash_at_step(30))
    state = load_training_state(tmp_path / "run")
    for group in state["optimizer"]["param_groups"]:
        assert group["fused"] is True
        group["fused"] = None
    torch.save(state, tmp_path / "run" / TRAINING_STATE)
    resumed = resume(tmp_path / "run")
    whole = train(cfg, small_corpus, out=tmp_path / "whole")
    assert resumed.steps == whole.steps > 30
    wa, wb = load_file(whole.run_dir / LAST_MODEL), load_file(resumed.run_dir / LAST_MODEL)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blowup_factor", ["5", "null"])
def test_a_finite_loss_with_an_infinite_gradient_is_reported_as_non_finite(small_corpus, tmp_path, monkeypatch,
                                                                            blowup_factor):
    import lmtool.step_guard

    monkeypatch.setattr(lmtool.step_guard, "gradient_norm", lambda grads: torch.tensor(float("inf")))
    cfg = load_config(TINY, ["train.max_bad_steps=3", "train.max_steps=20", f"train.blowup_factor={blowup_factor}"])
    with pytest.raises(TrainingFailed, match=r"3 bad steps in a row up to step 3 \(non-finite loss or gradient\)"):
        train(cfg, small_corpus, out=tmp_path / "run")


def test_the_trainer_starts_momentum_buffers_when_it_builds_and_when_it_resumes(small_corpus, tmp_path, monkeypatch):
    """A fused SGD whose first update is skipped would otherwise step from uninitialised buffers."""
    import lmtool.train as training

    started, buffers_at_start = [], []
    real = training.start_momentum

    def spy(optimizer):
        real(optimizer)
        started.append(optimizer)
        # right after the call, before any step could have made them
        buffers_at_start.append([optimizer.state[p].get("momentum_buffer") for p in optimizer.param_groups[0]["params"]])
        buffers_at_start[-1] = [None if b is None else b.clone() for b in buffers_at_start[-1]]

    monkeypatch.setattr(training, "start_momentum", spy)
    cfg = load_config(TINY, ["train.optimizer=sgd", "train.momentum=0.9", "train.max_steps=4"])
    train(cfg, small_corpus, out=tmp_path / "run")
    resume(tmp_path / "run", limits={"max_steps": 6})
    assert len(started) == 3 and started[1] is started[2]  # built; then the resumed one built, and again after loading
    for built in buffers_at_start[:2]:  # zeros before the first step
        assert all(b is not None and not b.any() for b in built)
    assert all(b is not None and b.any() for b in buffers_at_start[2])  # the loaded ones, kept


def test_a_stopped_run_resumed_at_its_limit_finishes_but_a_finished_one_is_refused(small_corpus, tmp_path):
    """A run stopped at step 4 (say by SIGTERM) may be resumed with --max-steps 4: it validates, keeps its best
    model and finishes. The same limit for a finished run would train nothing and only rewrite its config."""
    cfg = load_config(TINY, ["train.max_steps=4", "train.eval_every=null"])
    train(cfg, small_corpus, out=tmp_path / "run")
    with pytest.raises(LmtoolError, match=r"already finished at step 4; --max-steps 4 would train it no further"):
        resume(tmp_path / "run", limits={"max_steps": 4})
    state = load_training_state(tmp_path / "run")
    state["finished"], state["stop_reason"] = False, None  # as SIGTERM at step 4 would have left it
    torch.save(state, tmp_path / "run" / TRAINING_STATE)
    assert resume(tmp_path / "run", limits={"max_steps": 4}).steps == 4
    assert load_training_state(tmp_path / "run")["finished"]


def test_a_run_that_fails_to_start_releases_its_lock(small_corpus, tmp_path, monkeypatch):
    """In one Python process (a notebook), a failed start must not leave the run locked against a retry."""
    import lmtool.train

    def unreadable(path):
        raise LmtoolError(f"cannot read {path}")

    cfg = load_config(TINY, ["train.max_steps=2"])
    with monkeypatch.context() as patch:
        patch.setattr(lmtool.train, "file_digest", unreadable)
        with pytest.raises(LmtoolError, match="cannot read"):
            train(cfg, small_corpus, out=tmp_path / "run")
    assert train(cfg, small_corpus, out=tmp_path / "run", overwrite=True).steps == 2
    assert resume(tmp_path / "run", limits={"max_steps": 3}).steps == 3  # released after train() and resume() too
    train(cfg, small_corpus, out=tmp_path / "run", overwrite=True)


def test_resume_refuses_a_hand_edited_config_but_takes_its_limits(small_corpus, tmp_path):
    cfg = load_config(TINY, ["train.max_steps=4"])
    train(cfg, small_corpus, out=tmp_path / "run")
    config_file = tmp_path / "run" / "config.yaml"
    assert resume(tmp_path / "run", limits={"max_steps": 6}).steps == 6  # rewrites config.yaml's limit: allowed
    assert "max_steps: 6" in config_file.read_text()
    edited = config_file.read_text().replace("lr: 0.01", "lr: 5.0")
    assert edited != config_file.read_text()
    config_file.write_text(edited)
    with pytest.raises(LmtoolError, match=r"config.yaml was edited since the run's last checkpoint \(train.lr: 0.01 "
                                          r"-> 5.0\); put it back to resume"):
        resume(tmp_path / "run", limits={"max_steps": 8})


def test_a_hand_edited_vocabulary_is_refused_on_resume(small_corpus, tmp_path):
    """Swapped tokens would remap every id the model learned: refused like an edited config.yaml."""
    from lmtool.run_paths import VOCAB_FILE

    cfg = load_config(TINY, ["train.max_steps=3", "train.checkpoint_every=1"])
    run = train(cfg, small_corpus, out=tmp_path / "run").run_dir
    vocab = json.loads((run / VOCAB_FILE).read_text())
    original = json.dumps(vocab)
    vocab["tokens"][2], vocab["tokens"][3] = vocab["tokens"][3], vocab["tokens"][2]
    (run / VOCAB_FILE).write_text(json.dumps(vocab))
    with pytest.raises(LmtoolError, match=r"vocab.json was edited since the run's last checkpoint"):
        resume(run, limits={"max_steps": 5})
    (run / VOCAB_FILE).write_text(original)
    assert resume(run, limits={"max_steps": 5}).steps == 5


def test_a_run_without_a_model_suggests_resuming_only_where_it_has_a_checkpoint(small_corpus, tmp_path):
    from lmtool.run_paths import resolve_model_path

    run = train(load_config(TINY, ["train.max_steps=2"]), small_corpus, out=tmp_path / "run").run_dir
    (run / BEST_MODEL).unlink()
    (run / LAST_MODEL).unlink()
    with pytest.raises(LmtoolError, match=r"saved no model yet .*; wait for it if it is training, resume it with "
                       r"'lmtool train --resume .*run', or name another run$"):
        resolve_model_path(run)
    (run / TRAINING_STATE).unlink()  # a run stopped before its first checkpoint: --resume would be refused
    with pytest.raises(LmtoolError, match=r"saved no model yet .*; wait for it if it is training, or name another "
                       r"run$"):
        resolve_model_path(run)


def test_resuming_a_file_names_its_run_only_where_it_lies_in_one(small_corpus, tmp_path):
    run = train(load_config(TINY, ["train.max_steps=2"]), small_corpus, out=tmp_path / "run").run_dir
    with pytest.raises(LmtoolError, match=rf"is a file; give the run directory that holds it \({run}\)$"):
        resume(run / BEST_MODEL)
    with pytest.raises(LmtoolError, match=r"small\.txt is a file; give the run directory$"):  # not a run's file
        resume(small_corpus)


def test_library_paths_expand_a_leading_tilde_as_a_shell_would(small_corpus, tmp_path, monkeypatch):
    import lmtool

    monkeypatch.setenv("HOME", str(tmp_path))
    run = train(load_config(TINY, ["train.max_steps=2"]), "~/small.txt", out="~/runs/home").run_dir
    assert run == tmp_path / "runs" / "home" and (run / BEST_MODEL).is_file()
    assert lmtool.load_model("~/runs/home").perplexity("~/small.txt").score.tokens > 0
    with pytest.raises(LmtoolError, match=r"model not found: ~nobody-here-at-all/run"):  # no such user: as written
        lmtool.load_model("~nobody-here-at-all/run")


def test_a_second_ctrl_c_stops_training_by_an_exception_not_by_ending_the_process(small_corpus, tmp_path):
    """From Python (a notebook), os._exit would end the caller's whole process; the exception leaves it running."""
    from lmtool.errors import Interrupted

    def press_ctrl_c_twice(event):
        if event["event"] == "train":
            os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step, save, stop
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once

    cfg = load_config(TINY, ["train.max_steps=50", "train.log_every=2"])
    with pytest.raises(Interrupted, match=r"training stopped at once by a second SIGINT; the run keeps what it "
                       r"saved last") as stopped:
        train(cfg, small_corpus, out=tmp_path / "run", on_event=press_ctrl_c_twice)
    assert stopped.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's handler is back
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert train(cfg, small_corpus, out=tmp_path / "run", overwrite=True).steps == 50  # the lock was let go


def test_a_run_without_its_best_model_uses_the_last_one_and_says_so(small_corpus, tmp_path, run_cli):
    run = train(load_config(TINY, ["train.max_steps=2"]), small_corpus, out=tmp_path / "run").run_dir
    assert run_cli("sample", "--model", run, "--length", "3").err == ""  # the best model: nothing to say
    (run / BEST_MODEL).unlink()
    result = run_cli("sample", "--model", run, "--length", "3")
    assert result.code == 0 and result.err == (f"lmtool: warning: {run} has no {BEST_MODEL}; using {LAST_MODEL}, "
                                                "the weights at the last validation\n"), result.err
