"""sample, score and evaluate-perplexity: the library functions, the Python API and the commands."""

import json
import math
import os
import stat
from pathlib import Path, PurePosixPath

import pytest
import torch

import lmtool
from lmtool.config import load_config
from lmtool.errors import LmtoolError
from lmtool.sample import SamplingOptions, filter_logits, pick_next

from conftest import CONFIGS, SHAKESPEARE, train_run

TINY = CONFIGS / "tiny.yaml"
WORDS = "the cat sat on the mat\nthe dog sat on the log\na cat saw a dog\n" * 40


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("char"), "small.txt", SHAKESPEARE.read_text(encoding="utf-8")[:6000])


# Every word-level identity is checked with both output layers: the adaptive softmax must be just as exact.
SOFTMAX = {"full": [], "adaptive": ["model.softmax=adaptive", "model.adaptive_cutoffs=[4, 8]"]}


@pytest.fixture(scope="module", params=sorted(SOFTMAX))
def word_run(tmp_path_factory, request):
    overrides = ["data.level=word", "train.max_epochs=10", *SOFTMAX[request.param]]
    return train_run(tmp_path_factory.mktemp("word"), "words.txt", WORDS, overrides)


def assert_probabilities_sum_to_one(run_dir):
    """The next-token distribution sums to one (an adaptive softmax's log-probabilities as they are, without
    renormalising), and the loss at every position is exactly -log of that distribution at the target."""
    lm = lmtool.load_model(run_dir)
    x = torch.randint(0, len(lm.tokenizer), (3, 20))
    with torch.no_grad():
        scores, _ = lm.network(x)  # (3, 20, V)
        nll, _ = lm.network(x[:, :-1], targets=x[:, 1:])  # (3, 19)
    log_probs = scores.double() if lm.network.config.softmax == "adaptive" else scores.double().log_softmax(-1)
    sums = log_probs.exp().sum(-1)  # (3, 20)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    at_targets = log_probs[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)  # (3, 19)
    torch.testing.assert_close(nll.double(), -at_targets, rtol=1e-5, atol=1e-5)


def test_probabilities_sum_to_one_at_every_position(char_run, word_run):
    assert_probabilities_sum_to_one(char_run)
    assert_probabilities_sum_to_one(word_run)


def test_sentence_logprob_is_the_sum_of_token_logprobs_and_matches_a_step_by_step_pass(word_run):
    lm = lmtool.load_model(word_run)
    score = lm.score("the cat sat on the zebra")[0]
    assert [t.token for t in score.tokens] == ["the", "cat", "sat", "on", "the", "zebra", "<EOS>"]
    assert [t.known for t in score.tokens] == [True] * 5 + [False, True]
    assert score.num_unknown == 1
    assert score.logprob == pytest.approx(sum(t.logprob for t in score.tokens))
    assert score.log10prob == pytest.approx(score.logprob / math.log(10))
    # independent check: feed <EOS> then each token, one step at a time, reading log_softmax
    ids = lm.tokenizer.encode_line("the cat sat on the zebra")
    state, previous, expected = None, 0, 0.0
    with torch.no_grad():
        for i in ids:
            logits, state = lm.network(torch.tensor([[previous]]), state)
            expected += torch.log_softmax(logits[0, -1].double(), -1)[i].item()
            previous = i
    assert score.logprob == pytest.approx(expected, abs=1e-4)


def test_padded_batches_give_the_same_scores_as_one_at_a_time(word_run):
    lm = lmtool.load_model(word_run)
    sentences = ["the cat", "a dog saw the cat sat on the mat", "", "the log"]
    batched = lm.score(sentences, batch_size=4)
    single = [lm.score(s, batch_size=1)[0] for s in sentences]
    for b, s in zip(batched, single):
        assert b.logprob == pytest.approx(s.logprob, abs=1e-5)
    assert batched[2].num_tokens == 1  # the empty sentence is just <EOS>


def test_evaluate_perplexity_of_one_sentence_equals_score(word_run, tmp_path):
    lm = lmtool.load_model(word_run)
    sentence = "a cat sat on the mat"
    path = tmp_path / "one.txt"
    path.write_text(sentence + "\n")
    evaluation = lm.perplexity(path, batch_size=1)
    score = lm.score(sentence)[0]
    assert evaluation.score.tokens == score.num_tokens == 7
    assert evaluation.score.perplexity == pytest.approx(math.exp(-score.logprob / score.num_tokens), rel=1e-5)


def test_evaluate_perplexity_matches_training_validation(char_run):
    records = [json.loads(l) for l in (char_run / "metrics.jsonl").read_text().splitlines()]
    best = min((r for r in records if r["event"] == "valid"), key=lambda r: r["loss"])
    lines = SHAKESPEARE.read_text(encoding="utf-8")[:6000].split("\n")
    if lines[-1] == "":
        lines.pop()
    n_valid = max(1, round(len(lines) * 0.05))
    held_out = char_run.parent / "held_out.txt"
    held_out.write_text("\n".join(lines[-n_valid:]) + "\n")
    cfg = load_config(TINY)
    evaluation = lmtool.load_model(char_run).perplexity(held_out, batch_size=cfg.data.eval_batch_size)
    assert evaluation.score.tokens == best["tokens"]
    assert evaluation.score.loss == pytest.approx(best["loss"], rel=1e-5)


def test_unknown_tokens_are_counted_and_excluded_on_request(word_run, tmp_path):
    path = tmp_path / "unk.txt"
    path.write_text("the zebra sat\nthe cat\n")
    lm = lmtool.load_model(word_run)
    s = lm.perplexity(path).score
    assert (s.tokens, s.unknown) == (7, 1)
    assert s.perplexity_known is not None and s.perplexity_known != s.perplexity
    # one line scores as the sentence does (both start after an <EOS>): leave out its <UNK> token's log-prob
    path.write_text("the zebra sat\n")
    s = lm.perplexity(path).score
    tokens = lm.score(["the zebra sat"])[0].tokens
    assert [t.known for t in tokens] == [True, False, True, True] and (s.tokens, s.unknown) == (4, 1)
    assert s.perplexity_known == pytest.approx(math.exp(-sum(t.logprob for t in tokens if t.known) / 3), rel=1e-5)
    assert s.perplexity == pytest.approx(math.exp(-sum(t.logprob for t in tokens) / 4), rel=1e-5)


