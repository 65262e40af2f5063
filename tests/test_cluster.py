"""A real two-node Ray cluster on this machine (`ray start`, token authentication on): the demo
submitted to it as a Ray job with `rayskd submit`, its actors placed across the nodes, and
resumed on another node layout. One cluster and one job for all of it (each costs start-ups)."""
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import stop_ray_since

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A real two-node Ray cluster on this machine, token authentication on: the head (with the
    dashboard and its job agent) carries `learner_node`, a second node started with
    `ray start --address` carries `rollout_node`. Yields (dashboard URL, GCS address, env)."""
    import json
    import shutil
    import tempfile

    t0 = time.time()
    temp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    port, dash = free_port(), free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    try:
        r = subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                            "--dashboard-host=127.0.0.1", "--num-cpus=4", "--include-dashboard=true",
                            # the job agent's HTTP port is 52365 unless told: another test's cluster may hold it
                            f"--dashboard-agent-listen-port={free_port()}",
                            f"--resources={json.dumps({'learner_node': 4})}", f"--temp-dir={temp}"],
                           env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=4",
                            f"--dashboard-agent-listen-port={free_port()}",
                            f"--resources={json.dumps({'rollout_node': 4})}"],
                           env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        yield f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}", env
    finally:
        stop_ray_since(t0)
        shutil.rmtree(temp, ignore_errors=True)


def test_submit_rejects_a_bad_config_before_submitting(cluster, tmp_path):
    address, _, env = cluster
    r = subprocess.run([sys.executable, "-m", "rayskd", "submit", "--address", address, "configs/demo.yaml",
                        "learner.lr=abc"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "learner.lr" in r.stderr
    # issue 26.6: without the cluster's token (another home, none in the environment), one line, exit 2
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["HOME"] = str(tmp_path)
    for command in (["status", "raysubmit_x"], ["submit", "configs/demo.yaml", "run.steps=1"]):
        r = subprocess.run([sys.executable, "-m", "rayskd", *command, "--address", address], env=no_token,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "authentication failed" in r.stderr, (command, r.stderr[-3000:])
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]


def test_submit_a_run_across_two_nodes_then_resume_it_on_another_node_layout(demo_assets, cluster, tmp_path,
                                                                             no_leftover_engines):
    """The demo submitted as a Ray job (`rayskd submit`, `status`, `logs`) with the rollout worker
    and the teacher on one node and the learner on the other: the weights cross nodes at every
    push. Then the run resumed by a driver on the cluster (RAY_ADDRESS) on another node layout:
    the learner on the rollout node, beside the engine and the teacher."""
    import json

    address, gcs, env = cluster
    run = os.path.abspath(tmp_path / "job-run")
    cmd = [sys.executable, "-m", "rayskd", "submit", "--address", address, "configs/demo.yaml", "run.steps=2",
           "run.eval_every=0", "run.eval_max_prompts=32", f"run.output_dir={run}",
           "rollout.resources.rollout_node=1", "learner.resources.learner_node=1", "teacher.resources.rollout_node=1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    assert re.match(r"^raysubmit_\w+$", job_id), r.stdout
    deadline = time.time() + 900
    status = ""
    while time.time() < deadline:
        s = subprocess.run([sys.executable, "-m", "rayskd", "status", job_id, "--address", address], env=env,
                           capture_output=True, text=True, timeout=60)
        status = s.stdout
        if any(word in status for word in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(5)
    logs = subprocess.run([sys.executable, "-m", "rayskd", "logs", job_id, "--address", address], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    assert "SUCCEEDED" in status, status + logs[-3000:]
    assert "step 2/2" in logs
    assert os.path.exists(os.path.join(run, "checkpoints", "step_000002", "COMPLETE"))
    placement = json.load(open(os.path.join(run, "placement.json")))
    assert len(set(placement["learner"])) == 1 and len(set(placement["rollout"])) == 1
    assert set(placement["rollout"]) != set(placement["learner"])  # the weights cross nodes at every push
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [m["weights_version_sampled"] for m in rows] == [0, 1]
    assert all(m["sync_s"] > 0 for m in rows)
    # the engine on the rollout node serves exactly the weights the learner on the other node pushed
    assert all(m["sampler_mismatch_max"] < 1e-3 for m in rows)

    # resumed onto another node layout: the learner moves to the rollout node
    rollout_node = placement["rollout"][0]
    r = subprocess.run([sys.executable, "-m", "rayskd", "resume", run, "run.steps=3",
                        "learner.resources.learner_node=0", "learner.resources.rollout_node=1"],
                       env={**env, "RAY_ADDRESS": gcs}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step 2" in r.stdout, r.stdout[-2000:]
    placement = json.load(open(os.path.join(run, "placement.json")))
    assert placement["learner"] == [rollout_node] and placement["rollout"] == [rollout_node]
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [m["step"] for m in rows] == [1, 2, 3] and rows[2]["sampler_mismatch_max"] < 1e-3
