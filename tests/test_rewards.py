import pytest

from rayskd.rewards import exact_match, load_reward, math, split_sum


def test_exact_match():
    assert exact_match("1+1=", " 2\n", "2") == 1.0
    assert exact_match("1+1=", "3", "2") == 0.0
    assert exact_match("1+1=", "", "2") == 0.0


def test_split_sum_accepts_every_split_and_nothing_else():
    assert split_sum("385172=", "102050+283122", "385172") == 1.0  # digit by digit
    assert split_sum("385172=", " 385172+000000\n", "385172") == 1.0
    assert split_sum("385172=", "199999+185173", "385172") == 1.0  # with carries: the sum is what counts
    for wrong in ("102050+283123", "10205+283122", "102050283122", "+", "", "1020a0+283122", "102050+283122+0"):
        assert split_sum("385172=", wrong, "385172") == 0.0, wrong


def test_split_demo_teaches_the_student_wrong_facts_only():
    import random

    from rayskd.data.demo_split import misconceptions, split

    wrong = misconceptions(3, 0.3)
    for x in range(1, 10):  # some facts of every digit, never all of them
        assert 0 < sum((x, a) in wrong for a in range(x + 1)) < x + 1
    rng = random.Random(0)
    for _ in range(200):
        n = "".join(str(rng.randint(1, 9)) for _ in range(6))
        assert split_sum(n + "=", split(n, rng), n) == 1.0
        a, b = split(n, rng, wrong).split("+")
        right = all((int(x), int(ai)) not in wrong for x, ai in zip(n, a))
        assert split_sum(n + "=", f"{a}+{b}", n) == float(right)


def test_math_equivalence():
    assert math("", "The answer is $\\frac{1}{2}$", "0.5") == 1.0
    assert math("", "x = 4", "4") == 1.0
    assert math("", "5", "4") == 0.0
    assert math("", "", "4") == 0.0


def test_load_reward_builtin_and_import_path(tmp_path, monkeypatch):
    assert load_reward("exact_match") is exact_match
    (tmp_path / "myreward.py").write_text("def score(prompt, completion, answer):\n    return float(len(completion))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward("exact_match", "myreward:score")
    assert fn("p", "abc", "x") == 3.0
    with pytest.raises(ValueError, match="no callable 'nope'"):
        load_reward("exact_match", "myreward:nope")
    with pytest.raises(ValueError, match="cannot import"):
        load_reward("exact_match", "no_such_module_xyz:f")
    with pytest.raises(ValueError, match="unknown reward"):
        load_reward("bleu")
