"""Worker failures with real processes: a rollout worker and a teacher scorer killed mid-run are
restarted and their work retried (no prompt lost or used twice), while bad reward values and a
memory-hogging reward are counted samples, not a lost run; a learner failure stops the run with
a message that says how to resume, never leaving a checkpoint that looks complete but is not;
SIGTERM and Ctrl-C each checkpoint the last completed step, and the resume continues. Each test
is one run whose assertions share it (a run costs ~25 s of start-up on 2 cores)."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import our_processes
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


@pytest.fixture
def rewards_dir(tmp_path):
    d = tmp_path / "rewards"
    d.mkdir()
    (d / "my_rewards.py").write_text(REWARDS)
    return d


@contextlib.contextmanager
def training(*args, command: str = "train", cwd=None):
    """`rayskd train configs/demo.yaml ARGS` (or `rayskd resume ARGS`) in its own process group,
    killed whole on exit."""
    cmd = [sys.executable, "-m", "rayskd", command, *([os.path.abspath("configs/demo.yaml")] if command == "train"
                                                      else []), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=cwd)
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
    victims = our_processes(f"ray::{name}")
    assert victims, f"no {name} process found"
    victims[0].send_signal(signal.SIGKILL)
    return victims[0].pid


def every_step_kept(run, at_least: int, log: str) -> None:
    """The stopped run's newest checkpoint is its last logged step (>= at_least), committed and
    intact (every file as its manifest says): nothing trained is lost. (That such a checkpoint
    resumes with no step lost or repeated: the SIGTERM and damaged-checkpoint resumes in this
    file, and test_resume.py; each resume costs a ~45 CPU-s start-up.)"""
    from rayskd import checkpoint

    assert checkpoint.latest(str(run)) is not None, log[-3000:]
    step, path = checkpoint.latest(str(run))
    assert step == len(metrics(run)) >= at_least, log[-3000:]
    assert checkpoint.verify(path) is None
    assert [m["step"] for m in metrics(run)] == list(range(1, step + 1))


def test_killed_rollout_worker_and_teacher_and_bad_rewards_lose_nothing(demo_assets, tmp_path, rewards_dir,
                                                                       no_leftover_engines):
    """One run: the rollout worker killed after step 2 (restarted, its prompts retried: none lost or
    repeated, and it samples the current weights), the teacher scorer killed after step 3
    (restarted, its work retried), and a reward that returns NaN, bools, None, numpy floats and
    sometimes allocates 40 GB (each bad sample counted and scored 0)."""
    from rayskd.config import load_config
    from rayskd.data.dataset import PromptSampler

    assets, _ = demo_assets
    run = tmp_path / "run"
    args = ["run.steps=5", f"run.output_dir={run}", "learner.world_size=1", "learner.micro_batch_size=64", *FAST,
            *demo_paths(assets), "reward.function=my_rewards:bad_values", "reward.max_memory_mb=1024"]
    with training(*args, cwd=str(rewards_dir)) as proc:
        wait_for_steps(run, 2, proc)
        kill_actor("RolloutEngine")
        wait_for_steps(run, 3, proc)
        kill_actor("TeacherScorer")
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
        assert m["kd_divergence"] is not None and m["kd_divergence"] > 0  # the restarted teacher scored
        assert m["reward_errors"] > 0 and m["reward_mean"] == m["reward_mean"]  # finite: the bad ones scored 0


def test_a_learner_failure_then_a_damaged_checkpoint_and_a_resume_on_another_layout(demo_assets, tmp_path,
                                                                                    no_leftover_engines):
    """A learner rank killed mid-run (automatic restarts off: test_resume.py has them): exit 1 with
    the resume hint and what happened, and every committed checkpoint complete. Then, on that
    run: a resume on an impossible layout is refused in seconds before Ray starts, leaving the
    run's config alone; with the newest checkpoint truncated, a resume on one learner rank (two
    wrote it) passes over it to the one before."""
    from rayskd import checkpoint

    run = tmp_path / "run"
    with training("run.steps=50", "run.checkpoint_every=1", "run.keep_checkpoints=3", f"run.output_dir={run}",
                  "learner.world_size=2", "run.eval_every=0", "run.eval_max_prompts=16", "run.max_restarts=0") as proc:
        wait_for_steps(run, 4, proc)  # step 3's checkpoint is committed before step 4 is logged
        kill_actor("Learner")
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert f"rayskd resume {run}" in err
    # said once, for what it is (issue 26.4): a lost learner, not "an actor failed to start", and
    # not Ray's paragraph of possible causes
    assert "learner rank" in err and " died" in err and "failed to start" not in err, err[-3000:]
    assert "Some common causes include" not in err, err[-3000:]
    root = run / "checkpoints"
    committed = [d for d in os.listdir(root) if not d.endswith(".tmp")]
    assert committed and all((root / d / "COMPLETE").exists() for d in committed)
    config = (run / "config.yaml").read_text()

    # an impossible layout: exit 2 in seconds, before Ray starts, the run's config untouched
    t0 = time.time()
    r = rayskd("resume", str(run), "learner.world_size=3", "run.steps=4")
    assert r.returncode == 2 and "learner.world_size=3" in r.stderr, r.stderr
    assert time.time() - t0 < 60 and "Started a local Ray instance" not in r.stdout + r.stderr
    assert (run / "config.yaml").read_text() == config

    # the newest checkpoint truncated, the one before missing nothing: resume from it, on one
    # learner rank where two wrote it
    newest, _ = checkpoint.latest(str(run))
    assert newest >= 3
    model = root / f"step_{newest:06d}" / "hf" / "model.safetensors"
    with open(model, "r+b") as f:
        f.truncate(os.path.getsize(model) // 2)
    r = rayskd("resume", str(run), f"run.steps={newest + 1}", "learner.world_size=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"step_{newest:06d} is damaged (hf/model.safetensors has" in r.stdout, r.stdout[-3000:]
    assert f"step {newest - 1}" in r.stdout, r.stdout[-3000:]
    assert [m["step"] for m in metrics(run)] == list(range(1, newest + 2))
    assert "world_size: 1" in (run / "config.yaml").read_text()  # rewritten once the resume worked


def test_sigterm_then_ctrl_c_each_checkpoint_and_the_resumes_continue(demo_assets, tmp_path, no_leftover_engines):
    """SIGTERM (what `ray job stop` and schedulers send): a checkpoint after the current step and
    exit 3 (stopped before the requested steps: not a finished run). The resume continues, and
    Ctrl-C (SIGINT to the whole foreground group) checkpoints the last completed step and exits
    130. The learner is bf16 (issue
    25.4): each resume's check of the engines against the restored learner takes bf16's tolerance."""
    from rayskd import checkpoint

    run = tmp_path / "run"
    args = ["run.steps=40", f"run.output_dir={run}", "learner.world_size=1", "learner.micro_batch_size=64",
            "learner.bf16=true", *FAST]
    with training(*args) as proc:
        wait_for_steps(run, 2, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err[-3000:]
    assert "stopped on request" in out
    step, _ = checkpoint.latest(str(run))
    assert step == len(metrics(run)) and step < 40

    with training(str(run), "run.steps=40", command="resume") as proc:
        wait_for_steps(run, step + 2, proc)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert f"rayskd resume {run}" in err
    assert "engines float32, learner bfloat16" in out, out[-3000:]
    every_step_kept(run, at_least=step + 2, log=out)
