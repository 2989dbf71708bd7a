"""Bad inputs raise a curvkit error quickly, of the right built-in kind, saying what is wrong.

Message checks are deliberately loose: any one of a few keywords naming the offending thing.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, ref_hessian
from torch import nn

import curvkit as ck

DT = torch.float64
QUICK_S = 5.0  # "quickly": every error below comes from cheap checks on tiny models


def _mlp(d_in: int = 3, d_out: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, 4), nn.Tanh(), nn.Linear(4, d_out)).to(DT).eval()


def _regression_batch(n: int = 5, d_in: int = 3, d_out: int = 2):
    return torch.randn(n, d_in, dtype=DT), torch.randn(n, d_out, dtype=DT)


def _ce_batch(n: int = 5, d_in: int = 3, classes: int = 2):
    return torch.randn(n, d_in, dtype=DT), torch.randint(0, classes, (n,))


def expect_error(
    builtin: type[BaseException] | tuple[type[BaseException], ...],
    keywords: tuple[str, ...],
    fn: Callable[[], object],
    *,
    seconds: float = QUICK_S,
) -> BaseException:
    """Run ``fn``; it must raise a ``CurvkitError`` that is also ``builtin``, fast, and whose
    message (lower-cased) contains at least one of ``keywords``."""
    start = time.perf_counter()
    with pytest.raises(ck.CurvkitError) as info:
        fn()
    elapsed = time.perf_counter() - start
    err = info.value
    msg = str(err)
    assert isinstance(err, builtin), f"{type(err).__name__} is not a {builtin}: {msg}"
    assert any(k.lower() in msg.lower() for k in keywords), (
        f"message should mention one of {keywords}: {msg!r}"
    )
    assert elapsed < seconds, f"took {elapsed:.2f}s to raise"
    return err


def test_error_hierarchy():
    assert issubclass(ck.CurvkitValueError, ck.CurvkitError)
    assert issubclass(ck.CurvkitValueError, ValueError)
    assert issubclass(ck.CurvkitTypeError, ck.CurvkitError)
    assert issubclass(ck.CurvkitTypeError, TypeError)
    assert issubclass(ck.CurvkitMemoryError, ck.CurvkitError)
    assert issubclass(ck.CurvkitMemoryError, MemoryError)
    assert issubclass(ck.CurvkitWarning, UserWarning)


@pytest.mark.parametrize("fn", [ck.hessian, ck.ggn, ck.ef, ck.fisher])
def test_nan_in_inputs(fn):
    x, t = _ce_batch()
    x[2, 1] = float("nan")
    expect_error(ValueError, ("nan", "finite"), lambda: fn(_mlp(), nn.CrossEntropyLoss(), (x, t)))


@pytest.mark.parametrize("structure", ["dense", "operator", "kron", "diag"])
def test_float64_data_for_a_float32_model(structure):
    """The usual torch.from_numpy mistake: torch's "mat1 and mat2 must have the same dtype"
    came from deep inside the first layer. The message names both dtypes and both casts."""
    x, t = _ce_batch()  # float64
    model = _mlp().float()

    def call():  # an operator is lazy: its first product runs the model
        G = ck.ggn(model, nn.CrossEntropyLoss(), (x, t), structure=structure)
        return G @ torch.ones(G.shape[0]) if structure == "operator" else G

    err = expect_error(ValueError, ("float64",), call)
    assert "float32" in str(err) and "x.to(torch.float32)" in str(err), str(err)


def test_integer_inputs_get_advice_that_works():
    """uint8 token ids into an Embedding were told to cast the model to uint8."""
    y = torch.randint(0, 3, (6,))
    emb = nn.Sequential(nn.Embedding(11, 4), nn.Flatten(), nn.Linear(20, 3)).to(DT)
    tok = torch.randint(0, 11, (6, 5), dtype=torch.uint8)
    err = expect_error(ValueError, ("uint8",), lambda: ck.ggn(emb, nn.CrossEntropyLoss(), (tok, y)))
    assert "x.long()" in str(err) and "model.to" not in str(err), str(err)
    lin = nn.Sequential(nn.Linear(5, 3)).to(DT)
    feats = torch.randint(0, 11, (6, 5))
    err = expect_error(
        ValueError, ("int64",), lambda: ck.ggn(lin, nn.CrossEntropyLoss(), (feats, y))
    )
    assert "x.to(torch.float64)" in str(err) and "model.to" not in str(err), str(err)
    img = torch.randint(0, 255, (6, 3, 4, 4), dtype=torch.uint8)  # uint8 images
    for conv in (  # torch: a RuntimeError, and a NotImplementedError ("... for 'Byte'")
        nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(8, 3)),
        nn.Sequential(nn.ConvTranspose2d(3, 2, 3), nn.Flatten(), nn.Linear(72, 3)),
    ):
        for structure in ("dense", "diag"):
            err = expect_error(
                ValueError,
                ("uint8",),
                lambda s=structure, m=conv: ck.ggn(m, nn.CrossEntropyLoss(), (img, y), structure=s),
            )
            assert "x.to(torch.float32)" in str(err) and "model.to" not in str(err), str(err)


@pytest.mark.parametrize("loss_fn", [nn.BCEWithLogitsLoss(), nn.BCELoss()])
@pytest.mark.parametrize("kind", ["ggn", "hessian", "ef"])
def test_bool_targets_of_a_binary_cross_entropy(kind, loss_fn):
    """torch's BCE losses reject bool targets; ck.ggn took them, ck.hessian and ck.ef raised a
    raw 'Subtraction ... with two bool tensors'."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid()).to(DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.rand(5, 3) > 0.5
    err = expect_error(
        ValueError, ("floating-point targets",), lambda: getattr(ck, kind)(model, loss_fn, (x, y))
    )
    assert "y.float()" in str(err), str(err)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "ef"])
