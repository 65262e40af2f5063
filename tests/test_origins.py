"""Issue 29.1 and 29.3, sequences of other origins (docs/algorithms.md, "Sequences of other
origins"), in float64: with GKD's dataset responses beside the student's samples, the GRPO term
sees the student's samples only, with their importance weights, over the batch's normaliser of
their tokens, while the teacher term covers every sequence; nothing read from a dataset row's
sampler log-probs (there is no sampler) reaches the loss or the metrics; per-origin divergences
add up to the step's; the per-prompt choice is the same on a resume."""
import pytest
import torch

from rayskd.batch import DATASET, STUDENT, LearnerShare, RolloutShard, TeacherScores, gkd_origins, pad_rows, summarize
from rayskd.config import AlgorithmConfig, KDConfig, LearnerConfig
from rayskd.learner import learner_shares, micro_batch_loss, share_micro_batches
from rayskd.losses import group_advantages, importance_weights, policy_gradient_term, teacher_term

G, R = 2, 3
ALGO = AlgorithmConfig(kd=KDConfig(estimator="topk", divergence="forward_kl"), max_staleness=1)


def shard(dataset_logp=0.0):
    """Two prompts of G sequences: prompt 0 the student's samples (stale: their sampler's
    log-probs differ from the learner's), prompt 1 the dataset's response, G copies."""
    g = torch.Generator().manual_seed(0)
    sampler = -torch.rand(2 * G, R, generator=g, dtype=torch.float64) - 0.5
    sampler[G:] = dataset_logp
    lengths = torch.tensor([3, 2, 3, 3])
    return RolloutShard(pad_rows([[1, 2]] * 2 * G), torch.tensor([2] * 2 * G), pad_rows([[3, 4, 5]] * 2 * G), lengths,
                        sampler, torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.zeros(2 * G, dtype=torch.bool),
                        torch.tensor([0, 0, 1, 1]), G, 0, origin_N=torch.tensor([STUDENT] * G + [DATASET] * G,
                                                                                  dtype=torch.int8))


def loss_of(s, logp, divergence):
    (share,) = learner_shares([summarize(s)], [s], [TeacherScores(logp_NR=torch.full((2 * G, R), -1.0))], 1, ALGO, R,
                              1.0, 0)
    (mb,) = share_micro_batches([s], share.scores, share, ALGO, LearnerConfig(micro_batch_size=64), "cpu")
    return share, micro_batch_loss(logp, None, divergence, mb, share, ALGO, R)


def test_grpo_sees_the_students_samples_only_and_the_teacher_term_all():
    s = shard()
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(2 * G, R, generator=g, dtype=torch.float64) - 0.5).requires_grad_(True)
    divergence = torch.rand(2 * G, R, generator=g, dtype=torch.float64).requires_grad_(True)
    share, (loss, metrics) = loss_of(s, logp, divergence)
    mask = s.response_mask_NR().double()
    assert share.pg_denominator == 5  # token_mean over the student's 3 + 2 tokens, not all 11
    own = slice(0, G)
    w = importance_weights(logp[own], s.sampler_logp_NR[own], ALGO.tis_cap, ALGO.kd.is_cap)
    adv = group_advantages(s.rewards_N[own], G)  # the student's group's own
    pg, _ = policy_gradient_term(logp[own], adv, mask[own], w, clip_low=ALGO.clip_low, clip_high=ALGO.clip_high,
                                 aggregation="token_mean", denominator=5.0)
    kd = teacher_term(divergence, mask, torch.ones(2 * G, dtype=torch.float64), None, norm=ALGO.kd.norm,
                      aggregation="token_mean", denominator=11.0)
    ref = ALGO.pg_coef * pg + kd
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    for x in (logp, divergence):
        torch.testing.assert_close(torch.autograd.grad(loss, x, retain_graph=True)[0],
                                   torch.autograd.grad(ref, x, retain_graph=True)[0], rtol=1e-12, atol=1e-14)
    assert metrics.sampled_tokens == 5 and metrics.tokens == 11
    # per origin: the divergences' sums and token counts add up to the step's
    by = metrics.kd_k1_by_origin
    assert by[1] == 5 and by[3] == 6
    assert by[0] + by[2] == pytest.approx(metrics.kd_k1_sum, abs=1e-12) and by[1] + by[3] == metrics.kd_tokens
    rec = metrics.record(ALGO)["kd_divergence_by_origin"]
    assert rec == pytest.approx({"student": by[0] / 5, "dataset": by[2] / 6})

    # a dataset row's sampler log-probs (there is no sampler) reach nothing: loss, gradient, metrics
    logp2 = logp.detach().clone().requires_grad_(True)
    _, (loss2, metrics2) = loss_of(shard(dataset_logp=-50.0), logp2, divergence)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss2, logp2)[0], torch.autograd.grad(loss, logp)[0], rtol=0, atol=0)
    assert (metrics2.mismatch_k3_sum, metrics2.mismatch_max) == (metrics.mismatch_k3_sum, metrics.mismatch_max)


def test_the_per_prompt_choice_is_a_function_of_seed_and_step():
    a = gkd_origins(3, 7, 4000, 0.25)
    assert a == gkd_origins(3, 7, 4000, 0.25) and a != gkd_origins(3, 8, 4000, 0.25)
    assert abs(a.count(STUDENT) / 4000 - 0.25) < 0.03
    assert set(gkd_origins(0, 0, 100, 1.0)) == {STUDENT} and set(gkd_origins(0, 0, 100, 0.0)) == {DATASET}
