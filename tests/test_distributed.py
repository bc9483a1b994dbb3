"""Training on several processes (torchrun, DistributedDataParallel over gloo on the CPU)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from lmtool.checkpoint import LOCK_FILE, load_training_state
from lmtool.run_paths import LAST_MODEL, RUN_FILES
from lmtool.config import config_from_dict, load_config
from lmtool.errors import LmtoolError
from lmtool.train import train

from conftest import CONFIGS, REPO, SHAKESPEARE

TINY = CONFIGS / "tiny.yaml"
# fp32 and SGD: bf16 autocast rounds differently for 4 rows than for 8, and Adam turns rounding differences of
# near-zero gradients into lr-sized steps; either would hide a real difference under a loose tolerance.
SETTINGS = ["train.precision=fp32", "train.optimizer=sgd", "train.lr=1.0", "train.max_steps=30", "train.eval_every=10",
            "train.patience=null", "train.checkpoint_every=7"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rank_main(rank, world, port, cwd, config_tree, corpora, valid, out, resume_limits, build_fails_on=None):
    """One process of a job, as torchrun would start it; keeps the weights it ended with, and the steps of its
    checkpoints (with whether each was the final one), for the test."""
    os.chdir(cwd)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import lmtool.train as training

    finish = training._Trainer._finish

    def keep_weights(self, stop_reason):
        weights = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        save_file(weights, Path(cwd) / f"{Path(out).name}-rank{rank}.safetensors")
        return finish(self, stop_reason)

    training._Trainer._finish = keep_weights
    save_checkpoint = training._Trainer.save_checkpoint

    def note_checkpoint(self, finished=False, stop_reason=None):
        with open(Path(cwd) / f"{Path(out).name}-rank{rank}.checkpoints", "a") as f:
            f.write(f"{self.step} {finished}\n")
        return save_checkpoint(self, finished, stop_reason)

    training._Trainer.save_checkpoint = note_checkpoint
    if build_fails_on == rank:  # this rank runs out of memory while its trainer is built (after the DDP wrap)
        def no_memory(optimizer):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 16 bytes.")

        training.start_momentum = no_memory
    try:
        if resume_limits is not None:
            training.resume(Path(out), limits=resume_limits)
        else:
            training.train(config_from_dict(config_tree), Path(corpora[rank]), valid_path=valid, out=Path(out),
                           overwrite=build_fails_on is not None)
    except LmtoolError as err:
        (Path(cwd) / f"{Path(out).name}-rank{rank}.error").write_text(f"{err.exit_code} {err}")


def run_ranks(cwd, world, out, config=None, corpora=None, valid=None, resume_limits=None, timeout=120,
              build_fails_on=None):
    """Start `world` processes of one job and wait for them; a hang fails the test instead of the suite. With
    `build_fails_on`, that rank fails to build its trainer and the job trains with --overwrite."""
    tree = config.to_dict() if config is not None else None
    corpora = [str(c) for c in corpora] if corpora else None
    args = (world, free_port(), str(cwd), tree, corpora, str(valid) if valid else None, str(out), resume_limits,
            build_fails_on)
    job = mp.start_processes(_rank_main, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not job.join(timeout=1):
        if time.time() > deadline:
            for process in job.processes:
                process.kill()
            pytest.fail(f"the {world}-process job did not finish in {timeout}s")


def rank_weights(cwd, out, rank):
    return load_file(Path(cwd) / f"{Path(out).name}-rank{rank}.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training on two processes (batch 4 each) and, in this process, with the global batch 8."""
    cwd = tmp_path_factory.mktemp("ddp")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    (cwd / "train.txt").write_text(text[:6000], encoding="utf-8")
    (cwd / "valid.txt").write_text(text[6000:7000], encoding="utf-8")
    config = load_config(TINY, SETTINGS)
    run_ranks(cwd, 2, cwd / "ddp", config, [cwd / "train.txt"] * 2, cwd / "valid.txt")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)  # keeps runs/latest out of the repository
        train(load_config(TINY, SETTINGS + ["data.batch_size=8"]), cwd / "train.txt", valid_path=cwd / "valid.txt",
              out=cwd / "single")
    return cwd


def test_both_ranks_end_with_the_same_weights_and_rank_0_saves_them(runs):
    rank0, rank1 = rank_weights(runs, "ddp", 0), rank_weights(runs, "ddp", 1)
    saved = load_file(runs / "ddp" / LAST_MODEL)
    assert rank0.keys() == rank1.keys() == saved.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], saved[name]), name


