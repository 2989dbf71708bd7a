"""The fast route of structured curvatures (NOTE [chains] in ``engine/chain.py``).

Models that are chains of known modules have their factor columns backpropagated by hand. Each
model below exercises some of the rules; for each, the route taken is checked, the exact GGN
diagonal and per-layer blocks are compared with the dense ``torch.func`` reference (float64),
and KFAC from the fast route with KFAC from the generic autograd route. Models that are *not*
chains (an operation between two modules) must take the generic route and still be exact.
"""

from __future__ import annotations

import pytest
import torch
from cases import DT, Residual, ce_sample, mse_sample
from helpers import assert_close, ref_ggn
from torch import nn

import curvkit as ck
from curvkit.engine import pairs
from curvkit.engine.forward import Forward


def _ce_data(x: torch.Tensor, classes: int, batches: int = 2):
    t = torch.randint(0, classes, (x.shape[0],))
    return [(xb, tb) for xb, tb in zip(x.chunk(batches), t.chunk(batches))]


class Functional(nn.Module):  # a functional activation between two layers: not a chain
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.sigmoid(self.a(x)))


def _models():
    """name -> (model, batches, takes the fast route)."""
    torch.manual_seed(0)
    out = {}
    out["mlp_activations"] = (
        nn.Sequential(
            nn.Linear(4, 6),
            nn.Tanh(),
            nn.Dropout(0.3),  # eval mode: the identity
            nn.Linear(6, 5),
            nn.Sigmoid(),
            nn.Identity(),
            nn.Linear(5, 5),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Linear(5, 4),
            nn.ReLU(inplace=True),
            nn.Linear(4, 3),
        ),
        _ce_data(torch.randn(9, 4, dtype=DT), 3),
        True,
    )
    out["cnn_pool"] = (
        nn.Sequential(
            nn.Unflatten(1, (1, 7, 7)),
            nn.Conv2d(1, 3, 3, padding="same"),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=1),  # overlapping windows
            nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=2),
            nn.Tanh(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Flatten(),
            nn.Linear(16, 3),
        ),
        _ce_data(torch.randn(6, 49, dtype=DT), 3),
        True,
    )
    out["conv1d_groups"] = (
        nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=1, groups=2),
            nn.Sigmoid(),
            nn.MaxPool1d(2),
            nn.Conv1d(4, 4, 2, stride=2, bias=False),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        _ce_data(torch.randn(5, 2, 8, dtype=DT), 3),
        True,
    )
    out["conv3d"] = (
        nn.Sequential(
            nn.Conv3d(1, 2, 2, padding=1),
            nn.ReLU(),
            nn.MaxPool3d(2),
            nn.Flatten(),
            nn.Linear(16, 3),
        ),
        _ce_data(torch.randn(4, 1, 3, 3, 3, dtype=DT), 3),
        True,
    )
    out["sequence"] = (
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Flatten(), nn.Linear(10, 3)),
        _ce_data(torch.randn(6, 5, 3, dtype=DT), 3),
        True,
    )
    out["residual"] = (Residual(), _ce_data(torch.randn(6, 4, dtype=DT), 3), False)
    out["functional"] = (Functional(), _ce_data(torch.randn(6, 4, dtype=DT), 3), False)
    return {k: (m.to(DT).eval(), d, fast) for k, (m, d, fast) in out.items()}


MODELS = _models()


def _loss():
    return nn.CrossEntropyLoss(reduction="sum")


@pytest.fixture
def count_fast(monkeypatch):
    calls = {"n": 0}
    real = pairs.backprop_chain

    def spy(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(pairs, "backprop_chain", spy)
    return calls


@pytest.mark.parametrize("structure", ["diag", "block"])
@pytest.mark.parametrize("name", list(MODELS))
def test_route_and_exactness(name, structure, count_fast):
    model, data, fast = MODELS[name]
    op = ck.ggn(model, _loss(), data, structure=structure)
    assert (count_fast["n"] > 0) == fast, f"{name}: fast route taken {count_fast['n']} times"
    ref = ref_ggn(model, ce_sample, 1.0, data)
    if structure == "diag":
        assert_close(op.diagonal(), ref.diagonal(), what=f"{name} exact diagonal")
    else:  # every block of the operator is the matching block of the dense GGN
        dense = op.to_dense()
        mask = dense != 0
        assert_close(dense, ref * mask, what=f"{name} per-layer blocks")
        assert mask.sum() > ref.shape[0], "the blocks are more than a diagonal"


@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("mode", ["expand", "reduce"])
@pytest.mark.parametrize("name", [n for n, v in MODELS.items() if v[2]])
def test_fast_and_generic_routes_agree(name, mode, kind, monkeypatch):
    model, data, _ = MODELS[name]
    fn = getattr(ck, kind)
    fast = fn(model, _loss(), data, structure="kron", kfac=mode).to_dense()
    monkeypatch.setattr(Forward, "chain_trace", lambda self, batch: None)
    generic = fn(model, _loss(), data, structure="kron", kfac=mode).to_dense()
    assert_close(fast, generic, what=f"{name} {kind} KFAC ({mode}): fast vs generic route")


def test_mse_regression_chain():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    x, y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)
    op = ck.ggn(model, nn.MSELoss(reduction="sum"), (x, y), structure="diag")
    ref = ref_ggn(model, mse_sample, 1.0, [(x, y)])
    assert_close(op.diagonal(), ref.diagonal(), what="MSE chain diagonal")


def _cos_loss(o, y):  # Σ cos(o − y): output Hessians −diag(cos), of both signs
    return torch.cos(o - y).sum()


def _indefinite_data():
    torch.manual_seed(5)
    return torch.randn(5, 49, dtype=DT), torch.randn(5, 3, dtype=DT)


@pytest.mark.parametrize("structure", ["diag", "block"])
def test_indefinite_output_hessians_on_the_fast_route(structure, count_fast):
    """A non-convex loss: Mₙ is indefinite, its factor carries signs σ, which the reductions
    must apply (KFAC: ``test_structured.py::conv2d_indefinite`` against its definition)."""
    model, _, _ = MODELS["cnn_pool"]
    x, t = _indefinite_data()
    op = ck.ggn(model, _cos_loss, [(x[:2], t[:2]), (x[2:], t[2:])], structure=structure)
    assert count_fast["n"] > 0
    ref = ref_ggn(model, _cos_loss, 1.0, [(x, t)])
    if structure == "diag":
        assert_close(op.diagonal(), ref.diagonal(), what="signed exact diagonal")
    else:
        dense = op.to_dense()
        assert_close(dense, ref * (dense != 0), what="signed blocks")


def test_indefinite_kfac_fast_equals_generic(monkeypatch):
    model, _, _ = MODELS["cnn_pool"]
    x, t = _indefinite_data()
    fast = ck.ggn(model, _cos_loss, (x, t), structure="kron").to_dense()
    monkeypatch.setattr(Forward, "chain_trace", lambda self, batch: None)
    generic = ck.ggn(model, _cos_loss, (x, t), structure="kron").to_dense()
    assert_close(fast, generic, what="signed KFAC: fast vs generic route")
