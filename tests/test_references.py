"""Self-checks of the test references and of the case table (no curvkit involved).

The references in ``helpers.py`` use ``torch.func`` (vectorised). Here they are compared with
plain, loop-based ``torch.autograd`` so that a ``torch.func`` bug cannot silently become "truth"
(one such bug exists in torch 2.13: ``torch.func.hessian`` of anything with ``F.layer_norm``).
"""

from __future__ import annotations

import functools

import pytest
import torch
from cases import CASES, Case
from helpers import (
    FlatModel,
    assert_close,
    concat_batches,
    map_tensors,
    num_samples,
    per_sample_losses,
    ref_ef,
    ref_ggn,
    ref_hessian,
    total_loss_fn,
)


@functools.cache
def case(name: str) -> Case:
    return CASES[name]()


def _samples(c: Case):
    x, y = concat_batches(c.batches)
    for i in range(num_samples(x)):
        yield (
            map_tensors(lambda t, i=i: t[i : i + 1], x),
            map_tensors(lambda t, i=i: t[i : i + 1], y),
        )


def loop_ggn_ef(c: Case) -> tuple[torch.Tensor, torch.Tensor]:
    fm = FlatModel(c.model, c.params, c.output_fn)
    ggn = torch.zeros(fm.num_params, fm.num_params, dtype=torch.float64)
    ef = torch.zeros_like(ggn)
    for x_i, y_i in _samples(c):
        out = fm(fm.theta0, x_i).detach()
        jac = torch.autograd.functional.jacobian(
            lambda th, x_i=x_i: fm(th, x_i).reshape(-1), fm.theta0
        )
        h_out = torch.autograd.functional.hessian(
            lambda o, y_i=y_i, shape=out.shape: c.sample_loss(o.reshape(shape), y_i),
            out.reshape(-1),
        )
        ggn += jac.T @ h_out @ jac
        g = torch.autograd.functional.jacobian(
            lambda th, x_i=x_i, y_i=y_i: c.sample_loss(fm(th, x_i), y_i), fm.theta0
        )
        ef += torch.outer(g, g)
    return c.scale * ggn, c.scale * ef


@pytest.mark.parametrize("name", list(CASES))
def test_case_scale_and_sample_loss_match_total_loss(name):
    """``loss_fn(concatenated batch) == s * sum_n l_n``: the table's ``scale``/``sample_loss``."""
    c = case(name)
    fm = FlatModel(c.model, None, c.output_fn)
    x, y = concat_batches(c.batches)
    with torch.no_grad():
        total = c.loss_fn(fm(fm.theta0, x), y)
    per_sample = per_sample_losses(c.model, c.sample_loss, c.batches, output_fn=c.output_fn)
    assert_close(c.scale * per_sample.sum(), total, rtol=1e-12, what=name)


@pytest.mark.parametrize("name", list(CASES))
def test_references_match_plain_autograd(name):
    c = case(name)
    total, theta0 = total_loss_fn(c.model, c.loss_fn, c.batches, c.params, output_fn=c.output_fn)
    h_plain = torch.autograd.functional.hessian(total, theta0)
    assert_close(
        ref_hessian(c.model, c.loss_fn, c.batches, c.params, output_fn=c.output_fn),
        h_plain,
        rtol=1e-12,
        what=f"{name} hessian",
    )
    ggn, ef = loop_ggn_ef(c)
    args = (c.model, c.sample_loss, c.scale, c.batches, c.params)
    assert_close(ref_ggn(*args, output_fn=c.output_fn), ggn, rtol=1e-12, what=f"{name} ggn")
    assert_close(ref_ef(*args, output_fn=c.output_fn), ef, rtol=1e-12, what=f"{name} ef")


def test_ggn_equals_hessian_when_model_is_linear_in_the_parameters():
    c = case("frozen_first_layer_ce")  # only the last Linear trains: outputs linear in theta
    h = ref_hessian(c.model, c.loss_fn, c.batches, c.params)
    assert_close(ref_ggn(c.model, c.sample_loss, c.scale, c.batches, c.params), h, rtol=1e-12)
