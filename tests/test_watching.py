"""Issue 12 end to end: a short demo run (the CLI's main path, two learner ranks) writes its evaluations (greedy, pass@1, pass@k) to
eval.jsonl, the same scalars to TensorBoard and to W&B (offline), keeps the console to its own
lines while each actor's output goes to RUN_DIR/logs/; `rayskd eval` judges the run's newest
checkpoint and `rayskd report` draws it."""
import json
import os
import re
from collections import Counter

import pytest

from test_system import REQUIRED, demo_paths, metrics, rayskd

pytestmark = pytest.mark.slow


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_a_run_is_evaluated_tracked_and_quiet(demo_assets, tmp_path, monkeypatch, no_leftover_engines):
    """Also the CLI's main path (KDRL, the demo's config) with two learner ranks. At lr 1e-3 an
    update moves the student's probabilities by more than 1e-3, so the engine's and the
    learner's log-probs agreeing within 1e-3 on each step's samples, drawn with the weights the
    previous step pushed, says the push reached the engine. And the teacher-hacking monitor
    (issue 28.7) with the initial student as its golden model: at step 0 the golden model's
    divergence from the student, on the student's own sampled evaluation responses, is 0 (the
    same model scored the very samples the engine drew), the teacher's is not. And two teachers
    routed by the demo's `domain` field (issue 28.6), the second (for `carry` prompts) the
    initial student: at step 1 its divergence, logged apart from the teacher's, is 0 on the
    sequences routed to it."""
    import torch
    from transformers import AutoModelForCausalLM

    assets, _ = demo_assets
    run = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "offline")
    r = rayskd("train", os.path.abspath("configs/demo.yaml"), *demo_paths(assets), "run.steps=4",
               f"run.output_dir={run}", "learner.world_size=2", "learner.lr=1e-3", "run.eval_every=2",
               "run.eval_max_prompts=24", "run.eval_samples=4", "run.eval_k=[1,2,4]", "run.wandb_project=rayskd-test",
               "run.checkpoint_every=2", f"teacher.golden_path={assets}/student",
               f"teacher.others=[{assets}/student]", "teacher.route_field=domain", "teacher.names=[plain,carry]",
               "teacher.coefs=[1,0.5]",
               "teacher.dtype=float32")  # (the golden model scores as the fp32 engine samples: 0 at step 0)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # every step sampled the newest weights, the engine agreeing with the learner on them
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert [m["weights_version_sampled"] for m in rows] == [0, 1, 2, 3]
    for m in rows:
        assert REQUIRED <= set(m), REQUIRED - set(m)
        assert m["kd_divergence"] > 0 and m["skipped_update"] is False and m["sampler_mismatch_max"] < 1e-3
    by_teacher = [m["kd_divergence_by_teacher"] for m in rows]
    assert abs(by_teacher[0]["carry"]) < 1e-3 and by_teacher[0]["plain"] > 0.01, by_teacher[0]
    assert all(set(b) == {"plain", "carry"} for b in by_teacher)
    assert (run / "config.yaml").exists()
    final = AutoModelForCausalLM.from_pretrained(str(run / "final"))  # the exported student loads
    start = AutoModelForCausalLM.from_pretrained(os.path.join(assets, "student"))
    seq = torch.tensor([[0, 7, 10, 4, 5, 11, 0, 9, 7]])
    with torch.no_grad():
        moved = (final(seq).logits.softmax(-1) - start(seq).logits.softmax(-1)).abs().max()
    assert float(moved) > 1e-3  # the updates moved the student: a push that missed the engine would show
    assert "held-out accuracy" in r.stdout

    # evaluations before training and every 2 steps, with pass@k ordered as it must be
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4]
    for e in evals:
        assert e["problems"] == 24 and e["samples_per_problem"] == 4
        assert 0 <= e["pass@1"] <= e["pass@2"] <= e["pass@4"] <= 1 and 0 <= e["greedy_accuracy"] <= 1
        assert e["response_len_mean"] > 0
    assert [m["eval_accuracy"] for m in metrics(run) if "eval_accuracy" in m] == \
        [e["greedy_accuracy"] for e in evals[1:]]
    # the monitor: KL(student || teacher) and KL(student || golden) on the sampled responses
    assert abs(evals[0]["golden_kl"]) < 1e-3 and evals[0]["proxy_kl"] > 0.01, evals[0]
    assert all(isinstance(e["golden_kl"], float) for e in evals)
    assert "KL to teacher" in r.stdout and json.load(open(run / "placement.json"))["golden"]

    # TensorBoard: the same numbers at the same steps
    tb = tensorboard_scalars(run / "tensorboard")
    assert tb["train/reward_mean"] == pytest.approx({m["step"]: m["reward_mean"] for m in metrics(run)})
    assert tb["eval/pass@4"] == pytest.approx({e["step"]: e["pass@4"] for e in evals})
    assert tb["train/kd_divergence_by_teacher/carry"] == pytest.approx(
        {m["step"]: m["kd_divergence_by_teacher"]["carry"] for m in rows}, abs=1e-6)
    # W&B, offline: a run written under RUN_DIR/wandb with no network
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), os.listdir(run / "wandb")

    # the console: rayskd's own lines only, nothing repeated per step but the progress line
    out = [re.sub(r"^\[rayskd \d\d:\d\d:\d\d\] ", "", line) for line in r.stdout.splitlines() if line.strip()]
    assert len([line for line in out if line.startswith("step ")]) == 4
    repeated = [line for line, n in Counter(out + r.stderr.splitlines()).items() if n > 1 and line.strip()]
    assert not repeated, repeated
    assert "RotaryEmbedding" not in r.stdout + r.stderr and "pid=" not in r.stdout + r.stderr
    for name in ("rollout_0", "teacher_0", "teacher1_0", "golden_0", "learner_0", "learner_1"):
        assert (run / "logs" / f"{name}.log").stat().st_size > 0, name

    # `rayskd eval RUN_DIR`: the newest checkpoint, on the run's rollout settings
    r = rayskd("eval", str(run), "--k", "1,2", "--samples", "2", "--out", str(tmp_path / "eval.json"),
               "run.eval_max_prompts=24")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["step"] == 4 and result["problems"] == 24 and result["model"].endswith("step_000004/hf")
    assert result["greedy_accuracy"] == pytest.approx(evals[-1]["greedy_accuracy"])  # the same weights, greedy
    assert "pass@2" in r.stdout and 0 <= result["pass@1"] <= result["pass@2"] <= 1

    # `rayskd report`: one picture
    r = rayskd("report", str(run), "--out", str(tmp_path / "report.png"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_bad_input_before_starting_anything(demo_assets, tmp_path):
    assets, _ = demo_assets
    r = rayskd("eval", f"{assets}/student")
    assert r.returncode == 2 and "--data" in r.stderr, r.stderr
    r = rayskd("eval", str(tmp_path))
    assert r.returncode == 2 and "neither a model directory" in r.stderr, r.stderr
    r = rayskd("eval", f"{assets}/student", "--data", f"{assets}/eval.jsonl", "--k", "1,16")
    assert r.returncode == 2 and "pass@16" in r.stderr, r.stderr
    assert "Started a local Ray instance" not in r.stdout + r.stderr
    r = rayskd("report", str(tmp_path), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr, r.stderr


def test_a_failure_names_the_actor_and_ends_with_its_traceback():
    """A method that raises, and a constructor that raises (the actor never starts)."""
    import ray

    from rayskd.actors import describe_failure

    @ray.remote(num_cpus=0)
    class Scorer:
        def score(self, x):
            return self._check(x)

        def _check(self, x):
            raise ValueError(f"bad sample {x}")

    @ray.remote(num_cpus=0)
    class Engine:
        def __init__(self):
            raise RuntimeError("unsupported head size")

        def ready(self):
            return True

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(Exception) as caught:
            ray.get(Scorer.remote().score.remote(7))
        text = describe_failure(caught.value)
        with pytest.raises(Exception) as caught:
            ray.get(Engine.remote().ready.remote())
        died = describe_failure(caught.value)
    finally:
        ray.shutdown()
    assert died.splitlines()[0].startswith("Engine.__init__") and \
        "failed to start: RuntimeError: unsupported head size" in died.splitlines()[0], died
    first, *tail = text.splitlines()
    assert "Scorer.score" in first and "ValueError: bad sample 7" in first, text
    assert any("_check" in line for line in tail) and tail[-1].strip() == "ValueError: bad sample 7", text
    assert len(tail) <= 8
