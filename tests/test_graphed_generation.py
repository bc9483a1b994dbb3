"""Generation's token step as the CUDA-graph path runs it (`generate(cuda_graph=True)`, prepared but not yet run
on a GPU): the draw, the <EOS> bookkeeping and the recurrent step on fixed buffers, warm-up, non-finite scores
flagged on the device, and the fallback when a capture fails. CUDA graphs need a GPU, so here the stand-in graph
of test_graphed_step replays a step by running its Python code again, and the tokens drawn through it must equal
the eager ones. A stand-in cannot show that a real capture draws new random numbers on each replay:
bench/gpu_sampling.py (section 11 of bench/gpu.sh) compares real replays with eager tokens on a GPU."""

import functools
from types import SimpleNamespace

import pytest
import torch

import lmtool
import lmtool.sample
from lmtool.config import ModelConfig, load_config
from lmtool.errors import LmtoolError
from lmtool.graphed_step import WARMUP_STEPS, capture_cuda_graph
from lmtool.model import LanguageModel
from lmtool.sample import GRAPH_MIN_TOKENS, SamplingOptions, generate, token_capture
from lmtool.train import train

from conftest import CONFIGS
from test_graphed_step import StandInGraph, SyncCheckingGraph

PRIME = [3, 4]


def _model(cell: str = "lstm") -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(cell=cell, embedding_size=8, hidden_size=12, num_layers=2), 17).eval()


def _capture_with(monkeypatch, graph: StandInGraph) -> list[bool]:
    """Generation captures with `graph` wherever it is asked to; returns the cuda_graph flags it was asked with."""
    asked = []

    def capture(model, options, two_level, cuda_graph, generator):
        asked.append(cuda_graph)
        return graph if cuda_graph and not two_level else None

    monkeypatch.setattr(lmtool.sample, "token_capture", capture)
    return asked


@pytest.mark.parametrize("cell, settings", [
    ("lstm", dict(seed=3)),
    ("gru", dict(seed=3, num_samples=3, temperature=0.7, top_k=5)),
    ("lstm", dict(seed=3, num_samples=2, top_p=0.9)),
    ("lstm", dict(temperature=0)),  # greedy
    ("lstm", dict(seed=3, num_samples=2, precision="bf16")),
])
def test_tokens_drawn_through_a_graph_equal_eager_ones(monkeypatch, cell, settings):
    model, options = _model(cell), SamplingOptions(length=40, **settings)
    eager_steps, graphed_steps = [], []
    eager = generate(model, PRIME, options, eager_steps.append)
    graph = StandInGraph()
    asked = _capture_with(monkeypatch, graph)
    graphed = generate(model, PRIME, options, graphed_steps.append, cuda_graph=True)
    assert asked == [True] and graph.captures == 1 and graph.replays == 40 - WARMUP_STEPS
    assert graphed == eager and len(eager[0]) == 40
    assert len(graphed_steps) == 40 and all(torch.equal(a, b) for a, b in zip(graphed_steps, eager_steps))


@pytest.mark.parametrize("cell, settings", [
    ("lstm", dict(seed=3, num_samples=2, temperature=0.8, top_k=4, top_p=0.9, stop_at_eos=True)),
    ("gru", dict(temperature=0, stop_at_eos=True)),
    ("rnn_tanh", dict(num_samples=3, precision="bf16")),
])
def test_the_captured_token_step_never_waits_for_the_device(monkeypatch, cell, settings):
    _capture_with(monkeypatch, SyncCheckingGraph())  # each replay fails on a host synchronisation
    assert len(generate(_model(cell), PRIME, SamplingOptions(length=30, **settings), cuda_graph=True)) >= 1