@pytest.mark.parametrize("structure", ["dense", "operator", "diag", "kron"])
def test_float64_targets_of_a_float32_model(kind, structure):
    """torch's MSELoss promotes float64 targets of a float32 model; ck.ef (every structure) and
    Hessian operators raised raw dtype errors. Targets are taken in the model's dtype."""
    if kind == "hessian" and structure == "kron":
        return
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(10, 4), torch.randn(10, 3, dtype=torch.float64)
    run = lambda t: getattr(ck, kind)(model, nn.MSELoss(), (x, t), structure=structure)  # noqa: E731
    got, want = run(y), run(y.float())
    if structure == "operator":
        v = torch.randn(got.shape[0])
        got, want = got @ v, want @ v
    elif structure != "dense":
        got, want = got.to_dense(), want.to_dense()
    assert got.dtype == torch.float32
    assert_close(got, want, rtol=1e-6)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "ef", "hessian, nothing kept"])
def test_an_operator_sees_edits_of_targets_it_cast(kind):
    """A single batch is validated once and its cast copy reused: an in-place edit of the
    float64 targets of a float32 model went unseen and the operator answered for the old data
    (0.84 off a fresh one), while the same edit of float32 targets was refused."""
    torch.manual_seed(0)
    # "nothing kept": a Hessian whose kept state would pass the memory budget (16 MiB at
    # least; 20000 samples here) has no copies to compare against: it went on with the edited
    # or the stale data (0.05-0.07 off)
    limit, n = (2**20, 20000) if kind.endswith("kept") else (None, 6)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    x = torch.randn(n, 3)
    for dtype in (torch.float32, torch.float64):
        y = torch.randn(n, 2, dtype=dtype)
        op = getattr(ck, kind.split(",")[0])(
            model, nn.MSELoss(), (x, y), structure="operator", memory_limit=limit
        )
        v = torch.randn(op.shape[0])
        op @ v
        op @ v  # a second pass agrees with the first
        if limit is not None:
            assert op.problem._keep_none
        y.mul_(3.0)
        with pytest.raises(ck.CurvkitValueError, match="changed"):
            op @ v


