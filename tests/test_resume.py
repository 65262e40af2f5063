"""Long runs: a run killed with SIGKILL right after a checkpoint and resumed gives the same
per-step metrics as the uninterrupted run (CPU, same seed), and so does a run that restarts
itself after losing a learner; the checkpoint layout is complete and safe to load."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from test_system import metrics, rayskd

pytestmark = pytest.mark.slow

# everything the algorithm computes; timings are excluded
DETERMINISTIC = ("reward_mean", "reward_std", "kd_divergence", "kd_loss", "policy_loss", "entropy",
                 "response_len_mean", "grad_norm", "sampler_mismatch_max", "weights_version_sampled", "eval_accuracy", "staleness_max",
                 "prompt_uids", "taid_t", "sequences_by_origin", "reward_by_origin", "kd_divergence_by_origin")


def small_dataset(assets, path, n=64):
    rows = [json.loads(line) for line in open(os.path.join(assets, "train.jsonl"))][:n]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def kill_after_checkpoint(config, args, run_dir, step: int) -> None:
    """Start a run and SIGKILL its whole process group (the driver, its Ray processes, the actors
    and vLLM's engine) as soon as the checkpoint of `step` is complete."""
    proc = subprocess.Popen([sys.executable, "-m", "rayskd", "train", config, *args, f"run.output_dir={run_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = run_dir / "checkpoints" / f"step_{step:06d}" / "COMPLETE"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the run never wrote its step-{step} checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def learner_lost_after_checkpoint_heals_itself(args, run_dir, expected: list[dict]) -> None:
    """A learner rank killed with SIGKILL right after the step-2 checkpoint: the driver stops,
    restarts from its newest intact checkpoint in the same process (run.max_restarts), and
    finishes by itself with every metric equal to the uninterrupted run's."""
    from test_failures import kill_actor, training

    marker = run_dir / "checkpoints" / "step_000002" / "COMPLETE"
    with training(*args, f"run.output_dir={run_dir}") as proc:
        deadline = time.time() + 600
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the run never wrote its step-2 checkpoint"
        kill_actor("Learner")
        out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "restarting from the newest checkpoint (automatic restart 1 of run.max_restarts=2" in err, err[-3000:]
    assert "learner rank" in err and " died" in err, err[-3000:]
    healed = metrics(run_dir)
    assert [m["step"] for m in healed] == [1, 2, 3, 4]
    for ma, mb in zip(expected, healed):
        for key in DETERMINISTIC:
            assert ma.get(key) == mb.get(key), (ma["step"], key, ma.get(key), mb.get(key))


def learner_tensors(run_dir, step: int = 4) -> dict:
    """Every tensor of a checkpoint's learner state (masters and Adam moments by name)."""
    from safetensors.torch import load_file

    directory = run_dir / "checkpoints" / f"step_{step:06d}" / "learner"
    return {k: v.double() for f in sorted(os.listdir(directory)) if f.startswith("state-")
            for k, v in load_file(directory / f).items()}


def close(a, b, rel=1e-4) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rel * max(1.0, abs(a))
    return a == b


# TAID (issue 28.3): its t is training state, moved by the term's value each step; and GKD
# (issue 29.3): half the prompts (drawn per step) trained on the dataset's responses
TAID = ["teacher.top_k=8", "algorithm.kd.estimator=topk", "algorithm.kd.divergence=taid", "algorithm.gkd.lmbda=0.5"]


def run_args(tmp_path, assets, stage: int, staleness: int) -> list[str]:
    data = tmp_path / "train.jsonl"
    small_dataset(assets, data, n=48)  # 48 prompts, 24 per step: a pass over the data is exactly 2 steps
    # 192 sequences per step: whole micro-batches of 32 on 1, 2 or 3 ranks; 6 requests of 4
    # prompts, whole requests for 1, 2 or 3 ranks (a call's samples are seeded by its prompts)
    return ["run.steps=4", "rollout.prompts_per_request=4", "run.checkpoint_every=1", f"data.train_path={data}",
            "learner.world_size=2", f"learner.zero_stage={stage}", "algorithm.prompts_per_step=24",
            "learner.micro_batch_size=32", "run.eval_every=0", "run.eval_max_prompts=48",
            f"algorithm.max_staleness={staleness}"]


@pytest.fixture(scope="module")
def uninterrupted(demo_assets, tmp_path_factory):
    """The reference both tests compare with: 2 learner ranks at ZeRO-3, generating a step ahead,
    TAID's t as training state, GKD with lambda 0.5 on the dataset's responses, 4 steps
    uninterrupted. Returns (args, its run directory)."""
    tmp = tmp_path_factory.mktemp("resume")
    args = run_args(tmp, demo_assets[0], stage=3, staleness=1) + TAID
    full = tmp / "full"
    r = rayskd("train", os.path.abspath("configs/demo.yaml"), *args, f"run.output_dir={full}")
    assert r.returncode == 0, r.stderr[-3000:]
    return args, full


def test_sigkill_then_resume_is_exact_and_resumes_on_another_layout(uninterrupted, tmp_path, no_leftover_engines):
    """The run killed with SIGKILL right after its step-2 checkpoint (the end of a pass over the
    data; the checkpoint holds samples already drawn for the next step, split into as many
    requests as the layout had): resumed as it was, every metric equals the uninterrupted run's,
    TAID's t included; resumed on 3 learner ranks at ZeRO-2, 2 teachers and 2 rollout engines, it
    continues with the same optimizer state and the same metrics to float tolerance."""
    config = os.path.abspath("configs/demo.yaml")
    args, full = uninterrupted
    ts = [m.get("taid_t") for m in metrics(full)]
    for m in metrics(full):  # GKD: about half the prompts each step answered by the dataset, all correctly
        n = m["sequences_by_origin"]
        assert n["student"] + n["dataset"] == 192 and 0 < n["dataset"] < 192 and m["reward_by_origin"]["dataset"] == 1
        assert None not in (m["kd_divergence_by_origin"]["student"], m["kd_divergence_by_origin"]["dataset"])
    # from t_start (the first update only records the term), then at least the linear floor
    assert ts[:2] == [0.4, 0.4] and all(a < b for a, b in zip(ts[1:], ts[2:])) and 0.85 - 1e-12 <= ts[-1] < 1, ts

    cut = tmp_path / "cut"
    kill_after_checkpoint(config, args, cut, 2)
    assert len(metrics(cut)) >= 2
    other = tmp_path / "other_layout"
    shutil.copytree(cut, other)

    r = rayskd("resume", str(cut))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step 2" in r.stdout
    a, b = metrics(full), metrics(cut)
    assert [m["step"] for m in b] == [1, 2, 3, 4]  # neither zero steps nor a repeated pass
    for ma, mb in zip(a, b):
        for key in DETERMINISTIC:
            assert ma.get(key) == mb.get(key), (ma["step"], key, ma.get(key), mb.get(key))

    # another layout (test_elastic restores every rank count and stage at the learner)
    r = rayskd("resume", str(other), "learner.world_size=3", "learner.zero_stage=2", "teacher.num_workers=2",
               "rollout.num_workers=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2" in r.stdout, r.stdout[-2000:]
    c = metrics(other)
    assert [m["step"] for m in c] == [1, 2, 3, 4]
    for ma, mc in zip(a[2:], c[2:]):  # the same samples, the same update up to summation order
        for key in DETERMINISTIC:
            assert close(ma.get(key), mc.get(key)), (ma["step"], key, ma.get(key), mc.get(key))
    written = json.load(open(other / "checkpoints" / "step_000004" / "learner" / "state.json"))
    assert (written["world_size"], written["zero_stage"], written["step"]) == (3, 2, 4)
    # the optimizer state after two more updates: every master and moment as the original's
    ours, theirs = learner_tensors(other), learner_tensors(full)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert float((ours[key] - theirs[key]).norm()) <= 1e-4 * float(theirs[key].norm()) + 1e-12, key

    # checkpoints: the newest keep_checkpoints (2) are kept, each complete and loadable
    names = sorted(os.listdir(cut / "checkpoints"))
    assert names == ["step_000003", "step_000004"]
    ck = cut / "checkpoints" / "step_000004"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(ck / "hf"))
    # tensors in safetensors, the rest JSON: nothing is unpickled on resume
    assert all(f.endswith((".safetensors", ".json")) for f in os.listdir(ck / "learner"))
    state = json.load(open(ck / "learner" / "state.json"))
    assert (state["world_size"], state["zero_stage"], state["step"]) == (2, 3, 4)
    trainer_state = json.load(open(ck / "trainer.json"))
    sampler = trainer_state["sampler"]
    assert (sampler["epoch"], sampler["position"]) == (1, 48)  # two full passes; the next call starts pass 3
    assert trainer_state["taid"]["t"] >= ts[-1]  # (moved again by step 4's term: the t of step 5)

    # a finished run: `train` into it is refused (`resume` extends one: test_cluster.py and the
    # real shapes in test_architectures.py resume finished runs with more steps)
    r = rayskd("train", config, *args, f"run.output_dir={full}")
    assert r.returncode == 2 and "rayskd resume" in r.stderr


def test_a_learner_lost_at_zero3_heals_itself_exactly(uninterrupted, tmp_path, no_leftover_engines):
    """Issue 26.5 at ZeRO-3, generating a step ahead: a learner rank killed with SIGKILL right
    after the step-2 checkpoint; the run restores its newest checkpoint in the same process (a
    ZeRO-3 restore with the samples drawn ahead, as `rayskd resume` does) and every metric equals
    the uninterrupted run's."""
    args, full = uninterrupted
    learner_lost_after_checkpoint_heals_itself(args, tmp_path / "healed", metrics(full))
