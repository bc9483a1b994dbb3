"""The bad-input matrix: every user mistake exits non-zero with one clear line and changes no file."""

import hashlib
from pathlib import Path

import pytest
import torch

from lmtool.run_paths import BEST_MODEL

from conftest import CONFIGS, SHAKESPEARE, train_run

TINY = str(CONFIGS / "tiny.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    train_run(root, "corpus.txt", SHAKESPEARE.read_text(encoding="utf-8")[:4000], ["train.max_steps=4"])
    return root


def _truncated_model(tmp: Path, trained: Path) -> Path:
    data = (trained / "run" / BEST_MODEL).read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 3])
    return tmp / "cut.safetensors"


FILES = {
    "empty.txt": b"",
    "blank.txt": b"  \n\t\n   \n",
    "binary.txt": b"abc\x00def\n" * 10,
    "latin1.txt": "café au lait\n".encode("latin-1") * 5,
    "one-line.txt": b"x" * 50_000_000,
    "good.txt": SHAKESPEARE.read_bytes()[:3000],
    "blank-tail.txt": SHAKESPEARE.read_bytes()[:3000] + b"\n" * 40,  # its held-out tenth: blank lines alone
    "short.txt": b"to be\n",
    "old-mac.txt": b"\r".join(SHAKESPEARE.read_bytes()[:3000].splitlines()) + b"\r",  # lone CR line ends
    "malformed.yaml": b"model: {hidden_size: 3\n",
    "unknown-key.yaml": b"model:\n  hiden_size: 3\n",
    "wrong-type.yaml": b"model:\n  num_layers: two\n",
    "zero-hidden.yaml": b"model:\n  hidden_size: 0\n",
    "dropout.yaml": b"model:\n  dropout: 1.5\n",
    "negative-lr.yaml": b"train:\n  lr: -1\n",
    "newer.yaml": b"format_version: 99\n",
    "list.yaml": b"- 1\n- 2\n",
    "tie.yaml": b"model:\n  tie_weights: true\n  embedding_size: 8\n  hidden_size: 16\n",
    "twice.yaml": b"model:\n  cell: gru\ntrain:\n  lr: 0.01\nmodel:\n  num_layers: 1\n",
    "zeros.bin": bytes(5 * 2**20),  # no newline anywhere
    "foreign/config.yaml": b"name: another program's settings\n",  # not a run, though it has both files
    "foreign/vocab.json": b"{}",
    "fresh/config.yaml": b"format_version: 1\n",  # a run that has not validated yet: no model file
    "fresh/vocab.json": b"{}",
}

