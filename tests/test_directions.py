"""Backward and bidirectional language models: training, scoring, perplexity and writing toward an ending."""

import json
import math

import pytest
import torch

import lmtool
from lmtool.config import load_config
from lmtool.errors import LmtoolError
from lmtool.evaluate import log_mean_exp
from lmtool.train import resume, train

from conftest import CONFIGS, SHAKESPEARE, train_run

TINY = CONFIGS / "tiny.yaml"
WORDS = "the cat sat on the mat\nthe dog sat on the log\na cat saw a dog\n" * 40


def reversed_text(text: str) -> str:
    """The lines in reverse order, and each line's characters reversed."""
    return "".join(line[::-1] + "\n" for line in reversed(text.splitlines()))


def metrics(run_dir, event):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == event]


@pytest.fixture(scope="module")
def bidirectional_run(tmp_path_factory):
    overrides = ["data.level=word", "train.max_epochs=8", "model.direction=bidirectional", "model.cell=gru"]
    return train_run(tmp_path_factory.mktemp("bidi"), "words.txt", WORDS, overrides)


def test_a_backward_model_equals_a_forward_model_trained_on_the_reversed_text(tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:5000]
    held_out = SHAKESPEARE.read_text(encoding="utf-8")[5000:6000]
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "valid.txt").write_text(held_out)
    (tmp_path / "train.rev").write_text(reversed_text(text))
    (tmp_path / "valid.rev").write_text(reversed_text(held_out))
    cfg = ["train.max_steps=30", "train.eval_every=10"]
    backward = train(load_config(TINY, [*cfg, "model.direction=backward"]), tmp_path / "train.txt",
                     valid_path=tmp_path / "valid.txt", out=tmp_path / "backward").run_dir
    forward = train(load_config(TINY, cfg), tmp_path / "train.rev", valid_path=tmp_path / "valid.rev",
                    out=tmp_path / "forward").run_dir
    assert metrics(backward, "train") == pytest.approx(metrics(forward, "train"), rel=1e-6)
    assert metrics(backward, "valid") == pytest.approx(metrics(forward, "valid"), rel=1e-6)
    assert len(metrics(backward, "valid")) == 3
    # evaluate-perplexity reads a backward model's file reversed, exactly as validation did
    evaluation = lmtool.load_model(backward).perplexity(tmp_path / "valid.txt", batch_size=2)
    assert evaluation.score.loss == pytest.approx(metrics(backward, "valid")[-1], rel=1e-5)
    assert lmtool.load_model(backward).directions == ("backward",)


def test_each_direction_scores_a_sentence_as_its_network_does_and_token_scores_sum_to_it(bidirectional_run):
    lm = lmtool.load_model(bidirectional_run)
    assert lm.directions == ("forward", "backward")
    sentence = "the dog sat on the mat"
    mixture = lm.score(sentence)[0]
    for part in (mixture.forward, mixture.backward):
        assert part.logprob == pytest.approx(math.fsum(t.logprob for t in part.tokens))
        assert [t.token for t in part.tokens] == sentence.split() + ["<EOS>"]
    assert lm.score(sentence, direction="backward")[0].logprob == pytest.approx(mixture.backward.logprob)
    # independent checks: forward, <EOS> then the words; backward, <EOS>, the words right to left, then the
    # sentence start
    ids = lm.tokenizer.encode_line(sentence)
    for part, sequence in ((mixture.forward, [0] + ids), (mixture.backward, [0] + ids[-2::-1] + [0])):
        with torch.no_grad():
            scores, _ = lm.network(torch.tensor([sequence[:-1]]), direction=part.direction)
        logp = torch.log_softmax(scores[0].double(), -1).gather(1, torch.tensor(sequence[1:]).unsqueeze(1)).sum()
        assert part.logprob == pytest.approx(float(logp), abs=1e-4)