def test_two_processes_train_what_one_process_trains_with_the_global_batch(runs):
    ddp, single = rank_weights(runs, "ddp", 0), load_file(runs / "single" / LAST_MODEL)
    for name in ddp:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
    start = records(runs / "ddp")[0]
    assert start["world_size"] == 2 and start["batch_size"] == 8
    assert start["steps_per_epoch"] == records(runs / "single")[0]["steps_per_epoch"]

    def curve(run):
        return [(r["event"], r["step"], r["loss"], r.get("tokens_seen")) for r in records(runs / run)
                if r["event"] in ("train", "valid")]

    ddp_curve, single_curve = curve("ddp"), curve("single")
    assert [r[:2] for r in ddp_curve] == [r[:2] for r in single_curve]
    assert [r[3] for r in ddp_curve] == [r[3] for r in single_curve]  # tokens of every rank are counted
    for (_, _, a, _), (_, _, b, _) in zip(ddp_curve, single_curve):
        assert a == pytest.approx(b, rel=1e-6)


def test_validation_perplexity_is_the_perplexity_evaluate_gives(runs, run_cli):
    valid = [r for r in records(runs / "ddp") if r["event"] == "valid"][-1]
    result = run_cli("evaluate-perplexity", runs / "valid.txt", "--model", runs / "ddp" / LAST_MODEL,
                     "--batch-size", "2", "--json")  # tiny.yaml's data.eval_batch_size
    assert result.code == 0, result.err
    evaluated = json.loads(result.out)
    assert valid["tokens"] == evaluated["tokens"]
    assert valid["ppl"] == pytest.approx(evaluated["perplexity"], rel=1e-6)


def test_one_process_cannot_resume_a_two_process_run(runs, run_cli):
    result = run_cli("train", "--resume", runs / "ddp", "--max-steps", "40")
    assert result.code == 2
    assert "was trained by 2 processes and this is 1 process; resume it with the same number" in result.err
    assert load_training_state(runs / "ddp")["world_size"] == 2


def test_resume_on_two_processes_continues_exactly(runs, tmp_path):
    config = load_config(TINY, SETTINGS + ["train.max_steps=17"])  # stops between two log records
    run_ranks(tmp_path, 2, tmp_path / "short", config, [runs / "train.txt"] * 2, runs / "valid.txt")
    assert load_training_state(tmp_path / "short")["hidden"][0].shape == (2, 8, 32)  # both ranks' rows
    run_ranks(tmp_path, 2, tmp_path / "short", resume_limits={"max_steps": 30})
    resumed, whole = rank_weights(tmp_path, "short", 1), rank_weights(runs, "ddp", 1)
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name

    def train_losses(run_dir):
        return [(r["step"], r["loss"]) for r in records(run_dir) if r["event"] == "train"]

    assert train_losses(tmp_path / "short") == train_losses(runs / "ddp")


def test_a_rank_that_fails_stops_every_rank_with_its_message(runs, tmp_path):
    config = load_config(TINY, SETTINGS)
    run_ranks(tmp_path, 2, tmp_path / "run", config, [runs / "train.txt", tmp_path / "missing.txt"], timeout=60)
    code0, message0 = (tmp_path / "run-rank0.error").read_text().split(" ", 1)
    code1, message1 = (tmp_path / "run-rank1.error").read_text().split(" ", 1)
    assert (code1, message1) == ("2", f"training file not found: {tmp_path / 'missing.txt'}")
    assert (code0, message0) == ("2", f"rank 1 failed: training file not found: {tmp_path / 'missing.txt'}")


