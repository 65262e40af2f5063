"""Sampled sparse teacher targets (issue 28.2) by exact expectation over a 7-token vocabulary:
every outcome of the teacher's N draws enumerated with its probability, the estimator's value
and gradient averaged through the same functions, against the full forward KL and its
gradient. Unbiased from the teacher's own distribution and from a tempered proposal; top-k
renormalisation, at the same payload, is biased. The draw itself against its distribution; the
payload's hidden-state functions (the teacher's draw, the learner's estimate in its forward)
against the plain ones, and each draw a function of its sequence alone."""
import itertools
import math

import pytest
import torch

from rayskd.losses import distribution_divergence
from rayskd.losses.sparse import (hidden_sampled_forward_kl, hidden_sampled_logprobs, importance_weights,
                                  inverse_cdf_ids, proposal, row_uniforms, sparse_forward_kl,
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


def test_uniform_weights_under_a_tempered_proposal_are_biased():
    """The plausible mistake the unbiasedness test catches: weights 1/N (right only when r is
    the teacher's own distribution) with a tempered proposal."""
    s, te, teacher_logp = setup()
    full_grad = torch.autograd.grad(distribution_divergence(s, te, "forward_kl"), s)[0]
    log_r = proposal(teacher_logp, 1.7)
    grad = torch.zeros(V)
    for draw in itertools.product(range(V), repeat=2):
        ids = torch.tensor(draw)
        est = sparse_forward_kl(torch.log_softmax(s, -1), ids, torch.full((2,), 0.5), teacher_logp[ids])
        grad += float(torch.prod(log_r.exp()[ids])) * torch.autograd.grad(est, s)[0]
    assert float((grad - full_grad).norm() / full_grad.norm()) > 0.05


def test_weights_and_the_draw():
    _, _, teacher_logp = setup(1)
    log_r = proposal(teacher_logp)
    ids = inverse_cdf_ids(log_r.expand(3, V), torch.rand(3, 4, generator=torch.Generator().manual_seed(0)))
    assert ids.shape == (3, 4)
    assert torch.allclose(importance_weights(teacher_logp.expand(3, V), log_r.expand(3, V), ids),
                          torch.full((3, 4), 0.25))  # the teacher's own distribution: 1/N each
    tempered = proposal(teacher_logp, 2.0)
    u = torch.rand(1, 200_000, generator=torch.Generator().manual_seed(1))
    draws = inverse_cdf_ids(tempered[None], u)
    freq = torch.bincount(draws.flatten(), minlength=V) / draws.numel()
    r = tempered.exp()
    sigma = torch.sqrt(r * (1 - r) / draws.numel())
    assert bool((freq - r).abs().le(5 * sigma + 1e-12).all()), (freq, r)
    with pytest.raises(ValueError, match="temperature"):
        proposal(teacher_logp, 0.0)


def hidden_setup(seed=2, rows=2, width=3, hidden=5, vocab=V, padded=3):
    """Hidden states and an LM head with `padded` rows past the tokenizer's `vocab` (as real
    models pad theirs), float64."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, width, hidden, generator=g).requires_grad_(True)
    head = torch.randn(vocab + padded, hidden, generator=g).requires_grad_(True)
    return h, head


def test_the_teachers_draw_from_hidden_states_and_the_learners_estimate():
    """hidden_sampled_logprobs (teacher) and hidden_sampled_forward_kl (learner), chunked over
    positions, against log_softmax of the full logits and sparse_forward_kl on them: ids, log-probs,
    weights, and the estimate's value and gradients in the hidden states and the head."""
    h, head = hidden_setup()
    t_h, t_head = hidden_setup(seed=3)
    sampled = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(4))
    u = row_uniforms([[1, 2, 3], [4, 5]], [3, 2], 3, 4)
    temperature, proposal_t = 0.9, 1.5
    lp, ids, lp_ids, logw = hidden_sampled_logprobs(t_h.detach(), t_head.detach(), sampled, u, temperature, proposal_t,
                                                    chunk_size=2, vocab_size=V)
    full_t = torch.log_softmax((t_h @ t_head[:V].t()).detach() / temperature, -1)
    log_r = proposal(full_t, proposal_t)
    assert torch.allclose(lp, full_t.gather(-1, sampled[..., None]).squeeze(-1), atol=1e-13)
    assert torch.equal(ids, inverse_cdf_ids(log_r.reshape(-1, V), u.reshape(-1, 4)).reshape(2, 3, 4))
    assert bool((ids < V).all())  # never a padded row
    assert torch.allclose(lp_ids, full_t.gather(-1, ids), atol=1e-13)
    assert torch.allclose(logw.exp(), importance_weights(full_t, log_r, ids), atol=1e-13)

    est = hidden_sampled_forward_kl(h, head, ids, lp_ids, logw, temperature=temperature, chunk_size=2, vocab_size=V)
    ref = sparse_forward_kl(torch.log_softmax(h @ head[:V].t() / temperature, -1), ids, logw.exp(), lp_ids)
    assert torch.allclose(est, ref, atol=1e-13)
    g_est = torch.autograd.grad(est.sum(), (h, head))
    g_ref = torch.autograd.grad(ref.sum(), (h, head))
    for a, b in zip(g_est, g_ref):
        assert torch.allclose(a, b, atol=1e-12)
    assert float(g_est[1][V:].abs().max()) == 0.0  # the padded rows get no gradient


def test_a_draw_depends_on_its_sequence_alone():
    """The same sequence draws the same ids in any batch, at any padded width, in any chunking:
    a resumed run, or one re-split over other teacher workers, trains on the same targets."""
    rows = [[0, 7, 10, 4, 5], [0, 7, 1, 2], [3, 3, 3]]
    a = row_uniforms(rows, [4, 3, 2], 6, 3)
    b = row_uniforms(rows[::-1], [2, 3, 4], 4, 3)
    assert torch.equal(a[0, :4], b[2, :4]) and torch.equal(a[1, :3], b[1, :3]) and torch.equal(a[2, :2], b[0, :2])
    assert not torch.equal(a[0, :2], a[2, :2])  # different sequences, different draws
    assert float(a[0, 4:].abs().max()) == 0.0  # past a response's length: nothing drawn
    h, head = hidden_setup(rows=3, width=4)
    sampled = torch.zeros(3, 4, dtype=torch.long)
    u = row_uniforms(rows, [4, 3, 2], 4, 3)
    one = hidden_sampled_logprobs(h.detach(), head.detach(), sampled, u, chunk_size=1, vocab_size=V)
    many = hidden_sampled_logprobs(h.detach(), head.detach(), sampled, u, chunk_size=5, vocab_size=V)
    assert torch.equal(one[1], many[1])  # the ids; the values to rounding (a chunk's matmul)
    assert all(torch.allclose(x, y, atol=1e-13) for x, y in zip(one, many))