def test_the_mixture_lies_between_the_directions_without_underflow(bidirectional_run):
    lm = lmtool.load_model(bidirectional_run)
    for sentence in ("the cat sat on the log", "log the on sat cat the", " ".join(["dog cat mat"] * 334)):
        mix = lm.score(sentence)[0]
        low, high = sorted((mix.forward.logprob, mix.backward.logprob))
        assert low <= mix.logprob <= high
        assert high - math.log(2) <= mix.logprob
        assert math.isfinite(mix.logprob)
    assert mix.num_tokens == 1003 and mix.logprob < -745  # e^-745 underflows a float64; the log does not
    assert log_mean_exp(-5000.0, -5001.0) == pytest.approx(-5000 + math.log1p(math.exp(-1)) - math.log(2))


def test_evaluate_perplexity_reports_each_direction_and_the_mixture(bidirectional_run, tmp_path, run_cli, monkeypatch):
    held_out = tmp_path / "held.txt"
    held_out.write_text("the cat sat on the log\na dog saw the cat\n")
    result = run_cli("evaluate-perplexity", held_out, "--model", bidirectional_run, "--json")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    lm = lmtool.load_model(bidirectional_run)
    for direction in ("forward", "backward"):
        expected = lm.perplexity(held_out, direction=direction).score.perplexity
        assert record["directions"][direction]["perplexity"] == pytest.approx(expected, rel=1e-6)
    mixtures = lm.score(["the cat sat on the log", "a dog saw the cat"])
    expected = math.exp(-sum(m.logprob for m in mixtures) / sum(m.num_tokens for m in mixtures))
    assert record["mixture_per_line"]["perplexity"] == pytest.approx(expected, rel=1e-9)
    # a line too long for a padded batch is read in windows, with the same result
    import lmtool.api as api

    long_line = " ".join(["the cat sat on the mat"] * 60)
    held_out.write_text(long_line + "\nthe cat\n")
    original = api.LONG_LINE
    try:
        api.LONG_LINE = 100  # the long line is read 16 tokens at a time (23 windows), the short one batched
        windowed = lm.perplexity(held_out, bptt=16).mixture
        api.LONG_LINE = 10**9  # both batched
        batched = lm.perplexity(held_out).mixture
    finally:
        api.LONG_LINE = original
    assert windowed.tokens == batched.tokens == 361 + 3
    assert windowed.nll == pytest.approx(batched.nll, rel=1e-5)
    # by default a long line is one stream in the CPU's evaluation window, whatever the batch size
    seen = []
    monkeypatch.setattr(api, "LONG_LINE", 100)
    monkeypatch.setattr(api, "stream_nll",
                        lambda *args, real=api.stream_nll, **kw: seen.append(args[2:4]) or real(*args, **kw))
    default = lm.perplexity(held_out, batch_size=4).mixture
    assert seen[-2:] == [(1, 512), (1, 512)]  # both directions of the long line
    assert default.nll == pytest.approx(windowed.nll, rel=1e-5)
    held_out.write_text("the cat sat on the log\na dog saw the cat\n")
    table = run_cli("evaluate-perplexity", held_out, "--model", bidirectional_run)
    assert "perplexity, backward" in table.out and "mixture" in table.out
    one = json.loads(run_cli("evaluate-perplexity", held_out, "--model", bidirectional_run, "--direction",
                             "backward", "--json").out)
    assert "directions" not in one and one["perplexity"] == pytest.approx(record["directions"]["backward"]["perplexity"])
    assert one["direction"] == "backward" and record["direction"] == "forward"
    backward = run_cli("evaluate-perplexity", held_out, "--model", bidirectional_run, "--direction", "backward").out
    assert backward.startswith("perplexity, backward")  # it read like a forward perplexity
    forward = run_cli("evaluate-perplexity", held_out, "--model", bidirectional_run, "--direction", "forward").out
    assert forward.splitlines()[0].strip() == "perplexity"


def test_bf16_evaluation_computes_the_mixture_in_bf16_too(bidirectional_run, tmp_path):
    held_out = tmp_path / "held.txt"
    held_out.write_text("the cat sat on the log\na dog saw the cat\n")
    lm = lmtool.load_model(bidirectional_run)
    exact, fast = lm.perplexity(held_out), lm.perplexity(held_out, precision="bf16")
    assert fast.precision == "bf16"
    for a, b in [(exact.mixture, fast.mixture), *zip(exact.by_direction.values(), fast.by_direction.values())]:
        assert a.nll != b.nll and b.nll == pytest.approx(a.nll, rel=0.01)


