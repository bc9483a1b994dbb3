"""lmtool's CPU dropout: the rate, the scaling, the gradient, and the layer-by-layer stack it needs."""

import pytest
import torch
import torch.nn.functional as F

import lmtool.dropout
import lmtool.model
from lmtool.config import ModelConfig
from lmtool.dropout import LEVELS, dropout
from lmtool.model import LanguageModel


@pytest.mark.parametrize("p", [0.2, 0.5, 0.05])
def test_drops_at_the_rate_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(1_000_003)  # not a multiple of 4: the last 64-bit draw is cut
    y = dropout(x, p, training=True)
    rate = round(p * LEVELS) / LEVELS
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - rate) < 5 * (rate * (1 - rate) / x.numel()) ** 0.5
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - rate)))
    assert abs(y.double().mean().item() - 1) < 0.01


def test_identity_unless_training_and_the_gradient_follows_the_mask():
    x = torch.randn(64, 33, requires_grad=True)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0, training=True) is x
    torch.manual_seed(1)
    y = dropout(x, 0.3, training=True)
    y.backward(torch.ones_like(y))
    scale = LEVELS / (LEVELS - round(0.3 * LEVELS))
    assert torch.equal(x.grad, torch.where(y != 0, scale, 0.0))
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.3, training=True), y)  # the seed fixes the mask


def test_bf16_stays_bf16_and_other_devices_use_pytorch(monkeypatch):
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    assert dropout(x, 0.2, training=True).dtype == torch.bfloat16
    monkeypatch.setattr(lmtool.dropout, "FAST_DEVICES", set())
    torch.manual_seed(2)
    ours = dropout(x, 0.2, training=True)
    torch.manual_seed(2)
    assert torch.equal(ours, F.dropout(x, 0.2, True))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_the_stack_run_layer_by_layer_equals_the_fused_stack(cell, monkeypatch):
    """With dropout that keeps everything, CPU training's layer-by-layer stack gives the fused stack's outputs,
    final state and gradients exactly."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(cell=cell, embedding_size=6, hidden_size=10, num_layers=3, dropout=0.4), 13)
    model.train()
    x = torch.randint(0, 13, (4, 7))
    monkeypatch.setattr(lmtool.model, "dropout", lambda t, p, training: t)
    outputs, states, grads = [], [], []
    for layer_by_layer in (True, False):
        monkeypatch.setattr(lmtool.model, "fast_dropout_applies", lambda p, device: layer_by_layer)
        model.rnn.dropout = 0.4 if layer_by_layer else 0.0  # the fused stack's own dropout off
        model.zero_grad()
        output, state = model.read(x)
        output.sum().backward()
        outputs.append(output)
        states.append(state)
        grads.append([p.grad.clone() for p in [model.embedding.weight, *model.rnn.parameters()]])
    assert torch.equal(outputs[0], outputs[1])
    for a, b in zip(*(s if isinstance(s, tuple) else (s,) for s in states)):
        assert torch.equal(a, b)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_cpu_training_puts_dropout_between_layers(monkeypatch):
    calls = []
    monkeypatch.setattr(lmtool.model, "dropout", lambda t, p, training: calls.append(tuple(t.shape)) or t)
    model = LanguageModel(ModelConfig(embedding_size=6, hidden_size=10, num_layers=3, dropout=0.2), 13)
    model.train()
    model.read(torch.randint(0, 13, (2, 5)))
    assert calls == [(2, 5, 6), (2, 5, 10), (2, 5, 10), (2, 5, 10)]  # embedding, 2 between layers, output


def test_the_stack_run_layer_by_layer_under_bf16_autocast_matches_the_fused_stack(monkeypatch):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(embedding_size=6, hidden_size=10, num_layers=2, dropout=0.4), 13).train()
    x = torch.randint(0, 13, (4, 7))
    monkeypatch.setattr(lmtool.model, "dropout", lambda t, p, training: t)
    outputs = []
    for layer_by_layer in (True, False):
        monkeypatch.setattr(lmtool.model, "fast_dropout_applies", lambda p, device: layer_by_layer)
        model.rnn.dropout = 0.4 if layer_by_layer else 0.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(model.read(x)[0].float())
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-2, rtol=1e-2)


def test_a_rate_near_one_falls_back_to_pytorch():
    assert lmtool.dropout.fast_dropout_applies(0.99, torch.device("cpu"))
    assert not lmtool.dropout.fast_dropout_applies(0.999, torch.device("cpu"))
    assert not lmtool.dropout.fast_dropout_applies(0.2, torch.device("meta"))
