"""Issue 12: the unbiased pass@k estimator against hand-computed cases (n = k and c = 0
included) and exact binomials, and one evaluation's numbers from per-problem rows."""
import math
from fractions import Fraction

import pytest

from rayskd.evaluation import EvalRows, format_eval, pass_at_k, summarize_eval


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 0, 1, 0.0),            # c = 0: never
    (8, 0, 8, 0.0),            # c = 0 with n = k
    (4, 1, 4, 1.0),            # n = k: one correct sample is among the k
    (4, 4, 4, 1.0),
    (5, 2, 1, 2 / 5),          # pass@1 is the solve rate
    (5, 2, 2, 1 - 3 / 10),     # 1 - C(3,2)/C(5,2)
    (8, 3, 4, 1 - 5 / 70),     # 1 - C(5,4)/C(8,4)
    (4, 2, 3, 1.0),            # fewer than k failures: certain
    (10, 1, 5, 1 - 126 / 252),  # 1 - C(9,5)/C(10,5) = 1/2
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_exact_binomials():
    for n in range(1, 17):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_stays_finite_and_exact():
    exact = 1 - Fraction(math.comb(900, 64), math.comb(1000, 64))
    assert pass_at_k(1000, 100, 64) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_refuses_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_summary_of_an_evaluation():
    rows = EvalRows(greedy_reward=[1.0, 0.0, 1.0], greedy_len=[2, 4, 3],
                    sampled_reward=[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.5, 1.0]],
                    sampled_len=[[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]], reward_errors=1)
    out = summarize_eval(rows, (1, 2, 4))
    assert out["problems"] == 3 and out["samples_per_problem"] == 4 and out["reward_errors"] == 1
    assert out["greedy_accuracy"] == pytest.approx(2 / 3)
    # solved counts 1, 0, 3 (0.5 is partial credit, not solved)
    assert out["pass@1"] == pytest.approx((1 / 4 + 0 + 3 / 4) / 3)
    assert out["pass@2"] == pytest.approx(((1 - 3 / 6) + 0 + 1) / 3)
    assert out["pass@4"] == pytest.approx(2 / 3)
    assert out["response_len_mean"] == pytest.approx((2 + 4 + 3 + 4 + 8 + 12) / 15)
    assert format_eval(out).startswith("greedy 0.667 | pass@1 0.333 | pass@2 0.500 | pass@4 0.667 | len 2.2")


def test_distinct_right_answers_count_different_solving_responses():
    """distinct_right: per problem, the different responses (by token ids, to their length)
    among the solving samples; the mean over problems in the summary."""
    import torch

    from rayskd.batch import RolloutShard, pad_rows

    responses = [[1, 2, 9], [1, 2, 9], [1, 3, 9], [4, 9],  # problem 0: 2 distinct right, a wrong one
                 [5, 9], [5, 9, 7], [6, 9], [6, 9]]  # problem 1: [5, 9] and [5, 9] + a token past its length
    lengths = [3, 3, 3, 2, 2, 2, 2, 2]
    rewards = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.5, 0.0]
    n = len(responses)
    shard = RolloutShard(pad_rows([[0]] * n), torch.ones(n, dtype=torch.long), pad_rows(responses),
                         torch.tensor(lengths), torch.zeros(n, 3), torch.tensor(rewards),
                         torch.zeros(n, dtype=torch.bool), torch.tensor([0] * 4 + [1] * 4), 4, 0)
    assert EvalRows.count_distinct_right(shard, 4) == [2, 1]
    rows = EvalRows(greedy_reward=[1.0, 0.0], greedy_len=[3, 2], sampled_reward=[rewards[:4], rewards[4:]],
                    sampled_len=[lengths[:4], lengths[4:]], distinct_right=[2, 1])
    assert summarize_eval(rows, (1,))["distinct_right"] == 1.5


def test_greedy_only_evaluation_has_no_pass_at_k():
    out = summarize_eval(EvalRows(greedy_reward=[0.0, 1.0], greedy_len=[1, 1]), (1, 4))
    assert out["greedy_accuracy"] == 0.5 and not any(key.startswith("pass@") for key in out)