def test_sampling_is_reproducible_and_carries_state(char_run):
    lm = lmtool.load_model(char_run)
    a = lm.sample("ROMEO:", SamplingOptions(length=50, seed=3))
    b = lm.sample("ROMEO:", SamplingOptions(length=50, seed=3))
    c = lm.sample("ROMEO:", SamplingOptions(length=50, seed=4))
    assert a == b and a != c and len(a[0]) == 50
    greedy = lm.sample("ROMEO:", SamplingOptions(length=30, temperature=0))[0]
    # greedy decoding by re-reading the whole prefix each time gives the same text
    ids = [0] + lm.tokenizer.encode("ROMEO:")
    with torch.no_grad():
        for _ in range(30):
            logits, _ = lm.network(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert lm.tokenizer.decode(ids[1 + len("ROMEO:"):]) == greedy


def test_a_short_prompt_is_stepped_and_a_long_one_read_with_the_same_samples(char_run, monkeypatch):
    """On a CPU a prompt of a few tokens goes through the generation step (the sequence kernel's set-up costs
    more); a longer one is read by the sequence kernel. Either way the samples are the same."""
    import lmtool.sample

    lm = lmtool.load_model(char_run)
    reads = []
    real_read = type(lm.network).read
    monkeypatch.setattr(type(lm.network), "read", lambda self, *a, **k: reads.append(1) or real_read(self, *a, **k))
    options = SamplingOptions(length=40, seed=7, num_samples=2)
    short, long = "ROMEO:", "ROMEO: what say you?"  # 7 and 21 tokens with the <EOS> before them
    samples = {prompt: lm.sample(prompt, options) for prompt in (short, long)}
    assert reads == [1]  # the long prompt only
    monkeypatch.setattr(lmtool.sample, "STEPPED_PROMPT_TOKENS", 0)
    assert lm.sample(short, options) == samples[short] and reads == [1, 1]
    monkeypatch.setattr(lmtool.sample, "STEPPED_PROMPT_TOKENS", 100)
    assert lm.sample(long, options) == samples[long] and reads == [1, 1]
    # bf16 generation reads even a short prompt in fp32, and so do many streams (they share the read's set-up)
    lm.sample(short, SamplingOptions(length=5, seed=7, precision="bf16"))
    lm.sample(short, SamplingOptions(length=5, seed=7, num_samples=lmtool.sample.GATE_MAJOR_MIN_STREAMS))
    assert reads == [1, 1, 1, 1]


def test_batched_samples_and_stop_at_eos(word_run):
    lm = lmtool.load_model(word_run)
    samples = lm.sample("", SamplingOptions(length=40, num_samples=5, seed=1, stop_at_eos=True))
    assert len(samples) == 5
    # each stopped at its first line end (fewer than 40 tokens), which is not part of the text, as backward
    assert all("\n" not in s and len(s.split()) < 39 for s in samples), samples
    assert lm.sample("", length=40, num_samples=5, seed=1)[0].startswith(samples[0] + "\n")


def test_samples_stopped_at_a_line_end_are_one_line_each_on_screen_and_in_the_file(run_cli, char_run, tmp_path):
    # the <EOS> that stopped a sample is its line end: no blank line after it
    out = tmp_path / "lines.txt"
    many = run_cli("sample", "--model", char_run, "--stop-at-eos", "-n", "3", "--length", "300", "--seed", "1",
                   "-o", out)
    assert many.code == 0, many.err
    lines = out.read_text().split("\n")
    assert len(lines) == 4 and lines[3] == "" and all(lines[:3]), lines
    assert many.out.split("\n")[1::2][:3] == lines[:3]  # each after its "--- sample n ---" header
    one = run_cli("sample", "--model", char_run, "--stop-at-eos", "--length", "300", "--seed", "1", "--prime", "A")
    assert one.out.endswith("\n") and not one.out.endswith("\n\n") and one.out.count("\n") == 1, repr(one.out)


def test_top_k_keeps_exactly_k_tokens_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5]])
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=None))
    assert kept.sum().item() == 2 and not kept[0, 0] and not kept[0, 4]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, None, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, None, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, None, 0.1)).tolist() == [[True, False, False, False]]
    # a p that float32 rounds to 0 still keeps the most probable token (it was dropped with all the others)
    assert torch.isfinite(filter_logits(logits, None, 1e-46)).tolist() == [[True, False, False, False]]


# --- the commands ------------------------------------------------------------------------------------------


def test_sample_command_streams_the_prime_and_the_text(run_cli, char_run, tmp_path):
    result = run_cli("sample", "--model", char_run, "--prime", "ROMEO:", "--length", "40", "--seed", "2",
                     "--output", tmp_path / "s.txt")
    assert result.code == 0, result.err
    assert result.out.startswith("ROMEO:") and len(result.out) == len("ROMEO:") + 40 + 1
    assert (tmp_path / "s.txt").read_text() == result.out
    assert [p.name for p in tmp_path.iterdir() if p.name != "runs"] == ["s.txt"]  # no temporary file left beside it
    long_name = tmp_path / ("x" * 250)  # the longest names most file systems allow, less a little
    short = run_cli("sample", "--model", char_run, "--length", "3", "--seed", "2", "--output", long_name)
    assert short.code == 0 and long_name.read_text() == short.out, short.err
    again = run_cli("sample", "--model", char_run, "--prime", "ROMEO:", "--length", "40", "--seed", "2")
    assert again.out == result.out


def test_sample_uses_latest_run_and_says_how_to_train_without_one(run_cli, char_run, tmp_path):
    result = run_cli("sample", "--length", "5")
    assert result.code == 2 and "lmtool train" in result.err and len(result.err.strip().splitlines()) == 1
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "latest").symlink_to(char_run)
    assert run_cli("sample", "--length", "5", "--num-samples", "2").out.count("--- sample") == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "--temperature must be 0 (greedy) or positive and finite"),
        (["--top-k", "0"], "--top-k must be at least 1"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--length", "0"], "--length must be at least 1"),
        (["--num-samples", "0"], "--num-samples must be between 1 and 1,000,000, got 0"),
        (["--precision", "fp16"], "--precision must be fp32 or bf16, got 'fp16'"),
    ],
)
def test_sample_value_errors(run_cli, char_run, args, message):
    result = run_cli("sample", "--model", char_run, *args)
    assert result.code == 2 and message in result.err and "Traceback" not in result.err