def torchrun(*args, cwd, timeout=120):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "lmtool", *[str(a) for a in args]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_writes_one_run_that_rank_0_reports(small_corpus, tmp_path):
    done = torchrun("train", small_corpus, "--config", TINY, "--max-steps", "12", "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "runs", small_corpus.name]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["latest"]
    assert {p.name for p in (tmp_path / "run").iterdir()} == {*RUN_FILES, LOCK_FILE}
    events = [r["event"] for r in records(tmp_path / "run")]
    assert events.count("start") == 1 and events.count("end") == 1
    assert done.stdout.count("training summary") == 1
    assert done.stderr.count("batch 8 (2 processes x 4) x 16") == 1
    assert "warning" not in done.stderr


def test_torchrun_with_a_missing_corpus_fails_once_with_its_message(tmp_path):
    done = torchrun("train", tmp_path / "nope.txt", "--config", TINY, cwd=tmp_path, timeout=60)
    assert done.returncode != 0
    assert done.stderr.count(f"lmtool: error: training file not found: {tmp_path / 'nope.txt'}") == 1
    assert "rank 0 failed" not in done.stderr  # the other rank stops without repeating it
    assert not (tmp_path / "runs").exists()


def test_a_rank_that_cannot_build_its_model_stops_the_job_before_overwrite_replaces_the_old_run(runs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs / "ddp", old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    run_ranks(tmp_path, 2, old, load_config(TINY, SETTINGS), [runs / "train.txt"] * 2, runs / "valid.txt",
              build_fails_on=1)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    code0, message0 = (tmp_path / "old-rank0.error").read_text().split(" ", 1)
    code1, message1 = (tmp_path / "old-rank1.error").read_text().split(" ", 1)
    assert code0 == code1 == "1"
    assert message1.startswith("building the model failed on rank 1: RuntimeError: DefaultCPUAllocator: can't allocate")
    assert message0 == "rank 1 failed: " + message1


def test_torchrun_with_a_model_that_does_not_fit_the_vocabulary_fails_once(small_corpus, tmp_path):
    done = torchrun("train", small_corpus, "--config", TINY, "--set", "model.softmax=adaptive",
                    "--set", "model.adaptive_cutoffs=500", "--out", "run", cwd=tmp_path, timeout=60)
    assert done.returncode != 0  # torchrun's own code for failed workers; each worker exited with 2
    assert done.stderr.count("lmtool: error: model.adaptive_cutoffs [500] must all lie below") == 1


def test_a_bidirectional_adaptive_softmax_model_trains_on_two_processes_as_on_one(tmp_path):
    # Both stacks run in one forward call (one gradient reduction), and the adaptive softmax's tail clusters
    # that a rank's batch never reaches still get their (zero) share of the reduction.
    words = "the cat sat on the mat\nthe dog sat on the log\na cat saw a dog on the mat\n" * 30
    (tmp_path / "train.txt").write_text(words)
    (tmp_path / "valid.txt").write_text(words[:300])
    settings = SETTINGS + ["data.level=word", "model.direction=bidirectional", "model.softmax=adaptive",
                           "model.adaptive_cutoffs=[4, 8]", "train.max_steps=12"]
    run_ranks(tmp_path, 2, tmp_path / "ddp", load_config(TINY, settings), [tmp_path / "train.txt"] * 2,
              tmp_path / "valid.txt")
    train(load_config(TINY, settings + ["data.batch_size=8"]), tmp_path / "train.txt", valid_path=tmp_path / "valid.txt",
          out=tmp_path / "single")
    ddp, single = rank_weights(tmp_path, "ddp", 0), load_file(tmp_path / "single" / LAST_MODEL)
    assert any(name.startswith("rnn_backward.") for name in ddp) and any(name.startswith("adaptive.") for name in ddp)
    for name in ddp:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
    valid = [[r["directions"] for r in records(tmp_path / run) if r["event"] == "valid"][-1] for run in ("ddp", "single")]
    for direction in ("forward", "backward"):
        assert valid[0][direction]["loss"] == pytest.approx(valid[1][direction]["loss"], rel=1e-6)


def test_time_limit_and_checkpoint_times_are_agreed_by_every_rank(runs, tmp_path):
    """Each rank sees its own clock; one collective per step merges them, so both stop and checkpoint at the
    same steps (a disagreement would hang one rank in a collective the other never joins)."""
    config = load_config(TINY, SETTINGS + ["train.max_steps=null", "train.max_epochs=1000", "train.max_time=2",
                                           "train.checkpoint_time=0.3", "train.checkpoint_every=null",
                                           "train.eval_every=null"])
    run_ranks(tmp_path, 2, tmp_path / "timed", config, [runs / "train.txt"] * 2, runs / "valid.txt", timeout=90)
    end = records(tmp_path / "timed")[-1]
    assert end["event"] == "end" and end["stop_reason"] == "reached max_time=2s"
    assert load_training_state(tmp_path / "timed")["step"] == end["steps"] > 10
    first, second = rank_weights(tmp_path, "timed", 0), rank_weights(tmp_path, "timed", 1)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    checkpoints = [(tmp_path / f"timed-rank{rank}.checkpoints").read_text().splitlines() for rank in (0, 1)]
    assert checkpoints[0] == checkpoints[1]  # the same steps on both ranks
    timed = [line for line in checkpoints[0] if line.endswith("False")]
    assert len(timed) >= 2 and checkpoints[0][-1] == f"{end['steps']} True", checkpoints[0]  # several on the way