def test_report_draws_the_seeds_of_a_method_as_one_band(tmp_path):
    """`rayskd report` on METHOD/seedK directories: one line (the mean) per method."""
    import json

    from rayskd.report import _band, group_seeds, make_report

    labels = ["grpo/seed0", "grpo/seed1", "kdrl/seed0", "kdrl-seed1", "baseline"]
    assert group_seeds(labels) == {"grpo": [0, 1], "kdrl": [2, 3], "baseline": [4]}
    a = [{"step": 0, "pass@1": 0.1}, {"step": 20, "pass@1": 0.5}]
    b = [{"step": 0, "pass@1": 0.3}, {"step": 20, "pass@1": 0.7}, {"step": 40, "pass@1": 0.9}]
    steps, mean, low, high = _band([a, b], "pass@1")
    assert steps == [0, 20] and mean == pytest.approx([0.2, 0.6]) and low == [0.1, 0.5] and high == [0.3, 0.7]
    dirs = []
    for method in ("grpo", "kdrl"):
        for seed, records in enumerate((a, b)):
            d = tmp_path / method / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "eval.jsonl").write_text("".join(json.dumps({**r, "pass@8": r["pass@1"] + 0.1}) + "\n" for r in records))
            (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward_mean": 0.5, "step_s": 1.0}) + "\n"
                                                     for s in (1, 2)))
            dirs.append(str(d))
    out = make_report(dirs, str(tmp_path / "r.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_monitors_divergence_is_the_reverse_kl_in_expectation():
    """Issue 28.7: `sampled_kl` on the student's own samples, in exact expectation over every
    one-token response (float64), is KL(student || model); over a longer response it is the sum
    of the per-position KLs divided by the tokens. (A plausible mistake, the model's log-prob
    minus the student's, gives -KL: caught.)"""
    import torch

    from rayskd.batch import RolloutShard, TeacherScores
    from rayskd.evaluation import sampled_kl

    g = torch.Generator().manual_seed(0)
    log_q = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)  # the student
    log_p = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)  # a model
    expected = 0.0
    for a in range(6):
        shard = RolloutShard(torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]), torch.tensor([[a]]),
                             torch.tensor([1]), log_q[a].reshape(1, 1), torch.zeros(1), torch.zeros(1, dtype=torch.bool),
                             torch.zeros(1, dtype=torch.long), 1, 0)
        expected += float(log_q[a].exp()) * sampled_kl([shard], [TeacherScores(logp_NR=log_p[a].reshape(1, 1))])
    kl = float((log_q.exp() * (log_q - log_p)).sum())
    assert abs(expected - kl) < 1e-15 and kl > 0.1


def test_the_teacher_hacking_warning():
    """Said when, over the last 3 evaluations' changes, the divergence from the teacher fell at
    each and the divergence from the golden model rose at each; not for a rise that stalls, a
    teacher divergence that stops falling, or too few evaluations."""
    from rayskd.evaluation import hacking_warning

    def rows(proxy, golden):
        return [{"step": 10 * i, "proxy_kl": p, "golden_kl": q} for i, (p, q) in enumerate(zip(proxy, golden))]

    said = hacking_warning(rows([0.9, 0.5, 0.4, 0.3, 0.2], [0.5, 0.4, 0.45, 0.5, 0.6]))
    assert said is not None and "steps 10-40" in said and "0.5000 -> 0.2000" in said and "0.4000 -> 0.6000" in said
    assert hacking_warning(rows([0.5, 0.4, 0.3, 0.2], [0.4, 0.45, 0.45, 0.6])) is None  # golden stalled once
    assert hacking_warning(rows([0.5, 0.4, 0.4, 0.2], [0.4, 0.45, 0.5, 0.6])) is None  # teacher stalled once
    assert hacking_warning(rows([0.5, 0.4, 0.3], [0.4, 0.45, 0.5])) is None  # two changes only
    assert hacking_warning([{"step": 0, "greedy_accuracy": 0.1}] * 5) is None  # no monitor
