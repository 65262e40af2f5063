"""scripts/gpu_check.py --tiny: the GPU check's every phase, with tiny shapes on CPU, so that the
script the GPU machine runs (rarely, for minutes) cannot rot between its runs."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

FIELDS = ("device", "date", "versions", "generate_tokens_per_s", "teacher_tokens_per_s", "learner_tokens_per_s",
          "weight_push_s", "samples_per_s_on_policy", "samples_per_s_staleness1", "plain_vllm_tokens_per_s",
          "plain_teacher_tokens_per_s", "plain_learner_tokens_per_s", "resume_s")


def test_gpu_check_tiny_runs_every_phase_and_writes_its_json(tmp_path, no_leftover_engines):
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--tiny", "--out", str(tmp_path / "out"), "--work",
                        str(tmp_path / "work")], capture_output=True, text=True, timeout=1200)
    log = (tmp_path / "out" / "gpu_check.log").read_text() if (tmp_path / "out" / "gpu_check.log").exists() else ""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + log[-5000:]
    report = json.loads((tmp_path / "out" / "gpu-cpu-tiny.json").read_text())
    assert all(p["status"] == "ok" for p in report["phases"].values()), report["phases"]
    for field in FIELDS:
        assert report.get(field) not in (None, {}), field
    assert set(report["weight_push_s"]) == {"object_store", "collective"}
    assert report["engine_learner_logprob_max_diff"] < 1e-3
    assert report["on_policy_sampler_mismatch_max"] < 1e-3
    assert "rayskd GPU check on cpu" in r.stdout and "learner tokens/s" in r.stdout  # the summary, last