def test_sample_refuses_to_overwrite_output(run_cli, char_run, tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    result = run_cli("sample", "--model", char_run, "--output", keep)
    assert result.code == 2 and "already exists" in result.err and keep.read_text() == "precious"
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "not-yet.txt")  # dangling: exists() says no, but it is there
    result = run_cli("sample", "--model", char_run, "--output", link)
    assert result.code == 2 and "already exists" in result.err and link.is_symlink()
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)  # as a device would be (/dev/full was once replaced by a plain file this way), not even replaced
    for overwrite in ([], ["--overwrite"]):  # without it, the advice was to pass --overwrite, which fails too
        result = run_cli("sample", "--model", char_run, "--output", pipe, *overwrite)
        assert result.code == 2 and "is not a regular file (a device or a pipe)" in result.err
    assert stat.S_ISFIFO(pipe.lstat().st_mode)


def test_prime_with_unknown_characters_warns(run_cli, char_run):
    result = run_cli("sample", "--model", char_run, "--prime", "\u2603", "--length", "3")
    assert result.code == 0 and "read as <UNK>" in result.err


def test_score_ranks_sentences_and_writes_json_and_kenlm(run_cli, word_run, tmp_path):
    likely, unlikely = "the cat sat on the mat", "mat the on sat cat the"
    rows = [json.loads(l) for l in run_cli("score", unlikely, likely, "--model", word_run, "--json").out.splitlines()]
    assert [r["rank"] for r in rows] == [2, 1] and rows[1]["logprob"] > rows[0]["logprob"]
    table = run_cli("score", unlikely, likely, "--model", word_run, "--tokens")  # given least probable first
    assert table.code == 0, table.err
    # the ranking table's rows (a sentence may wrap there: found by its log P) and then the token tables
    assert table.out.index(f"{rows[1]['logprob']:.4f}") < table.out.index(f"{rows[0]['logprob']:.4f}")
    assert table.out.index(f"1. {likely}") < table.out.index(f"2. {unlikely}")
    kenlm = run_cli("score-sentence-probability", likely, "--model", word_run, "--format", "kenlm").out.splitlines()
    assert kenlm[0].startswith("the=") and "</s>=2 7 " in kenlm[0]
    assert float(kenlm[0].split("Total: ")[1].split()[0]) == pytest.approx(rows[1]["log10prob"], abs=1e-4)
    sentences = tmp_path / "s.txt"
    sentences.write_text(f"{likely}\n{unlikely}\n")
    from_file = run_cli("score", "--file", sentences, "--model", word_run, "--json")
    assert [json.loads(l)["sentence"] for l in from_file.out.splitlines()] == [likely, unlikely]
    more = tmp_path / "more.txt"
    more.write_text("the dog\n")
    # several files, and arguments, all scored; ranks run over every sentence together
    several = run_cli("score", "a cat", "--file", sentences, "-f", more, "--model", word_run, "--json")
    rows = [json.loads(l) for l in several.out.splitlines()]
    assert [r["sentence"] for r in rows] == ["a cat", likely, unlikely, "the dog"]
    assert sorted(r["rank"] for r in rows) == [1, 2, 3, 4]
    # a Windows line end: --file drops its CR, and so does an argument cut from such a file with $(head -1 ...)
    sentences.write_bytes(f"{likely}\r\n".encode())
    crlf = [json.loads(run_cli("score", *args, "--model", word_run, "--json").out) for args in
            (["--file", sentences], [f"{likely}\r"])]
    assert crlf[0] == crlf[1] and crlf[0]["sentence"] == likely


def test_a_word_written_eos_mid_sentence_is_not_the_sentence_end(run_cli, word_run):
    kenlm = run_cli("score", "the cat <EOS> sat", "--model", word_run, "--format", "kenlm")
    assert kenlm.code == 0, kenlm.err
    words = kenlm.out.splitlines()[0].split("\t")
    assert words[2].startswith("<EOS>=0 3 ") and words[4].startswith("</s>=2 5 ")  # unknown, then the real end
    assert kenlm.out.count("</s>=2") == 1 and "OOV: 1" in kenlm.out


def test_sentences_and_file_names_are_printed_as_written_not_as_markup(run_cli, char_run, tmp_path):
    result = run_cli("score", "uh [/] yes [noise]", "--tokens", "--model", char_run)
    assert result.code == 0, result.err
    assert "1. uh [/] yes [noise]" in result.out  # the per-token table's title
    named = tmp_path / "data [draft].txt"
    named.write_text("to be or not to be\n")
    result = run_cli("evaluate-perplexity", named.name, "--model", char_run)  # the test runs in tmp_path
    assert result.code == 0, result.err
    assert "data [draft].txt" in result.out


def test_joined_symbols_and_control_characters_are_shown_whole(run_cli, char_run):
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467"  # one symbol of five code points: five character tokens
    sentence = f"a {family} of three"
    table = run_cli("score", sentence, "--model", char_run)
    assert table.code == 0, table.err
    assert sentence in table.out  # coloured one code point at a time, rich cut the cell's last 4 characters
    tab = run_cli("score", "a\tb c", "--model", char_run, "--format", "kenlm").out.splitlines()[0].split("\t")
    assert [field.split("=")[0] for field in tab[:5]] == ["a", "\\t", "b", "␣", "c"]  # no field left empty or split
    tokens = run_cli("score", "a\tb", "--model", char_run, "--tokens").out
    assert "│ \\t " in tokens and "│ a " in tokens
    assert "│ a\\tb " in tokens  # the sentence column: one row, not a tab expanded onto two
    accent = run_cli("score", "e\u0301", "--model", char_run, "--tokens").out
    assert "│ ◌\u0301 " in accent  # a combining mark alone, on a dotted circle
    lone_joiner = run_cli("score", "a\u200d", "--model", char_run, "--format", "kenlm").out.split("\t")
    assert lone_joiner[1].startswith("\\u200d=")  # alone it would show as nothing
    # line and paragraph separators split the sentence cell over rows and the token table's title over lines
    separated = run_cli("score", "the\u2028dog\x85cat", "--model", char_run, "--tokens").out
    assert "1. the\\u2028dog\\x85cat" in separated and "│ the\\u2028dog\\x85cat " in separated
    assert not any(c in separated for c in "\u2028\x85")