def test_a_model_that_casts_its_own_inputs_is_not_refused():
    """Inputs of another dtype are fine when forward() casts them: only a failing forward pass
    is explained by the mismatch."""

    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _mlp()

        def forward(self, x):
            return self.inner(x.to(DT))

    x, t = _ce_batch()
    G = ck.ggn(Casting(), nn.CrossEntropyLoss(), (x.float(), t))
    assert G.dtype == DT


@pytest.mark.parametrize("loss_fn", [nn.GaussianNLLLoss(), nn.TripletMarginLoss()])
def test_a_loss_that_needs_three_tensors(loss_fn):
    """torch's raw "forward() missing 1 required positional argument: 'var'" came from inside
    curvkit's loss check."""
    x, y = _regression_batch()
    expect_error(
        ValueError,
        ("loss_fn(output, target)",),
        lambda: ck.ggn(_mlp(), loss_fn, (x, y)),
    )


def test_embedding_with_max_norm():
    """Embedding(max_norm=...) renormalises its weight in place in forward(): torch.func's raw
    "attempted to call in-place operation (aten::embedding_renorm_)" (or vmap's) leaked. The
    structured paths now compute its rows one sample at a time (exact, against the same model
    with its rows renormalised and max_norm=None); where a transform must run over the whole
    pass, the error says how to get the same curvature."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Linear(8, 3))
    model = model.to(DT)
    x, t = torch.randint(0, 10, (6, 2)), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    with torch.no_grad():
        model(x)
    plain = __import__("copy").deepcopy(model)
    plain[0].max_norm = None
    G = ck.ggn(plain, loss, (x, t))
    D = ck.ggn(model, loss, (x, t), structure="diag").diagonal()
    assert torch.allclose(D, G.diagonal(), rtol=1e-10, atol=1e-14)
    err = expect_error(ValueError, ("in place",), lambda: ck.ggn(model, loss, (x, t)))
    assert "max_norm = None" in str(err), str(err)


@pytest.mark.parametrize("limit", [-5, 0, "1e9", 1.5e9, True])
def test_memory_limit_must_be_a_positive_int(limit):
    x, t = _ce_batch()
    expect_error(
        ValueError,
        ("memory_limit",),
        lambda: ck.ggn(_mlp(), nn.CrossEntropyLoss(), (x, t), memory_limit=limit),
    )


def test_a_shape_error_with_half_inputs_is_not_called_a_dtype_mismatch():
    """A model that casts its float16 inputs itself and then has a genuine shape bug: the
    dtype hint fired for any error while the dtypes differed, hiding torch's real message."""

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x):
            return self.l(x.float()).view(-1, 5)  # the bug: 12 values do not make rows of 5

    x, t = torch.randn(6, 3).half(), torch.randint(0, 2, (6,))
    with pytest.raises(RuntimeError) as err:
        ck.ggn(Broken(), nn.CrossEntropyLoss(), (x, t))
    assert "float16" not in str(err.value) and "invalid for input" in str(err.value)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_inf_or_nan_in_a_parameter(bad):
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 1] = bad
    err = expect_error(
        ValueError, ("inf", "finite"), lambda: ck.hessian(model, nn.MSELoss(), _regression_batch())
    )
    assert "'2.weight'" in str(err), str(err)


def test_wrong_target_shape_for_mse():
    x, _ = _regression_batch()
    y = torch.randn(5, 3, dtype=DT)  # output is (5, 2)
    expect_error(
        ValueError, ("shape", "(5, 3)", "size"), lambda: ck.ggn(_mlp(), nn.MSELoss(), (x, y))
    )