def test_score_command_prints_both_directions_and_the_mixture(bidirectional_run, run_cli):
    result = run_cli("score", "the cat sat", "a dog", "--model", bidirectional_run, "--json", "--tokens")
    assert result.code == 0, result.err
    records = [json.loads(line) for line in result.out.splitlines()]
    assert [r["direction"] for r in records] == ["mixture", "mixture"]
    for r in records:
        assert r["logprob"] == pytest.approx(log_mean_exp(r["forward"]["logprob"], r["backward"]["logprob"]))
        assert r["backward"]["per_token"][-1]["token"] == "<EOS>"
    table = run_cli("score", "the cat sat", "--model", bidirectional_run, "--tokens")
    assert "mixture of both directions" in table.out and "(backward)" in table.out and "<EOS> (start)" in table.out


def test_an_ending_is_written_toward_right_to_left(bidirectional_run, run_cli, tmp_path):
    ending = "sat on the mat"
    result = run_cli("sample", "--model", bidirectional_run, "--ending", ending, "--length", "12", "--seed", "3")
    assert result.code == 0, result.err
    assert result.out.rstrip("\n").endswith(" " + ending)
    assert len(result.out.split()) > len(ending.split())
    lm = lmtool.load_model(bidirectional_run)
    texts = lm.sample(ending=ending, length=30, num_samples=3, seed=1)
    # three streams, each drawn on its own (the ending itself is not returned)
    assert len(texts) == 3 and all(t and len(t.split()) <= 30 for t in texts) and len(set(texts)) == 3, texts
    # an ending that finishes a line ("...\n") is read the same as one without the newline
    assert lm.sample(ending="the mat\n", length=8, seed=2) == lm.sample(ending="the mat", length=8, seed=2)
    # greedy backward generation is the reversed greedy path of the backward stack
    greedy = lm.sample(ending="the mat", length=1, temperature=0)[0]
    ids = [0] + lm.tokenizer.encode_line("the mat")[-2::-1]
    with torch.no_grad():
        scores, _ = lm.network(torch.tensor([ids]), direction="backward")
    assert greedy == lm.tokenizer.decode([int(scores[0, -1].argmax())])
    out = tmp_path / "ending.txt"
    result = run_cli("sample", "--model", bidirectional_run, "--ending", ending, "-n", "3", "-o", out, "--seed", "1",
                     "--stop-at-eos", "--length", "50")
    lines = out.read_text().splitlines()  # with --stop-at-eos, each sample is the one line that ends so
    assert len(lines) == 3 and all(line.endswith(" " + ending) for line in lines)
    assert result.out.count("--- sample") == 3


def test_char_level_ending(tmp_path, run_cli, small_corpus):
    run = train(load_config(TINY, ["model.direction=backward", "train.max_epochs=1"]), small_corpus,
                out=tmp_path / "run").run_dir
    result = run_cli("sample", "--model", run, "--ending", "to bed.", "--length", "40", "--seed", "2")
    assert result.code == 0, result.err
    assert result.out.endswith("to bed.\n") and len(result.out) > len("to bed.\n")
    refused = run_cli("sample", "--model", run, "--prime", "ROMEO:")
    assert refused.code == 2 and refused.out == "" and "give --ending TEXT" in refused.err
    assert '(--ending "" for a line that leads to a line end)' in refused.err
    unconditioned = run_cli("sample", "--model", run, "--ending", "", "--length", "40", "--seed", "2")
    assert unconditioned.code == 0 and unconditioned.out.strip(), unconditioned.err  # the advice works
    assert "has no forward direction" in run_cli("score", "to bed", "--model", run, "--direction", "forward").err
    lm = lmtool.load_model(run)
    with pytest.raises(LmtoolError, match="this model reads backward only: give ending=TEXT"):  # not the CLI's flag
        lm.sample("ROMEO:", length=5)
    with pytest.raises(LmtoolError, match="on_token streams forward generation only"):  # it was silently dropped
        lm.sample(ending="to bed.", length=5, on_token=print)