# (case, command line with {tmp} and {run} placeholders, what the one line must say, exit code)
CASES = [
    ("missing corpus", "train {tmp}/nope.txt", "training file not found", 2),
    ("directory corpus", "train {tmp}", "is a directory", 2),
    ("empty corpus", "train {tmp}/empty.txt", "training file {tmp}/empty.txt is empty (no text to learn from)", 2),
    ("corpus is a link to itself", "train {tmp}/loop.txt",
     "training file {tmp}/loop.txt is a symbolic link that leads nowhere", 2),
    ("empty validation file", "train {tmp}/good.txt --valid {tmp}/empty.txt",
     "validation file {tmp}/empty.txt is empty (no text to score)", 2),
    ("whitespace corpus", "train {tmp}/blank.txt", "is empty", 2),
    ("binary corpus", "train {tmp}/binary.txt", "looks binary (NUL byte at offset 3)", 2),
    ("non-utf8 corpus", "train {tmp}/latin1.txt", "not UTF-8: undecodable byte 0xe9 at offset 3", 2),
    ("50 MB single line", "train {tmp}/one-line.txt", "single line, so no validation lines", 2),
    ("old Mac line ends", "train {tmp}/old-mac.txt", "single line, so no validation lines can be held out; give "
     "--valid FILE or a corpus with several lines; it holds 112 lone carriage returns (\\r, old Mac line ends), "
     "which are not line ends: convert them first, e.g. tr '\\r' '\\n' < FILE > FILE.txt", 2),
    ("empty vocabulary", "train {tmp}/good.txt --set data.min_freq=100000", "gives an empty vocabulary (nothing "
     "besides <EOS> and <UNK>): every character occurs fewer than data.min_freq=100000 times; lower data.min_freq", 2),
    ("blank validation split", "train {tmp}/blank-tail.txt",
     "the validation split of {tmp}/blank-tail.txt (its last 8 lines) holds only blank lines", 2),
    ("missing valid file", "train {tmp}/good.txt --valid {tmp}/nope.txt", "validation file not found", 2),
    ("binary test file", "train {tmp}/good.txt --test {tmp}/binary.txt", "binary.txt looks binary", 2),
    ("missing config", "train {tmp}/good.txt --config {tmp}/nope.yaml", "config file not found", 2),
    ("config twice", "train {tmp}/good.txt -c {tmp}/dropout.yaml --config {tmp}/negative-lr.yaml",
     "--config given 2 times; give one file, and change single settings with --set", 2),
    ("malformed yaml", "train {tmp}/good.txt --config {tmp}/malformed.yaml", "is not valid YAML at line", 2),
    ("yaml not a mapping", "train {tmp}/good.txt --config {tmp}/list.yaml", "must hold a mapping", 2),
    ("unknown key", "train {tmp}/good.txt --config {tmp}/unknown-key.yaml", "did you mean 'model.hidden_size'", 2),
    ("wrong type", "train {tmp}/good.txt --config {tmp}/wrong-type.yaml", "model.num_layers: expected a whole number, got 'two'", 2),
    ("hidden_size 0", "train {tmp}/good.txt --config {tmp}/zero-hidden.yaml", "model.hidden_size: 0 is out of range", 2),
    ("dropout 1.5", "train {tmp}/good.txt --config {tmp}/dropout.yaml", "model.dropout: 1.5 is out of range", 2),
    ("lr -1", "train {tmp}/good.txt --config {tmp}/negative-lr.yaml", "train.lr: -1.0 is out of range", 2),
    ("format 0", "train {tmp}/good.txt --set format_version=0", "format_version 0 is out of range", 2),
    ("newer format", "train {tmp}/good.txt --config {tmp}/newer.yaml", "newer than this lmtool understands", 2),
    ("tied sizes differ", "train {tmp}/good.txt --config {tmp}/tie.yaml", "model.tie_weights needs", 2),
    ("set without value", "train {tmp}/good.txt --set model.hidden_size", "--set expects section.key=value", 2),
    ("set unknown section", "train {tmp}/good.txt --set modle.cell=gru", "did you mean 'model.cell'", 2),
    ("unknown device", "train {tmp}/good.txt --device tpu", "train.device: 'tpu' is not one of", 2),
    ("bad duration", "train {tmp}/good.txt --max-time soon", "not a duration", 2),
    ("existing run", "train {tmp}/good.txt --out {run}/run", "already exists; pass --overwrite", 2),
    ("out is a file", "train {tmp}/good.txt --out {tmp}/good.txt", "is a file, not a directory", 2),
    ("overwrite a non-run", "train {tmp}/good.txt --out {tmp} --overwrite", "is not an lmtool run", 2),
    ("resume a non-run", "train --resume {tmp}", "not an lmtool run directory", 2),
    ("resume a model file", "train --resume {run}/run/model-best.safetensors", "is a file; give the run directory", 2),
    ("resume a text file", "train --resume {tmp}/good.txt", "good.txt is a file; give the run directory", 2),
    ("resume a missing run", "train --resume {tmp}/nothing", "no such run directory", 2),
    ("resume with a config", "train --resume {run}/run --set model.cell=gru", "drop --set", 2),
    ("no corpus", "train", "give the training text", 2),
    ("unknown option", "train {tmp}/good.txt --hidden 3", "No such option: --hidden", 2),
    ("unknown command", "fly", "No such command 'fly'", 2),
    ("sample temperature", "sample --model {run}/run --temperature -0.5", "--temperature must be 0 (greedy) or positive and finite", 2),
    ("sample top-p", "sample --model {run}/run --top-p 0", "--top-p must be in (0, 1]", 2),
    ("sample top-k", "sample --model {run}/run --top-k 0", "--top-k must be at least 1", 2),
    ("sample length", "sample --model {run}/run --length -3", "--length must be at least 1", 2),
    ("sample no model", "sample", "train one first with 'lmtool train", 2),
    ("sample missing model", "sample --model {tmp}/nope", "model not found", 2),
    ("sample dir without model", "sample --model {tmp}", "holds no model file", 2),
    ("sample a run without a model yet", "sample --model {tmp}/fresh", "is a run that has saved no model yet", 2),
    ("sample output exists", "sample --model {run}/run --output {tmp}/good.txt", "already exists; pass --overwrite", 2),
    ("truncated weights", "score hello --model {truncated}", "cut.safetensors is not a readable lmtool model file", 2),
    ("yaml as model", "score hello --model {tmp}/unknown-key.yaml", "unknown-key.yaml is not a readable lmtool model", 2),
    ("score nothing", "score --model {run}/run", "no sentences to score", 2),
    ("score missing file", "score --file {tmp}/nope.txt --model {run}/run", "sentence file not found", 2),
    ("score binary file", "score --file {tmp}/binary.txt --model {run}/run", "looks binary", 2),
    ("score stdin twice", "score -f - --file - --model {run}/run", "--file - (standard input) can be given once", 2),
    ("score bad format", "score hi --format arpa --model {run}/run", "--format must be table or kenlm", 2),
    ("score batch 0", "score hi --batch-size 0 --model {run}/run", "--batch-size must be at least 1", 2),
    ("evaluate missing", "evaluate-perplexity {tmp}/nope.txt --model {run}/run", "evaluation file not found", 2),
    ("evaluate empty", "evaluate-perplexity {tmp}/empty.txt --model {run}/run",
     "evaluation file {tmp}/empty.txt is empty (no text to score)", 2),
    ("evaluate non-utf8", "evaluate-perplexity {tmp}/latin1.txt --model {run}/run", "not UTF-8", 2),
    ("evaluate batch 0", "evaluate-perplexity {tmp}/good.txt --batch-size 0 --model {run}/run", "--batch-size must be at least 1", 2),
    ("evaluate no files", "evaluate-perplexity --model {run}/run", "Missing argument", 2),
    ("evaluate whitespace file", "evaluate-perplexity {tmp}/blank.txt --model {run}/run", "is empty", 2),
    ("evaluate batch too large", "evaluate-perplexity {tmp}/short.txt --batch-size 64 --model {run}/run",
     "short.txt holds 6 tokens, too few for --batch-size 64; use --batch-size 3 or less", 2),
    ("score empty file", "score --file {tmp}/empty.txt --model {run}/run", "empty.txt holds no sentences", 2),
    ("score blank file", "score --file {tmp}/blank.txt --model {run}/run", "blank.txt holds no sentences", 2),
    ("seed too large", "train {tmp}/good.txt --seed 4294967296", "train.seed must be between 0 and 4,294,967,295 "
     "(PyTorch's CPU generator keeps only 32 bits), got 4,294,967,296", 2),
    ("seed far too large", "train {tmp}/good.txt --seed 18446744073709551616",
     "train.seed must be between 0 and 4,294,967,295", 2),
    ("sample seed too large", "sample --model {run}/run --seed 4294967296", "--seed must be between 0 and "
     "4,294,967,295 (PyTorch's CPU generator keeps only 32 bits), got 4,294,967,296", 2),
    ("set a whole section", "train {tmp}/good.txt --set model=gru", "'model' is a section, not a key", 2),
    ("section given twice", "train {tmp}/good.txt --config {tmp}/twice.yaml",
     "line 5, column 1: duplicate key 'model'", 2),
    ("out is runs/latest", "train {tmp}/good.txt --out runs/latest", "is the link lmtool points at the newest run", 2),
    ("binary without newlines", "score --file {tmp}/zeros.bin --model {run}/run",
     "looks binary (NUL byte at offset 0)", 2),
    ("resume to a reached step", "train --resume {run}/run --max-steps 3", "already finished at step 4; --max-steps 3 would", 2),
    ("number too large", "train {tmp}/good.txt --set train.lr=" + "9" * 400, "is too large a number", 2),
    ("output in a missing directory", "sample --model {run}/run --output {tmp}/nodir/out.txt",
     "does not exist; create it first", 2),
    ("output is a directory", "sample --model {run}/run --output {tmp}", "is a directory; give a file name", 2),
    ("out of memory", "train {tmp}/good.txt --set model.hidden_size=1048576 --out {tmp}/big",
     "ran out of memory (tried to allocate", 1),
    ("width too large", "train {tmp}/good.txt --set model.embedding_size=100000000000000000000",
     "model.embedding_size: 100000000000000000000 is out of range (must be at most 1048576)", 2),
    ("init range too large", "train {tmp}/good.txt --set model.init_range=1e39", "must be at most 1000", 2),
    ("too many samples", "sample --model {run}/run --num-samples 100000000000000000000",
     "--num-samples must be between 1 and 1,000,000", 2),
    ("output is the model", "sample --model {run}/run/model-best.safetensors --output {run}/run/model-best.safetensors "
     "--overwrite", "is the model being sampled from", 2),
    ("output is a file of a run", "sample --model {run}/run --output {run}/run/config.yaml --overwrite",
     "is a file of the run", 2),
    ("output is a run's lock", "sample --model {run}/run --output {run}/run/.lock --overwrite",
     "is a file of the run", 2),
    ("too many layers", "train {tmp}/good.txt --set model.num_layers=100000",
     "model.num_layers: 100000 is out of range (must be at most 256)", 2),
    ("kenlm and json", "score hi --format kenlm --json --model {run}/run", "drop --json", 2),
    ("model is not a regular file", "score hi --model /dev/null", "/dev/null is not a regular file", 2),
    ("overwrite another program's directory", "train {tmp}/good.txt --out {tmp}/foreign --overwrite",
     "exists and is not an lmtool run", 2),
    ("path name too long", "score --file {tmp}/" + "x" * 300 + "/a.txt --model {run}/run", "File name too long", 2),
]
if not torch.cuda.is_available():
    CASES.append(("cuda without gpu", "train {tmp}/good.txt --device cuda", "PyTorch sees no CUDA GPU", 2))