def test_a_word_holding_a_joiner_is_written_as_it_is(run_cli, word_run):
    # escaped, the KenLM field and the token row no longer named the vocabulary's word
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467"
    kenlm = run_cli("score", f"the {family} cat", "--model", word_run, "--format", "kenlm").out.split("\t")
    assert kenlm[1].split("=")[0] == family
    assert f"│ {family} " in run_cli("score", f"the {family}", "--model", word_run, "--tokens").out
    # an invisible character is escaped: raw, "ca<zero-width space>t" would read as the word "cat"
    hidden = run_cli("score", "the ca\u200bt", "--model", word_run, "--format", "kenlm").out.split("\t")
    assert hidden[1].split("=")[0] == "ca\\u200bt"


def test_a_word_prime_ending_in_a_space_gets_no_second_one(run_cli, word_run):
    for extra in ([], ["-n", "2"]):
        result = run_cli("sample", "--model", word_run, "--prime", "the cat ", "--length", "5", "--seed", "3", *extra)
        assert result.code == 0, result.err
        assert "the cat  " not in result.out and "the cat" in result.out, result.out


def test_sample_refuses_an_output_directory_it_cannot_write(run_cli, char_run, tmp_path):
    """Refused before any sampling, by trying: root passes every permission check, yet cannot write in /sys."""
    import os

    if os.geteuid() == 0:
        if not Path("/sys/kernel").is_dir():
            pytest.skip("root can write anywhere but in /sys, which this system lacks")
        locked = Path("/sys")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
    result = run_cli("sample", "--model", char_run, "--output", locked / "out.txt")
    assert result.code == 2 and result.out == "" and len(result.err.strip().splitlines()) == 1
    # "Permission denied", or "Read-only file system" where /sys is mounted read-only
    assert result.err.startswith(f"lmtool: error: --output {locked / 'out.txt'}: cannot create a file in {locked} (")
    assert result.err.strip().endswith("); choose another place")
    assert not (locked / "out.txt").exists()


def test_a_full_disk_is_a_runtime_failure_that_names_the_path(run_cli, char_run, tmp_path, monkeypatch):
    import errno
    import tempfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/lmtool-eval-x")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", full)
    held = tmp_path / "held.txt"
    held.write_text("to be or not to be\n")
    result = run_cli("evaluate-perplexity", held, "--model", char_run)
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1
    assert "cannot read or write /tmp/lmtool-eval-x: No space left on device" in result.err


def test_a_tiny_temperature_is_greedy_not_an_error():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 0.0]])
    for temperature in (1e-40, 1e-46, 1e-3):  # 1e-46 rounds to 0 in float32
        picked = pick_next(logits, SamplingOptions(temperature=temperature), torch.Generator().manual_seed(0))
        assert picked.tolist() == [1, 0]


def test_score_needs_sentences(run_cli, word_run):
    result = run_cli("score", "--model", word_run)
    assert result.code == 2 and "no sentences to score" in result.err


def test_evaluate_perplexity_command(run_cli, word_run, tmp_path):
    path = tmp_path / "held.txt"
    path.write_text("the cat sat on the mat\na dog saw a cat\n")
    result = run_cli("evaluate-perplexity", path, "--model", word_run, "--json")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    assert record["tokens"] == 13 and record["unknown"] == 0
    assert record["perplexity"] == pytest.approx(math.exp(record["nll"]))
    assert record["bits_per_word"] == pytest.approx(record["nll"] / math.log(2))
    table = run_cli("evaluate-perplexity", path, "--model", word_run)
    assert "perplexity" in table.out and "bits per word" in table.out
    missing = run_cli("evaluate-perplexity", tmp_path / "nope.txt", "--model", word_run)
    assert missing.code == 2 and "not found" in missing.err


def test_bf16_evaluation_and_scores_are_close_to_fp32_and_say_so(run_cli, char_run, tmp_path):
    held = tmp_path / "held.txt"
    held.write_text(SHAKESPEARE.read_text(encoding="utf-8")[6000:9000], encoding="utf-8")
    exact = json.loads(run_cli("evaluate-perplexity", held, "--model", char_run, "--json").out)
    result = run_cli("evaluate-perplexity", held, "--model", char_run, "--json", "--precision", "bf16",
                     "--batch-size", "4")
    assert result.code == 0, result.err
    fast = json.loads(result.out)
    assert exact["precision"] == "fp32" and fast["precision"] == "bf16"
    assert fast["perplexity"] == pytest.approx(exact["perplexity"], rel=0.01)
    assert "bf16 (approximate)" in run_cli("evaluate-perplexity", held, "--model", char_run, "--precision", "bf16").out
    lm = lmtool.load_model(char_run)
    lines = ["ROMEO: what light", "First Citizen:"]
    pairs = zip(lm.score(lines), lm.score(lines, precision="bf16"))
    gaps = [abs(fp32.logprob - bf16.logprob) / abs(fp32.logprob) for fp32, bf16 in pairs]
    assert 0 < max(gaps) < 0.01  # bf16 really computed, and close
    table = run_cli("score", *lines, "--model", char_run, "--precision", "bf16")
    assert table.code == 0 and "bf16 (approximate)" in table.out
    records = [json.loads(line) for line in run_cli("score", *lines, "--model", char_run, "--json").out.splitlines()]
    assert [r["precision"] for r in records] == ["fp32", "fp32"]


@pytest.mark.parametrize("command", ["evaluate-perplexity", "score"])
def test_bad_precision_is_one_line(run_cli, char_run, tmp_path, command):
    held = tmp_path / "held.txt"
    held.write_text("ROMEO:\n")
    target = [] if command == "score" else [held]  # score: checked before it looks for sentences
    result = run_cli(command, *target, "--model", char_run, "--precision", "half")
    assert result.code == 2 and "--precision must be fp32 or bf16, got 'half'" in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err


