"""Issue 28.6, several teachers (docs/algorithms.md, "Several teachers"), in float64: an
ensemble's target is the mixture sum_i w_i pi_i, exact per sampled token, and the expected
gradient of its k2 teacher term is the gradient of KL(student || mixture); routed teachers each
score their own prompts' sequences, which go back to their rows, each weighted by its teacher's
coefficient; each teacher's divergence is logged, and the parts add up to the step's. A real
teacher scoring a routed subset gives exactly its rows of the whole shard's scores."""
import pytest
import torch

from rayskd.batch import LearnerShare, RolloutShard, TeacherScores, combine_scores, pad_rows
from rayskd.config import AlgorithmConfig, LearnerConfig
from rayskd.learner import StepMetrics, micro_batch_loss, share_micro_batches
from rayskd.losses import kl_estimator

V = 7


def _dist(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)


def _shard(n, width=3):
    """n responses of `width` tokens (ids cycling through V), one group of n."""
    responses = [[(i + j) % V for j in range(width)] for i in range(n)]
    return RolloutShard(pad_rows([[1, 2]] * n), torch.tensor([2] * n), pad_rows(responses), torch.tensor([width] * n),
                        torch.zeros(n, width, dtype=torch.float64), torch.zeros(n), torch.zeros(n, dtype=torch.bool),
                        torch.arange(n), n, 0)


def _scores(shard, logp_V, teacher, rows=None):
    """A teacher's scores of `shard` (or of its `rows`) from its distribution over V."""
    ids = shard.response_ids_NR if rows is None else shard.response_ids_NR[rows]
    return TeacherScores(logp_NR=logp_V[ids], teacher=teacher,
                         rows_N=None if rows is None else torch.tensor(rows))


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.2, 0.8), (0.6, 0.3, 0.1)])
def test_an_ensembles_target_is_the_mixture_and_its_k2_gradient_that_of_the_kl_to_it(weights):
    """Every token of V as one sequence: the combined log-prob is log sum_i w_i pi_i(y) for
    each; E_{y ~ student}[grad k2] by enumeration equals grad KL(student || mixture) (averaging
    the teachers' log-probs instead, the geometric mean, fails both)."""
    teachers = [_dist(10 + i) for i in range(len(weights))]
    shard = _shard(V, width=1)
    parts = [_scores(shard, lp, i) for i, lp in enumerate(teachers)]
    combined = combine_scores(parts[::-1], V, "ensemble", list(weights))  # in any order
    mixture = torch.log(sum(w * lp.exp() for w, lp in zip(weights, teachers)))
    torch.testing.assert_close(combined.logp_NR[:, 0], mixture[shard.response_ids_NR[:, 0]], rtol=0, atol=1e-14)
    assert torch.equal(combined.teacher_logp_TNR[1], parts[1].logp_NR)  # each teacher's own, for its metric

    z = torch.randn(V, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    expected = (logp.exp().detach() * kl_estimator(logp, combined.logp_NR[:, 0], "k2")).sum()
    exact = (logp.exp() * (logp - mixture)).sum()
    g_expected, = torch.autograd.grad(expected, z, retain_graph=True)
    g_exact, = torch.autograd.grad(exact, z)
    torch.testing.assert_close(g_expected, g_exact, rtol=1e-10, atol=1e-12)


def _loss(shard, parts, coefs, combine, logp, kd_mask=None):
    algo = AlgorithmConfig()
    tokens = float(shard.response_len_N.sum())  # the whole batch's normalisers, whatever the mask
    share = LearnerShare(kd_coef=1.0, rehearsal_start=0, pg_denominator=tokens, kd_denominator=tokens,
                         kd_mask=kd_mask or [1.0] * shard.num_sequences, shards=[shard], scores=parts,
                         score_parts=[len(parts)], combine=combine, teacher_coefs=tuple(coefs))
    (mb,) = share_micro_batches([shard], parts, share, algo, LearnerConfig(micro_batch_size=64), "cpu")
    return micro_batch_loss(logp, None, None, mb, share, algo, 3)


def test_routed_teachers_score_their_rows_weighted_by_their_coefficients():
    """Rows 0, 2, 3 routed to teacher 1 (coefficient 0.25), rows 1, 4 to teacher 0 (1.5): the
    loss and its gradient are 1.5 x the teacher term with teacher 0's scores on its rows only
    plus 0.25 x teacher 1's on its rows; per-teacher divergences and token counts add up to
    the step's."""
    shard = _shard(5)
    teachers, rows = [_dist(1), _dist(2)], [[1, 4], [0, 2, 3]]
    parts = [_scores(shard, teachers[1], 1, rows[1]), _scores(shard, teachers[0], 0, rows[0])]
    logp = torch.log_softmax(torch.randn(5, 3, V, generator=torch.Generator().manual_seed(0),
                                         dtype=torch.float64), -1).gather(-1, shard.response_ids_NR[..., None])[..., 0]
    logp.requires_grad_(True)
    coefs = (1.5, 0.25)
    loss, metrics = _loss(shard, parts, coefs, "route", logp)
    ref = 0.0
    for t in (0, 1):  # the same shard, one teacher, its rows alone in the teacher term
        alone = [TeacherScores(logp_NR=teachers[t][shard.response_ids_NR])]
        mask = [1.0 if i in rows[t] else 0.0 for i in range(5)]
        part, _ = _loss(shard, alone, (1.0,), "route", logp, kd_mask=mask)
        pg, _ = _loss(shard, alone, (1.0,), "route", logp, kd_mask=[0.0] * 5)  # the GRPO term alone
        ref = ref + coefs[t] * (part - pg) + (pg if t == 0 else 0.0)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    g, = torch.autograd.grad(loss, logp)
    g_ref, = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)

    by = metrics.kd_k1_by_teacher
    assert by[1] == 6 and by[3] == 9  # tokens: 2 and 3 sequences of 3
    assert by[0] + by[2] == pytest.approx(metrics.kd_k1_sum, abs=1e-12) and by[1] + by[3] == metrics.kd_tokens
    assert by[0] == pytest.approx(float((logp.detach() - teachers[0][shard.response_ids_NR])[rows[0]].sum()), abs=1e-12)
    merged = StepMetrics.merge([metrics, metrics]).record(AlgorithmConfig())["kd_divergence_by_teacher"]
    assert merged == pytest.approx([by[0] / by[1], by[2] / by[3]])


