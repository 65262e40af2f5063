"""Issue 26, end to end with real processes, on one run directory (each phase's assertions
share the run): the directory is one live process's (a second train or resume is refused at
once, naming the holder); a driver killed with SIGKILL leaves Ray processes that the next run
in that directory stops; a resume checks that its training data is what the checkpoint was
trained on (refused naming the change, or, when the change is meant, a new pass over the data);
a run whose directory vanishes stops clearly and its committed checkpoints stay whole; no Ray
process of either run outlives it; the local cluster's token file is its owner's only and the
cluster refuses a client without the token."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import our_processes
from test_failures import training, wait_for_steps
from test_system import FAST, metrics, rayskd

pytestmark = pytest.mark.slow


def ray_processes_since(t0: float) -> list[psutil.Process]:
    return our_processes("gcs_server", "raylet", "ray::", "dashboard", since=t0)


def test_one_process_per_run_directory_and_what_a_resume_checks(demo_assets, tmp_path, no_leftover_engines):
    assets, _ = demo_assets
    t0 = time.time() - 1
    data = tmp_path / "train.jsonl"
    rows = open(os.path.join(assets, "train.jsonl")).readlines()[:256]
    data.write_text("".join(rows))
    run = tmp_path / "run"
    # run.steps: more than either run can reach before it is stopped (a step takes about a second)
    args = [*FAST, "run.steps=2000", f"run.output_dir={run}", "learner.world_size=1", "learner.micro_batch_size=64",
            f"data.train_path={data}", "run.checkpoint_every=1", "run.max_restarts=0"]  # (FAST has no checkpoints)
    with training(*args) as first:
        wait_for_steps(run, 2, first)
        # 1. the directory is the first run's: a second train or resume is refused at once
        for command in (["train", os.path.abspath("configs/demo.yaml"), *args], ["resume", str(run)]):
            started = time.time()
            r = rayskd(*command)
            assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
            assert f"is in use by another rayskd run (pid {first.pid} on" in r.stderr, r.stderr
            assert time.time() - started < 60 and "Started a local Ray instance" not in r.stdout + r.stderr
        token = os.path.expanduser("~/.ray/auth_token")
        assert os.stat(token).st_mode & 0o077 == 0  # the local cluster's token: its owner's only
        # 2. the driver alone killed with SIGKILL: its Ray processes may outlive it
        first.send_signal(signal.SIGKILL)
        first.wait()
        time.sleep(2)
        left = [p for p in ray_processes_since(t0) if p.is_running()]
    steps_before = len(metrics(run))

    # 3. the data changed since the checkpoint: refused before Ray starts, naming the change
    data.write_text("".join(rows[::-1]))
    r = rayskd("resume", str(run))
    assert r.returncode == 2 and "holds the same rows in another order" in r.stderr, r.stderr[-2000:]
    assert "run.allow_data_change=true" in r.stderr and "Started a local Ray instance" not in r.stdout + r.stderr

    # 4. meant: the resume trains on the data as it is, from the start of a new pass; it stops what
    # the killed driver left of Ray. Then its directory vanishes mid-run: a clear stop, and what
    # was committed is whole
    moved = tmp_path / "moved"
    with training(str(run), "run.allow_data_change=true", command="resume") as resumed:
        wait_for_steps(run, steps_before + 2, resumed)
        os.rename(run, moved)
        out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 1, out[-2000:] + err[-3000:]
    assert "training on it as it is now, from the start of a new pass" in out, out[-3000:]
    if left:
        assert "Ray processes a previous run in this directory left behind" in out, out[-3000:]
    assert f"the run directory {run} is gone or not writable" in err, err[-3000:]
    committed = [d for d in os.listdir(moved / "checkpoints") if not d.endswith(".tmp")]
    assert committed and all((moved / "checkpoints" / d / "COMPLETE").exists() for d in committed)
    # no Ray process of either run outlives it
    deadline = time.time() + 30
    while (alive := [p for p in ray_processes_since(t0) if p.is_running() and p.status() != "zombie"]) and \
            time.time() < deadline:
        time.sleep(1)
    assert not alive, [" ".join(p.cmdline()[:2]) for p in alive]


def test_the_local_cluster_refuses_a_client_without_its_token(tmp_path):
    """Token authentication is on for the cluster rayskd starts (Ray's default, RAY_AUTH_MODE
    unset): a client with no token (another home directory) cannot join it, and the token file
    is its owner's only."""
    import ray

    from rayskd.actors import init_ray

    assert "RAY_AUTH_MODE" not in os.environ or os.environ["RAY_AUTH_MODE"] == "token"
    try:
        assert init_ray(1)
        assert os.stat(os.path.expanduser("~/.ray/auth_token")).st_mode & 0o077 == 0
        address = ray.get_runtime_context().gcs_address
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
        env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token")
        probe = f"import ray; ray.init(address={address!r}, log_to_driver=False); print('joined')"
        r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert "joined" not in r.stdout and r.returncode != 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "token" in (r.stdout + r.stderr).lower(), r.stderr[-2000:]
    finally:
        ray.shutdown()
        shutil.rmtree(tmp_path / ".ray", ignore_errors=True)
