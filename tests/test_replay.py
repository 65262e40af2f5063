"""Issue 29.4, DistiLLM's adaptive off-policy reuse (rayskd/replay.py; docs/algorithms.md,
"DistiLLM's adaptive off-policy reuse"): the per-prompt choice of the dataset's response, the
student's fresh samples or replayed ones; t's rule; the replay buffer; in float64, the GRPO term
on replayed groups with their old sampler's ratio; and, end to end, kill -9 + resume exact with
the buffer in the checkpoint."""
import os

import pytest
import torch

from rayskd.batch import (
    DATASET, REPLAY, STUDENT, PromptBatch, RolloutShard, TeacherScores, pad_rows, split_prompts, summarize,
    teacher_last,
)
from rayskd.config import AlgorithmConfig, KDConfig, LearnerConfig
from rayskd.learner import learner_shares, micro_batch_loss, share_micro_batches
from rayskd.losses import group_advantages, importance_weights, policy_gradient_term, teacher_term
from rayskd.replay import ReplayBuffer, Threshold, distillm_origins

G, R = 2, 3
ALGO = AlgorithmConfig(kd=KDConfig(estimator="topk", divergence="skew_reverse_kl"), max_staleness=1)


def test_each_prompts_origin_follows_the_authors_rule():
    """u < t (1 - s/T): fresh; t (1 - s/T) <= u < t: replayed once the buffer is full (fresh
    before); u >= t: the dataset's response. A function of (seed, step) only."""
    n = 20000
    a = distillm_origins(3, 7, n, 0.6, 0.25, True)
    assert a == distillm_origins(3, 7, n, 0.6, 0.25, True) and a != distillm_origins(3, 8, n, 0.6, 0.25, True)
    for origin, share in ((STUDENT, 0.6 * 0.75), (REPLAY, 0.6 * 0.25), (DATASET, 0.4)):
        assert abs(a.count(origin) / n - share) < 0.015, (origin, a.count(origin) / n)
    not_full = distillm_origins(3, 7, n, 0.6, 0.25, False)  # the same draws: replayed ones are fresh instead
    assert [STUDENT if o == REPLAY else o for o in a] == not_full
    assert set(distillm_origins(0, 0, 100, 0.0, 0.5, True)) == {DATASET}
    assert set(distillm_origins(0, 0, 100, 1.0, 0.0, True)) == {STUDENT}


def test_t_rises_when_the_validation_loss_rose_by_eps():
    """The authors' rule: the first evaluation sets the reference loss; t += raise_by (at most 1)
    when a loss is >= the reference + eps, which then becomes the reference; else nothing."""
    t = Threshold(0.0).update(2.0, 0.1, 0.1)
    assert t == Threshold(0.0, 2.0)
    assert t.update(2.05, 0.1, 0.1) == t  # rose, but less than eps
    assert t.update(1.5, 0.1, 0.1) == t  # fell: the reference stays the last raising loss
    t = t.update(2.1, 0.1, 0.1)
    assert t.t == pytest.approx(0.1) and t.last_loss == 2.1
    assert Threshold(0.95, 1.0).update(5.0, 0.1, 0.1).t == 1.0


def groups_shard(uids, origins, g=G, seed=0) -> RolloutShard:
    gen = torch.Generator().manual_seed(seed)
    n = len(uids) * g
    return RolloutShard(pad_rows([[1, 2]] * n), torch.tensor([2] * n), torch.randint(3, 9, (n, R), generator=gen),
                        torch.tensor([R] * n), -torch.rand(n, R, generator=gen), torch.rand(n, generator=gen),
                        torch.zeros(n, dtype=torch.bool), torch.tensor([u for u in uids for _ in range(g)]), g, 4,
                        origin_N=torch.tensor([o for o in origins for _ in range(g)], dtype=torch.int8))


