"""The table of test problems (models x losses), all float64 and in eval mode.

Each factory returns a :class:`Case`: what is passed to curvkit (``model``, ``loss_fn``, ``data``,
``params``, ``kwargs``) and what the references in ``helpers.py`` need (``batches``, the per-sample
loss ``sample_loss`` written batched-of-one, the scale ``s`` of ``L = s * sum_n l_n``, and the
output picker ``output_fn``). The total loss the Hessian reference differentiates is ``loss_fn``
itself applied to the concatenated batch, which is exactly what the contract promises.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DT = torch.float64


class Residual(nn.Module):
    """A residual connection: not a chain (NOTE [chains] in ``engine/chain.py``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) + x)


@dataclass
class Case:
    name: str
    model: nn.Module
    loss_fn: Any
    data: Any
    batches: list[tuple[Any, Any]]
    sample_loss: Callable[[torch.Tensor, Any], torch.Tensor]
    scale: float
    params: list[torch.Tensor] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    output_fn: Callable[[Any], torch.Tensor] | None = None

    def run(self, fn: Callable, **extra: Any) -> Any:
        """Call a curvkit entry point (``ck.hessian``, ``ck.ggn``, ...) on this case."""
        return fn(self.model, self.loss_fn, self.data, params=self.params, **self.kwargs, **extra)

    @property
    def num_params(self) -> int:
        if self.params is not None:
            return sum(p.numel() for p in self.params)
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


# per-sample losses, batched of one: (1, ...) output, (1, ...) target -> scalar
def ce_sample(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o, t, reduction="sum")