def test_constant_logits_give_perplexity_equal_to_the_vocabulary_size(char_run):
    from lmtool.data import encode_lines
    from lmtool.evaluate import stream_nll

    lm = lmtool.load_model(char_run)
    with torch.no_grad():
        lm.network.decoder.weight.zero_()
        lm.network.decoder.bias.fill_(0.7)
    stream = encode_lines(lm.tokenizer, ["to be or not to be", "that is the question"])
    score = stream_nll(lm.network, stream, batch_size=1, bptt=8)
    assert score.perplexity == pytest.approx(len(lm.tokenizer), rel=1e-6)


def test_token_by_token_evaluation_equals_one_full_pass(char_run):
    from lmtool.data import encode_lines
    from lmtool.evaluate import stream_nll

    lm = lmtool.load_model(char_run)
    stream = encode_lines(lm.tokenizer, ["First Citizen:", "Before we proceed any further, hear me speak."])
    one_at_a_time = stream_nll(lm.network, stream, batch_size=1, bptt=1)
    whole = stream_nll(lm.network, stream, batch_size=1, bptt=10_000)
    assert one_at_a_time.tokens == whole.tokens == stream.numel() - 1
    assert one_at_a_time.nll == pytest.approx(whole.nll, rel=1e-5)


def test_evaluation_windows_on_a_cpu_hold_at_least_512_positions_by_default():
    from lmtool.evaluate import evaluation_window

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert evaluation_window(35, 1, cpu) == 512
    assert evaluation_window(35, 8, cpu) == 64  # 8 x 64 = 512
    assert evaluation_window(35, 7, cpu) == 74  # rounded up: 7 x 73 = 511 would fall short
    assert evaluation_window(35, 16, cpu) == 35  # 16 x 35 = 560: the model's window already holds enough
    assert evaluation_window(600, 1, cpu) == 600  # never shorter than the model's
    assert evaluation_window(128, 1, cuda) == 128  # GPUs keep the model's window
    assert evaluation_window(128, 1, torch.device("mps")) == 128  # and so does any other device


def test_default_evaluation_window_changes_the_speed_not_the_numbers(char_run, tmp_path, monkeypatch):
    import lmtool.api

    lm = lmtool.load_model(char_run)
    held = tmp_path / "held.txt"
    held.write_text(SHAKESPEARE.read_text(encoding="utf-8")[6000:9000], encoding="utf-8")
    windows = []
    original = lmtool.api.stream_nll
    monkeypatch.setattr(lmtool.api, "stream_nll", lambda *args, **kw: windows.append(args[3]) or original(*args, **kw))
    default = lm.perplexity(held)
    model_window = lm.perplexity(held, bptt=lm.config.data.bptt)
    lm.perplexity(held, batch_size=64)
    assert windows == [512, lm.config.data.bptt, max(lm.config.data.bptt, 8)]
    assert default.score.tokens == model_window.score.tokens
    assert default.score.nll == pytest.approx(model_window.score.nll, rel=1e-6)


def test_top_k_and_top_p_never_emit_a_token_outside_the_allowed_set():
    from lmtool.sample import pick_next

    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    allowed_k = torch.topk(logits, 3).indices
    options = SamplingOptions(top_k=3, temperature=1.5)
    for _ in range(200):
        picked = pick_next(logits, options, None)
        assert all(picked[b] in allowed_k[b] for b in range(4))
    probs = torch.softmax(logits, -1)
    options = SamplingOptions(top_p=0.5)
    for _ in range(200):
        picked = pick_next(logits, options, None)
        for b in range(4):
            # a token is allowed when the tokens strictly more probable than it hold less than p
            assert probs[b][probs[b] > probs[b, picked[b]]].sum() < 0.5


def test_top_k_one_is_greedy(char_run):
    lm = lmtool.load_model(char_run)
    greedy = lm.sample("KING", SamplingOptions(length=40, temperature=0))
    top1 = lm.sample("KING", SamplingOptions(length=40, top_k=1, seed=9))
    assert greedy == top1


def test_edge_sentences_are_scored_and_flagged(run_cli, word_run):
    rows = [json.loads(l) for l in run_cli("score", "", "zebra quagga okapi", "--model", word_run, "--json").out.splitlines()]
    assert rows[0]["tokens"] == 1 and rows[0]["unknown"] == 0  # just <EOS>
    assert rows[1]["tokens"] == 4 and rows[1]["unknown"] == 3  # scored through <UNK> and flagged
    assert math.isfinite(rows[1]["logprob"])


def test_a_prompt_longer_than_any_training_line_is_fine(char_run):
    lm = lmtool.load_model(char_run)
    text = lm.sample("ROMEO: " * 200, SamplingOptions(length=10, seed=1))[0]
    assert len(text) == 10


@pytest.mark.parametrize("args, message", [
    (["--top-k", "-1"], "--top-k must be at least 1"),
    (["--model", "nowhere"], "model not found: nowhere"),
])
def test_more_sample_errors(run_cli, char_run, args, message):
    args = args if "--model" in args else [*args, "--model", str(char_run)]
    result = run_cli("sample", *args)
    assert result.code == 2 and message in result.err and len(result.err.strip().splitlines()) == 1


@pytest.mark.parametrize("scores", [
    [[0.1, float("nan"), 0.3]],  # one stream
    [[0.1, 0.2, 0.3], [0.1, float("nan"), 0.3]],  # several, one row bad
    [[0.1, 0.2, 0.3], [0.0, 0.0, 0.0], [float("inf"), 0.0, 0.0]],  # an infinite score: its softmax is NaN
    [[float("-inf")] * 3, [0.1, 0.2, 0.3]],  # every token impossible
])
def test_non_finite_scores_stop_sampling_with_a_clear_error(scores):
    from lmtool.sample import pick_next

    with pytest.raises(LmtoolError, match="non-finite scores"):
        pick_next(torch.tensor(scores), SamplingOptions(), None)
    finite = torch.tensor([[0.1, 0.2, 0.3]] * len(scores))
    assert pick_next(finite, SamplingOptions(), torch.Generator().manual_seed(0)).shape == (len(scores),)


def draw_blocks_of_16(monkeypatch, min_vocab: int, in_blocks: bool = True) -> None:
    """Draws in blocks of 16 tokens from `min_vocab` tokens and 2 streams (in_blocks=False: never in blocks)."""
    import lmtool.sample

    monkeypatch.setattr(lmtool.sample, "DRAW_BLOCK", 16)
    monkeypatch.setattr(lmtool.sample, "DRAW_BLOCKS_MIN_VOCAB", min_vocab)
    monkeypatch.setattr(lmtool.sample, "DRAW_BLOCKS_MIN_STREAMS", 2 if in_blocks else 10**9)


