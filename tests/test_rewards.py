import pytest

from rayskd.rewards import exact_match, load_reward, math


def test_exact_match():
    assert exact_match("1+1=", " 2\n", "2") == 1.0
    assert exact_match("1+1=", "3", "2") == 0.0
    assert exact_match("1+1=", "", "2") == 0.0


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
