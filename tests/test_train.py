import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmtool.checkpoint import load_model_file
from lmtool.run_paths import BEST_MODEL, LAST_MODEL
from lmtool.config import TrainConfig, load_config
from lmtool.evaluate import stream_nll
from lmtool.data import encode_lines
from lmtool.text_files import read_text, split_lines
from lmtool.errors import LmtoolError
from lmtool.schedule import PlateauTracker, learning_rate
from lmtool.train import train

from conftest import CONFIGS, REPO

TINY = CONFIGS / "tiny.yaml"


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_overfits_a_repeated_sentence(tmp_path):
    corpus = tmp_path / "repeat.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 60)
    cfg = load_config(
        TINY,
        ["train.max_epochs=25", "train.patience=null", "data.valid_fraction=0.1", "data.batch_size=4"],
    )
    result = train(cfg, corpus, out=tmp_path / "run")
    assert result.best_valid.perplexity < 1.5


def test_same_seed_gives_the_same_run_and_the_best_model_file_scores_as_recorded(small_corpus, tmp_path):
    cfg = load_config(TINY, ["train.seed=5"])
    a = train(cfg, small_corpus, out=tmp_path / "a")
    b = train(cfg, small_corpus, out=tmp_path / "b")
    losses = lambda run: [(r["event"], r.get("loss")) for r in metrics(run)]  # noqa: E731
    assert losses(a.run_dir) == losses(b.run_dir)
    wa, wb = load_model_file(a.run_dir / LAST_MODEL).model, load_model_file(b.run_dir / LAST_MODEL).model
    assert all(torch.equal(x, y) for x, y in zip(wa.state_dict().values(), wb.state_dict().values()))

    # the saved best model, reloaded, gives exactly the validation loss recorded during training
    loaded = load_model_file(a.run_dir / BEST_MODEL)
    lines = split_lines(read_text(small_corpus))
    n_valid = max(1, round(len(lines) * cfg.data.valid_fraction))
    valid = encode_lines(loaded.tokenizer, lines[-n_valid:])
    score = stream_nll(loaded.model, valid, cfg.data.eval_batch_size, cfg.data.bptt)
    assert score.loss == pytest.approx(a.best_valid.loss, rel=1e-5)
    assert score.tokens == a.best_valid.tokens


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_with_the_sliced_output_layer_follows_pytorchs(small_corpus, tmp_path, monkeypatch, precision):
    # The tiny corpus's vocabulary is below the size that takes the sliced layer and fits one slice, so lower
    # that size and shrink the slices: the whole trainer (guard, fused optimiser, tied weights, validation) then
    # runs through lmtool/chunked_nll.py, and must follow the run that used PyTorch's cross-entropy.
    import lmtool.chunked_nll as chunked_nll
    import lmtool.model

    overrides = ["data.level=word", "train.max_steps=30", "train.eval_every=10", "model.tie_weights=true",
                 "model.embedding_size=32", f"train.precision={precision}"]
    cfg = load_config(TINY, overrides)
    calls = []
    real = lmtool.model.linear_nll
    monkeypatch.setattr(lmtool.model, "linear_nll", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    reference = train(cfg, small_corpus, out=tmp_path / "pytorch")
    assert not calls  # the reference is PyTorch's path
    monkeypatch.setattr(chunked_nll, "MIN_VOCAB", 0)
    monkeypatch.setattr(chunked_nll, "slice_size", lambda rows, vocab_size: min(vocab_size, 7))
    sliced = train(cfg, small_corpus, out=tmp_path / "sliced")
    assert len(calls) >= 30  # every training step, and validation
    expected, got = metrics(reference.run_dir), metrics(sliced.run_dir)
    assert [r["event"] for r in got] == [r["event"] for r in expected]
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    for a, b in zip(expected, got):
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], rel=tolerance)
    assert sliced.best_valid.loss == pytest.approx(reference.best_valid.loss, rel=tolerance)


def test_run_directory_contents_and_latest_link(small_corpus, tmp_path):
    result = train(load_config(TINY), small_corpus, out=tmp_path / "run")
    names = {p.name for p in result.run_dir.iterdir()}
    assert {"config.yaml", "vocab.json", "metrics.jsonl", BEST_MODEL, LAST_MODEL} <= names
    assert (tmp_path / "runs" / "latest").resolve() == result.run_dir.resolve()
    events = [r["event"] for r in metrics(result.run_dir)]
    assert events[0] == "start" and events[-1] == "end" and events.count("valid") == 2
    # validation perplexity is exp(summed NLL / tokens)
    valid = [r for r in metrics(result.run_dir) if r["event"] == "valid"][-1]
    assert valid["ppl"] == pytest.approx(math.exp(valid["loss"]))