def test_samples_that_end_are_cut_at_their_end_as_eagerly(monkeypatch):
    # Without on_token the graphed loop looks for the end only every few tokens: the extra steps draw nothing
    # but <EOS>, which is cut off.
    model, options = _model(), SamplingOptions(length=200, seed=5, num_samples=3, stop_at_eos=True)
    eager = generate(model, PRIME, options)
    graph = StandInGraph()
    _capture_with(monkeypatch, graph)
    graphed = generate(model, PRIME, options, cuda_graph=True)
    assert graphed == eager
    assert max(map(len, eager)) < 200  # every sample ended early, so the loop did stop
    assert graph.replays + WARMUP_STEPS < 200
    # with on_token the end is looked for after every step: the callback sees exactly the eager steps
    eager_steps, graphed_steps = [], []
    generate(model, PRIME, options, eager_steps.append)
    generate(model, PRIME, options, graphed_steps.append, cuda_graph=True)
    assert len(graphed_steps) == len(eager_steps) < 200
    assert all(torch.equal(a, b) for a, b in zip(graphed_steps, eager_steps))


def test_non_finite_scores_raise_as_eagerly_and_reach_no_callback(monkeypatch):
    model = _model()
    with torch.no_grad():
        model.decoder.bias[5] = float("nan")
    _capture_with(monkeypatch, StandInGraph())
    for settings in (dict(seed=1), dict(temperature=0)):
        seen = []
        with pytest.raises(LmtoolError, match="non-finite"):
            generate(model, PRIME, SamplingOptions(length=20, **settings), seen.append, cuda_graph=True)
        assert seen == []
        with pytest.raises(LmtoolError, match="non-finite"):  # without on_token, at the end
            generate(model, PRIME, SamplingOptions(length=20, **settings), cuda_graph=True)


def test_a_failed_capture_draws_the_same_tokens_eagerly_and_says_so(monkeypatch):
    model, options = _model(), SamplingOptions(length=30, seed=2, num_samples=2)
    eager = generate(model, PRIME, options)
    graph = StandInGraph(fail=True)
    _capture_with(monkeypatch, graph)
    with pytest.warns(UserWarning) as warned:
        assert generate(model, PRIME, options, cuda_graph=True) == eager
    assert graph.captures == 0 and graph.replays == 0
    assert [str(w.message) for w in warned] == [
        "generation's token step could not be captured as a CUDA graph (RuntimeError: operation not permitted when "
        "stream is capturing [stand-in]); generation went on with eager steps, which draw the same tokens"]


def test_which_generations_are_drawn_through_a_graph(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda, cpu = (SimpleNamespace(device=torch.device(kind)) for kind in ("cuda", "cpu"))  # all token_capture reads
    first, second = (SimpleNamespace(device=torch.device("cuda", n)) for n in (0, 1))
    long, short = SamplingOptions(length=GRAPH_MIN_TOKENS), SamplingOptions(length=GRAPH_MIN_TOKENS - 1)
    assert token_capture(cuda, long, False, True, None) is capture_cuda_graph  # the default generator
    seeded = torch.Generator()
    with_generator = token_capture(cuda, long, False, True, seeded)
    assert isinstance(with_generator, functools.partial) and with_generator.func is capture_cuda_graph
    assert with_generator.keywords == {"generators": (seeded,)}
    assert token_capture(cuda, short, False, True, None) is None  # a capture would cost more than it saves
    assert token_capture(cuda, long, True, True, None) is None  # two-level adaptive draws
    assert token_capture(cuda, long, False, False, None) is None
    assert token_capture(cpu, long, False, True, None) is None
    assert token_capture(first, long, False, True, None) is capture_cuda_graph
    assert token_capture(second, long, False, True, None) is None  # captures record on the current GPU only


def test_sampling_through_the_library_stays_eager_until_the_graph_is_checked_on_a_gpu(small_corpus, tmp_path,
                                                                                    monkeypatch):
    run = train(load_config(CONFIGS / "tiny.yaml", ["train.max_steps=3"]), small_corpus, out=tmp_path / "r")
    asked = _capture_with(monkeypatch, StandInGraph())
    lmtool.load_model(run.run_dir).sample(prime="th", length=20, seed=1)
    assert asked == [False]
