"""The off-policy corrections, by exact expectation over a small vocabulary (float64).

Samples come from the engine's policy mu (stale weights with algorithm.max_staleness >= 1, and
the engine/learner mismatch always); the learner's objective must give, in expectation over
mu, the gradient it would give on the student's own samples (pi_theta), for every combination
of max_staleness and tis_cap, for the GRPO term and for every teacher estimator, when the
ratios pi_theta / mu are inside the clip and under the caps. Each expectation is the exact sum
over tokens a of mu(a) x the gradient of the loss at a, through `learner.micro_batch_loss`,
the code every update runs (one sampled token per sequence: the per-token correction is then
the whole correction; docs/algorithms.md says why longer prefixes are not corrected)."""
import pytest
import torch

from rayskd.batch import LearnerShare
from rayskd.config import AlgorithmConfig, KDConfig
from rayskd.learner import MicroBatch, micro_batch_loss
from rayskd.losses import (
    TEACHER_ESTIMATORS, distribution_divergence, importance_weights, kd_sequence_mask, solved, teacher_denominator,
)
from rayskd.losses.divergences import logsumexp_outside

torch.set_default_dtype(torch.float64)
V, K = 7, 3  # vocabulary, the teacher's top-k
COMBINATIONS = [(staleness, tis_cap) for staleness in (0, 1) for tis_cap in (0.0, 2.0)]