def test_existing_run_needs_overwrite(small_corpus, tmp_path):
    cfg = load_config(TINY, ["train.max_steps=2"])
    train(cfg, small_corpus, out=tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(LmtoolError, match="already exists; pass --overwrite"):
        train(cfg, small_corpus, out=tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
    train(cfg, small_corpus, out=tmp_path / "run", overwrite=True)
    assert metrics(tmp_path / "run")[0]["event"] == "start"
    assert len([r for r in metrics(tmp_path / "run") if r["event"] == "start"]) == 1


def test_max_steps_and_eval_every_and_test_split(small_corpus, tmp_path):
    test_file = tmp_path / "test.txt"
    test_file.write_text("First Citizen:\nWe are accounted poor citizens.\n")
    cfg = load_config(TINY, ["train.max_steps=7", "train.eval_every=3"])
    result = train(cfg, small_corpus, test_path=test_file, out=tmp_path / "run")
    assert result.steps == 7 and "max_steps=7" in result.stop_reason
    records = metrics(result.run_dir)
    assert [r["step"] for r in records if r["event"] == "valid"] == [3, 6, 7]
    assert result.test is not None and [r for r in records if r["event"] == "test"][0]["tokens"] == result.test.tokens


def test_early_stop_after_patience(small_corpus, tmp_path):
    # an absurd learning rate makes validation worse after the first check
    cfg = load_config(TINY, ["train.lr=50", "train.patience=2", "train.max_epochs=20", "train.optimizer=sgd",
                             "train.clip_grad_norm=null", "train.schedule=constant"])
    result = train(cfg, small_corpus, out=tmp_path / "run")
    assert "early stop" in result.stop_reason
    assert result.epochs < 20


def test_decay_schedule_follows_zaremba():
    cfg = TrainConfig(schedule="decay", lr=1.0, decay_factor=0.5, decay_start_epoch=4)
    assert [learning_rate(cfg, 0, epoch, 0, None) for epoch in range(1, 8)] == [1, 1, 1, 1, 0.5, 0.25, 0.125]


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(schedule="cosine", lr=1.0, warmup_steps=4, min_lr=0.1, max_steps=104)
    assert [learning_rate(cfg, s, 1, 0, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(cfg, 54, 1, 0, 104) == pytest.approx(0.55)
    assert learning_rate(cfg, 104, 1, 0, 104) == pytest.approx(0.1)


def test_plateau_divides_after_patience_and_counts_for_early_stop():
    tracker = PlateauTracker()
    assert tracker.update(2.0, plateau_patience=1) is True
    tracker.update(2.1, plateau_patience=1)
    assert tracker.divisions == 0
    tracker.update(2.2, plateau_patience=1)
    assert (tracker.divisions, tracker.since_best) == (1, 2)
    cfg = TrainConfig(schedule="plateau", lr=1.0, plateau_factor=4.0)
    assert learning_rate(cfg, 0, 1, tracker.divisions, None) == 0.25


def test_a_model_that_does_not_fit_the_vocabulary_fails_before_writing_a_run(small_corpus, tmp_path, run_cli):
    result = run_cli("train", small_corpus, "--config", TINY, "--set", "model.softmax=adaptive",
                     "--set", "model.adaptive_cutoffs=500", "--out", tmp_path / "run")
    assert result.code == 2 and "must all lie below the vocabulary size" in result.err
    assert not (tmp_path / "run").exists()  # so fixing the config and running again needs no --overwrite


def count_host_reads(monkeypatch):
    """Count every way a tensor's value reaches Python (each one waits for the GPU when training runs there)."""
    calls = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            calls["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_training_step_reads_nothing_back_from_the_device(small_corpus, tmp_path, monkeypatch, optimizer):
    """Steps between two logs add no host reads: 10 more steps, the same count (the GPU is never waited for)."""
    calls = count_host_reads(monkeypatch)
    counts = []
    for steps in (5, 15):
        calls["n"] = 0
        cfg = load_config(TINY, [f"train.max_steps={steps}", "train.log_every=1000", "train.eval_every=null",
                                 f"train.optimizer={optimizer}", "train.momentum=0.9", "train.checkpoint_every=null",
                                 "train.checkpoint_time=null"])
        train(cfg, small_corpus, out=tmp_path / f"run{steps}")
        counts.append(calls["n"])
    assert counts[0] > 0  # the counter sees the reads of validation and checkpoints
    assert counts[1] == counts[0]


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_a_skipped_step_leaves_the_optimiser_as_if_it_never_happened(optimizer, on_device):
    """A bad first step (NaN gradient) skipped, then clipped good ones: the same weights as clip_grad_norm_ and
    plain steps, momentum and Adam's step count included (the fused kernels clip through their grad_scale)."""
    from lmtool.step_guard import StepGuard, guarded_update, start_momentum
    from lmtool.train import OPTIMIZERS

    cfg = TrainConfig(optimizer=optimizer, lr=0.1, momentum=0.9, weight_decay=0.01)
    torch.manual_seed(0)
    start = torch.randn(7, 3)
    ours, plain_param = [torch.nn.Parameter(start.clone())], torch.nn.Parameter(start.clone())
    mine, plain = OPTIMIZERS[optimizer](ours, cfg, on_device or None), OPTIMIZERS[optimizer]([plain_param], cfg, None)
    start_momentum(mine)
    guard = StepGuard(torch.device("cpu"), blowup_factor=None, max_bad_steps=5)
    ours[0].grad = torch.full_like(start, float("nan"))
    bad = guarded_update(mine, ours, guard, torch.tensor(float("nan")), 0.5, 1, on_device)
    assert bool(bad) and torch.equal(ours[0].detach(), start)
    if optimizer == "sgd":  # the skipped step leaves zero buffers, not uninitialised memory
        assert torch.equal(mine.state[ours[0]]["momentum_buffer"], torch.zeros_like(start))
    for step in range(3):  # clipped good steps: momentum and bias correction count from the first good one
        grad = torch.randn(7, 3) * (1 + step)  # norms of about 4.6, 9 and 14, all clipped to 0.5
        ours[0].grad, plain_param.grad = grad.clone(), grad.clone()
        assert not guarded_update(mine, ours, guard, torch.tensor(1.0), 0.5, step + 2, on_device)
        torch.nn.utils.clip_grad_norm_([plain_param], 0.5)
        plain.step()
        torch.testing.assert_close(ours[0].detach(), plain_param.detach(), rtol=1e-5, atol=1e-6)
    assert guard.state_dict()["skipped_steps"] == 1 and guard.state_dict()["good_steps"] == 3


def test_the_clipping_norm_is_the_norm_of_all_gradients_and_keeps_inf_and_nan():
    """The CPU's dot-product norm: what clip_grad_norm_ would compute (closer to float64 than PyTorch's own norm
    over ten million entries), and a non-finite gradient gives a non-finite norm for the bad-step check."""
    from lmtool.step_guard import gradient_norm

    torch.manual_seed(0)
    grads = [torch.randn(10_000_000), torch.randn(200, 800)[:, ::2], torch.randn(3) * 1e-3]  # one non-contiguous
    exact = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    ours, pytorchs = float(gradient_norm(grads)), float(torch.nn.utils.get_total_norm(grads))
    assert abs(ours - exact) <= abs(pytorchs - exact) + 1e-3 and abs(ours - exact) / exact < 5e-5
    for bad, expected in ((float("inf"), math.isinf), (float("nan"), math.isnan), (1e30, math.isinf)):
        broken = [g.clone() for g in grads]
        broken[1][5, 7] = bad
        assert expected(float(gradient_norm(broken)))  # 1e30 squared overflows, as in PyTorch's norm


def test_a_loss_blow_up_run_stops_with_the_step_and_the_reason(small_corpus, tmp_path, monkeypatch):
    from lmtool.errors import TrainingFailed
    from test_resume import corrupt_loss

    corrupt_loss(monkeypatch, lambda call: 1000.0 if call > 60 else 1.0)
    cfg = load_config(TINY, ["train.max_bad_steps=2", "train.max_steps=90", "train.eval_every=null"])
    # the guard's own threshold stopped it, and clipping is on already (tiny.yaml): the advice says so
    with pytest.raises(TrainingFailed, match=r"2 bad steps in a row up to step 62 \(loss .* above 5 x the running mean"
                       r".*; no model was saved before it\. Lower train\.lr, or raise train\.blowup_factor \(5; null "
                       r"turns the check off\) if the loss swings that much by nature, and add --overwrite to train "
                       r"again into "):
        train(cfg, small_corpus, out=tmp_path / "run")


def test_before_the_running_mean_settles_only_a_loss_far_above_a_uniform_guess_is_a_blow_up():
    from lmtool.step_guard import StepGuard

    def judged(guard, losses):
        verdicts = []
        for step, loss in enumerate(losses, start=1):
            bad, non_finite = guard.check(torch.tensor(loss), torch.tensor(1.0))
            guard.record(bad, non_finite, torch.tensor(loss), step)
            verdicts.append(bool(bad))
        return verdicts

    uniform = math.log(66)
    early = StepGuard(torch.device("cpu"), blowup_factor=5.0, max_bad_steps=2, warmup=50, uniform_loss=uniform)
    # spikes of 10 and 99 x ln V, which runs recover from, pass; a finite blow-up after an update does not
    assert judged(early, [uniform, 10 * uniform, 99 * uniform, 1e30, 1e30]) == [False, False, False, True, True]
    assert early.failure() == ("2 bad steps in a row up to step 5 (loss 1e+30 above 100 x 13.1, the larger of the "
                               "running mean and a uniform guess's loss (ln V), the limit before 50 good steps)")
    # the first step, before any update, is never judged; from there the running mean is the reference
    first = StepGuard(torch.device("cpu"), blowup_factor=5.0, max_bad_steps=2, warmup=50, uniform_loss=uniform)
    assert judged(first, [1e30, 1e31, 2e33]) == [False, False, True]
    # without the vocabulary's ln V the check waits for the running mean to settle, as before
    late = StepGuard(torch.device("cpu"), blowup_factor=5.0, max_bad_steps=2, warmup=3)
    assert judged(late, [uniform, 1e30, 1e30, 1e30, 1e30]) == [False, False, False, True, True]
    assert late.failure().endswith("(loss 1e+30 above 5 x the running mean 3.96e+28)")
    off = StepGuard(torch.device("cpu"), blowup_factor=None, max_bad_steps=2, uniform_loss=uniform)
    assert judged(off, [uniform, 1e30, 1e30]) == [False, False, False]


def test_a_loss_that_blows_up_in_the_first_steps_stops_the_run(small_corpus, tmp_path, monkeypatch):
    from lmtool.errors import TrainingFailed
    from test_resume import corrupt_loss

    corrupt_loss(monkeypatch, lambda call: 1000.0 if call > 2 else 1.0)  # finite, from the third step on
    cfg = load_config(TINY, ["train.max_bad_steps=2", "train.max_steps=40", "train.eval_every=null"])
    with pytest.raises(TrainingFailed, match=r"2 bad steps in a row up to step 4 \(loss .* above 100 x .*, the larger "
                       r"of the running mean and a uniform guess's loss \(ln V\), the limit before 50 good steps\); "
                       r"no model was saved before it\. Lower train\.lr, or raise train\.blowup_factor"):
        train(cfg, small_corpus, out=tmp_path / "run")
    assert not (tmp_path / "run" / "model-best.safetensors").exists()


def test_a_diverged_perplexity_prints_in_scientific_notation_not_hundreds_of_digits(capsys):
    from lmtool.display import TrainDisplay, format_perplexity

    line = {"event": "train", "epoch": 1, "step": 5, "loss": 4.2094, "ppl": math.exp(4.2094), "lr": 1e30,
            "tokens_per_s": 3196.0, "elapsed": 0.4, "eta": 1.2}
    TrainDisplay(live=False)(line)
    TrainDisplay(live=False)({**line, "loss": 900.0, "ppl": math.exp(700)})  # evaluate.safe_exp's ceiling
    first, second = capsys.readouterr().err.splitlines()
    assert "| loss 4.2094 | ppl 67.32 | lr 1.00e+30 |" in first
    assert "| loss 900.0000 | ppl 1.01e+304 | lr 1.00e+30 |" in second
    assert [format_perplexity(x) for x in (999_999.994, 999_999.996, 1e6, float("inf"))] == [
        "999999.99", "1e+06", "1e+06", "inf"]
    assert format_perplexity(3.14159, 3) == "3.142"


def test_cpu_training_keeps_freed_host_memory_for_reuse(small_corpus, tmp_path, monkeypatch):
    import lmtool.host_memory
    import lmtool.train

    calls = []
    monkeypatch.setattr(lmtool.train, "keep_freed_memory", lambda: calls.append(1) or True)
    train(load_config(TINY, ["train.max_steps=2"]), small_corpus, out=tmp_path / "run")
    assert calls == [1]
    monkeypatch.setattr(lmtool.host_memory.sys, "platform", "darwin")
    assert lmtool.host_memory.keep_freed_memory() is False  # elsewhere it changes nothing


def test_keeping_freed_memory_stops_page_faults_for_repeated_large_tensors():
    # Run in a fresh interpreter: once set, glibc's thresholds stay for the life of the process.
    import subprocess
    import sys

    script = """
import resource, sys, torch
from lmtool.host_memory import keep_freed_memory
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(64, 2**20).sum()  # 256 MB allocated, touched and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
default = faults()
assert keep_freed_memory()
faults()
print(default, faults())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    default, kept = map(int, out.split())
    assert default > 50_000 and kept < default / 10


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    from datetime import datetime

    from lmtool.checkpoint import claim_default_run_path

    monkeypatch.chdir(tmp_path)
    now = datetime(2026, 11, 27, 1, 2, 3)
    paths = [claim_default_run_path(Path("data/corpus.txt"), now) for _ in range(3)]
    assert [str(p) for p in paths] == ["runs/corpus-20261127-010203", "runs/corpus-20261127-010203-2",
                                       "runs/corpus-20261127-010203-3"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in paths)


def test_a_run_in_use_by_another_process_is_neither_resumed_nor_overwritten(run_cli, small_corpus, tmp_path):
    from lmtool.checkpoint import RunDir

    cfg = ["--config", CONFIGS / "tiny.yaml", "--max-steps", "3", "--out", tmp_path / "run"]
    assert run_cli("train", small_corpus, *cfg).code == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == b"locked\n"
        before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
        for args in (("train", "--resume", tmp_path / "run", "--max-steps", "6"),
                     ("train", small_corpus, *cfg, "--overwrite")):
            result = run_cli(*args)
            assert result.code == 2, result.err
            assert result.err.strip() == (f"lmtool: error: run {tmp_path / 'run'} is in use by another lmtool process "
                                          f"(pid {holder.pid}); wait for it to stop, or choose another run")
        assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    finally:
        holder.kill()
        holder.wait()
    free = RunDir(tmp_path / "run")
    free.lock()  # free again once the holder is gone
    free.release()


HOLD_LOCK = """
import sys, time
from pathlib import Path
from lmtool.checkpoint import RunDir
run = RunDir(Path(sys.argv[1]))
run.lock()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_hand_made_runs_latest_is_left_alone_with_a_warning(tmp_path, monkeypatch):
    from lmtool.checkpoint import mark_latest

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "latest").mkdir(parents=True)
    (tmp_path / "runs" / "new").mkdir()
    with pytest.warns(UserWarning, match="runs/latest is not a link lmtool made, so it was not updated"):
        mark_latest(Path("runs/new"))
    assert not (tmp_path / "runs" / "latest.txt").exists()  # no file for the loaders to miss


def test_a_file_system_without_locks_trains_unlocked(tmp_path, monkeypatch):
    import errno

    from lmtool.checkpoint import RunDir

    fcntl = pytest.importorskip("fcntl")

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = RunDir.create(tmp_path / "run", overwrite=False)  # no "in use" error: nothing holds this run
    assert run.lock_handle is None


def test_weights_made_non_finite_by_a_step_fail_the_run_at_validation(small_corpus, tmp_path):
    """A huge weight decay makes the weights infinite inside the optimiser's update, where the step guard (which
    checks the loss and the gradients) cannot see it: the validation loss then ends the run as diverged."""
    from lmtool.errors import TrainingFailed

    cfg = load_config(TINY, ["train.weight_decay=1e300", "train.max_steps=2", "train.eval_every=null"])
    with pytest.raises(TrainingFailed, match=r"training diverged: the validation loss is nan at step 2; no model"):
        train(cfg, small_corpus, out=tmp_path / "run")
    assert not (tmp_path / "run" / BEST_MODEL).exists() and not (tmp_path / "run" / LAST_MODEL).exists()


def test_the_training_library_refuses_wrong_arguments_clearly(small_corpus, tmp_path):
    """Python callers get lmtool's one-line errors, not AttributeError or TypeError from deep inside."""
    from lmtool.train import resume

    cfg = load_config(TINY, ["train.max_steps=2"])
    before = sorted(tmp_path.rglob("*"))
    for call, message in ((lambda: train({"train": {}}, small_corpus), r"config must be a Config \(from "
                           r"lmtool.config.load_config\), got dict"),
                          (lambda: train(cfg, None), r"corpus_path must be a path \(str or Path\), got NoneType"),
                          (lambda: train(cfg, ""), "corpus_path is an empty name"),
                          (lambda: train(cfg, small_corpus, valid_path=3), "valid_path must be a path"),
                          (lambda: train(cfg, small_corpus, out=""), "out is an empty name"),
                          (lambda: resume(None), "the run to resume must be a path"),
                          (lambda: load_config(TINY, "train.max_steps=2"), "overrides must be a list of "
                           "'section.key=value' strings, got the string 'train.max_steps=2'")):
        with pytest.raises(LmtoolError, match=message):
            call()
    assert sorted(tmp_path.rglob("*")) == before
    result = train(cfg, str(small_corpus), out=str(tmp_path / "run"))  # plain strings are paths too
    assert result.steps == 2 and result.run_dir == tmp_path / "run"


def test_a_run_saved_with_a_seed_above_32_bits_still_loads_and_resumes(small_corpus, tmp_path):
    """New seeds stop at 2**32 - 1 (the bits PyTorch's CPU generator keeps); runs saved before that still load."""
    import numpy as np

    import lmtool
    from lmtool.config import config_from_dict
    from lmtool.train import resume

    import lmtool.train

    tree = load_config(TINY, ["train.max_steps=2"]).to_dict()
    tree["train"]["seed"] = 2**64 - 1  # as lmtool once accepted
    with pytest.MonkeyPatch.context() as older_lmtool:
        older_lmtool.setattr(lmtool.train, "check_new_seed", lambda name, seed: None)
        run = train(config_from_dict(tree), small_corpus, out=tmp_path / "run").run_dir
    assert lmtool.load_model(run).config.train.seed == 2**64 - 1
    # numpy counts and torch's device objects, as a Python caller may pass them
    resumed = resume(run, limits={"max_steps": np.int64(3)}, device=torch.device("cpu"))
    assert resumed.steps == 3
    with pytest.raises(LmtoolError, match=r"limits must be a dict of max_time, max_epochs, max_steps, got 'max_steps=4'"):
        resume(run, limits="max_steps=4")
    with pytest.raises(LmtoolError, match=r"limits must be a dict of .*, got \{'lr': 1\}"):
        resume(run, limits={"lr": 1})
    config_before = (run / "config.yaml").read_bytes()
    for call, message in ((lambda: resume(run, limits={"max_steps": 5}, on_event=5), "on_event must be a function"),
                          (lambda: resume(run, device=""), "unknown device ''"),  # it was silently ignored
                          (lambda: resume(run, device="cuda:abc"), "unknown device 'cuda:abc'"),
                          (lambda: resume(run, device="cpu:\u0663"), "unknown device")):
        with pytest.raises(LmtoolError, match=message):
            call()
    assert (run / "config.yaml").read_bytes() == config_before  # refused before the run was touched
    # a Config built by hand is held to the same limit as one from load_config
    tree["train"]["seed"] = 2**32 + 7
    with pytest.raises(LmtoolError, match="train.seed must be between 0 and 4,294,967,295"):
        train(config_from_dict(tree), small_corpus, out=tmp_path / "new")


def test_a_config_edited_by_hand_is_checked_before_anything_is_written(small_corpus, tmp_path):
    import re
    from dataclasses import replace

    config = load_config(TINY, ["train.max_steps=2"])
    train(config, small_corpus, out=tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    # a frozen Config is edited with dataclasses.replace, which runs none of load_config's checks
    for edited, message in [
        (replace(config, data=replace(config.data, batch_size=0)), "data.batch_size: 0 is out of range"),
        (replace(config, model=replace(config.model, cell="xyz")), "model.cell: 'xyz' is not one of"),
        (replace(config, data=replace(config.data, level="bytes")), "data.level: 'bytes' is not one of"),
        (replace(config, model=replace(config.model, tie_weights=True)), "model.tie_weights needs"),
        (replace(config, train=None), "config.train must be a TrainConfig, got NoneType"),
    ]:
        with pytest.raises(LmtoolError, match=re.escape(message)):
            train(edited, small_corpus, out=tmp_path / "old", overwrite=True)
        assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    with pytest.raises(LmtoolError, match="overwrite must be True or False, got 'no'"):  # "no" is truthy
        train(config, small_corpus, out=tmp_path / "old", overwrite="no")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