def test_cross_entropy_class_index_out_of_range():
    x, t = _ce_batch(classes=2)
    t[3] = 2  # the model has 2 logits: valid classes are 0 and 1
    expect_error(
        ValueError,
        ("class", "target", "range"),
        lambda: ck.ggn(_mlp(), nn.CrossEntropyLoss(), (x, t)),
    )


def test_empty_data():
    expect_error(
        ValueError, ("empty", "no batch", "data"), lambda: ck.hessian(_mlp(), nn.MSELoss(), [])
    )


def test_one_shot_iterator_used_up_by_an_earlier_pass():
    """An operator over a generator was built, gave one product, then failed on the next."""
    x, y = _regression_batch()

    def batches():
        return ((x[i : i + 2], y[i : i + 2]) for i in range(0, len(x), 2))

    err = expect_error(
        ValueError,
        ("one-shot", "every product"),
        lambda: ck.ggn(_mlp(), nn.MSELoss(), batches(), structure="operator"),
    )
    assert "list of batches or a DataLoader" in str(err), err
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    expect_error(  # two passes: the second finds nothing left
        ValueError,
        ("one-shot", "used up"),
        lambda: ck.ggn(model, nn.MSELoss(), batches(), structure="ekfac"),
    )


class _HuberActivation(nn.Module):
    """huber_loss's backward has no forward-mode derivative: the Hessian's first try (forward
    over reverse) fails on the first batch and the pass is retried in reverse mode."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        return self.o(F.huber_loss(h, torch.zeros_like(h), reduction="none", delta=0.5))


@pytest.mark.parametrize("structure", ["dense", "diag"])
def test_one_shot_iterator_whose_pass_is_retried(structure):
    """The retry read on from where the failed try stopped: a generator of three batches gave
    the Hessian of the last two (0.54 off), silently."""
    torch.manual_seed(0)
    model = _HuberActivation().to(DT).eval()
    x, y = torch.randn(9, 4, dtype=DT), torch.randint(0, 3, (9,))
    batches = [(x[i : i + 3], y[i : i + 3]) for i in range(0, 9, 3)]
    ce = nn.CrossEntropyLoss()
    want = ck.hessian(model, ce, batches, structure=structure)  # a list: retried from the start
    ref = ref_hessian(model, ce, [(x, y)])
    if structure == "diag":
        want, ref = want.diagonal(), ref.diagonal()
    assert_close(want, ref, rtol=1e-10)
    err = expect_error(
        ValueError,
        ("one-shot", "stopped partway"),
        lambda: ck.hessian(model, ce, iter(batches), structure=structure),
    )
    assert "list of batches or a DataLoader" in str(err), err


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        hidden = torch.utils.checkpoint.checkpoint(
            lambda h: torch.tanh(self.a(h)), x, use_reentrant=False
        )
        return self.b(hidden)


@pytest.mark.parametrize("structure", ["dense", "diag", "kron"])
def test_activation_checkpointing_is_named(structure):
    kind = ck.ggn if structure == "kron" else ck.hessian
    model = Checkpointed().to(DT)
    expect_error(
        TypeError,
        ("checkpoint",),
        lambda: kind(model, nn.MSELoss(), _regression_batch(), structure=structure),
    )


def test_params_with_a_tensor_not_in_the_model():
    model = _mlp()
    stranger = nn.Parameter(torch.zeros(4, dtype=DT))
    expect_error(
        ValueError,
        ("param", "model"),
        lambda: ck.hessian(
            model, nn.MSELoss(), _regression_batch(), params=[model[0].bias, stranger]
        ),
    )


def test_callable_loss_returning_a_non_scalar():
    def per_element(out, target):
        return (out - target) ** 2  # forgot the .sum()

    expect_error(
        ValueError,
        ("scalar", "shape"),
        lambda: ck.hessian(_mlp(), per_element, _regression_batch()),
    )


@pytest.mark.parametrize("wrap", [lambda x: x, lambda x: [x]], ids=["bare", "in_list"])
def test_batch_without_targets(wrap):
    """A tensor is not an ``(inputs, targets)`` pair (Type- or ValueError both fine)."""
    x, _ = _regression_batch()
    expect_error(
        (TypeError, ValueError),
        ("target", "pair", "tuple"),
        lambda: ck.hessian(_mlp(), nn.MSELoss(), wrap(x)),
    )


def test_batch_with_three_elements():
    x, y = _regression_batch()
    expect_error(
        (TypeError, ValueError),
        ("pair", "target", "3", "tuple"),
        lambda: ck.hessian(_mlp(), nn.MSELoss(), [(x, y, y)]),
    )


def test_dropout_in_train_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(DT).train()
    expect_error(
        ValueError, ("eval", "train"), lambda: ck.hessian(model, nn.MSELoss(), _regression_batch())
    )


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, dropout=0.3, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.mha(x, x, x, need_weights=False)[0].mean(1))


def test_attention_dropout_in_train_mode():
    """MultiheadAttention's dropout is a float, not a Dropout module."""
    model = Attention().to(DT).train()
    x, y = torch.randn(5, 3, 4, dtype=DT), torch.randn(5, 2, dtype=DT)
    for structure in ("dense", "operator", "diag"):
        expect_error(
            ValueError,
            ("eval", "train", "MultiheadAttention"),
            lambda s=structure: ck.ggn(model, nn.MSELoss(), (x, y), structure=s),
        )


