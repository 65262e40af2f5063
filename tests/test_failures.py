"""Worker failures with real processes: a rollout worker killed mid-run is restarted and its
prompts retried (no prompt lost or used twice); a learner failure stops the run with a
message that says how to resume, never leaving a checkpoint that looks complete but is not."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from test_system import FAST, metrics

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def training(*args):
    """`rayskd train configs/demo.yaml ARGS` in its own process group, killed whole on exit."""
    proc = subprocess.Popen([sys.executable, "-m", "rayskd", "train", os.path.abspath("configs/demo.yaml"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_steps(run, n, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(run / "metrics.jsonl") and len(open(run / "metrics.jsonl").readlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach step {n}")


def kill_actor(name):
    victims = [p for p in psutil.process_iter(["pid", "cmdline"])
               if any(f"ray::{name}" in part for part in (p.info["cmdline"] or []))]
    assert victims, f"no {name} process found"
    victims[0].send_signal(signal.SIGKILL)
    return victims[0].pid


def test_killed_rollout_worker_is_restarted_and_no_prompt_is_lost_or_repeated(demo_assets, tmp_path,
                                                                             no_leftover_engines):
    from rayskd.config import load_config
    from rayskd.data.dataset import PromptSampler

    run = tmp_path / "run"
    args = ["run.steps=5", f"run.output_dir={run}", "learner.world_size=1", "learner.micro_batch_size=64", *FAST]
    with training(*args) as proc:
        wait_for_steps(run, 2, proc)
        kill_actor("RolloutEngine")
        out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "rollout worker 0 failed" in out
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5]
    cfg = load_config("configs/demo.yaml", args)
    sampler = PromptSampler(9600, cfg.run.seed)  # the demo's train split
    for m in rows:
        assert m["prompt_uids"] == sorted(sampler.next(cfg.algorithm.prompts_per_step))
        assert m["weights_version_sampled"] == m["step"] - 1  # the restarted engine got the current weights


def test_killed_teacher_scorer_is_restarted_and_its_work_retried(demo_assets, tmp_path, no_leftover_engines):
    run = tmp_path / "run"
    with training("run.steps=4", f"run.output_dir={run}", "learner.world_size=1", "learner.micro_batch_size=64",
                  *FAST) as proc:
        wait_for_steps(run, 1, proc)
        kill_actor("TeacherScorer")
        out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert all(m["kd_divergence"] is not None and m["kd_divergence"] > 0 for m in rows)


def test_learner_failure_stops_with_resume_hint_and_no_partial_checkpoint(demo_assets, tmp_path,
                                                                          no_leftover_engines):
    run = tmp_path / "run"
    with training("run.steps=50", "run.checkpoint_every=1", f"run.output_dir={run}", "learner.world_size=2",
                  "run.eval_every=0", "run.eval_max_prompts=16") as proc:
        wait_for_steps(run, 2, proc)
        kill_actor("Learner")
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert f"rayskd resume {run}" in err
    root = run / "checkpoints"
    committed = [d for d in os.listdir(root) if not d.endswith(".tmp")]
    assert committed and all((root / d / "COMPLETE").exists() for d in committed)


def test_sigterm_checkpoints_after_the_current_step_and_resume_continues(demo_assets, tmp_path,
                                                                         no_leftover_engines):
    run = tmp_path / "run"
    args = ["run.steps=40", f"run.output_dir={run}", "learner.world_size=1", "learner.micro_batch_size=64", *FAST]
    with training(*args) as proc:
        wait_for_steps(run, 2, proc)
        proc.send_signal(signal.SIGTERM)  # what `ray job stop` and schedulers send
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err[-3000:]  # stopped before the requested steps: not a finished run
    assert "stopped on request" in out
    from rayskd import checkpoint

    step, _ = checkpoint.latest(str(run))
    assert step == len(metrics(run)) and step < 40
    r = subprocess.run([sys.executable, "-m", "rayskd", "resume", str(run), f"run.steps={step + 1}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in metrics(run)] == list(range(1, step + 2))
