"""model.py: the one NNModel, seeded construction, recognising its state_dict."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distmnist.core.config import load_config
from distmnist.core.errors import DistMnistError
from distmnist.core.model import (
    NNModel,
    build_model,
    build_optimizer,
    build_scheduler,
    hidden_from_state_dict,
)


def layer_spec(model: NNModel) -> list:
    spec = []
    for m in model.linear_relu_stack:
        if isinstance(m, nn.Linear):
            spec.append(("Linear", m.in_features, m.out_features))
        else:
            spec.append(type(m).__name__)
    return spec


def test_default_layers_are_the_tutorial_mlp():
    model = NNModel()
    assert isinstance(model.flatten, nn.Flatten)
    assert isinstance(model.linear_relu_stack, nn.Sequential)
    assert layer_spec(model) == [
        ("Linear", 784, 128),
        "ReLU",
        ("Linear", 128, 128),
        "ReLU",
        ("Linear", 128, 10),
    ]
    assert all(m.bias is not None for m in model.linear_relu_stack if isinstance(m, nn.Linear))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == (784 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10)
    # children in order: flatten first, then the stack
    assert [name for name, _ in model.named_children()] == ["flatten", "linear_relu_stack"]


@pytest.mark.parametrize("hidden", [[256, 256], [64], [512, 64, 32]])
def test_hidden_sizes_from_argument(hidden):
    model = NNModel(hidden)
    widths = [784, *hidden, 10]
    expected = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        expected += [("Linear", a, b), "ReLU"]
    assert layer_spec(model) == expected[:-1]
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_forward_is_flatten_then_stack():
    model = build_model([32, 16], seed=0)
    x = torch.rand(5, 1, 28, 28)
    manual = x.reshape(5, 784)
    for m in model.linear_relu_stack:
        manual = m(manual)
    assert torch.equal(model(x), manual)
    assert model(x).shape == (5, 10)


def test_build_model_same_seed_same_weights():
    a = build_model([128, 128], seed=7)
    torch.rand(1000)  # consuming the global RNG in between must not matter
    b = build_model([128, 128], seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_build_model_different_seeds_differ():
    a = build_model([128, 128], seed=0).state_dict()
    b = build_model([128, 128], seed=1).state_dict()
    assert all(not torch.equal(a[k], b[k]) for k in a)


def test_build_model_ignores_and_keeps_the_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    m1 = build_model([64], seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), after)  # as if build_model had never run
    torch.manual_seed(999)
    m2 = build_model([64], seed=3)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))


@pytest.mark.parametrize("hidden", [[128, 128], [64], [300, 200, 100], [10]])
def test_hidden_from_state_dict_round_trip(hidden):
    state = NNModel(hidden).state_dict()
    assert hidden_from_state_dict(state) == hidden
    rebuilt = NNModel(hidden_from_state_dict(state))
    rebuilt.load_state_dict(state)  # strict: same keys and shapes


def test_hidden_from_state_dict_after_save_and_load(tmp_path):
    model = build_model([48, 24], seed=1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert hidden_from_state_dict(state) == [48, 24]


def broken_chain():
    state = NNModel([128, 128]).state_dict()
    state["linear_relu_stack.2.weight"] = torch.zeros(128, 64)
    return state


def wrong_input():
    state = NNModel([128]).state_dict()
    state["linear_relu_stack.0.weight"] = torch.zeros(128, 783)
    return state


def wrong_output():
    state = NNModel([128]).state_dict()
    state["linear_relu_stack.2.weight"] = torch.zeros(9, 128)
    state["linear_relu_stack.2.bias"] = torch.zeros(9)
    return state


def extra_key():
    state = NNModel([128]).state_dict()
    state["something.else"] = torch.zeros(1)
    return state


def missing_bias():
    state = NNModel([128]).state_dict()
    del state["linear_relu_stack.0.bias"]
    return state


def optimizer_state():
    model = NNModel([16])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 1, 28, 28)).sum().backward()
    opt.step()
    return opt.state_dict()


def vector_weight():
    state = NNModel([128]).state_dict()
    state["linear_relu_stack.2.weight"] = torch.zeros(128)
    return state


@pytest.mark.parametrize(
    "make",
    [
        lambda: {},
        lambda: {"a": torch.zeros(3), "b": torch.ones(2)},
        lambda: {"weight": torch.zeros(10, 784), "bias": torch.zeros(10)},
        lambda: nn.Linear(784, 10).state_dict(),
        lambda: [torch.zeros(3)],
        lambda: "model",
        lambda: {"linear_relu_stack.0.weight": "not a tensor", "linear_relu_stack.0.bias": torch.zeros(10)},
        optimizer_state,
        broken_chain,
        wrong_input,
        wrong_output,
        extra_key,
        missing_bias,
        vector_weight,
    ],
    ids=[
        "empty",
        "random",
        "plain-linear-keys",
        "linear",
        "list",
        "str",
        "non-tensor",
        "optimizer",
        "broken-chain",
        "wrong-input",
        "wrong-output",
        "extra-key",
        "missing-bias",
        "vector-weight",
    ],
)
def test_hidden_from_state_dict_rejects_foreign_dicts(make):
    with pytest.raises(DistMnistError) as info:
        hidden_from_state_dict(make(), source="--model x.pt")
    assert "--model x.pt" in str(info.value)


def test_cosine_schedule_goes_from_lr_to_zero_and_constant_stays():
    cfg = load_config(None, ["optim.lr=0.1", "optim.schedule=cosine"])
    model = NNModel([8])
    opt = build_optimizer(cfg.optim, model.parameters())
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == cfg.optim.momentum
    sched = build_scheduler(cfg.optim, opt, total_steps=10)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))

    cfg = load_config(None, ["optim.lr=0.1", "optim.schedule=constant"])
    opt = build_optimizer(cfg.optim, model.parameters())
    sched = build_scheduler(cfg.optim, opt, total_steps=10)
    for _ in range(12):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == 0.1