def test_batchnorm_in_train_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT)
    model.eval()
    model[1].train()  # only the BatchNorm left in training mode
    expect_error(
        ValueError, ("eval", "train"), lambda: ck.ggn(model, nn.MSELoss(), _regression_batch())
    )


def test_no_trainable_parameters():
    model = _mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    expect_error(
        ValueError,
        ("trainable", "requires_grad", "frozen", "no param"),
        lambda: ck.hessian(model, nn.MSELoss(), _regression_batch()),
    )


def test_unknown_structure():
    err = expect_error(
        ValueError,
        ("structure",),
        lambda: ck.hessian(_mlp(), nn.MSELoss(), _regression_batch(), structure="foo"),
    )
    assert "foo" in str(err) or "dense" in str(err), str(err)


def test_dense_request_far_beyond_memory_raises_before_allocating():
    """P ~ 1e8 -> a 4e16-byte Hessian: refused within a second, allocating nothing big."""
    model = nn.Linear(100_000, 1_000, bias=False).eval()  # float32: 400 MB of weights
    x, y = torch.randn(2, 100_000), torch.randn(2, 1_000)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for fn in (ck.hessian, ck.ggn, ck.ef):
        expect_error(
            MemoryError,
            ("memory", "bytes", "memory_limit", "GB", "GiB"),
            lambda fn=fn: fn(model, nn.MSELoss(), (x, y)),
            seconds=1.0,
        )
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 1024, f"peak memory grew by {grown_mib:.0f} MiB before raising"


def test_memory_limit_can_lower_the_limit():
    err = expect_error(
        MemoryError,
        ("memory", "bytes", "memory_limit"),
        lambda: ck.hessian(_mlp(), nn.MSELoss(), _regression_batch(), memory_limit=10),
    )
    assert isinstance(err, ck.CurvkitMemoryError)


def test_memory_limit_large_enough_allows_the_call():
    h = ck.hessian(_mlp(), nn.MSELoss(), _regression_batch(), memory_limit=10**9)
    assert tuple(h.shape) == (26, 26)


def test_fisher_with_a_plain_callable_loss():
    def my_loss(out, target):
        return ((out - target) ** 2).sum()

    expect_error(
        ck.CurvkitError,
        ("fisher", "distribution", "loss", "callable"),
        lambda: ck.fisher(_mlp(), my_loss, _regression_batch()),
    )


