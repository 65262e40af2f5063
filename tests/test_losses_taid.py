"""TAID (issue 28.3) against float64 references: the intermediate distribution and the loss by
explicit sums over a small vocabulary, the gradient against its closed form Q - p_t (a p_t
that let the gradient through the student's side would fail it), the ends t = 0 and t = 1,
and the adaptive schedule step by step."""
import math

import pytest
import torch

from rayskd.losses import distribution_divergence
from rayskd.losses.taid import TaidState, taid, taid_target

torch.set_default_dtype(torch.float64)
V = 9


def logits(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(n, V, generator=g)).requires_grad_(True), 2 * torch.randn(n, V, generator=g)


def naive(p, q, t):
    """p_t and KL(p_t || q) by explicit sums (1-D float64 probabilities)."""
    w = [q[i] ** (1 - t) * p[i] ** t for i in range(V)]
    z = sum(w)
    w = [x / z for x in w]
    return torch.tensor(w), sum(w[i] * (math.log(w[i]) - math.log(q[i])) for i in range(V))


@pytest.mark.parametrize("t", [0.0, 0.4, 0.77, 1.0])
def test_value_and_gradient_against_explicit_sums(t):
    s, te = logits(int(t * 100))
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(te, -1)
    loss = taid(log_p, log_q, t)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    for row in range(s.shape[0]):
        p, q = log_p[row].exp().detach(), log_q[row].exp().detach()
        w, value = naive(p.tolist(), q.tolist(), t)
        assert torch.allclose(taid_target(log_p[row], log_q[row], t).exp(), w, atol=1e-14)
        assert abs(float(loss[row].detach()) - float(value)) < 1e-13
        # p_t carries no gradient: d KL(p_t || softmax(z)) / dz = q - p_t
        assert torch.allclose(grad[row], q - w, atol=1e-13), (grad[row], q - w)


def test_the_ends_are_forward_kl_and_nothing():
    s, te = logits(7)
    log_p = torch.log_softmax(te, -1)

    def ours(t):
        return taid(log_p, torch.log_softmax(s, -1), t)

    forward = distribution_divergence(s, te, "forward_kl")
    assert torch.allclose(ours(1.0), forward, atol=1e-13)
    g1 = torch.autograd.grad(ours(1.0).sum(), s)[0]
    assert torch.allclose(g1, torch.autograd.grad(forward.sum(), s)[0], atol=1e-13)
    assert float(ours(0.0).detach().abs().max()) < 1e-13
    assert float(torch.autograd.grad(ours(0.0).sum(), s)[0].abs().max()) < 1e-13
    with pytest.raises(ValueError, match="t must be in"):
        ours(1.5)


def test_the_adaptive_schedule_step_by_step():
    state = TaidState(t=0.4)
    state = state.update(2.0, 1, 100, t_start=0.4)  # the first step records its loss only
    assert state == TaidState(t=0.4, prev_loss=2.0, momentum=0.0)
    # a falling loss: m = 0.01 * (2.0 - 1.5) / 2.0 = 0.0025; the floor is 0.4 + 0.6 * 2/100 = 0.412;
    # the growth 0.4 + 5e-4 * sigmoid(0.0025) * 0.6 = 0.40015 is below it: t = the floor
    state = state.update(1.5, 2, 100, t_start=0.4)
    assert state.momentum == pytest.approx(0.0025, abs=1e-15)
    assert state.t == pytest.approx(0.412, abs=1e-15) and state.prev_loss == 1.5
    # a fast learner (alpha 0.5): the growth 0.412 + 0.5 * sigmoid(m) * 0.588 passes the floor
    fast = state.update(0.5, 3, 100, t_start=0.4, alpha=0.5)
    m = 0.99 * 0.0025 + 0.01 * (1.5 - 0.5) / 1.5
    assert fast.momentum == pytest.approx(m, abs=1e-15)
    assert fast.t == pytest.approx(0.412 + 0.5 / (1 + math.exp(-m)) * 0.588, abs=1e-15)
    # t never falls (a rising loss), never passes t_end, and reaches it by the last step
    t_prev, s = fast.t, fast
    for step in range(4, 101):
        s = s.update(s.prev_loss * 1.1, step, 100, t_start=0.4, t_end=0.9, alpha=0.5)
        assert t_prev <= s.t <= 0.9
        t_prev = s.t
    assert s.t == 0.9