@pytest.fixture
def small_draw_blocks(monkeypatch):
    """Blocks of 16 tokens for any stream count from a 100-token vocabulary: 6 whole blocks and a last one of 4."""
    draw_blocks_of_16(monkeypatch, 100)


def block_test_probabilities() -> torch.Tensor:
    """(100,) probabilities with zeros where a block draw could slip: a whole empty block (tokens 64-79), the
    first and last tokens of blocks (0, 15, 47, 48), one inside the last, shorter block (97), and heavy tokens on
    both sides of the boundary at 32."""
    weights = torch.rand(100, generator=torch.Generator().manual_seed(3)) + 0.2
    weights[64:80] = 0
    weights[[0, 15, 47, 48, 97]] = 0
    weights[[31, 32, 33, 95]] *= 8
    return weights / weights.sum()


def test_drawing_in_blocks_follows_the_distribution(small_draw_blocks, monkeypatch):
    """The two-level draw (many streams, a large vocabulary) picks each token as often as its probability says,
    never a token of probability 0, and, from the same uniform numbers, the token the one-level cumsum draw picks."""
    import lmtool.sample

    draws = 40_000
    probs = block_test_probabilities().expand(draws, 100).contiguous()
    drawn = lmtool.sample._draw(probs, torch.Generator().manual_seed(1))  # (B, 1)
    assert drawn.shape == (draws, 1) and 0 <= int(drawn.min()) and int(drawn.max()) < 100
    assert bool((probs[0][drawn.flatten()] > 0).all())
    observed = torch.bincount(drawn.flatten(), minlength=100).double() / draws
    expected = probs[0].double()
    standard_errors = (expected * (1 - expected) / draws).sqrt()
    assert bool(((observed - expected).abs() <= 4.5 * standard_errors).all())  # zero where the probability is
    monkeypatch.setattr(lmtool.sample, "DRAW_BLOCKS_MIN_STREAMS", 10**9)  # the one-level draw, same numbers
    one_level = lmtool.sample._draw(probs, torch.Generator().manual_seed(1))
    assert (one_level == drawn).double().mean() > 0.999  # they differ only where the sums round differently


def test_drawing_in_blocks_reports_non_finite_scores(small_draw_blocks):
    """A NaN in any row raises; with a flag (a CUDA graph's draw) it is set instead, and every token drawn is still
    a valid index for the next step's embedding."""
    import lmtool.sample

    probs = block_test_probabilities().expand(3, 100).clone()
    probs[1, 40] = float("nan")
    with pytest.raises(LmtoolError, match="non-finite scores"):
        lmtool.sample._draw(probs, None)
    flag = torch.zeros((), dtype=torch.bool)
    drawn = lmtool.sample._draw(probs, None, flag)
    assert bool(flag) and 0 <= int(drawn.min()) and int(drawn.max()) < 100


def uniform_numbers(monkeypatch, value: float) -> None:
    """Every torch.rand in lmtool.sample gives `value`."""
    import lmtool.sample

    monkeypatch.setattr(lmtool.sample.torch, "rand", lambda shape, **kwargs: torch.full(shape, value))


@pytest.mark.parametrize("vocab", [96, 100])  # whole blocks only; a last block of 4 (its gathered columns clamped)
def test_a_draw_in_blocks_at_the_top_of_the_distribution_never_picks_an_impossible_token(monkeypatch, vocab):
    """A uniform number just below 1 lands past the rounded cumulative sum of the last block in some rows; the
    draw still picks the last possible token, not the impossible one after it."""
    import lmtool.sample

    draw_blocks_of_16(monkeypatch, 96)
    weights = torch.rand(20_000, vocab, generator=torch.Generator().manual_seed(0)) ** 8  # mixed magnitudes
    weights[:, -1] = 0
    probs = weights / weights.sum(-1, keepdim=True)
    uniform_numbers(monkeypatch, 1 - 2.0**-24)  # the largest number torch.rand gives in float32
    drawn = lmtool.sample._draw(probs, None)
    assert int((drawn == vocab - 1).sum()) == 0 and bool((probs.gather(1, drawn) > 0).all())


@pytest.mark.parametrize("in_blocks", [True, False])
def test_a_uniform_number_on_a_boundary_picks_the_token_after_it(monkeypatch, in_blocks):
    """Inverse CDF: u picks the first token whose cumulated probability exceeds it. Here u = 0.5 is where the first
    block's mass ends, and the next block starts with a token of probability 0: token 17 is drawn, not 15 (the
    first block) or 16 (impossible)."""
    import lmtool.sample

    draw_blocks_of_16(monkeypatch, 32, in_blocks)
    probs = torch.zeros(2, 32)
    probs[:, :16] = 1 / 32
    probs[:, 17:19] = 0.25
    uniform_numbers(monkeypatch, 0.5)
    assert lmtool.sample._draw(probs, None).flatten().tolist() == [17, 17]


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_k": 40}, {"top_p": 0.5}])
def test_generating_many_streams_over_a_large_vocabulary_draws_in_blocks(monkeypatch, options):
    """generate() with enough streams over a large vocabulary goes through the block draw, at any temperature and
    filter: every token it draws has probability, the samples are reproducible with a seed, never hold a token the
    filter removed, and are the ones the one-level draw gives from the same seed."""
    import lmtool.sample
    from lmtool.config import ModelConfig
    from lmtool.model import LanguageModel

    used = []
    real = lmtool.sample._draw_in_blocks

    def checked(probs, *args):
        drawn = real(probs, *args)
        used.append(bool((probs.gather(1, drawn) > 0).all()))  # pick_next would hide an impossible draw
        return drawn

    monkeypatch.setattr(lmtool.sample, "_draw_in_blocks", checked)
    torch.manual_seed(0)
    vocab = lmtool.sample.DRAW_BLOCKS_MIN_VOCAB + 100  # a last, shorter block
    model = LanguageModel(ModelConfig(embedding_size=8, hidden_size=8, init_range=2.0), vocab).eval()
    sampling = SamplingOptions(length=5, num_samples=lmtool.sample.DRAW_BLOCKS_MIN_STREAMS, seed=3, **options)
    allowed = []
    if "top_k" in options:  # the scores of every step, and the tokens each allows
        real_pick = lmtool.sample.pick_next
        monkeypatch.setattr(lmtool.sample, "pick_next", lambda scores, *args: allowed.append(
            torch.topk(scores, options["top_k"]).indices) or real_pick(scores, *args))
    samples = lmtool.sample.generate(model, [1, 2], sampling)
    assert len(used) == 5 and all(used) and samples == lmtool.sample.generate(model, [1, 2], sampling)
    assert len(samples) == sampling.num_samples and all(len(s) == 5 and max(s) < vocab for s in samples)
    for step, keep in enumerate(allowed[:5]):
        assert all(samples[row][step] in keep[row] for row in range(sampling.num_samples))
    monkeypatch.setattr(lmtool.sample, "DRAW_BLOCKS_MIN_STREAMS", 10**9)  # the one-level draw
    assert lmtool.sample.generate(model, [1, 2], sampling) == samples