@pytest.mark.parametrize("args, message", [
    (["sample", "--ending", "the end"], "--ending needs a backward or bidirectional model"),
    (["score", "the cat", "--direction", "backward"], "has no backward direction"),
    (["score", "the cat", "--direction", "both"], "--direction both needs a bidirectional model"),
    (["evaluate-perplexity", "held.txt", "--direction", "backward"], "has no backward direction"),
    (["score", "the cat", "--direction", "sideways"], "--direction must be forward, backward or both"),
    (["sample", "--ending", "x", "--prime", "y"], "give --prime or --ending, not both"),
])
def test_asking_for_a_direction_the_model_lacks_is_a_clear_error(tmp_path, run_cli, args, message):
    corpus = tmp_path / "words.txt"
    corpus.write_text(WORDS)
    (tmp_path / "held.txt").write_text("the cat\n")
    run = train(load_config(TINY, ["data.level=word", "train.max_steps=3"]), corpus, out=tmp_path / "run").run_dir
    result = run_cli(*args, "--model", run)
    assert result.code == 2
    assert message in result.err and len(result.err.strip().splitlines()) == 1


def test_kenlm_format_needs_one_direction(bidirectional_run, run_cli):
    result = run_cli("score", "the cat", "--model", bidirectional_run, "--format", "kenlm")
    assert result.code == 2 and "add --direction forward or backward" in result.err
    forward = run_cli("score", "the cat", "--model", bidirectional_run, "--format", "kenlm", "--direction", "forward")
    assert forward.code == 0 and forward.out.startswith("the=") and "\tcat=" in forward.out
    assert " 1 " in forward.out.split("\t")[0] and "</s>=2 3 " in forward.out
    # Read backward, "cat" is predicted first and the sentence start, KenLM's <s>, last.
    backward = run_cli("score", "the cat", "--model", bidirectional_run, "--format", "kenlm", "--direction", "backward")
    first, second, start = backward.out.splitlines()[0].split("\t")[:3]
    assert first.startswith("the=") and first.split()[1] == "2"
    assert second.startswith("cat=") and second.split()[1] == "1"
    assert start.startswith("<s>=1 3 ") and "</s>" not in backward.out


@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_bidirectional_training_resumes_exactly_and_trains_both_stacks(tmp_path, small_corpus, cell):
    cfg = load_config(TINY, ["model.direction=bidirectional", f"model.cell={cell}", "model.num_layers=3",
                             "train.max_steps=24", "train.checkpoint_every=8", "train.eval_every=12"])
    whole = train(cfg, small_corpus, out=tmp_path / "whole")

    def crash(record):
        if record["event"] == "train" and record["step"] == 20:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train(cfg, small_corpus, out=tmp_path / "broken", on_event=crash)
    resumed = resume(tmp_path / "broken")
    a, b = lmtool.load_model(whole.run_dir).network, lmtool.load_model(resumed.run_dir).network
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert metrics(whole.run_dir, "valid") == metrics(resumed.run_dir, "valid")
    records = [json.loads(line) for line in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["event"] == "valid"][-1]
    both = valid["directions"]
    assert valid["loss"] == pytest.approx((both["forward"]["loss"] + both["backward"]["loss"]) / 2, rel=1e-6)
    vocabulary_size = len(lmtool.load_model(whole.run_dir).tokenizer)
    torch.manual_seed(cfg.train.seed)  # the weights the trainer started from
    fresh = type(a)(cfg.model, vocabulary_size)
    assert not torch.equal(a.rnn_backward.weight_hh_l0, fresh.rnn_backward.weight_hh_l0)  # the backward stack trained


def test_training_reports_the_streams_and_each_direction(tmp_path, small_corpus, run_cli):
    result = run_cli("train", small_corpus, "--config", TINY, "--set", "model.direction=bidirectional",
                     "--max-steps", "12", "--out", tmp_path / "run")
    assert result.code == 0, result.err
    assert "bidirectional lstm" in result.err and "batch 4 x 16" in result.err
    assert "forward ppl" in result.err and "backward ppl" in result.err
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["batch_size"] == 4 and start["directions"] == ["forward", "backward"]
