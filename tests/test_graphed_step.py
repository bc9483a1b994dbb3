"""The training step as the CUDA-graph path runs it: fixed input buffers, the state carried in place, every
counter updated in place, warm-up, a new capture for a new lr, eager short windows and the fallback when a
capture fails. CUDA graphs need a GPU, so here a stand-in "graph" replays the step by running it (and, like a
real capture, does not run it while capturing); training through it must equal the plain step bitwise. The
real capture is compared with eager training by bench/cuda_graph.py on a GPU."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import lmtool.train
from lmtool.run_paths import LAST_MODEL
from lmtool.config import load_config
from lmtool.distributed import DistributedContext
from lmtool.errors import TrainingFailed
from lmtool.graphed_step import WARMUP_STEPS, GraphedStep
from lmtool.step_guard import StepGuard
from lmtool.train import TrainingClock, resume, train, uses_cuda_graph

from conftest import CONFIGS
from test_resume import RESUMABLE, Crash, corrupt_loss, crash_at_step, losses

TINY = CONFIGS / "tiny.yaml"


class StandInGraph:
    """capture(run) -> replay, as lmtool.graphed_step.capture_cuda_graph, without CUDA: capturing records
    `run` without running it; each replay runs it. `fail` makes every capture raise."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.captures, self.replays = fail, 0, 0

    def __call__(self, run):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing [stand-in]")
        self.captures += 1

        def replay():
            self.replays += 1
            run()

        return replay


class NoHostSyncs(TorchDispatchMode):
    """Fails any operation that copies a tensor's value to the host (item(), bool(), tolist(), nonzero): inside a
    real capture such a synchronisation breaks the capture."""

    SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            raise AssertionError(f"a host synchronisation in the captured step: {func}")
        return func(*args, **(kwargs or {}))


class SyncCheckingGraph(StandInGraph):
    """The stand-in graph whose replays run under NoHostSyncs: what a capture would record must not synchronise."""

    def __call__(self, run):
        replay = super().__call__(run)

        def checked():
            with NoHostSyncs():
                replay()

        return checked


def test_the_host_sync_check_catches_a_sync():  # the check the sync-free tests rely on can fail
    with pytest.raises(AssertionError, match="host synchronisation"):
        SyncCheckingGraph()(lambda: torch.ones(2).sum().item())()
    SyncCheckingGraph()(lambda: torch.ones(2).sum().add_(1))()


@pytest.fixture(params=["stand-in graph", "uncaptured"])
def graphed(request, monkeypatch):
    """Train through GraphedStep on the CPU; returns the stand-in graph (None: the uncaptured path)."""
    graph = StandInGraph() if request.param == "stand-in graph" else None
    monkeypatch.setattr(lmtool.train, "uses_cuda_graph", lambda config, device, ctx: True)
    monkeypatch.setattr(lmtool.train, "step_capture", lambda device: graph)
    if graph is not None:  # count the windows of another width, which must run eagerly
        graph.short_windows, call = 0, GraphedStep.__call__

        def counted(self, x, *args):
            graph.short_windows += x.size(-1) != self.width
            return call(self, x, *args)

        monkeypatch.setattr(GraphedStep, "__call__", counted)
    return graph


def weights(run_dir):
    return load_file(run_dir / LAST_MODEL)


@pytest.mark.parametrize("overrides", [
    [],  # Adam, plateau schedule, two epochs: a new epoch's zero state and a changed lr reach the buffers
    ["model.dropout=0.3", "model.direction=bidirectional", "train.optimizer=sgd", "train.lr=0.5",
     "train.schedule=decay", "train.decay_start_epoch=1"],
    ["train.precision=bf16"],
])
def test_the_graphed_step_trains_exactly_like_the_plain_one(small_corpus, tmp_path, graphed, monkeypatch, overrides):
    cfg = load_config(TINY, ["train.eval_every=20", "train.plateau_patience=0", *overrides])
    result = train(cfg, small_corpus, out=tmp_path / "graphed")
    if graphed is not None:
        assert graphed.captures >= 2  # the lr changed at least once
        # every full window after the warm-up is a replay; each epoch's shorter last window is not
        assert graphed.short_windows >= 1
        assert graphed.replays == result.steps - WARMUP_STEPS - graphed.short_windows
    monkeypatch.setattr(lmtool.train, "uses_cuda_graph", lambda config, device, ctx: False)
    plain = train(cfg, small_corpus, out=tmp_path / "plain")
    assert losses(result.run_dir) == losses(plain.run_dir)
    graphed_weights, plain_weights = weights(result.run_dir), weights(plain.run_dir)
    assert all(torch.equal(graphed_weights[k], plain_weights[k]) for k in plain_weights)


def test_the_graphed_step_resumes_exactly(small_corpus, tmp_path, graphed, reference_run):
    cfg = load_config(TINY, RESUMABLE)
    whole = reference_run(RESUMABLE)  # trained by the plain step, which the graphed one must equal bitwise
    with pytest.raises(Crash):
        train(cfg, small_corpus, out=tmp_path / "broken", on_event=crash_at_step(60))
    resumed = resume(tmp_path / "broken")
    assert losses(whole.run_dir) == losses(resumed.run_dir)
    assert all(torch.equal(a, b) for a, b in zip(weights(whole.run_dir).values(), weights(resumed.run_dir).values()))


def test_bad_steps_in_the_graphed_step_are_numbered_and_skipped(small_corpus, tmp_path, graphed, monkeypatch):
    # The step number reaches the guard as a device tensor in the buffers: the failure must still name step 23.
    corrupt_loss(monkeypatch, lambda call: float("nan") if call > 20 else 1.0)
    with pytest.raises(TrainingFailed, match="3 bad steps in a row up to step 23"):
        train(load_config(TINY, ["train.eval_every=10", "train.max_bad_steps=3"]), small_corpus, out=tmp_path / "r")