def test_which_draws_go_in_blocks(monkeypatch):
    """Only many streams over a large vocabulary draw in blocks: a few streams, or a small vocabulary, cumulate the
    whole row."""
    import lmtool.sample

    called = []
    real = lmtool.sample._draw_in_blocks
    monkeypatch.setattr(lmtool.sample, "_draw_in_blocks", lambda *args: called.append(True) or real(*args))
    vocab, streams = lmtool.sample.DRAW_BLOCKS_MIN_VOCAB, lmtool.sample.DRAW_BLOCKS_MIN_STREAMS
    for rows, columns, expected in ((streams, vocab, True), (streams - 1, vocab, False), (streams, vocab - 1, False)):
        called.clear()
        probs = torch.softmax(torch.randn(rows, columns), -1)
        drawn = lmtool.sample._draw(probs, torch.Generator().manual_seed(0))
        assert drawn.shape == (rows, 1) and bool(called) == expected


@pytest.mark.parametrize("streams", [40_000, 1])
def test_two_level_adaptive_sampling_draws_from_the_exact_distribution(streams):
    """Many streams at once, and one stream draw after draw (its own shorter code path)."""
    from lmtool.config import ModelConfig
    from lmtool.model import LanguageModel
    from lmtool.sample import draw_adaptive

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(embedding_size=4, hidden_size=8, softmax="adaptive", adaptive_cutoffs=(3, 6),
                                      adaptive_div_value=1.0, init_range=1.0), vocab_size=10).eval()
    context = torch.randn(1, 8)  # one context, many independent draws
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        expected = model.scores(context).exp()[0]  # (V,)
        if streams > 1:
            draws = draw_adaptive(model.adaptive, context.expand(streams, 8), generator)
        else:
            single = [draw_adaptive(model.adaptive, context, generator) for _ in range(16_000)]
            assert all(d.shape == (1,) and d.dtype == torch.int64 for d in single)
            draws = torch.cat(single)
    observed = torch.bincount(draws, minlength=10).double() / draws.numel()
    assert expected[3:6].sum() > 0.05 and expected[6:].sum() > 0.05  # both tail clusters are really exercised
    # 4 standard errors at most: tight enough to catch tokens drawn in the wrong order within a cluster
    torch.testing.assert_close(observed, expected.double(), atol=0.01 if streams > 1 else 0.016, rtol=0)


@pytest.mark.parametrize("word_run", ["adaptive"], indirect=True)
def test_sampling_an_adaptive_model_at_other_temperatures_uses_the_full_distribution(word_run, monkeypatch):
    """Only temperature 1 without a filter draws in two levels; any other temperature, top-k or top-p is applied
    to the whole distribution, and every draw stays reproducible."""
    import lmtool.sample

    calls = {"two-level": 0, "full": 0}

    def counted(name, function):
        def wrapper(*args):
            calls[name] += 1
            return function(*args)
        return wrapper

    def within_top_3(scores, options, generator, non_finite=None):
        token = pick_next(scores, options, generator, non_finite)  # (B,)
        if options.top_k == 3:
            assert bool((scores.gather(1, token[:, None]) >= scores.topk(3).values[:, -1:]).all())
        return token

    monkeypatch.setattr(lmtool.sample, "draw_adaptive", counted("two-level", lmtool.sample.draw_adaptive))
    monkeypatch.setattr(lmtool.sample, "pick_next", counted("full", within_top_3))
    lm = lmtool.load_model(word_run)
    for options, path in ((SamplingOptions(length=20, seed=5), "two-level"),
                          (SamplingOptions(length=20, seed=5, temperature=0.7), "full"),
                          (SamplingOptions(length=20, seed=5, top_k=3), "full"),
                          (SamplingOptions(length=20, seed=5, top_p=0.9), "full")):
        calls.update({"two-level": 0, "full": 0})
        a, b = lm.sample("the cat", options), lm.sample("the cat", options)
        assert a == b and len(a[0].split()) >= 10
        assert calls == {"two-level": 0, "full": 0, path: 40}, (options, calls)


def test_bf16_generation_stays_close_to_fp32_and_samples_valid_tokens(char_run, word_run):
    """--precision bf16 steps the recurrent layers in bfloat16: each step's distribution stays within a few
    hundredths of fp32's, while the scores and the draw stay fp32."""
    for run_dir in (char_run, word_run):
        lm = lmtool.load_model(run_dir)
        model = lm.network.eval()
        tokens = torch.randint(0, len(lm.tokenizer), (4, 12))
        _, state = model.read(tokens[:, :-1])
        probs = {}
        for dtype in (None, torch.bfloat16):
            layers = [tuple(t.to(dtype) for t in layer) if dtype else layer for layer in model.layer_states(state)]
            hidden, _ = model.step_layers(tokens[:, -1], layers, model.step_weights(dtype=dtype))
            assert hidden.dtype == (dtype or torch.float32)
            probs[dtype] = torch.softmax(model.scores(hidden.float()), dim=-1)
        difference = (probs[None] - probs[torch.bfloat16]).abs().max().item()
        assert 0 < difference < 0.03  # bf16 rounding is there, and small
        asked = []
        real_weights = type(model).step_weights

        def spy(self, direction=None, dtype=None, streams=1):
            asked.append(dtype)
            return real_weights(self, direction, dtype, streams)

        type(model).step_weights = spy
        try:
            texts = lm.sample("", length=30, num_samples=3, seed=2, precision="bf16")
        finally:
            type(model).step_weights = real_weights
        assert asked == [torch.bfloat16]  # generation really stepped with bf16 weights
        assert len(texts) == 3 and all(texts)
        assert texts == lm.sample("", length=30, num_samples=3, seed=2, precision="bf16")  # same seed, same text


