"""Issue 11, end to end with real processes: an always-failing reward is refused before
anything starts; a killed vLLM engine core is a dead rollout worker (restarted, retried), and
the fourth crash of a rollout worker within the window stops the run at once with a message,
keeping every step. (Bad reward values, Ctrl-C and a damaged newest checkpoint: test_failures.py,
sharing runs with the other failures.)"""
import os
import signal
import time

import psutil
import pytest

from test_failures import kill_actor, nothing_lost, rewards_dir, training, wait_for_steps  # noqa: F401
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
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if "EngineCore" in (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])]


def test_a_killed_engine_core_is_a_dead_worker_and_the_fourth_crash_stops_at_once(demo_assets, tmp_path,
                                                                                 no_leftover_engines):
    """vLLM's engine core in a process of its own, as on a GPU. SIGKILL it mid-run: the worker
    exits, Ray restarts it, it gets the current weights and the same prompts again, and the run
    goes on. Then three kills of the rollout worker itself: the fourth crash within the window
    stops the run at once (not after 600 s of silence), keeping every step."""
    run = tmp_path / "run"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # inherited by the run and its Ray workers
    try:
        with training("run.steps=60", f"run.output_dir={run}", "learner.world_size=1", *FAST) as proc:
            wait_for_steps(run, 2, proc)
            cores = engine_cores()
            assert cores, "no engine core process: VLLM_ENABLE_V1_MULTIPROCESSING did not reach the worker"
            cores[0].send_signal(signal.SIGKILL)
            wait_for_steps(run, 4, proc)  # recovered: it trains on
            recovered = metrics(run)
            for crash in range(1, 4):
                wait_for_steps(run, crash + 4, proc)
                t_kill, victim = time.time(), kill_actor("RolloutEngine")
                if crash < 3:  # wait for Ray's restart, so that the next kill hits the new worker
                    while not any("ray::RolloutEngine" in " ".join(p.info["cmdline"] or []) and p.pid != victim
                                  for p in psutil.process_iter(["cmdline"])):
                        assert proc.poll() is None and time.time() - t_kill < 300
                        time.sleep(0.5)
            out, err = proc.communicate(timeout=300)
            stopped_after = time.time() - t_kill
    finally:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    assert "rollout worker 0 failed" in out
    assert [m["step"] for m in recovered[:4]] == [1, 2, 3, 4]
    assert all(m["weights_version_sampled"] == m["step"] - 1 for m in metrics(run))  # the current weights each time
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert "rollout worker 0 failed 4 times within 10 minutes" in err
    assert stopped_after < 120  # at once, not after 600 s of silence
    nothing_lost(run, at_least=7, log=out + err)