def test_the_buffer_keeps_the_students_fresh_groups_oldest_out_and_checkpoints(tmp_path):
    buf = ReplayBuffer(3)
    buf.add([groups_shard([10, 11, 12], [STUDENT, DATASET, REPLAY])])  # only fresh samples are kept
    assert len(buf) == 1 and not buf.full
    buf.add([groups_shard([20, 21], [STUDENT, STUDENT], seed=1), groups_shard([30], [STUDENT], seed=2)])
    assert [int(g.uids_N[0]) for g in buf.groups] == [20, 21, 30] and buf.full  # 10 went first
    drawn = buf.draw(5, 2, 0, 3)
    assert sorted(drawn.uids_N[::G].tolist()) == [20, 21, 30]  # without replacement
    assert set(drawn.origin_N.tolist()) == {REPLAY}
    first, rest = buf.draw(5, 2, 0, 1), buf.draw(5, 2, 1, 2)  # a step's requests: consecutive parts
    assert first.uids_N[::G].tolist() + rest.uids_N[::G].tolist() == drawn.uids_N[::G].tolist()
    for g in drawn.uids_N[::G].tolist():  # a replayed group is its stored samples, sampler log-probs included
        stored = next(x for x in buf.groups if int(x.uids_N[0]) == g)
        rows = drawn.uids_N == g
        assert torch.equal(drawn.response_ids_NR[rows], stored.response_ids_NR)
        assert torch.equal(drawn.sampler_logp_NR[rows], stored.sampler_logp_NR)
        assert torch.equal(drawn.rewards_N[rows], stored.rewards_N)
    buf.save(str(tmp_path))
    back = ReplayBuffer(3)
    back.load(str(tmp_path))
    assert torch.equal(back.draw(5, 2, 0, 3).response_ids_NR, drawn.response_ids_NR)
    with pytest.raises(ValueError, match="holding 3"):
        buf.draw(0, 0, 2, 2)


def test_replayed_prompts_form_requests_of_their_own():
    origins = distillm_origins(0, 9, 24, 0.9, 0.5, True)
    assert REPLAY in origins and STUDENT in origins
    prompts = teacher_last(PromptBatch(list(range(24)), [[i] for i in range(24)], ["p"] * 24, ["a"] * 24, origins))
    for count in (2, 3, 4, 6):
        parts = split_prompts(prompts, count)
        assert len(parts) == count and all(len(set(o == REPLAY for o in p.origins)) == 1 for p in parts), count


def shard():
    """Three prompts of G sequences: the student's fresh samples (one version old), a replayed
    group (many versions old: its sampler's log-probs far from the learner's), a dataset response."""
    g = torch.Generator().manual_seed(0)
    sampler = -torch.rand(3 * G, R, generator=g, dtype=torch.float64) - 0.5
    sampler[G:2 * G] -= 0.3  # the replayed group's old policy
    sampler[2 * G:] = 0.0
    return RolloutShard(pad_rows([[1, 2]] * 3 * G), torch.tensor([2] * 3 * G), pad_rows([[3, 4, 5]] * 3 * G),
                        torch.tensor([3, 2, 3, 1, 3, 3]), sampler, torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]),
                        torch.zeros(3 * G, dtype=torch.bool), torch.tensor([0, 0, 1, 1, 2, 2]), G, 0,
                        origin_N=torch.tensor([STUDENT] * G + [REPLAY] * G + [DATASET] * G, dtype=torch.int8))


