"""Issue 11, end to end with real processes: an always-failing reward is refused before
anything starts; a killed vLLM engine core is a dead rollout worker (restarted, retried), and
a crash of a rollout worker past its budget within the window stops the run at once with a message,
keeping every step. (Bad reward values, Ctrl-C and a damaged newest checkpoint: test_failures.py,
sharing runs with the other failures.)"""
import os
import signal
import time

import pytest

from conftest import our_processes
from test_failures import every_step_kept, kill_actor, rewards_dir, training, wait_for_steps  # noqa: F401
from test_system import FAST, demo_paths, metrics, rayskd

pytestmark = pytest.mark.slow


def test_an_always_failing_reward_is_refused_before_anything_starts(demo_assets, tmp_path, rewards_dir):
    assets, _ = demo_assets
    t0 = time.time()
    r = rayskd("train", os.path.abspath("configs/demo.yaml"), *demo_paths(assets), f"run.output_dir={tmp_path / 'r'}",
               "reward.function=my_rewards:always_nan", cwd=str(rewards_dir))
    assert r.returncode == 2 and "always_nan failed on all 4" in r.stderr and "returned nan" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Started a local Ray instance" not in r.stdout + r.stderr
    assert time.time() - t0 < 60


def engine_cores():
    return our_processes("EngineCore")


def test_a_killed_engine_core_is_a_dead_worker_and_a_crash_past_the_budget_stops_at_once(demo_assets, tmp_path,
                                                                                        no_leftover_engines):
    """vLLM's engine core in a process of its own, as on a GPU. SIGKILL it mid-run: the worker
    exits, Ray restarts it, it gets the current weights and the same prompts again, and the run
    goes on. Then a kill of the rollout worker itself, its second failure within the window with
    rollout.max_failures=1 (3 by default): the run stops at once (not after 600 s of silence),
    keeping every step."""
    run = tmp_path / "run"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # inherited by the run and its Ray workers
    try:
        # (automatic restarts off: the stop itself is tested here, the restart in test_resume.py)
        with training("run.steps=60", f"run.output_dir={run}", "learner.world_size=1", "run.max_restarts=0",
                      "rollout.max_failures=1", *FAST) as proc:
            wait_for_steps(run, 2, proc)
            cores = engine_cores()
            assert cores, "no engine core process: VLLM_ENABLE_V1_MULTIPROCESSING did not reach the worker"
            cores[0].send_signal(signal.SIGKILL)
            wait_for_steps(run, 4, proc)  # recovered: it trains on
            recovered = metrics(run)
            wait_for_steps(run, 5, proc)
            t_kill = time.time()
            kill_actor("RolloutEngine")
            out, err = proc.communicate(timeout=300)
            stopped_after = time.time() - t_kill
    finally:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    assert "rollout worker 0 failed" in out
    assert [m["step"] for m in recovered[:4]] == [1, 2, 3, 4]
    assert all(m["weights_version_sampled"] == m["step"] - 1 for m in metrics(run))  # the current weights each time
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert "rollout worker 0 failed 2 times within 10 minutes" in err
    assert stopped_after < 120  # at once, not after 600 s of silence
    every_step_kept(run, at_least=5, log=out + err)


def test_non_finite_teacher_scores_are_counted_not_trained_on_and_stop_when_they_persist(demo_assets, tmp_path,
                                                                                       no_leftover_engines):
    """Issue 26.3: a teacher with one inf in its LM head gives non-finite log-probs for every
    token. Each step counts them and gives those sequences no teacher term (the GRPO term trains,
    no update is skipped); after three steps in a row the run stops naming the teacher, with a
    checkpoint of its last step, and no stray staging directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayskd import checkpoint

    assets, _ = demo_assets
    teacher = tmp_path / "teacher"
    model = AutoModelForCausalLM.from_pretrained(f"{assets}/teacher", dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] = float("inf")
    model.save_pretrained(teacher)
    AutoTokenizer.from_pretrained(f"{assets}/teacher").save_pretrained(teacher)
    run = tmp_path / "run"
    r = rayskd("train", os.path.abspath("configs/demo.yaml"), "run.steps=10", f"run.output_dir={run}",
               f"teacher.path={teacher}", "learner.world_size=1", *FAST)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"the teacher ({teacher}, worker(s) [0]) gave non-finite log-probs in 3 steps in a row" in r.stderr, \
        r.stderr[-3000:]
    assert "restarting" not in r.stderr  # the same weights would do it again
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3]
    for m in rows:
        assert m["teacher_nonfinite_tokens"] > 0 and m["teacher_nonfinite_sequences"] == 256
        assert m["kd_tokens"] == 0 and m["skipped_update"] is False and m["nonfinite_teachers"] == [0]
    assert checkpoint.latest(str(run))[0] == 3
    assert not [d for d in os.listdir(run / "checkpoints") if d.endswith(".tmp")]


def test_failure_messages_say_what_happened():
    """Issue 26.4: an actor that died at work is worded for how it died, in one line (a learner
    killed mid-run was once 'failed to start', with Ray's OOM/SIGSEGV paragraph twice)."""
    from rayskd.actors import died

    fields = "\tclass_name: Learner\n\tpid: 4242\n\tname: rayskd-learner-1-99-3\n\tip: 10.0.0.7\n"
    killed = (f"The actor died unexpectedly before finishing this task.\n{fields}The actor is dead because its "
              "worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly "
              "exits with a connection error code 2. End of file. Some common causes include: (1) the process was "
              "killed by the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the worker "
              "crashed unexpectedly due to SIGSEGV or another unexpected error.")
    line = died(killed)
    assert line.startswith("learner rank 1 (pid 4242, on 10.0.0.7) died: its process ended (killed, or crashed)")
    assert "\n" not in line and "start" not in line
    oom = killed.replace("Worker exit type: SYSTEM_ERROR", "Task was killed due to the node running low on memory.")
    assert "was killed for using too much memory (OOM" in died(oom)
    node = f"The actor died unexpectedly before finishing this task.\n{fields}The node 10.0.0.7 died: its raylet is gone."
    assert "was lost with its node" in died(node)
    teacher = killed.replace("class_name: Learner", "class_name: TeacherScorer").replace("learner-1", "teacher-0")
    assert died(teacher).startswith("teacher 0 (pid 4242")
