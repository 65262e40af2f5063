"""Long runs: a run killed with SIGKILL right after a checkpoint and resumed gives the same
per-step metrics as the uninterrupted run (CPU, same seed), and the checkpoint layout is
complete and safe to load."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_system import FAST, metrics, rayskd

pytestmark = pytest.mark.slow

# everything the algorithm computes; timings are excluded
DETERMINISTIC = ("reward_mean", "reward_std", "kd_divergence", "kd_loss", "policy_loss", "entropy",
                 "response_len_mean", "grad_norm", "sampler_mismatch_max", "weights_version_sampled", "eval_accuracy", "staleness_max",
                 "prompt_uids")


def small_dataset(assets, path, n=64):
    rows = [json.loads(line) for line in open(os.path.join(assets, "train.jsonl"))][:n]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.mark.parametrize("staleness", [0, 1])
def test_sigkill_after_end_of_pass_then_resume_is_exact(demo_assets, tmp_path, no_leftover_engines, staleness):
    """With max_staleness=1 the checkpoint also holds the samples already drawn for the next
    step, so the resumed run trains on exactly the same ones."""
    assets, _ = demo_assets
    data = tmp_path / "train.jsonl"
    small_dataset(assets, data)  # 64 prompts, 32 per step: a pass over the data is exactly 2 steps
    config = os.path.abspath("configs/demo.yaml")
    args = ["run.steps=4", "run.checkpoint_every=1", f"data.train_path={data}", "learner.world_size=2",
            "run.eval_every=0", "run.eval_max_prompts=48", f"algorithm.max_staleness={staleness}"]

    full = tmp_path / "full"
    r = rayskd("train", config, *args, f"run.output_dir={full}")
    assert r.returncode == 0, r.stderr[-3000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "rayskd", "train", config, *args, f"run.output_dir={cut}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = cut / "checkpoints" / "step_000002" / "COMPLETE"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never wrote its step-2 checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray processes, the actors and vLLM's engine
    proc.wait()
    assert len(metrics(cut)) >= 2

    r = rayskd("resume", str(cut))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step 2" in r.stdout
    a, b = metrics(full), metrics(cut)
    assert [m["step"] for m in b] == [1, 2, 3, 4]  # neither zero steps nor a repeated pass
    for ma, mb in zip(a, b):
        for key in DETERMINISTIC:
            assert ma.get(key) == mb.get(key), (ma["step"], key, ma.get(key), mb.get(key))

    # checkpoints: the newest keep_checkpoints (2) are kept, each complete and loadable
    names = sorted(os.listdir(cut / "checkpoints"))
    assert names == ["step_000003", "step_000004"]
    ck = cut / "checkpoints" / "step_000004"
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(ck / "hf"))
    for rank in (0, 1):
        state = torch.load(ck / f"learner_rank{rank}.pt", weights_only=True)  # no arbitrary unpickling
        assert state["world_size"] == 2
    sampler = json.load(open(ck / "trainer.json"))["sampler"]
    assert (sampler["epoch"], sampler["position"]) == (1, 64)  # two full passes; the next call starts pass 3


def test_resume_of_a_finished_run_trains_nothing_more_and_can_extend(demo_assets, tmp_path, no_leftover_engines):
    config = os.path.abspath("configs/demo.yaml")
    run = tmp_path / "run"
    r = rayskd("train", config, "run.steps=1", f"run.output_dir={run}", "learner.world_size=1", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    r = rayskd("resume", str(run), "run.steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in metrics(run)] == [1, 2]
    r = rayskd("train", config, "run.steps=1", f"run.output_dir={run}")
    assert r.returncode == 2 and "rayskd resume" in r.stderr
