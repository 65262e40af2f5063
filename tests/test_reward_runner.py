"""The reward process: raising and hanging functions score 0 and are counted, bad return
values are an error naming the function, a crash of the process does not lose the run."""
import time

import pytest

from rayskd.rewards.runner import RewardError, RewardRunner

USER = '''
import os, time
def good(prompt, completion, answer):
    return float(completion == answer)
def flaky(prompt, completion, answer):
    if completion == "boom":
        raise RuntimeError("bad sample")
    if completion == "slow":
        time.sleep(60)
    if completion == "die":
        os._exit(3)
    return 1.0
def wrong_type(prompt, completion, answer):
    return "yes"
def nan(prompt, completion, answer):
    return float("nan")
'''


@pytest.fixture
def user_module(tmp_path):
    (tmp_path / "user_rewards.py").write_text(USER)
    return str(tmp_path)


def test_builtin_and_user_function(user_module):
    r = RewardRunner("exact_match", None, 5.0)
    try:
        assert r.score([("p", "12", "12"), ("p", "1", "12")]) == ([1.0, 0.0], {"reward_errors": 0, "reward_timeouts": 0})
    finally:
        r.close()
    r = RewardRunner("exact_match", "user_rewards:good", 5.0, (user_module,))
    try:
        assert r.score([("p", "a", "a")])[0] == [1.0]
    finally:
        r.close()


def test_raise_and_timeout_score_zero_and_are_counted(user_module):
    r = RewardRunner("exact_match", "user_rewards:flaky", 0.5, (user_module,))
    try:
        t0 = time.time()
        rewards, stats = r.score([("p", "ok", "a"), ("p", "boom", "a"), ("p", "slow", "a"), ("p", "ok", "a")])
        assert rewards == [1.0, 0.0, 0.0, 1.0]
        assert stats == {"reward_errors": 1, "reward_timeouts": 1}
        assert time.time() - t0 < 30
    finally:
        r.close()


def test_crashing_process_is_restarted(user_module):
    r = RewardRunner("exact_match", "user_rewards:flaky", 2.0, (user_module,))
    try:
        rewards, stats = r.score([("p", "ok", "a"), ("p", "die", "a")])
        assert rewards == [0.0, 0.0] and stats["reward_errors"] == 2
        assert r.score([("p", "ok", "a")])[0] == [1.0]  # the next batch works again
    finally:
        r.close()


@pytest.mark.parametrize("fn", ["wrong_type", "nan"])
def test_non_float_is_an_error_naming_the_function(user_module, fn):
    r = RewardRunner("exact_match", f"user_rewards:{fn}", 2.0, (user_module,))
    try:
        with pytest.raises(RewardError, match=f"user_rewards:{fn}"):
            r.score([("p", "a", "a")])
    finally:
        r.close()


def test_unimportable_function_fails_at_start(user_module):
    with pytest.raises(RewardError, match="no callable"):
        RewardRunner("exact_match", "user_rewards:missing", 2.0, (user_module,))
