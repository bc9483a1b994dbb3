"""The training step as the CUDA-graph path runs it: fixed input buffers, the state carried in place, every
counter updated in place. CUDA graphs need a GPU, so here the same step runs uncaptured on the CPU and must
train exactly like the plain step; capturing itself is checked by bench/gpu_steps.py on a GPU."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lmtool.train
from lmtool.checkpoint import LAST_MODEL
from lmtool.config import load_config
from lmtool.distributed import DistributedContext
from lmtool.errors import TrainingFailed
from lmtool.graphed_step import GraphedStep
from lmtool.step_guard import StepGuard
from lmtool.train import resume, train, uses_cuda_graph

from conftest import CONFIGS
from test_resume import RESUMABLE, Crash, corrupt_loss, crash_at_step, losses

TINY = CONFIGS / "tiny.yaml"


@pytest.fixture
def static_step(monkeypatch):
    """Train through GraphedStep on the CPU (uncaptured); returns the list of its calls' window shapes."""
    calls = []
    original = GraphedStep.__call__

    def counted(self, x, y, state, step, lr):
        calls.append(tuple(x.shape))
        return original(self, x, y, state, step, lr)

    monkeypatch.setattr(lmtool.train, "uses_cuda_graph", lambda config, device, ctx: True)
    monkeypatch.setattr(GraphedStep, "__call__", counted)
    return calls


def weights(run_dir):
    return load_file(run_dir / LAST_MODEL)


@pytest.mark.parametrize("overrides", [
    [],  # Adam, plateau schedule, two epochs: a new epoch's zero state and a changed lr reach the buffers
    ["model.dropout=0.3", "model.direction=bidirectional", "train.optimizer=sgd", "train.lr=0.5",
     "train.schedule=decay", "train.decay_start_epoch=1"],
    ["train.precision=bf16"],
])
def test_the_static_step_trains_exactly_like_the_plain_one(small_corpus, tmp_path, static_step, monkeypatch, overrides):
    cfg = load_config(TINY, ["train.eval_every=20", "train.plateau_patience=0", *overrides])
    static = train(cfg, small_corpus, out=tmp_path / "static")
    assert len(set(static_step)) == 2  # full windows, and each epoch's shorter last one
    monkeypatch.setattr(lmtool.train, "uses_cuda_graph", lambda config, device, ctx: False)
    plain = train(cfg, small_corpus, out=tmp_path / "plain")
    assert losses(static.run_dir) == losses(plain.run_dir)
    static_weights, plain_weights = weights(static.run_dir), weights(plain.run_dir)
    assert all(torch.equal(static_weights[k], plain_weights[k]) for k in plain_weights)


def test_the_static_step_resumes_exactly(small_corpus, tmp_path, static_step):
    cfg = load_config(TINY, RESUMABLE)
    whole = train(cfg, small_corpus, out=tmp_path / "whole")
    with pytest.raises(Crash):
        train(cfg, small_corpus, out=tmp_path / "broken", on_event=crash_at_step(60))
    resumed = resume(tmp_path / "broken")
    assert losses(whole.run_dir) == losses(resumed.run_dir)
    assert all(torch.equal(a, b) for a, b in zip(weights(whole.run_dir).values(), weights(resumed.run_dir).values()))


def test_bad_steps_in_the_static_step_are_numbered_and_skipped(small_corpus, tmp_path, static_step, monkeypatch):
    # The step number reaches the guard as a device tensor here: the failure must still name step 23.
    corrupt_loss(monkeypatch, lambda call: float("nan") if call > 20 else 1.0)
    with pytest.raises(TrainingFailed, match="3 bad steps in a row up to step 23"):
        train(load_config(TINY, ["train.eval_every=10", "train.max_bad_steps=3"]), small_corpus, out=tmp_path / "r")


def test_the_guard_updates_its_counters_in_place():
    # A captured step reads and writes the same tensors on every replay: none may be replaced.
    guard = StepGuard(torch.device("cpu"), blowup_factor=5.0, max_bad_steps=1, warmup=1)
    tensors = lambda: [guard.good_steps, guard.bad_run, guard.skipped, guard.loss_ema, guard.failed_at,  # noqa: E731
                       guard.failed_blowup, guard.failed_loss, guard.failed_ema]
    before = [t.data_ptr() for t in tensors()]
    for loss in (1.0, 2.0, float("nan")):
        bad, non_finite = guard.check(torch.tensor(loss), torch.tensor(1.0))
        guard.record(bad, non_finite, torch.tensor(loss), torch.tensor(3))
    assert [t.data_ptr() for t in tensors()] == before
    assert guard.failure() == "1 bad steps in a row up to step 3 (non-finite loss or gradient)"


def test_which_runs_capture_their_step():
    cuda, cpu, one = torch.device("cuda"), torch.device("cpu"), DistributedContext()
    assert uses_cuda_graph(load_config(TINY, []), cuda, one)
    assert not uses_cuda_graph(load_config(TINY, []), cpu, one)
    assert not uses_cuda_graph(load_config(TINY, ["train.cuda_graph=false"]), cuda, one)
    assert not uses_cuda_graph(load_config(TINY, ["model.softmax=adaptive", "data.level=word"]), cuda, one)
    assert not uses_cuda_graph(load_config(TINY, ["train.schedule=cosine"]), cuda, one)


def test_the_start_line_says_whether_the_step_is_a_cuda_graph(small_corpus, tmp_path, static_step, run_cli):
    result = run_cli("train", small_corpus, "--config", TINY, "--out", tmp_path / "run", "--max-steps", "3")
    assert result.code == 0
    assert "(fp32, CUDA graph)" in result.err or "(bf16, CUDA graph)" in result.err
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["cuda_graph"] is True


def test_a_notice_is_one_line_on_stderr_with_its_text_intact(capsys):
    from lmtool.display import TrainDisplay

    TrainDisplay(live=False)({"event": "notice", "message": "capture failed (RuntimeError: [x] not allowed)"})
    assert capsys.readouterr().err == "lmtool: note: capture failed (RuntimeError: [x] not allowed)\n"