def test_mean_callable_without_reduction_mean():
    def mean_loss(out, target):
        return ((out - target) ** 2).sum() / out.shape[0]  # a mean over the batch's samples

    err = expect_error(
        ValueError, ("reduction",), lambda: ck.hessian(_mlp(), mean_loss, _regression_batch())
    )
    assert isinstance(err, ck.CurvkitValueError)


def test_block_structure_beyond_memory_raises_before_allocating():
    model = nn.Sequential(nn.Linear(64, 4096), nn.Tanh(), nn.Linear(4096, 10)).eval()
    x, y = torch.randn(4, 64), torch.randint(0, 10, (4,))
    expect_error(
        MemoryError,
        ("block", "kron", "memory_limit"),
        lambda: ck.ggn(model, nn.CrossEntropyLoss(), (x, y), structure="block"),
        seconds=1.0,
    )


def test_kron_structure_beyond_memory_raises_before_allocating():
    model = nn.Sequential(nn.Linear(200_000, 10)).eval()  # an A factor of 200001² floats
    x, y = torch.randn(2, 200_000), torch.randint(0, 10, (2,))
    expect_error(
        MemoryError,
        ("kron", "diag", "memory_limit"),
        lambda: ck.ggn(model, nn.CrossEntropyLoss(), (x, y), structure="kron"),
        seconds=1.0,
    )


@pytest.mark.parametrize(
    "loss_fn",
    [nn.HuberLoss(reduction="sum"), nn.L1Loss(reduction="sum"), nn.KLDivLoss("batchmean")],
    ids=["huber", "l1", "kldiv"],
)
def test_targets_that_torch_would_broadcast_are_refused(loss_fn):
    """(N,) targets with (N, 1) outputs: torch broadcasts to (N, N) and only warns; the Huber
    Hessian came out N× off, and different again over a loader."""
    model = _mlp(d_out=1)
    x, y = torch.randn(6, 3, dtype=DT), torch.rand(6, dtype=DT)
    with pytest.raises(ck.CurvkitValueError, match=r"broadcasts to \(6, 6\).*y.reshape\(-1, 1\)"):
        ck.hessian(model, loss_fn, (x, y))


class _Centered(nn.Module):
    """Subtracts the batch mean: each sample's output depends on the others."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0))


@pytest.mark.parametrize("structure", ["dense", "diag", "operator"])
def test_a_model_that_couples_the_samples_of_a_batch_is_refused(structure):
    """An eval-mode model with batch statistics in forward(): the Hessian was 99% off and the
    GGN 17%, silently (only nn.BatchNorm in training mode was refused)."""
    torch.manual_seed(0)
    model = _Centered().to(DT).eval()
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    with pytest.raises(ck.CurvkitValueError, match="depends on the other samples of its batch"):
        op = ck.ggn(model, nn.CrossEntropyLoss(), (x, y), structure=structure)
        op @ torch.ones(op.shape[0], dtype=DT)


# --------------------------------------------------------------------------------------------
# what users pass (an adversarial review of input handling)
# --------------------------------------------------------------------------------------------
def _ce_pair(n: int = 6):
    torch.manual_seed(1)
    return torch.randn(n, 3, dtype=DT), torch.randint(0, 2, (n,))


def test_wrapped_models_give_the_wrapped_models_curvature():
    """torch.compile's wrapper failed from the second call on, DataParallel at the first
    product, with raw torch errors; both hold the user's module, with the same parameters."""
    model = _mlp()
    data = _ce_pair()
    want = ck.ggn(model, nn.CrossEntropyLoss(), data)
    for wrapped in (nn.DataParallel(model), torch.compile(model)):
        for _ in range(2):
            got = ck.ggn(wrapped, nn.CrossEntropyLoss(), data)
            torch.testing.assert_close(got, want)
    assert ck.parameter_slices(nn.DataParallel(model)) == ck.parameter_slices(model)


class _FDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.nn.functional.dropout(torch.tanh(self.a(x)), 0.5, self.training))