def test_evaluating_a_big_file_as_one_exact_stream_hints_at_batch_size(run_cli, char_run, tmp_path, monkeypatch):
    import lmtool.cli

    held = tmp_path / "held.txt"
    held.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    monkeypatch.setattr(lmtool.cli, "EXACT_STREAM_HINT_BYTES", 2000)  # a 3 kB file stands for a big one
    exact = run_cli("evaluate-perplexity", held, "--model", char_run)
    assert exact.code == 0 and "lmtool: hint:" in exact.err and "--batch-size 64" in exact.err
    assert len(exact.err.strip().splitlines()) == 1
    assert "hint" not in run_cli("evaluate-perplexity", held, "--model", char_run, "--batch-size", "8").err
    monkeypatch.setattr(lmtool.cli, "EXACT_STREAM_HINT_BYTES", 2_000_000)
    assert "hint" not in run_cli("evaluate-perplexity", held, "--model", char_run).err


def test_the_library_refuses_what_the_command_line_refuses(char_run, tmp_path):
    """Values that the CLI checks before any work are checked by the library too: a batch size of -1 scored
    every sentence as probability 1, and a negative window gave a perplexity of 1."""
    import numpy as np  # numbers of any integer or real type count, as they did before the checks

    lm = lmtool.load_model(char_run)
    for call, message in ((lambda: lm.score(["ab"], batch_size=-1), "batch_size must be an integer of at least 1, got -1"),
                          (lambda: lm.score(["ab"], batch_size=0), "batch_size must be an integer of at least 1, got 0"),
                          (lambda: lm.perplexity(SHAKESPEARE, bptt=-3), "bptt must be an integer of at least 1, got -3"),
                          (lambda: lm.perplexity(SHAKESPEARE, batch_size=0), "batch_size must be an integer of at least 1"),
                          (lambda: lm.perplexity([]), "no files to evaluate"),
                          (lambda: lm.sample(options=SamplingOptions(length=5), length=50), "give options or length, not both"),
                          (lambda: lm.score(None), "sentences must be a string or a list of strings"),
                          (lambda: lm.score(["a", None]), "sentences must be a string or a list of strings"),
                          (lambda: lm.perplexity(None), "paths must be a file path"),
                          (lambda: lm.sample(["ROMEO"]), "prime must be a string, got list"),
                          (lambda: lm.sample("x", temperature="hot"), r"temperature must be a number, got 'hot' \(str\)"),
                          (lambda: lm.sample("x", length=5.5), r"length must be a whole number, got 5.5 \(float\)"),
                          (lambda: lm.sample("x", top_k=True), r"top_k must be a whole number or None, got True"),
                          (lambda: lm.sample("x", stop_at_eos="yes"), r"stop_at_eos must be a flag \(True or False\)"),
                          (lambda: lm.score("x", direction="sideways"),
                           "direction must be forward, backward or both, got 'sideways'"),
                          # each of these raised a TypeError or AttributeError from deep inside
                          (lambda: lm.perplexity(SHAKESPEARE, batch_size=True), "batch_size must be an integer of at "
                           "least 1, got True"),
                          (lambda: lm.perplexity(SHAKESPEARE, bptt=True), "bptt must be an integer of at least 1"),
                          (lambda: lm.sample("x", lenght=5), "unknown sampling option 'lenght'; did you mean 'length'"),
                          (lambda: lm.sample("x", colour=5), "unknown sampling option 'colour'; sample takes prime, "
                           "options, on_token, ending, temperature, top_k"),
                          (lambda: lm.sample("x", {"length": 5}), "options must be a SamplingOptions, got dict"),
                          (lambda: lm.sample("x", length=3, on_token=5), "on_token must be a function"),
                          (lambda: lmtool.load_model(b"runs/x"), r"the model \(a run directory or model file\) must be "
                           r"a path \(str or Path\), got bytes"),
                          (lambda: lmtool.load_model(""), r"the model \(a run directory or model file\) is an empty name"),
                          (lambda: lm.perplexity(""), "a file to evaluate is an empty name; give a path"),
                          (lambda: lm.sample("x", promt="y"), "unknown sampling option 'promt'; did you mean 'prime'"),
                          (lambda: lmtool.load_model(char_run, device="cuda:1"), "lmtool uses the current GPU; choose "
                           "which GPU that is with CUDA_VISIBLE_DEVICES"),
                          (lambda: lmtool.load_model(char_run, device=3), "device must be auto, cpu, cuda or mps, got int"),
                          (lambda: lm.sample("x", temperature=float("inf")), "positive and finite, got inf"),
                          (lambda: lm.sample("x", seed=2**32), "--seed must be between 0 and 4,294,967,295")):
        with pytest.raises(lmtool.LmtoolError, match=message):  # exported by the package, torch-free
            call()
    # numpy integers are counts; other path objects are paths; torch's device objects are devices
    assert lm.score(["ab"], batch_size=np.int64(2))[0].logprob == lm.score(["ab"])[0].logprob
    held = tmp_path / "held.txt"
    held.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    assert (lm.perplexity(PurePosixPath(held), bptt=np.int32(16), batch_size=4).score.perplexity
            == lm.perplexity(str(held), bptt=16, batch_size=4).score.perplexity)
    for device in (torch.device("cpu"), torch.device("cpu", 0), "cpu:0"):
        assert lmtool.load_model(char_run, device=device).device == torch.device("cpu")
    assert lm.sample(None, length=3, seed=1) == lm.sample("", length=3, seed=1)  # no prime

    options = SamplingOptions(length=np.int64(3), temperature=np.float32(0.5), seed=np.int32(1), stop_at_eos=np.bool_(0))
    assert (options.length, options.seed, options.stop_at_eos) == (3, 1, False) and type(options.length) is int
    assert lm.sample("", options) == lm.sample("", length=3, temperature=float(np.float32(0.5)), seed=1)
