"""MiniLLM's teacher term (issue 28.5) against the exact sequence-level reverse KL, in float64:
a tabular student and teacher over 3 tokens (token 0 ends a response) and responses of at most
3 tokens, so that every response and its probability can be listed. The expected gradient of
the estimator's values (the sum over every response of Q(y) x the gradient of its values) must
equal the gradient of KL(Q(y|x) || P(y|x)), and their expected sum its value."""
import itertools

import pytest
import torch

from rayskd.losses import TEACHER_ESTIMATORS, DivergenceParams, TeacherSignal
from rayskd.losses.divergences import reverse_kl
from rayskd.losses.minillm import future_cost

V, EOS, T = 3, 0, 3


def responses() -> list[tuple[int, ...]]:
    """Every complete response: ends with EOS, or stops at T tokens."""
    out = []
    for n in range(1, T + 1):
        for y in itertools.product(range(V), repeat=n):
            if EOS not in y[:-1] and (y[-1] == EOS or n == T):
                out.append(y)
    return out


PREFIXES = [p for n in range(T) for p in itertools.product(range(1, V), repeat=n)]  # no EOS inside


def table(seed: int, requires_grad: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64) * 1.5).requires_grad_(requires_grad)


def batch(theta: torch.Tensor, phi: torch.Tensor):
    """Per response [N, T]: the student's log-prob of each token (with gradient), the teacher's,
    the mask, and at each position both full next-token log-distributions [N, T, V]."""
    ys = responses()
    index = {p: i for i, p in enumerate(PREFIXES)}
    rows = [[index[y[:t]] if t < len(y) else 0 for t in range(T)] for y in ys]
    rows = torch.tensor(rows)
    tokens = torch.tensor([list(y) + [EOS] * (T - len(y)) for y in ys])
    mask = torch.tensor([[1.0 if t < len(y) else 0.0 for t in range(T)] for y in ys], dtype=torch.float64)
    log_q = torch.log_softmax(theta[rows], -1)
    log_p = torch.log_softmax(phi[rows], -1)
    gather = lambda lp: lp.gather(-1, tokens[..., None])[..., 0] * mask  # noqa: E731
    return gather(log_q), gather(log_p).detach(), mask, log_q, log_p.detach()


def sequence_reverse_kl(theta, phi) -> torch.Tensor:
    logq, logp, mask, _, _ = batch(theta, phi)
    seq_q, seq_p = logq.sum(-1), logp.sum(-1)
    return (seq_q.exp() * (seq_q - seq_p)).sum()


def expected(theta, phi, estimator: str, gamma: float = 1.0, length_norm: bool = False, long_from_t: bool = False):
    """(sum over responses of sg(Q(y)) x sum_t values_t, its gradient in theta), through the
    estimator table the learner uses."""
    theta = theta.detach().clone().requires_grad_(True)
    logq, logp, mask, log_q_full, log_p_full = batch(theta, phi)
    single = reverse_kl(log_p_full, log_q_full, DivergenceParams()) * mask
    signal = TeacherSignal(logp, single if estimator == "minillm_topk" else None, mask_NR=mask,
                           weight_NR=torch.ones_like(mask), gamma=gamma, length_norm=length_norm)
    values = TEACHER_ESTIMATORS[estimator].values(logq, signal)
    if long_from_t:  # a plausible mistake: the reward-to-go of the long part includes the token's own log-ratio
        values = values + (logq - logp).detach() * (logq - logq.detach())
    prob = logq.sum(-1).exp().detach()
    total = (prob * (values * mask).sum(-1)).sum()
    (grad,) = torch.autograd.grad(total, theta)
    return total.detach(), grad


@pytest.mark.parametrize("estimator", ["minillm", "minillm_topk"])
def test_the_expected_gradient_is_the_sequence_reverse_kl_gradient(estimator):
    theta, phi = table(0, True), table(1, False)
    assert abs(float(batch(theta, phi)[0].sum(-1).detach().exp().sum()) - 1.0) < 1e-12  # every response listed
    kl = sequence_reverse_kl(theta, phi)
    (exact,) = torch.autograd.grad(kl, theta)
    value, grad = expected(theta, phi, estimator)
    assert abs(float(value) - float(kl)) < 1e-12  # the values estimate the sequence KL as the sum of per-token KLs
    assert float((grad - exact).abs().max()) < 1e-12, float((grad - exact).abs().max())
    # the planted mistake (the long part's reward-to-go from t, not t + 1) counts the
    # single-step part twice: off by the per-token term's whole gradient
    _, wrong = expected(theta, phi, estimator, long_from_t=True)
    assert float((wrong - exact).abs().max()) > 1e-2
    # a discount (here 0: only the next token's log-ratio) trades that exactness for variance
    _, myopic = expected(theta, phi, estimator, gamma=0.0)
    assert float((myopic - exact).abs().max()) > 1e-2


def test_future_cost_is_the_discounted_sum_after_each_token_within_each_response():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(3, 5, generator=g, dtype=torch.float64)
    lengths = [5, 2, 0]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(5)] for n in lengths], dtype=torch.float64)
    for gamma, norm in ((1.0, False), (0.95, False), (0.9, True), (0.0, True)):
        got = future_cost(delta, mask, gamma, norm)
        for b, n in enumerate(lengths):
            for t in range(5):
                terms = [gamma ** (u - t - 1) * float(delta[b, u]) for u in range(t + 1, n)]
                want = (sum(terms) / max(len(terms), 1) if norm else sum(terms)) if t < n else 0.0
                assert abs(float(got[b, t]) - want) < 1e-12, (gamma, norm, b, t)
    with pytest.raises(ValueError, match="gamma"):
        future_cost(delta, mask, 1.5, False)


def test_the_long_part_is_weighted_and_the_exact_single_step_part_is_not():
    """Off the student's policy: minillm_topk multiplies only its long part by the sampled
    token's importance weight (the per-position divergence depends on the prefix only), and
    minillm is weighted as a whole by the caller (TeacherEstimator.sampled)."""
    theta, phi = table(0, True), table(1, False)
    logq, logp, mask, log_q_full, log_p_full = batch(theta, phi)
    single = reverse_kl(log_p_full, log_q_full, DivergenceParams()) * mask
    weight = torch.full_like(mask, 0.5)
    signal = TeacherSignal(logp, single, mask_NR=mask, weight_NR=weight, gamma=1.0, length_norm=False)
    unweighted = TeacherSignal(logp, single, mask_NR=mask, weight_NR=torch.ones_like(mask), gamma=1.0,
                               length_norm=False)
    half = TEACHER_ESTIMATORS["minillm_topk"].values(logq, signal)
    one = TEACHER_ESTIMATORS["minillm_topk"].values(logq, unweighted)
    long_half = torch.autograd.grad((half - single).sum(), theta, retain_graph=True)[0]
    long_one = torch.autograd.grad((one - single).sum(), theta, retain_graph=True)[0]
    assert torch.allclose(long_half, 0.5 * long_one, atol=1e-14, rtol=0)
    assert torch.equal(half.detach(), single.detach())  # the long part adds no value
    assert TEACHER_ESTIMATORS["minillm"].sampled and not TEACHER_ESTIMATORS["minillm_topk"].sampled