def case(seed: int):
    """Student logits z, a sampler mu with pi/mu inside [0.93, 1.15] (inside the clip of 0.2 and
    under every cap), a teacher, and a fixed advantage per token."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(V, generator=g)
    pi = torch.softmax(z, -1)
    while True:
        mu = pi / (0.93 + 0.22 * torch.rand(V, generator=g))
        mu = mu / mu.sum()
        ratio = pi / mu
        if ratio.min() >= 0.93 and ratio.max() <= 1.15:
            break
    teacher = torch.log_softmax(torch.randn(V, generator=g), -1)
    advantages = torch.randn(V, generator=g)
    return z, mu.log(), teacher, advantages


def teacher_topk(teacher: torch.Tensor):
    vals, ids = teacher.topk(K)
    return torch.cat([vals, logsumexp_outside(teacher, ids)]), ids


def per_token_gradients(z, sampler_logp, teacher, advantages, algo: AlgorithmConfig, kd_coef: float) -> torch.Tensor:
    """[V, V]: row a is the gradient (w.r.t. the student's logits) of the learner's loss on a
    batch of one sequence whose one token is a, sampled with log-prob sampler_logp[a]."""
    rows = []
    for a in range(V):
        zz = z.clone().requires_grad_(True)
        logp_all = torch.log_softmax(zz, -1)
        divergence = None
        if TEACHER_ESTIMATORS[algo.kd.estimator].distribution:
            vals, ids = teacher_topk(teacher)
            divergence = distribution_divergence(zz, vals, algo.kd.divergence, topk_ids=ids).reshape(1, 1)
        mb = MicroBatch(fields=(), mask_NR=torch.ones(1, 1), advantages_N=advantages[a:a + 1],
                        sampler_logp_NR=sampler_logp[a].reshape(1, 1), teacher_logp_NR=teacher[a].reshape(1, 1),
                        kd_mask_N=torch.ones(1))
        share = LearnerShare(kd_coef=kd_coef, rehearsal_start=0, pg_denominator=None, kd_denominator=None,
                             kd_mask=[1.0], shards=[], scores=[])
        loss, _ = micro_batch_loss(logp_all[a].reshape(1, 1), None, divergence, mb, share, algo, 1)
        rows.append(torch.autograd.grad(loss, zz)[0])
    return torch.stack(rows)


def expected_gradient(z, sampler_logp, teacher, advantages, algo, kd_coef) -> torch.Tensor:
    """sum_a mu(a) grad L(a): the exact expectation over the sampler's tokens."""
    rows = per_token_gradients(z, sampler_logp, teacher, advantages, algo, kd_coef)
    return (sampler_logp.exp()[:, None] * rows).sum(0)


def algorithm(staleness: int, tis_cap: float, estimator: str, pg_coef: float) -> AlgorithmConfig:
    divergence = "forward_kl" if estimator in ("topk", "sparse") else "reverse_kl"
    return AlgorithmConfig(max_staleness=staleness, tis_cap=tis_cap, pg_coef=pg_coef, clip_low=0.2, clip_high=0.2,
                           kd=KDConfig(estimator=estimator, divergence=divergence, is_cap=2.0))


def exact_on_policy_gradient(z, teacher, advantages, estimator: str, pg_coef: float, kd_coef: float) -> torch.Tensor:
    """The gradient the objective's terms stand for, from their definitions: GRPO's
    -E_pi[A grad log pi], and the teacher estimator's divergence: reverse KL for k2 and
    k1_reward, forward KL for k3's gradient, the top-k + tail forward KL at the position (sparse's
    too: a per-position divergence is all the weighting sees; its draws' unbiasedness is
    test_losses_sparse.py's); MiniLLM's
    on a one-token response is its single-step part, the reverse KL (top-k + tail for minillm_topk;
    its long part, across tokens, in test_losses_minillm.py)."""
    zz = z.clone().requires_grad_(True)
    logq = torch.log_softmax(zz, -1)
    q = logq.exp()
    pg = -(q.detach() * advantages * logq).sum()
    if estimator in ("k2", "k1_reward", "minillm"):
        kd = (q * (logq - teacher)).sum()
    elif estimator == "k3":
        kd = (teacher.exp() * (teacher - logq)).sum()
    else:
        vals, ids = teacher_topk(teacher)
        kd = distribution_divergence(zz, vals, "forward_kl" if estimator in ("topk", "sparse") else "reverse_kl",
                                     topk_ids=ids)
    return torch.autograd.grad(pg_coef * pg + kd_coef * kd, zz)[0]


@pytest.mark.parametrize("estimator", list(TEACHER_ESTIMATORS))
@pytest.mark.parametrize("staleness,tis_cap", COMBINATIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_combination_is_unbiased_for_every_term(estimator, staleness, tis_cap, seed):
    """Samples from mu, in expectation, train as the student's own samples would: the GRPO term
    alone, the teacher term alone, and the two together (KDRL). This failed on the code before
    the fix for staleness 1 with TIS (the ratio applied twice: GRPO off by 7e-2 relative)."""
    z, mu_logp, teacher, adv = case(seed)
    pi_logp = torch.log_softmax(z, -1)
    for pg_coef, kd_coef in ((1.0, 0.0), (0.0, 0.7), (1.0, 0.7)):
        algo = algorithm(staleness, tis_cap, estimator, pg_coef)
        off = expected_gradient(z, mu_logp, teacher, adv, algo, kd_coef)
        on = expected_gradient(z, pi_logp, teacher, adv, algo, kd_coef)
        torch.testing.assert_close(off, on, rtol=1e-12, atol=1e-14)
        exact = exact_on_policy_gradient(z, teacher, adv, estimator, pg_coef, kd_coef)
        torch.testing.assert_close(on, exact, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("staleness,tis_cap", COMBINATIONS)
def test_distribution_estimator_takes_no_per_token_weight(staleness, tis_cap):
    """The top-k divergence at a position is exact whatever token was sampled there: every
    sampled token gives the same gradient (variance 0), where a weight pi/mu of the sampled
    token would add variance and correct nothing."""
    z, mu_logp, teacher, adv = case(3)
    rows = per_token_gradients(z, mu_logp, teacher, adv, algorithm(staleness, tis_cap, "topk", 0.0), 1.0)
    torch.testing.assert_close(rows, rows[:1].expand_as(rows), rtol=0, atol=1e-15)


def test_the_teacher_weight_is_truncated():
    """The review's token: mu = 1.2e-4, pi_theta = 0.9. Untruncated, its weight was 7,332 and its
    k2 gradient 21,263 (7,500 and 21,700 here); truncated at kd.is_cap it is is_cap times the on-policy one."""
    logp, mu = torch.tensor([[0.9]]).log(), torch.tensor([[1.2e-4]]).log()
    w = importance_weights(logp, mu, tis_cap=0.0, teacher_cap=2.0)
    assert w.teacher_weight.item() == 2.0
    assert importance_weights(logp, mu, tis_cap=0.0, teacher_cap=1e9).teacher_weight.item() == pytest.approx(7500.0)
    teacher = torch.tensor([[0.05]]).log()
    lp = logp.clone().requires_grad_(True)
    mb = MicroBatch(fields=(), mask_NR=torch.ones(1, 1), advantages_N=torch.zeros(1), sampler_logp_NR=mu,
                    teacher_logp_NR=teacher, kd_mask_N=torch.ones(1))
    share = LearnerShare(kd_coef=1.0, rehearsal_start=0, pg_denominator=None, kd_denominator=None, kd_mask=[1.0],
                         shards=[], scores=[])
    loss, metrics = micro_batch_loss(lp, None, None, mb, share, algorithm(1, 0.0, "k2", 0.0), 1)
    (grad,) = torch.autograd.grad(loss, lp)
    on_policy = (logp - teacher).item()  # k2's gradient with weight 1: delta = 2.89
    assert grad.item() == pytest.approx(2.0 * on_policy)
    assert metrics.kd_weight_sum == 2.0


def test_grpo_weights_follow_one_rule_whatever_the_staleness():
    """tis_cap = 0: the clipped ratio is taken against mu, no TIS weight; tis_cap > 0: against
    the learner's own log-probs, times sg(min(pi/mu, cap)). Neither depends on staleness."""
    logp, mu = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.1, -0.5]])
    clipped = importance_weights(logp, mu, tis_cap=0.0, teacher_cap=2.0)
    assert torch.equal(clipped.pg_behaviour_logp, mu) and clipped.pg_weight is None
    tis = importance_weights(logp, mu, tis_cap=2.0, teacher_cap=2.0)
    assert torch.equal(tis.pg_behaviour_logp, logp)
    torch.testing.assert_close(tis.pg_weight, torch.exp(logp - mu).clamp(max=2.0))