def bce_sample(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(o, t, reduction="sum")


def bce_logits_sample(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(o, t, reduction="sum")


def mse_sample(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(o, t, reduction="sum")


def xent_mean_callable(yhat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The (a) callable: a mean over the batch's samples (``reduction="mean"`` needed)."""
    return -(t * torch.log(yhat)).sum() / yhat.shape[0]


def gaussian_nll_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Heteroscedastic Gaussian NLL summed over samples; out[:, 0] mean, out[:, 1] log var."""
    mean, log_var = out[:, 0], out[:, 1]
    return (0.5 * (log_var + (y - mean) ** 2 / torch.exp(log_var))).sum()


def _finish(model: nn.Module) -> nn.Module:
    return model.to(DT).eval()


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def _ce_batch(n: int, d_in: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, d_in, dtype=DT), torch.randint(0, classes, (n,))


# --------------------------------------------------------------------------------------------
# (a) Flatten + Linear + Linear + Sigmoid, mean callable / BCELoss
# --------------------------------------------------------------------------------------------
def _sigmoid_model() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = _finish(nn.Sequential(nn.Flatten(), nn.Linear(2, 5), nn.Linear(5, 1), nn.Sigmoid()))
    x = torch.randn(5, 2, 1, 1, dtype=DT)
    t = torch.rand(5, 1, dtype=DT)
    return model, (x, t)


def sigmoid_mean_callable() -> Case:
    model, batch = _sigmoid_model()
    return Case(
        "sigmoid_mean_callable",
        model,
        xent_mean_callable,
        batch,
        [batch],
        sample_loss=xent_mean_callable,
        scale=1 / 5,
        kwargs={"reduction": "mean"},
    )


def sigmoid_bce() -> Case:
    model, batch = _sigmoid_model()
    return Case("sigmoid_bce", model, nn.BCELoss(), batch, [batch], bce_sample, scale=1 / 5)


# --------------------------------------------------------------------------------------------
# (b) Tanh MLP + CrossEntropyLoss, mean and sum
# --------------------------------------------------------------------------------------------
def _mlp_ce(reduction: str) -> Case:
    torch.manual_seed(1)
    model = _finish(_mlp(4, 6, 3))
    batch = _ce_batch(8, 4, 3)
    scale = 1 / 8 if reduction == "mean" else 1.0
    return Case(
        f"mlp_ce_{reduction}",
        model,
        nn.CrossEntropyLoss(reduction=reduction),
        batch,
        [batch],
        ce_sample,
        scale,
    )


def mlp_ce_mean() -> Case:
    return _mlp_ce("mean")


def mlp_ce_sum() -> Case:
    return _mlp_ce("sum")


# --------------------------------------------------------------------------------------------
# (c) small CNN + CE
# --------------------------------------------------------------------------------------------
def cnn_ce() -> Case:
    torch.manual_seed(2)
    model = _finish(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    )
    x = torch.randn(6, 1, 5, 5, dtype=DT)
    t = torch.randint(0, 3, (6,))
    return Case("cnn_ce", model, nn.CrossEntropyLoss(), (x, t), [(x, t)], ce_sample, 1 / 6)


# --------------------------------------------------------------------------------------------
# (d) BatchNorm (eval, non-trivial running stats) + MaxPool + AvgPool + Dropout (eval)
# --------------------------------------------------------------------------------------------
def bn_pool_dropout_ce() -> Case:
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(2)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        bn,
        nn.MaxPool2d(2),
        nn.AvgPool2d(2, stride=1),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    )
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(2))
        bn.running_var.copy_(torch.rand(2) + 0.5)
        bn.weight.copy_(torch.randn(2))
        bn.bias.copy_(torch.randn(2))
    model = _finish(model)
    x = torch.randn(5, 1, 6, 6, dtype=DT)
    t = torch.randint(0, 3, (5,))
    return Case(
        "bn_pool_dropout_ce", model, nn.CrossEntropyLoss(), (x, t), [(x, t)], ce_sample, 1 / 5
    )


# --------------------------------------------------------------------------------------------
# (e) weight tying: Embedding weight shared with the output Linear
# --------------------------------------------------------------------------------------------
class TiedModel(nn.Module):
    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hid = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hid(self.emb(tokens).mean(dim=1)))
        return self.out(h)


def tied_embedding_ce() -> Case:
    torch.manual_seed(4)
    model = _finish(TiedModel())
    x = torch.randint(0, 7, (6, 3))
    t = torch.randint(0, 7, (6,))
    return Case(
        "tied_embedding_ce", model, nn.CrossEntropyLoss(), (x, t), [(x, t)], ce_sample, 1 / 6
    )


# --------------------------------------------------------------------------------------------
# (f) Embedding + single-head attention with plain ops + LayerNorm + mean pooling + head
# --------------------------------------------------------------------------------------------
class TinyAttention(nn.Module):
    def __init__(self, vocab: int = 6, dim: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)  # (N, T, D)
        q, k, v = self.q(h), self.k(h), self.v(h)
        scores = q @ k.transpose(-2, -1) / math.sqrt(h.shape[-1])
        att = torch.softmax(scores, dim=-1) @ v
        h = self.norm(h + att)
        return self.head(h.mean(dim=1))


def attention_ce() -> Case:
    torch.manual_seed(5)
    model = _finish(TinyAttention())
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        model.norm.weight.add_(0.3 * torch.randn(4, dtype=DT))
        model.norm.bias.add_(0.3 * torch.randn(4, dtype=DT))
    x = torch.randint(0, 6, (5, 3))
    t = torch.randint(0, 3, (5,))
    return Case("attention_ce", model, nn.CrossEntropyLoss(), (x, t), [(x, t)], ce_sample, 1 / 5)


# --------------------------------------------------------------------------------------------
# (g) dict inputs passed as keyword arguments
# --------------------------------------------------------------------------------------------
class KwargsModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(3, 5)
        self.lin2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        h = torch.tanh(self.lin1(x))
        if mask is not None:
            h = h * mask
        return self.lin2(h)


def dict_inputs_ce_sum() -> Case:
    torch.manual_seed(6)
    model = _finish(KwargsModel())
    x = torch.randn(6, 3, dtype=DT)
    mask = (torch.rand(6, 5) > 0.3).to(DT)
    t = torch.randint(0, 3, (6,))
    batch = ({"x": x, "mask": mask}, t)
    return Case(
        "dict_inputs_ce_sum",
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        batch,
        [batch],
        ce_sample,
        1.0,
    )


# tuple inputs passed positionally
class TwoInputModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x1) + self.b(x2)))


def tuple_inputs_ce() -> Case:
    torch.manual_seed(7)
    model = _finish(TwoInputModel())
    x1, x2 = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    t = torch.randint(0, 3, (5,))
    batch = ((x1, x2), t)
    return Case("tuple_inputs_ce", model, nn.CrossEntropyLoss(), batch, [batch], ce_sample, 1 / 5)


# --------------------------------------------------------------------------------------------
# (h) multi-output MSE (mean) on a parameter subset given in a non-model order
# --------------------------------------------------------------------------------------------
def mse_mean_param_subset() -> Case:
    torch.manual_seed(8)
    model = _finish(_mlp(3, 5, 2))
    x, y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)
    params = [model[2].weight, model[0].bias]
    return Case(
        "mse_mean_param_subset",
        model,
        nn.MSELoss(),
        (x, y),
        [(x, y)],
        mse_sample,
        scale=1 / (7 * 2),
        params=params,
    )


# --------------------------------------------------------------------------------------------
# (i) frozen parameters are excluded
# --------------------------------------------------------------------------------------------
def frozen_first_layer_ce() -> Case:
    torch.manual_seed(9)
    model = _finish(_mlp(4, 5, 3))
    for p in model[0].parameters():
        p.requires_grad_(False)
    batch = _ce_batch(6, 4, 3)
    return Case(
        "frozen_first_layer_ce", model, nn.CrossEntropyLoss(), batch, [batch], ce_sample, 1 / 6
    )


# --------------------------------------------------------------------------------------------
# (j) heteroscedastic Gaussian NLL as a (sum) callable
# --------------------------------------------------------------------------------------------
def gaussian_nll_callable() -> Case:
    torch.manual_seed(10)
    model = _finish(_mlp(3, 6, 2))
    with torch.no_grad():
        model[2].weight.mul_(0.5)
    x, y = torch.randn(7, 3, dtype=DT), torch.randn(7, dtype=DT)
    return Case(
        "gaussian_nll_callable", model, gaussian_nll_sum, (x, y), [(x, y)], gaussian_nll_sum, 1.0
    )


# --------------------------------------------------------------------------------------------
# (k) multi-label BCEWithLogitsLoss (mean over all N*K elements)
# --------------------------------------------------------------------------------------------
def multilabel_bce_logits() -> Case:
    torch.manual_seed(11)
    model = _finish(_mlp(4, 5, 3))
    x = torch.randn(6, 4, dtype=DT)
    t = (torch.rand(6, 3) > 0.5).to(DT)
    return Case(
        "multilabel_bce_logits",
        model,
        nn.BCEWithLogitsLoss(),
        (x, t),
        [(x, t)],
        bce_logits_sample,
        scale=1 / (6 * 3),
    )


# --------------------------------------------------------------------------------------------
# (l) several uneven batches (7, 3, 5): list of pairs and a DataLoader
# --------------------------------------------------------------------------------------------
BATCH_SIZES = (7, 3, 5)


def _split(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(torch.split(x, BATCH_SIZES), torch.split(y, BATCH_SIZES)))


def batches_mse_mean() -> Case:
    torch.manual_seed(12)
    model = _finish(_mlp(3, 4, 2))
    x, y = torch.randn(15, 3, dtype=DT), torch.randn(15, 2, dtype=DT)
    batches = _split(x, y)
    return Case(
        "batches_mse_mean", model, nn.MSELoss(), batches, batches, mse_sample, scale=1 / (15 * 2)
    )


def _batches_ce(reduction: str) -> Case:
    torch.manual_seed(13)
    model = _finish(_mlp(4, 5, 3))
    x, y = _ce_batch(15, 4, 3)
    batches = _split(x, y)
    scale = 1 / 15 if reduction == "mean" else 1.0
    return Case(
        f"batches_ce_{reduction}",
        model,
        nn.CrossEntropyLoss(reduction=reduction),
        batches,
        batches,
        ce_sample,
        scale,
    )


def batches_ce_mean() -> Case:
    return _batches_ce("mean")


def batches_ce_sum() -> Case:
    return _batches_ce("sum")


def dataloader_mse_mean() -> Case:
    """A DataLoader with batch_size 6 over 15 samples: batches of 6, 6, 3."""
    torch.manual_seed(14)
    model = _finish(_mlp(3, 4, 2))
    x, y = torch.randn(15, 3, dtype=DT), torch.randn(15, 2, dtype=DT)
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=False)
    batches = [(bx, by) for bx, by in loader]
    return Case(
        "dataloader_mse_mean", model, nn.MSELoss(), loader, batches, mse_sample, scale=1 / (15 * 2)
    )


def batches_mean_callable() -> Case:
    """The (a) mean callable over uneven batches: the mean is over all 15 samples."""
    torch.manual_seed(15)
    model = _finish(nn.Sequential(nn.Flatten(), nn.Linear(2, 5), nn.Linear(5, 1), nn.Sigmoid()))
    x, t = torch.randn(15, 2, 1, 1, dtype=DT), torch.rand(15, 1, dtype=DT)
    batches = _split(x, t)
    return Case(
        "batches_mean_callable",
        model,
        xent_mean_callable,
        batches,
        batches,
        xent_mean_callable,
        scale=1 / 15,
        kwargs={"reduction": "mean"},
    )


# --------------------------------------------------------------------------------------------
# output shapes other than (N, C): (N,) regression, and (N, C, T) token-wise CE over 2 batches
# --------------------------------------------------------------------------------------------
def scalar_output_mse_mean() -> Case:
    torch.manual_seed(17)
    model = _finish(nn.Sequential(_mlp(3, 4, 1), nn.Flatten(0)))  # output (N,)
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, dtype=DT)
    return Case("scalar_output_mse_mean", model, nn.MSELoss(), (x, y), [(x, y)], mse_sample, 1 / 6)


def tokenwise_ce_batches() -> Case:
    """Conv1d logits (N, C=3, T=4); CE mean divides by N_total * T = 5 * 4."""
    torch.manual_seed(18)
    model = _finish(nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 3, 1)))
    x = torch.randn(5, 2, 4, dtype=DT)
    t = torch.randint(0, 3, (5, 4))
    batches = list(zip(torch.split(x, (3, 2)), torch.split(t, (3, 2))))
    return Case(
        "tokenwise_ce_batches",
        model,
        nn.CrossEntropyLoss(),
        batches,
        batches,
        ce_sample,
        scale=1 / (5 * 4),
    )


# --------------------------------------------------------------------------------------------
# (m) outputs: dict {"logits": ...}, object with .logits, and output_fn=
# --------------------------------------------------------------------------------------------
class DictOutputModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp(4, 5, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.body(x)
        return {"hidden": torch.tanh(logits), "logits": logits}


class AttrOutputModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp(4, 5, 3)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        logits = self.body(x)
        return SimpleNamespace(loss=None, logits=logits)


class TupleOutputModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp(4, 5, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.body(x)
        return logits, torch.tanh(logits)


def first_of_tuple(raw: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return raw[0]


def _output_case(name: str, cls: type[nn.Module], output_fn: Callable | None = None) -> Case:
    torch.manual_seed(16)
    model = _finish(cls())
    batch = _ce_batch(6, 4, 3)
    kwargs = {"output_fn": output_fn} if output_fn is not None else {}
    return Case(
        name,
        model,
        nn.CrossEntropyLoss(),
        batch,
        [batch],
        ce_sample,
        1 / 6,
        kwargs=kwargs,
        output_fn=output_fn,
    )


def dict_output_ce() -> Case:
    return _output_case("dict_output_ce", DictOutputModel)


def attr_output_ce() -> Case:
    return _output_case("attr_output_ce", AttrOutputModel)


def output_fn_ce() -> Case:
    return _output_case("output_fn_ce", TupleOutputModel, first_of_tuple)


# --------------------------------------------------------------------------------------------
# THE TABLE
# --------------------------------------------------------------------------------------------
CASES: dict[str, Callable[[], Case]] = {
    "sigmoid_mean_callable": sigmoid_mean_callable,  # (a)
    "sigmoid_bce": sigmoid_bce,  # (a)
    "mlp_ce_mean": mlp_ce_mean,  # (b)
    "mlp_ce_sum": mlp_ce_sum,  # (b)
    "cnn_ce": cnn_ce,  # (c)
    "bn_pool_dropout_ce": bn_pool_dropout_ce,  # (d)
    "tied_embedding_ce": tied_embedding_ce,  # (e)
    "attention_ce": attention_ce,  # (f)
    "dict_inputs_ce_sum": dict_inputs_ce_sum,  # (g)
    "tuple_inputs_ce": tuple_inputs_ce,  # (g')
    "mse_mean_param_subset": mse_mean_param_subset,  # (h)
    "frozen_first_layer_ce": frozen_first_layer_ce,  # (i)
    "gaussian_nll_callable": gaussian_nll_callable,  # (j)
    "multilabel_bce_logits": multilabel_bce_logits,  # (k)
    "batches_mse_mean": batches_mse_mean,  # (l)
    "batches_ce_mean": batches_ce_mean,  # (l)
    "batches_ce_sum": batches_ce_sum,  # (l)
    "dataloader_mse_mean": dataloader_mse_mean,  # (l)
    "batches_mean_callable": batches_mean_callable,  # (l)
    "scalar_output_mse_mean": scalar_output_mse_mean,
    "tokenwise_ce_batches": tokenwise_ce_batches,
    "dict_output_ce": dict_output_ce,  # (m)
    "attr_output_ce": attr_output_ce,  # (m)
    "output_fn_ce": output_fn_ce,  # (m)
}

# cases whose ``data`` is several batches (compared against one concatenated batch too)
MULTI_BATCH_CASES = (
    "batches_mse_mean",
    "batches_ce_mean",
    "batches_ce_sum",
    "dataloader_mse_mean",
    "batches_mean_callable",
    "tokenwise_ce_batches",
)