def test_grpo_takes_replayed_groups_with_their_old_samplers_ratio():
    """float64: the GRPO term covers the fresh and the replayed groups, each token's ratio taken
    against its own sampler's log-probs (the one rule: losses.importance_weights), each group's
    advantage from its stored rewards, over their tokens (3 + 2 + 3 + 1); the dataset's group has
    the teacher term only; values and gradients equal the terms built by hand."""
    s = shard()
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(3 * G, R, generator=g, dtype=torch.float64) - 0.5).requires_grad_(True)
    divergence = torch.rand(3 * G, R, generator=g, dtype=torch.float64).requires_grad_(True)
    (share,) = learner_shares([summarize(s)], [s], [TeacherScores(logp_NR=torch.full((3 * G, R), -1.0))], 1, ALGO, R,
                              1.0, 0)
    (mb,) = share_micro_batches([s], share.scores, share, ALGO, LearnerConfig(micro_batch_size=64), "cpu")
    loss, metrics = micro_batch_loss(logp, None, divergence, mb, share, ALGO, R)
    assert share.pg_denominator == 9
    mask = s.response_mask_NR().double()
    own = slice(0, 2 * G)
    w = importance_weights(logp[own], s.sampler_logp_NR[own], ALGO.tis_cap, ALGO.kd.is_cap)
    pg, _ = policy_gradient_term(logp[own], group_advantages(s.rewards_N[own], G), mask[own], w,
                                 clip_low=ALGO.clip_low, clip_high=ALGO.clip_high, aggregation="token_mean",
                                 denominator=9.0)
    kd = teacher_term(divergence, mask, torch.ones(3 * G, dtype=torch.float64), None, norm=ALGO.kd.norm,
                      aggregation="token_mean", denominator=15.0)
    ref = pg + kd
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    for x in (logp, divergence):
        torch.testing.assert_close(torch.autograd.grad(loss, x, retain_graph=True)[0],
                                   torch.autograd.grad(ref, x, retain_graph=True)[0], rtol=1e-12, atol=1e-14)
    # planted: the replayed group's ratio against the learner's own log-probs (no correction for its age)
    fresh_only = importance_weights(logp[own], torch.cat([s.sampler_logp_NR[:G], logp[G:2 * G].detach()]),
                                    ALGO.tis_cap, ALGO.kd.is_cap)
    wrong, _ = policy_gradient_term(logp[own], group_advantages(s.rewards_N[own], G), mask[own], fresh_only,
                                    clip_low=ALGO.clip_low, clip_high=ALGO.clip_high, aggregation="token_mean",
                                    denominator=9.0)
    assert not torch.allclose(torch.autograd.grad(wrong + kd, logp, retain_graph=True)[0],
                              torch.autograd.grad(ref, logp, retain_graph=True)[0])
    assert metrics.sampled_tokens == 9
    rec = metrics.record(ALGO)["kd_divergence_by_origin"]
    assert rec["replay"] is not None and rec["teacher"] is None


@pytest.mark.slow
def test_distillm_kill_and_resume_is_exact(demo_assets, tmp_path, no_leftover_engines):
    """A DistiLLM run (t 0.8, a buffer of 8 groups, generating a step ahead) whose learner is
    killed with SIGKILL right after the step-2 checkpoint: the run restores that checkpoint in
    a new Trainer (its buffer and t from the checkpoint alone) and every metric, t and the
    validation loss equal the uninterrupted run's; its steps mix the dataset's, fresh and
    replayed sequences. (In-process, as test_resume's ZeRO-3 heal: a third process start would
    cost CI ~40 s; the driver's own kill -9 and `rayskd resume` path is test_resume's.)"""
    import json

    from test_resume import learner_lost_after_checkpoint_heals_itself, small_dataset
    from test_system import metrics, rayskd

    config = os.path.abspath("configs/demo.yaml")
    data = tmp_path / "train.jsonl"
    small_dataset(demo_assets[0], data, n=32)
    args = ["run.steps=4", "run.checkpoint_every=1", f"data.train_path={data}", "learner.world_size=1",
            "algorithm.prompts_per_step=8", "rollout.prompts_per_request=4", "learner.micro_batch_size=64",
            "run.eval_every=2", "run.eval_max_prompts=16", "run.eval_samples=0", "algorithm.max_staleness=1",
            "algorithm.distillm.capacity=8", "algorithm.distillm.init_threshold=0.8", "algorithm.kd.estimator=topk",
            "teacher.top_k=8", "algorithm.kd.divergence=skew_reverse_kl", "algorithm.kd.skew=0.1"]
    full = tmp_path / "full"
    r = rayskd("train", config, *args, f"run.output_dir={full}")
    assert r.returncode == 0, r.stderr[-3000:]
    a = metrics(full)
    origins = [m["sequences_by_origin"] for m in a]
    assert sum(o["replay"] for o in origins) > 0 and sum(o["dataset"] for o in origins) > 0, origins
    assert origins[0]["replay"] == 0  # the buffer fills first
    assert all(m["distillm_t"] is not None for m in a)
    assert (full / "checkpoints" / "step_000004" / "replay_buffer.safetensors").exists()
    evals = [json.loads(line) for line in open(full / "eval.jsonl")]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(e["validation_loss"] > 0 for e in evals)

    healed = tmp_path / "healed"
    learner_lost_after_checkpoint_heals_itself(args, healed, a)
    assert [m["distillm_t"] for m in metrics(healed)] == [m["distillm_t"] for m in a]
    resumed = [json.loads(line) for line in open(healed / "eval.jsonl")]
    assert [e["validation_loss"] for e in resumed] == [e["validation_loss"] for e in evals]
