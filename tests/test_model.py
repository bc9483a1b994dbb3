import pytest
import torch

from lmtool.config import ModelConfig
from lmtool.model import CELLS, LanguageModel, count_parameters, detach_state


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("num_layers", [1, 3])
def test_forward_shapes_and_state_for_every_cell(cell, num_layers):
    cfg = ModelConfig(cell=cell, embedding_size=6, hidden_size=10, num_layers=num_layers, dropout=0.1)
    model = LanguageModel(cfg, vocab_size=17)
    x = torch.randint(0, 17, (3, 5), dtype=torch.int32)
    logits, state = model(x)
    assert logits.shape == (3, 5, 17)
    states = state if isinstance(state, tuple) else (state,)
    assert len(states) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (num_layers, 3, 10) for s in states)
    # the state carries over: feeding the second half after the first equals one pass over both
    model.eval()
    full, _ = model(x)
    first, mid = model(x[:, :2])
    second, _ = model(x[:, 2:], detach_state(mid))
    torch.testing.assert_close(torch.cat([first, second], 1), full)


def test_tied_weights_share_one_tensor():
    model = LanguageModel(ModelConfig(embedding_size=8, hidden_size=8, tie_weights=True), vocab_size=11)
    assert model.decoder.weight is model.embedding.weight
    untied = LanguageModel(ModelConfig(embedding_size=8, hidden_size=8), vocab_size=11)
    assert count_parameters(untied) - count_parameters(model) == 11 * 8


def test_init_range_bounds_every_weight():
    model = LanguageModel(ModelConfig(embedding_size=8, hidden_size=8, init_range=0.05), vocab_size=11)
    assert max(p.abs().max().item() for p in model.parameters()) <= 0.05


def test_single_layer_with_dropout_does_not_warn(recwarn):
    LanguageModel(ModelConfig(num_layers=1, dropout=0.5, hidden_size=8, embedding_size=4), vocab_size=5)
    assert not [w for w in recwarn if "dropout" in str(w.message)]


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_single_token_step_equals_the_sequence_kernel(cell):
    model = LanguageModel(ModelConfig(cell=cell, embedding_size=6, hidden_size=10, num_layers=2, dropout=0.3), 13)
    model.eval()
    x = torch.randint(0, 13, (3, 7))
    full, full_state = model(x)
    state = model.init_state(3)
    steps = []
    for t in range(7):
        logits, state = model.step(x[:, t], state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full)
    for a, b in zip(state if isinstance(state, tuple) else (state,), full_state if isinstance(full_state, tuple) else (full_state,)):
        torch.testing.assert_close(a, b)
    # the cached step weights follow an update of the parameters
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(0.5)
    full, _ = model(x[:, :1])
    logits, _ = model.step(x[:, 0], model.init_state(3))
    torch.testing.assert_close(logits, full[:, 0])


def test_precision_resolution():
    from lmtool.devices import bf16_is_native, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if bf16_is_native(cpu) else None)
    assert resolve_precision("auto", torch.device("cuda")) is None  # not yet checked on a GPU