def test_a_row_no_teacher_scored_is_an_error_not_a_silent_zero():
    shard = _shard(3)
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        combine_scores([_scores(shard, _dist(1), 0, [0, 1])], 3, "route", [1.0, 1.0])


def test_a_teacher_scores_a_routed_subset_as_its_rows_of_the_whole(demo_assets):
    from rayskd.config import load_config
    from rayskd.teacher import TeacherScorer

    assets, _ = demo_assets
    cfg = load_config("configs/demo.yaml", [f"teacher.path={assets}/teacher", "teacher.dtype=float32",
                                            "teacher.top_k=3", "algorithm.kd.estimator=topk"])
    scorer = TeacherScorer(cfg.teacher.path, cfg.teacher, 13, teacher=1)
    responses = [[0, 5, 2, 12], [0, 5, 3, 12], [0, 1, 12], [1, 12], [9, 9, 12]]
    n = len(responses)
    shard = RolloutShard(pad_rows([[0, 7, 10, 4, 5, 11]] * n), torch.tensor([6] * n), pad_rows(responses),
                         torch.tensor([len(r) for r in responses]), torch.zeros(n, 4), torch.zeros(n),
                         torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long), 1, 0)
    whole, part = scorer.score(shard), scorer.score(shard, [4, 1, 3])
    assert part.teacher == 1 and part.rows_N.tolist() == [4, 1, 3]
    for name in ("logp_NR", "topk_ids_NRK", "topk_logp_NRK1"):
        torch.testing.assert_close(getattr(part, name), getattr(whole, name)[[4, 1, 3]], rtol=0, atol=1e-6)
    back = combine_scores([part, scorer.score(shard, [0, 2])], n, "route", [1.0, 1.0])
    torch.testing.assert_close(back.topk_logp_NRK1, whole.topk_logp_NRK1, rtol=0, atol=1e-6)