def snapshot(*roots: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for root in roots for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("case, command, message, code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(run_cli, tmp_path, trained, case, command, message, code):
    for name, content in FILES.items():
        if len(content) > 2**20 and name not in command:  # writing and hashing 55 MB for every case took 15 s
            continue
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content)
    (tmp_path / "loop.txt").symlink_to("loop.txt")  # a link that leads back to itself
    truncated = _truncated_model(tmp_path, trained)
    args = command.format(tmp=tmp_path, run=trained, truncated=truncated).split()
    before = snapshot(tmp_path, trained)
    result = run_cli(*args)
    assert result.code == code, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    assert message.format(tmp=tmp_path) in lines[0], lines[0]
    assert snapshot(tmp_path, trained) == before  # nothing of the user's changed, no stray run directory


# An empty name is Path("") — the current directory — once parsed, so each path option refuses it as it is parsed.
EMPTY_NAMES = [
    ("train", "", "'CORPUS'"),
    ("train", "{good} --valid", "'--valid'"),
    ("train", "{good} --test", "'--test'"),
    ("train", "{good} --out", "'--out'"),
    ("train", "{good} --config", "'--config'"),
    ("train", "--resume", "'--resume'"),
    ("sample", "--model {run} --output", "'--output'"),
    ("sample", "--model", "'--model'"),
    ("score", "--model {run} hi --file", "'--file'"),
    ("score", "hi --model", "'--model'"),
    ("evaluate-perplexity", "--model {run} {good}", "'FILE'"),
]


@pytest.mark.parametrize("command, before_empty, option", EMPTY_NAMES, ids=[f"{c} {o}" for c, _, o in EMPTY_NAMES])
def test_empty_name_is_refused(run_cli, tmp_path, trained, monkeypatch, command, before_empty, option):
    (tmp_path / "good.txt").write_bytes(FILES["good.txt"])
    monkeypatch.chdir(tmp_path)  # where an empty name used to point
    args = [command, *before_empty.format(good=tmp_path / "good.txt", run=trained / "run").split(), ""]
    before = snapshot(tmp_path, trained)
    result = run_cli(*args)
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lmtool: error: Invalid value for {option}"), result.err
    assert lines[0].endswith(f"is an empty name; give a path (see 'lmtool {command} --help')")
    assert snapshot(tmp_path, trained) == before