def test_masked_norm_counts_selected_responses_under_every_aggregation():
    """kd.norm=masked divides by what the KD mask selects under every aggregation; under
    seq_mean_token_sum_norm it counted every response, as norm=all does (the review's point 5)."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    seq = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert teacher_denominator(mask, seq, "masked", "token_mean") == 5.0
    assert teacher_denominator(mask, seq, "all", "token_mean") == 6.0
    assert teacher_denominator(mask, seq, "masked", "seq_mean_token_mean") == 2.0  # non-empty and selected
    assert teacher_denominator(mask, seq, "all", "seq_mean_token_mean") == 3.0
    assert teacher_denominator(mask, seq, "masked", "seq_mean_token_sum_norm", 5) == 3 * 5
    assert teacher_denominator(mask, seq, "all", "seq_mean_token_sum_norm", 5) == 4 * 5


def test_one_definition_of_a_solved_response():
    """A response solves its problem at reward >= 1 (full credit), for the KD mask as for
    pass@k: a 0.5 reward is unsolved for both."""
    from rayskd.evaluation import EvalRows, summarize_eval

    rewards = torch.tensor([0.5, 1.0, 0.0, 0.5])
    assert solved(rewards).tolist() == [False, True, False, False]
    assert kd_sequence_mask(rewards, 2, "incorrect_only").tolist() == [1.0, 0.0, 1.0, 1.0]
    assert kd_sequence_mask(rewards, 2, "group_unsolved").tolist() == [0.0, 0.0, 1.0, 1.0]
    assert summarize_eval(EvalRows(greedy_reward=[0.5, 1.0], greedy_len=[1, 1]), ())["greedy_accuracy"] == 0.5
