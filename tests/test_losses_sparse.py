"""Sampled sparse teacher targets (issue 28.2) by exact expectation over a 7-token vocabulary:
every outcome of the teacher's N draws enumerated with its probability, the estimator's value
and gradient averaged through the same functions, against the full forward KL and its
gradient. Unbiased from the teacher's own distribution and from a tempered proposal; top-k
renormalisation, at the same payload, is biased. The draw itself against its distribution."""
import itertools
import math

import pytest
import torch

from rayskd.losses import distribution_divergence
from rayskd.losses.sparse import (importance_weights, proposal, sample_ids, sparse_forward_kl,
                                  topk_renormalised_forward_kl)

torch.set_default_dtype(torch.float64)
V = 7


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (1.5 * torch.randn(V, generator=g)).requires_grad_(True)
    te = 2.0 * torch.randn(V, generator=g)
    return s, te, torch.log_softmax(te, -1)


def exact_expectation(s, teacher_logp, log_r, n):
    """E over N draws from r of (estimate, gradient in the student's logits), enumerated."""
    value, grad = 0.0, torch.zeros(V)
    r = log_r.exp()
    for draw in itertools.product(range(V), repeat=n):
        ids = torch.tensor(draw)
        prob = float(torch.prod(r[ids]))
        est = sparse_forward_kl(torch.log_softmax(s, -1), ids, importance_weights(teacher_logp, log_r, ids),
                                teacher_logp[ids])
        value += prob * float(est.detach())
        grad += prob * torch.autograd.grad(est, s)[0]
    return value, grad


@pytest.mark.parametrize("temperature,n", [(1.0, 1), (1.0, 3), (1.7, 2), (0.6, 2)])
def test_unbiased_for_the_forward_kl_and_its_gradient(temperature, n):
    s, te, teacher_logp = setup()
    full = distribution_divergence(s, te, "forward_kl")
    full_grad = torch.autograd.grad(full, s)[0]
    value, grad = exact_expectation(s, teacher_logp, proposal(teacher_logp, temperature), n)
    assert abs(value - float(full.detach())) < 1e-12, (value, float(full))
    assert torch.allclose(grad, full_grad, atol=1e-12), (grad, full_grad)


def test_top_k_renormalisation_is_biased_at_the_same_payload():
    s, te, teacher_logp = setup()
    full_grad = torch.autograd.grad(distribution_divergence(s, te, "forward_kl"), s)[0]
    # k = 2 ids per position against N = 2 sampled ids
    topk_grad = torch.autograd.grad(topk_renormalised_forward_kl(torch.log_softmax(s, -1), teacher_logp, 2), s)[0]
    _, sampled_grad = exact_expectation(s, teacher_logp, proposal(teacher_logp), 2)
    bias = float((topk_grad - full_grad).norm() / full_grad.norm())
    assert bias > 0.05, bias  # 0.26 on this example (top-2 holds 85% of the mass)
    assert float((sampled_grad - full_grad).norm()) < 1e-12


def test_weights_and_the_draw():
    _, _, teacher_logp = setup(1)
    log_r = proposal(teacher_logp)
    ids = sample_ids(log_r.expand(3, V), 4, torch.Generator().manual_seed(0))
    assert ids.shape == (3, 4)
    assert torch.allclose(importance_weights(teacher_logp.expand(3, V), log_r.expand(3, V), ids),
                          torch.full((3, 4), 0.25))  # the teacher's own distribution: 1/N each
    tempered = proposal(teacher_logp, 2.0)
    draws = sample_ids(tempered, 200_000, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=V) / draws.numel()
    r = tempered.exp()
    sigma = torch.sqrt(r * (1 - r) / draws.numel())
    assert bool((freq - r).abs().le(5 * sigma + 1e-12).all()), (freq, r)
    with pytest.raises(ValueError, match="temperature"):
        proposal(teacher_logp, 0.0)
