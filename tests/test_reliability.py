"""Issue 11, end to end with real processes: bad reward values and a memory-hogging reward are
counted samples, not a lost run; an always-failing reward is refused before anything starts;
Ctrl-C and an error stop checkpoint the last completed step first; a killed vLLM engine core
is a dead rollout worker (restarted, retried); the fourth crash of a rollout worker within the
window stops the run at once with a message; a damaged newest checkpoint is passed over; a resume with another
learner count is refused before anything starts and leaves the run's config alone."""
import os
import signal
import time

import psutil
import pytest

from test_failures import kill_actor, training, wait_for_steps
from test_system import FAST, demo_paths, metrics, rayskd

pytestmark = pytest.mark.slow

REWARDS = '''
def bad_values(prompt, completion, answer):
    """NaN, a bool, None, a numpy float, and now and then 40 GB: every kind of bad sample."""
    import numpy as np
    correct = completion.strip() == answer.strip()
    k = sum(map(ord, completion + prompt)) % 5
    if k == 0:
        return float("nan")
    if k == 1:
        return correct
    if k == 2 and not correct:
        return None
    if k == 3 and len(completion) % 7 == 0:
        return float(len(bytearray(40 * 2**30)))
    return np.float32(correct)


def always_nan(prompt, completion, answer):
    return float("nan")
'''


def nothing_lost(run, at_least: int, log: str) -> None:
    """The stopped run's newest checkpoint is its last logged step (>= at_least), and a resume
    continues from it with one more step and no gap."""
    from rayskd import checkpoint

    assert checkpoint.latest(str(run)) is not None, log[-3000:]
    step, _ = checkpoint.latest(str(run))
    assert step == len(metrics(run)) >= at_least  # nothing trained is lost
    r = rayskd("resume", str(run), f"run.steps={step + 1}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in metrics(run)] == list(range(1, step + 2))


@pytest.fixture
def rewards_dir(tmp_path):
    d = tmp_path / "rewards"
    d.mkdir()
    (d / "my_rewards.py").write_text(REWARDS)
    return d


def test_bad_reward_values_and_a_memory_hog_are_counted_samples(demo_assets, tmp_path, rewards_dir,
                                                                no_leftover_engines):
    assets, _ = demo_assets
    run = tmp_path / "run"
    r = rayskd("train", os.path.abspath("configs/demo.yaml"), *demo_paths(assets), "run.steps=3",
               f"run.output_dir={run}", "learner.world_size=1", "reward.function=my_rewards:bad_values",
               "reward.max_memory_mb=1024", *FAST, cwd=str(rewards_dir))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert all(m["reward_errors"] > 0 for m in rows)
    assert all(m["reward_mean"] == m["reward_mean"] for m in rows)  # finite: the bad ones scored 0


def test_an_always_failing_reward_is_refused_before_anything_starts(demo_assets, tmp_path, rewards_dir):
    assets, _ = demo_assets
    t0 = time.time()
    r = rayskd("train", os.path.abspath("configs/demo.yaml"), *demo_paths(assets), f"run.output_dir={tmp_path / 'r'}",
               "reward.function=my_rewards:always_nan", cwd=str(rewards_dir))
    assert r.returncode == 2 and "always_nan failed on all 4" in r.stderr and "returned nan" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Started a local Ray instance" not in r.stdout + r.stderr
    assert time.time() - t0 < 60


def test_ctrl_c_checkpoints_the_last_completed_step(demo_assets, tmp_path, no_leftover_engines):
    run = tmp_path / "run"
    with training("run.steps=40", f"run.output_dir={run}", "learner.world_size=1", *FAST) as proc:
        wait_for_steps(run, 2, proc)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole foreground group
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert f"rayskd resume {run}" in err
    nothing_lost(run, at_least=2, log=out)


def test_a_killed_engine_core_is_restarted_like_a_dead_worker(demo_assets, tmp_path, no_leftover_engines):
    """vLLM's engine core in a process of its own, as on a GPU: SIGKILL it mid-run; the worker
    exits, Ray restarts it, it gets the current weights and the same prompts again."""
    run = tmp_path / "run"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # inherited by the run and its Ray workers
    try:
        with training("run.steps=4", f"run.output_dir={run}", "learner.world_size=1", *FAST) as proc:
            wait_for_steps(run, 2, proc)
            cores = [p for p in psutil.process_iter(["name", "cmdline"])
                     if "EngineCore" in (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])]
            assert cores, "no engine core process: VLLM_ENABLE_V1_MULTIPROCESSING did not reach the worker"
            cores[0].send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=600)
    finally:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "rollout worker 0 failed" in out
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert all(m["weights_version_sampled"] == m["step"] - 1 for m in rows)


def test_the_fourth_crash_in_the_window_stops_at_once_and_keeps_the_steps(demo_assets, tmp_path,
                                                                          no_leftover_engines):
    run = tmp_path / "run"
    with training("run.steps=60", f"run.output_dir={run}", "learner.world_size=1", *FAST) as proc:
        for crash in range(4):
            wait_for_steps(run, crash + 1, proc)
            t_kill, victim = time.time(), kill_actor("RolloutEngine")
            if crash < 3:  # wait for Ray's restart, so that the next kill hits the new worker
                while not any("ray::RolloutEngine" in " ".join(p.info["cmdline"] or []) and p.pid != victim
                              for p in psutil.process_iter(["cmdline"])):
                    assert proc.poll() is None and time.time() - t_kill < 300
                    time.sleep(0.5)
        out, err = proc.communicate(timeout=300)
        stopped_after = time.time() - t_kill
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert "rollout worker 0 failed 4 times within 10 minutes" in err
    assert stopped_after < 120  # at once, not after 600 s of silence
    nothing_lost(run, at_least=4, log=out + err)


def test_damaged_newest_checkpoint_and_a_resume_on_another_learner_count(demo_assets, tmp_path,
                                                                         no_leftover_engines):
    run = tmp_path / "run"
    r = rayskd("train", os.path.abspath("configs/demo.yaml"), "run.steps=3", f"run.output_dir={run}",
               "learner.world_size=2", "run.checkpoint_every=1", "run.keep_checkpoints=3", "run.eval_every=0",
               "run.eval_max_prompts=16")
    assert r.returncode == 0, r.stderr[-3000:]
    config = (run / "config.yaml").read_text()

    # an impossible layout: exit 2 in seconds, before Ray starts, the run's config untouched
    t0 = time.time()
    r = rayskd("resume", str(run), "learner.world_size=3", "run.steps=4")
    assert r.returncode == 2 and "learner.world_size=3" in r.stderr, r.stderr
    assert time.time() - t0 < 60 and "Started a local Ray instance" not in r.stdout + r.stderr
    assert (run / "config.yaml").read_text() == config

    # the newest checkpoint truncated, the one before missing nothing: resume from step 2, on
    # one learner rank where two wrote it
    model = run / "checkpoints" / "step_000003" / "hf" / "model.safetensors"
    with open(model, "r+b") as f:
        f.truncate(os.path.getsize(model) // 2)
    r = rayskd("resume", str(run), "run.steps=4", "learner.world_size=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_000003 is damaged (hf/model.safetensors has" in r.stdout and "step 2" in r.stdout, r.stdout[-3000:]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    assert "world_size: 1" in (run / "config.yaml").read_text()  # rewritten once the resume worked