def _spectral_normed():
    model = _mlp()
    torch.nn.utils.spectral_norm(model[0])
    return model


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.Linear(4, 2)), "RReLU"),
        (_spectral_normed, "spectral_norm"),
        (_FDropout, "random|other samples"),
    ],
    ids=["rrelu", "legacy_spectral_norm", "functional_dropout"],
)
def test_training_mode_randomness_is_refused(make, match):
    """RReLU and F.dropout in training mode gave raw vmap errors; the legacy spectral_norm was
    accepted, moved the result by 2e-3 per call and changed the user's model."""
    model = make().to(DT).train()
    with pytest.raises(ck.CurvkitValueError, match=match):
        ck.hessian(model, nn.CrossEntropyLoss(), _ce_pair())


@pytest.mark.parametrize("flag", ["scale_grad_by_freq", "sparse"])
def test_embedding_flags_that_change_torchs_gradient_are_refused(flag):
    """scale_grad_by_freq rescales torch's gradient by token counts within a batch (not the
    function): the dense GGN came out 2.6 off and depended on the batch split; sparse=True gave
    raw SparseCPU errors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, **{flag: True}), nn.Flatten(), nn.Linear(6, 2))
    x, y = torch.tensor([[0, 0], [0, 1], [2, 0]]), torch.tensor([0, 1, 1])
    with pytest.raises(ck.CurvkitValueError, match=rf"{flag}=True.*{flag} = False"):
        ck.ggn(model.to(DT), nn.CrossEntropyLoss(), (x, y))


@pytest.mark.parametrize("structure", ["diag", "kron", "block"])
def test_int32_token_ids_work_on_every_structure(structure):
    """nn.Embedding takes int32 ids and the dense path worked; the structured ones raised
    one_hot's raw error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).to(DT)
    x, y = torch.randint(0, 5, (7, 2)), torch.randint(0, 2, (7,))
    want = ck.ggn(model, nn.CrossEntropyLoss(), (x, y), structure=structure).to_dense()
    got = ck.ggn(model, nn.CrossEntropyLoss(), (x.int(), y), structure=structure).to_dense()
    torch.testing.assert_close(got, want)


def test_common_mistakes_get_clear_errors():
    model, (x, y) = _mlp(), _ce_pair()
    with pytest.raises(
        ck.CurvkitTypeError, match=r"an instance, e.g. loss_fn=CrossEntropyLoss\(\)"
    ):
        ck.ggn(model, nn.CrossEntropyLoss, (x, y))
    with pytest.raises(ck.CurvkitValueError, match=r"int64.*x.to\(torch.float64\)"):
        ck.ggn(model, nn.CrossEntropyLoss(), (x.long(), y))
    with pytest.raises(ck.CurvkitValueError, match="int64"):  # the Hessian failed on uint8
        ck.hessian(model, nn.CrossEntropyLoss(), (x, y.to(torch.uint8)))
    for structure in ("dense", "diag"):  # a .detach() in output_fn: silently all zero
        with pytest.raises(ck.CurvkitValueError, match="does not depend on the model's output"):
            ck.ggn(
                model, nn.CrossEntropyLoss(), (x, y), structure=structure, output_fn=torch.detach
            )


def test_params_may_be_a_module_and_inputs_a_list():
    """params=model[0] raised "'Linear' object is not iterable"; ([a, b], y) was read as a
    loader of two batches."""
    model, (x, y) = _mlp(), _ce_pair()
    want = ck.ggn(model, nn.CrossEntropyLoss(), (x, y), params=list(model[0].parameters()))
    torch.testing.assert_close(ck.ggn(model, nn.CrossEntropyLoss(), (x, y), params=model[0]), want)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, a, b):
            return self.inner(a + b)

    got = ck.ggn(Two(), nn.CrossEntropyLoss(), ([x, torch.zeros_like(x)], y))
    torch.testing.assert_close(got, ck.ggn(model, nn.CrossEntropyLoss(), (x, y)))


