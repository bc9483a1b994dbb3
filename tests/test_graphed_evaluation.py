"""Evaluation's windows as the CUDA-graph path scores them: fixed input buffers, the carried state, warm-up,
eager short windows, one rank's rows and the fallback when a capture fails. CUDA graphs need a GPU, so here the
stand-in graph of test_graphed_step replays a window by running its Python code again, and scores through it
must equal the eager ones bitwise. A stand-in cannot show that the kernels a real capture records add the sums
up in place: bench/gpu_eval.py (section 10 of bench/gpu.sh) compares real replays with eager windows on a GPU."""

from types import SimpleNamespace

import pytest
import torch

import lmtool
import lmtool.evaluate
from lmtool.config import ModelConfig, load_config
from lmtool.devices import inference_autocast
from lmtool.evaluate import GRAPH_MIN_WINDOWS, stream_nll, window_capture
from lmtool.graphed_step import WARMUP_STEPS, capture_cuda_graph
from lmtool.model import LanguageModel
from lmtool.tokenizer import UNK_ID
from lmtool.train import train

from conftest import CONFIGS
from test_graphed_step import StandInGraph, SyncCheckingGraph

VOCAB, BPTT = 17, 5


def _model(cell: str, direction: str) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(cell=cell, embedding_size=8, hidden_size=12, num_layers=2, direction=direction),
                         VOCAB).eval()


def _stream(batch_size: int, full_windows: int) -> torch.Tensor:
    """Ids for `batch_size` streams of `full_windows` windows of BPTT targets and a last window of 2, some <UNK>."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch_size * (full_windows * BPTT + 3),), generator=generator)
    ids[::7] = UNK_ID
    return ids


def _capture_with(monkeypatch, graph: StandInGraph) -> list[tuple[int, bool]]:
    """Evaluation captures with `graph` wherever it is asked to; returns the (windows, cuda_graph) it was asked."""
    asked = []

    def capture(model, windows_count, cuda_graph):
        asked.append((windows_count, cuda_graph))
        return graph if cuda_graph else None

    monkeypatch.setattr(lmtool.evaluate, "window_capture", capture)
    return asked


@pytest.mark.parametrize("cell, direction, read, batch_size, rows, precision", [
    ("lstm", "forward", "forward", 1, None, "fp32"),
    ("gru", "bidirectional", "backward", 3, None, "fp32"),
    ("lstm", "forward", "forward", 4, slice(1, 3), "fp32"),  # one rank's share of the streams
    ("lstm", "forward", "forward", 2, None, "bf16"),  # autocast stays on, without its cache, in the captured window
])
def test_windows_replayed_as_a_graph_score_exactly_like_eager_ones(monkeypatch, cell, direction, read, batch_size,
                                                                   rows, precision):
    model, full_windows = _model(cell, direction), GRAPH_MIN_WINDOWS + 2
    stream = _stream(batch_size, full_windows)
    with inference_autocast(precision, model.device):
        eager = stream_nll(model, stream, batch_size, BPTT, read, rows, cuda_graph=False)
        graph = StandInGraph()
        asked = _capture_with(monkeypatch, graph)
        replayed = stream_nll(model, stream, batch_size, BPTT, read, rows)
    assert asked == [(full_windows + 1, True)]
    assert graph.captures == 1 and graph.replays == full_windows - WARMUP_STEPS  # the short last window ran eagerly
    scored_streams = len(range(batch_size)[rows or slice(None)])
    assert eager.unknown > 0 and eager.tokens == scored_streams * (full_windows * BPTT + 2)
    assert replayed == eager  # the sums, the token and <UNK> counts, bitwise


@pytest.mark.parametrize("cell, direction, read, precision", [
    ("lstm", "forward", "forward", "fp32"), ("gru", "bidirectional", "backward", "bf16")])
def test_the_captured_window_never_waits_for_the_device(monkeypatch, cell, direction, read, precision):
    _capture_with(monkeypatch, SyncCheckingGraph())  # each replay fails on a host synchronisation
    model = _model(cell, direction)
    with inference_autocast(precision, model.device):
        assert stream_nll(model, _stream(2, GRAPH_MIN_WINDOWS), 2, BPTT, read).tokens > 0


def test_a_failed_capture_scores_every_window_eagerly_with_the_same_result_and_says_so(monkeypatch):
    model, stream = _model("lstm", "forward"), _stream(2, GRAPH_MIN_WINDOWS)
    eager = stream_nll(model, stream, 2, BPTT)
    graph = StandInGraph(fail=True)
    asked = _capture_with(monkeypatch, graph)
    with pytest.warns(UserWarning) as warned:
        failed = stream_nll(model, stream, 2, BPTT)
    assert asked == [(GRAPH_MIN_WINDOWS + 1, True)] and graph.captures == 0 and graph.replays == 0
    assert failed == eager
    assert [str(w.message) for w in warned] == [
        "evaluation's windows could not be captured as a CUDA graph (RuntimeError: operation not permitted when "
        "stream is capturing [stand-in]); they were scored one kernel at a time instead: the same numbers, more "
        "slowly"]


def test_which_streams_are_scored_through_a_graph(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def model(device: str, softmax: str = "full"):  # window_capture reads only these two
        return SimpleNamespace(device=torch.device(device), config=SimpleNamespace(softmax=softmax))

    assert window_capture(model("cuda"), GRAPH_MIN_WINDOWS, cuda_graph=True) is capture_cuda_graph
    assert window_capture(model("cuda"), GRAPH_MIN_WINDOWS - 1, cuda_graph=True) is None  # a capture would cost more
    assert window_capture(model("cuda"), 1000, cuda_graph=False) is None
    assert window_capture(model("cuda", "adaptive"), 1000, cuda_graph=True) is None
    assert window_capture(model("cpu"), 1000, cuda_graph=True) is None
    assert window_capture(model("cuda:0"), 1000, cuda_graph=True) is capture_cuda_graph
    assert window_capture(model("cuda:1"), 1000, cuda_graph=True) is None  # captures record on the current GPU


@pytest.mark.parametrize("setting, expected", [([], True), (["train.cuda_graph=false"], False)])
def test_validation_and_evaluation_follow_the_runs_cuda_graph_setting(small_corpus, tmp_path, monkeypatch, setting,
                                                                      expected):
    asked = _capture_with(monkeypatch, StandInGraph())
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.max_steps=10", "train.eval_every=5", *setting])
    result = train(cfg, small_corpus, out=tmp_path / "run")
    validations = len(asked)
    lmtool.load_model(result.run_dir).perplexity(small_corpus)
    assert validations >= 2 and len(asked) > validations
    assert {flag for _, flag in asked} == {expected}
