"""The reward process (issue 11.1, 11.5, 11.8): raising, hanging, memory-hogging and crashing
samples and bad return values score 0 and are counted while the rest of the batch is scored;
bools and numeric types are numbers; the process cannot see Ray's variables or join the cluster; a function that
fails on every probe row is refused before training."""
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
def value(prompt, completion, answer):
    import numpy as np
    import torch
    return {"nan": float("nan"), "inf": float("inf"), "none": None, "str": "yes", "list": [1.0],
            "true": True, "false": False, "np": np.float32(0.5), "int": 2, "tensor": torch.tensor(0.25),
            "tensors": torch.ones(2), "ok": 1.0}[completion]
def hog(prompt, completion, answer):
    if completion == "hog":
        return float(len(bytearray(40 * 2**30)))  # 40 GB
    return 1.0
def env(prompt, completion, answer):
    return float(any(k.startswith("RAY_") for k in os.environ)) + 10 * float(os.getcwd() == answer)
def join(prompt, completion, answer):
    import ray
    ray.init(address=answer, log_to_driver=False)
    return float(len(ray.nodes()))
def always_wrong(prompt, completion, answer):
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


def test_a_crashing_sample_scores_zero_and_the_rest_of_its_batch_is_scored(user_module):
    r = RewardRunner("exact_match", "user_rewards:flaky", 2.0, (user_module,))
    try:
        rewards, stats = r.score([("p", "ok", "a"), ("p", "die", "a"), ("p", "ok", "a"), ("p", "ok", "a")])
        assert rewards == [1.0, 0.0, 1.0, 1.0] and stats["reward_errors"] == 1
        assert r.score([("p", "ok", "a")])[0] == [1.0]  # the next batch works too
    finally:
        r.close()


def test_bad_values_score_zero_and_numbers_of_any_type_count(user_module):
    # 30 s: the first sample imports torch in the reward process, seconds on a loaded machine
    r = RewardRunner("exact_match", "user_rewards:value", 30.0, (user_module,))
    try:
        bad = ["nan", "inf", "none", "str", "list", "tensors"]
        good = {"true": 1.0, "false": 0.0, "np": 0.5, "int": 2.0, "tensor": 0.25, "ok": 1.0}
        rewards, stats = r.score([("p", c, "a") for c in [*bad, *good]])
        assert rewards == [0.0] * len(bad) + list(good.values())
        assert all(type(x) is float for x in rewards)
        assert stats == {"reward_errors": len(bad), "reward_timeouts": 0}
    finally:
        r.close()


def test_a_memory_hog_is_one_failed_sample(user_module):
    r = RewardRunner("exact_match", "user_rewards:hog", 5.0, (user_module,), max_memory_mb=1024)
    try:
        rewards, stats = r.score([("p", "ok", "a"), ("p", "hog", "a"), ("p", "ok", "a")])
        assert rewards == [1.0, 0.0, 1.0] and stats["reward_errors"] == 1
    finally:
        r.close()


def test_the_reward_process_has_no_ray_variables_and_its_own_directory(user_module, monkeypatch):
    import os

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    r = RewardRunner("exact_match", "user_rewards:env", 2.0, (user_module,))
    try:
        assert r.score([("p", "c", os.getcwd())])[0] == [0.0]
    finally:
        r.close()


def test_the_reward_process_cannot_join_the_training_cluster(user_module):
    """A local cluster as `rayskd train` starts one (token auth, Ray's default): the reward
    process, told the cluster's address, has no token to join with. (The address is passed:
    Ray's own discovery, address="auto", finds the newest cluster on the machine, which under
    xdist may be another test's.)"""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False)
    address = ray.get_runtime_context().gcs_address
    r = RewardRunner("exact_match", "user_rewards:join", 60.0, (user_module,))
    try:
        rewards, stats = r.score([("p", "c", address)])
        assert rewards == [0.0] and stats["reward_errors"] == 1
        assert "Failed to connect to Ray cluster" in r.first_failure, r.first_failure  # (with ~/.ray it joins)
    finally:
        r.close()
        ray.shutdown()


def test_a_function_failing_on_every_probe_row_is_refused(user_module):
    r = RewardRunner("exact_match", "user_rewards:always_wrong", 2.0, (user_module,))
    try:
        with pytest.raises(RewardError, match=r"always_wrong failed on all 3 .*returned nan"):
            r.check([("p", "1", "1")] * 3)
        r2 = RewardRunner("exact_match", "user_rewards:flaky", 2.0, (user_module,))
        r2.check([("p", "boom", "a"), ("p", "ok", "a")])  # one row scored: fine
        r2.close()
    finally:
        r.close()


def test_unimportable_function_fails_at_start(user_module):
    with pytest.raises(RewardError, match="no callable"):
        RewardRunner("exact_match", "user_rewards:missing", 2.0, (user_module,))
