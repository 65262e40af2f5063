"""Runs one after another on the same actors (rayskd.sweep, trainer.Warm): a run on a previous
run's actors is the run it would have been on new ones, number for number, whatever ran on
them before; what its config would start differently is started anew."""
import json
import os
import subprocess
import sys

import pytest

from test_resume import DETERMINISTIC, small_dataset
from test_system import demo_paths, metrics

pytestmark = pytest.mark.slow

SWEEP = """
import json, sys
from rayskd.config import load_config
from rayskd.sweep import train_all
runs = json.loads(sys.argv[1])
train_all([load_config("configs/demo.yaml", overrides) for overrides in runs], driver_log=True)
"""


def test_a_run_on_a_previous_runs_actors_equals_a_run_on_new_ones(demo_assets, tmp_path, no_leftover_engines):
    """Three runs in one process: forward KL on the teacher's top-8 (on new actors), then GKD on
    the teacher's own samples (another objective, and a teacher that also generates: its own
    teacher and teacher engine, one actor more than the first run placed, the student's engines
    and learners reused), then the first run again on those actors (the teacher engine shut
    down). The third run's every metric and evaluation equal the first's: the learners loaded
    the student anew with a new optimizer and the objective of their run, and the engines took
    its weights back (step 0's evaluation is the initial student's again)."""
    data = tmp_path / "train.jsonl"
    small_dataset(demo_assets[0], data, n=32)
    common = [*demo_paths(demo_assets[0]), f"data.train_path={data}", "run.steps=3", "learner.world_size=2",
              "algorithm.prompts_per_step=8", "run.eval_max_prompts=16", "run.eval_samples=4", "run.eval_k=[1,4]"]
    topk = ["algorithm.kd.estimator=topk", "teacher.top_k=8", "algorithm.kd.divergence=forward_kl"]
    gkd = ["algorithm.kd.estimator=topk", "teacher.top_k=8", "algorithm.kd.divergence=generalized_jsd",
           "algorithm.gkd.lmbda=0.5", "algorithm.gkd.off_policy=teacher", "teacher.generation.num_workers=1"]
    runs = [[*common, *topk, f"run.output_dir={tmp_path / 'first'}"],
            [*common, *gkd, f"run.output_dir={tmp_path / 'gkd'}"],
            [*common, *topk, f"run.output_dir={tmp_path / 'again'}"]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-c", SWEEP, json.dumps(runs)], capture_output=True, text=True, env=env,
                       timeout=900)
    logs = {name: (tmp_path / name / "driver.log").read_text() for name in ("first", "gkd", "again")}
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:] + "".join(logs.values())[-3000:]
    assert "reusing" not in logs["first"]
    assert "reusing the previous run's rollout, learner:" in logs["gkd"], logs["gkd"][-2000:]
    assert "reusing the previous run's rollout, learner:" in logs["again"], logs["again"][-2000:]
    first, gkd, again = metrics(tmp_path / "first"), metrics(tmp_path / "gkd"), metrics(tmp_path / "again")
    assert [m["step"] for m in again] == [1, 2, 3]
    for a, b in zip(first, again):
        for key in DETERMINISTIC:
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))
    assert all(m["sequences_by_origin"]["teacher"] > 0 for m in gkd)

    def evals(name):
        rows = [json.loads(line) for line in open(tmp_path / name / "eval.jsonl")]
        return [{k: v for k, v in e.items() if not k.endswith("_s")} for e in rows]

    assert evals("again") == evals("first") and [e["step"] for e in evals("first")] == [0, 3]
    assert evals("gkd")[0] == evals("first")[0]