def test_hessian_through_parametrized_weight_norm_is_refused_ggn_is_not():
    """torch's double backward through parametrizations.weight_norm is wrong (the Hessian's
    block of the direction parameter came out 0.64 off against finite differences); the GGN
    needs first derivatives of the model only."""
    model = _mlp()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    data = _ce_pair()
    with pytest.raises(ck.CurvkitValueError, match="weight_norm.*ck.ggn"):
        ck.hessian(model, nn.CrossEntropyLoss(), data)
    G = ck.ggn(model, nn.CrossEntropyLoss(), data)
    assert G.shape == (30, 30) and bool(torch.isfinite(G).all())
    ck.hessian(model, nn.CrossEntropyLoss(), data, params=[model[2].weight])  # not through it


def test_output_fn_on_an_object_output_is_accepted():
    """A model returning a dataclass with .logits: output_fn=lambda o: o.logits was refused as
    detaching (the check could not see inside the object)."""
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _mlp()

        def forward(self, x):
            return Out(self.inner(x))

    model, data = Wrapped(), _ce_pair()
    got = ck.ggn(model, nn.CrossEntropyLoss(), data, output_fn=lambda o: o.logits)
    torch.testing.assert_close(got, ck.ggn(model.inner, nn.CrossEntropyLoss(), data))


def test_detaching_output_fn_is_refused_on_structured_outputs():
    """A namedtuple, a dataclass or a transformers-style ModelOutput (a dict subclass whose
    attributes mirror its items): a .detach() in output_fn gave all-zero curvature, unchecked,
    because the check rebuilt plain containers only. Without the detach each is accepted."""
    import collections
    import dataclasses

    Pair = collections.namedtuple("Pair", "logits aux")

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        note: str = "x"

    class ModelOutput(collections.OrderedDict):  # transformers' ModelOutput, in short
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            super().__setattr__(key, value)

        def __getattr__(self, key):
            try:
                return self[key]
            except KeyError:
                raise AttributeError(key) from None

    def mo(t):
        o = ModelOutput()
        o["logits"] = t
        o["loss"] = None
        return o

    wrappers = {"namedtuple": lambda t: Pair(t, t.sum()), "dataclass": Out, "ModelOutput": mo}
    data = _ce_pair()
    want = ck.ggn(_mlp(), nn.CrossEntropyLoss(), data)
    for name, wrap in wrappers.items():

        class Wrapped(nn.Module):
            def __init__(self, wrap):
                super().__init__()
                self.inner, self.wrap = _mlp(), wrap

            def forward(self, x):
                return self.wrap(self.inner(x))

        with pytest.raises(ck.CurvkitValueError, match="does not depend on the model's output"):
            ck.ggn(
                Wrapped(wrap), nn.CrossEntropyLoss(), data, output_fn=lambda o: o.logits.detach()
            )
        got = ck.ggn(Wrapped(wrap), nn.CrossEntropyLoss(), data, output_fn=lambda o: o.logits)
        torch.testing.assert_close(got, want, msg=name)


def test_spectral_norm_parametrization_in_training_mode_is_refused():
    model = _mlp()
    torch.nn.utils.parametrizations.spectral_norm(model[0])
    with pytest.raises(ck.CurvkitValueError, match="spectral_norm.*model.eval"):
        ck.ggn(model.train(), nn.CrossEntropyLoss(), _ce_pair())
    ck.ggn(model.eval(), nn.CrossEntropyLoss(), _ce_pair())


def test_an_op_vmap_cannot_batch_gets_a_clear_error():
    """An eval-mode RReLU: torch's vmap has no rule for rrelu_with_noise (raw RuntimeError)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.Linear(4, 2)).to(DT).eval()
    with pytest.raises(ck.CurvkitValueError, match=r"vmap does not support.*LeakyReLU"):
        ck.ef(model, nn.CrossEntropyLoss(), _ce_pair())