def test_a_failed_capture_says_so_once_and_training_goes_on_the_same(small_corpus, tmp_path, monkeypatch, run_cli):
    monkeypatch.setattr(lmtool.train, "uses_cuda_graph", lambda config, device, ctx: True)
    monkeypatch.setattr(lmtool.train, "step_capture", lambda device: StandInGraph(fail=True))
    result = run_cli("train", small_corpus, "--config", TINY, "--out", tmp_path / "failed", "--max-steps", "30")
    assert result.code == 0
    notes = [line for line in result.err.splitlines() if line.startswith("lmtool: note:")]
    assert notes == ["lmtool: note: the training step could not be captured as a CUDA graph (RuntimeError: operation "
                     "not permitted when stream is capturing [stand-in]); training goes on without one "
                     "(train.cuda_graph=false skips the attempt)"]
    monkeypatch.setattr(lmtool.train, "uses_cuda_graph", lambda config, device, ctx: False)
    assert run_cli("train", small_corpus, "--config", TINY, "--out", tmp_path / "plain", "--max-steps", "30").code == 0
    assert losses(tmp_path / "failed") == losses(tmp_path / "plain")


def test_buffers_take_the_full_width_even_when_a_short_window_comes_first():
    # A run resumed at an epoch's last window starts with a short window: the graph must still be of full ones.
    seen = []

    def body(x, y, state, step):
        seen.append((tuple(x.shape), type(step).__name__))
        return state + 1

    graph = StandInGraph()
    step = GraphedStep(body, width=8, capture=graph)
    state = step(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), 1, 0.1)  # short, eager
    for n in range(2, 2 + WARMUP_STEPS + 2):
        state = step(torch.zeros(2, 8), torch.zeros(2, 8), state, n, 0.1)
    assert graph.captures == 1 and graph.replays == 2
    assert seen[0] == ((2, 3), "int") and set(seen[1:]) == {((2, 8), "Tensor")}
    assert torch.equal(state, torch.full((2,), 1.0 + WARMUP_STEPS + 2))  # the state was carried through all


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
    assert guard.failure() == "1 bad step in a row up to step 3 (non-finite loss or gradient)"


def test_which_runs_capture_their_step():
    cuda, cpu, one = torch.device("cuda"), torch.device("cpu"), DistributedContext()
    assert uses_cuda_graph(load_config(TINY, []), cuda, one)
    assert not uses_cuda_graph(load_config(TINY, []), cpu, one)
    assert not uses_cuda_graph(load_config(TINY, ["train.cuda_graph=false"]), cuda, one)
    assert not uses_cuda_graph(load_config(TINY, ["model.softmax=adaptive", "data.level=word"]), cuda, one)
    assert not uses_cuda_graph(load_config(TINY, ["train.schedule=cosine"]), cuda, one)


def test_the_start_line_says_whether_the_step_is_a_cuda_graph(small_corpus, tmp_path, graphed, run_cli):
    result = run_cli("train", small_corpus, "--config", TINY, "--out", tmp_path / "run", "--max-steps", "3")
    assert result.code == 0
    assert "(fp32, CUDA graph)" in result.err or "(bf16, CUDA graph)" in result.err
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["cuda_graph"] is True


def test_a_plain_step_is_not_called_a_cuda_graph(small_corpus, tmp_path, run_cli):
    result = run_cli("train", small_corpus, "--config", TINY, "--out", tmp_path / "run", "--max-steps", "3")
    assert result.code == 0 and "CUDA graph" not in result.err and " on cpu (" in result.err, result.err
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["cuda_graph"] is False


def test_tokens_per_second_count_training_time_only(small_corpus, tmp_path, monkeypatch):
    # A stand-in clock: each training step takes 1 s, each validation and checkpoint 100 s. Every log line
    # must then report its tokens over exactly its steps' seconds, across validations, checkpoints and epochs.
    now = [0.0]
    monkeypatch.setattr(lmtool.train.time, "perf_counter", lambda: now[0])
    for name, seconds in (("_train_step", 1.0), ("_validate", 100.0), ("save_checkpoint", 100.0)):
        original = getattr(lmtool.train._Trainer, name)

        def timed(self, *args, original=original, seconds=seconds, **kwargs):
            now[0] += seconds
            return original(self, *args, **kwargs)

        monkeypatch.setattr(lmtool.train._Trainer, name, timed)
    cfg = load_config(TINY, ["train.log_every=5", "train.eval_every=7", "train.checkpoint_every=4",
                             "train.checkpoint_time=null"])
    result = train(cfg, small_corpus, out=tmp_path / "run")
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in records if r["event"] == "train"]
    assert result.epochs == 2 and len(logs) > 10
    previous = 0
    for log in logs:
        assert (log["tokens_seen"] - previous) / log["tokens_per_s"] == pytest.approx(5.0)
        previous = log["tokens_seen"]


def test_the_training_clock_leaves_pauses_out_and_waits_for_the_device_before_stopping():
    waits = []
    clock = TrainingClock(lambda: waits.append(1))
    clock.start()
    with clock.paused():
        pass
    assert len(waits) == 1 and clock.since is not None  # paused, and running again
    clock.stop()
    clock.stop()  # stopping a stopped clock waits for nothing
    assert len(waits) == 2 and clock.lap() >= 0 and clock.since is None


def test_a_notice_is_one_line_on_stderr_with_its_text_intact(capsys):
    from lmtool.display import TrainDisplay

    TrainDisplay(live=False)({"event": "notice", "message": "capture failed (RuntimeError: [x] not allowed)"})
    assert capsys.readouterr().err == "lmtool: note: capture failed (RuntimeError: [x] not allowed)\n"
