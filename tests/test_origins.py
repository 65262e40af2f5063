"""Issue 29.1 and 29.3, sequences of other origins (docs/algorithms.md, "Sequences of other
origins"), in float64: with GKD's dataset responses beside the student's samples, the GRPO term
sees the student's samples only, with their importance weights, over the batch's normaliser of
their tokens, while the teacher term covers every sequence; nothing read from a dataset row's
sampler log-probs (there is no sampler) reaches the loss or the metrics; per-origin divergences
add up to the step's; the per-prompt choice is the same on a resume."""
import pytest
import torch

import json
import os

from rayskd.batch import (
    DATASET, STUDENT, TEACHER, PromptBatch, RolloutShard, TeacherScores, concat_shards, gkd_origins, pad_rows,
    split_prompts, split_shard, summarize, teacher_last,
)
from rayskd.config import AlgorithmConfig, KDConfig, LearnerConfig, MiniLLMConfig
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
    assert rec["teacher"] is None and {k: rec[k] for k in ("student", "dataset")} == pytest.approx(
        {"student": by[0] / 5, "dataset": by[2] / 6})

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


def test_the_teachers_prompts_form_requests_of_their_own_however_a_step_is_cut():
    """Each request goes to one kind of engine: after `teacher_last`, every cut (the step's
    requests, or a resume's re-split of its saved samples) keeps the teacher's prompts apart."""
    origins = gkd_origins(0, 3, 24, 0.5, TEACHER)
    prompts = teacher_last(PromptBatch(list(range(24)), [[i] for i in range(24)], ["p"] * 24, ["a"] * 24, origins))
    assert sorted(prompts.uids) == list(range(24)) and prompts.origins == sorted(origins, key=lambda o: o == TEACHER)
    for count in (2, 3, 4, 6):
        parts = split_prompts(prompts, count)
        assert len(parts) == count and all(p.uids for p in parts)
        assert all(len(set(o == TEACHER for o in p.origins)) == 1 for p in parts), count
        whole = concat_shards([RolloutShard(pad_rows([[1]] * 2 * len(p.uids)), torch.ones(2 * len(p.uids)),
                                            pad_rows([[2]] * 2 * len(p.uids)), torch.ones(2 * len(p.uids)),
                                            torch.zeros(2 * len(p.uids), 1), torch.zeros(2 * len(p.uids)),
                                            torch.zeros(2 * len(p.uids), dtype=torch.bool),
                                            torch.tensor([u for u in p.uids for _ in range(2)]), 2, 0,
                                            origin_N=torch.tensor([o for o in p.origins for _ in range(2)],
                                                                  dtype=torch.int8)) for p in parts])
        for other in (2, 3, 4):  # a resume on another layout re-splits the samples the same way
            cut = split_shard(whole, other)
            assert [s.uids_N[::2].tolist() for s in cut] == [p.uids for p in split_prompts(prompts, other)]


@pytest.mark.slow
def test_gkd_on_the_teachers_samples_end_to_end(demo_assets, tmp_path, no_leftover_engines):
    """GKD with lambda 0.5 on the teacher's samples (issue 29.2): the teacher's own vLLM engine
    generates half the prompts' sequences. They solve the demo far more often than the
    student's; the k1 mean over them, log pi_theta - log pi_T on the teacher's samples, estimates
    -KL(teacher || student), so it is negative where the student's is positive; the student's
    staleness is counted without them."""
    from test_system import demo_paths, metrics, rayskd

    assets, _ = demo_assets
    run = tmp_path / "run"
    r = rayskd("train", os.path.abspath("configs/demo.yaml"), *demo_paths(assets), "run.steps=2", "run.eval_every=0",
               f"run.output_dir={run}", "algorithm.gkd.lmbda=0.5", "algorithm.gkd.off_policy=teacher",
               "teacher.generation.num_workers=1", "algorithm.kd.estimator=topk", "teacher.top_k=8",
               "algorithm.kd.divergence=generalized_jsd", "algorithm.kd.beta=0.5", "algorithm.max_staleness=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = metrics(run)
    for m in rows:
        n, reward, kl = m["sequences_by_origin"], m["reward_by_origin"], m["kd_divergence_by_origin"]
        assert n["student"] + n["teacher"] == 256 and n["teacher"] > 0 and n["dataset"] == 0
        assert reward["teacher"] > reward["student"] + 0.3, reward
        assert kl["teacher"] < 0 < kl["student"], kl
    assert [m["weights_version_sampled"] for m in rows] == [0, 0] and [m["staleness_max"] for m in rows] == [0, 1]
    assert json.load(open(run / "placement.json"))["teacher_rollout"]
    assert (run / "logs" / "teacher_rollout_0.log").stat().st_size > 0


@pytest.mark.parametrize("alpha", [0.2, 0.6])
def test_mixed_sampling_weights_make_the_teacher_term_the_on_policy_one_in_expectation(alpha):
    """MiniLLM's teacher-mixed sampling (issue 29.6): tokens drawn from mu = alpha pi_T +
    (1 - alpha) pi_theta, the teacher term weighted by sg(pi_theta / mu). Over every token of
    a 7-token vocabulary, each once as a `mixture` sequence through the learner's loss: the loss
    is the mean of sg(pi_theta / mu) k2, and its mu-expected gradient is the on-policy one,
    grad KL(pi_theta || pi_T) (without the weight, the ratio 1, it is not)."""
    from rayskd.batch import MIXTURE
    from rayskd.learner import mixture_logp
    from rayskd.losses import kl_estimator

    V = 7
    g = torch.Generator().manual_seed(5)
    z = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    # pi_theta / mu <= 1 / (1 - alpha): no truncation at this cap (the default 2 truncates above alpha 0.5)
    algo = AlgorithmConfig(kd=KDConfig(estimator="k2", is_cap=1e9, minillm=MiniLLMConfig(mix_alpha=alpha)))
    s = RolloutShard(pad_rows([[1]] * V), torch.ones(V, dtype=torch.long), torch.arange(V)[:, None],
                     torch.ones(V, dtype=torch.long), torch.zeros(V, 1, dtype=torch.float64), torch.zeros(V),
                     torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.long), V, 0,
                     origin_N=torch.full((V,), MIXTURE, dtype=torch.int8))
    (share,) = learner_shares([summarize(s)], [s], [TeacherScores(logp_NR=teacher[:, None])], 1, algo, 1, 1.0, 0)
    (mb,) = share_micro_batches([s], share.scores, share, algo, LearnerConfig(micro_batch_size=64), "cpu")
    logp = torch.log_softmax(z, -1)
    loss, _ = micro_batch_loss(logp[:, None], None, None, mb, share, algo, 1)
    mu = mixture_logp(teacher, logp.detach(), alpha)
    per_token = torch.exp(logp.detach() - mu) * kl_estimator(logp, teacher, "k2")
    torch.testing.assert_close(loss, per_token.mean(), rtol=1e-12, atol=1e-14)
    expected, = torch.autograd.grad((mu.exp() * per_token).sum(), z, retain_graph=True)
    exact, = torch.autograd.grad((logp.exp() * (logp - teacher)).sum(), z, retain_graph=True)
    torch.testing.assert_close(expected, exact, rtol=1e-10, atol=1e-12)
    unweighted, = torch.autograd.grad((mu.exp() * kl_estimator(logp, teacher, "k2")).sum(), z)
    assert (unweighted - exact).abs().max() > 1e-3
