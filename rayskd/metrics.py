"""Step metrics: one JSON object per step in RUN_DIR/metrics.jsonl, evaluations in
RUN_DIR/eval.jsonl, the same scalars in TensorBoard / W&B, and a progress line."""
from __future__ import annotations

import json
import math
import os
import sys
import time

from dataclasses import asdict, dataclass, fields

from .evaluation import format_eval
from .tracking import scalars


@dataclass
class StepRecord:
    """One step's line of metrics.jsonl: every key a step logs is defined here, once. The
    producers fill their parts by name (an unknown name is an error): the rollouts'
    statistics (`batch.batch_stats`), the update's (`learner.StepMetrics.record`), the
    driver's counters and phase timings (`trainer.Trainer.step`); the console line, the
    trackers, `rayskd report` and scripts/ read these names. Fields left None are not written."""
    step: int
    # the step's rollouts (batch.batch_stats)
    reward_mean: float | None = None
    reward_std: float | None = None
    response_len_mean: float | None = None
    response_tokens: float | None = None  # response tokens trained on this step
    empty_frac: float | None = None
    truncated_frac: float | None = None  # responses that hit rollout.max_new_tokens
    reward_errors: int | None = None  # samples whose reward raised (scored 0)
    reward_timeouts: int | None = None
    weights_version_sampled: int | None = None  # the oldest weights version a sample was drawn with
    prompt_uids: list | None = None  # the training rows of the step's prompts
    # the update (learner.StepMetrics.record)
    policy_loss: float | None = None
    kd_loss: float | None = None
    kd_divergence: float | None = None  # k1 mean of KL(student || teacher) over the KD-masked tokens
    kd_tokens: int | None = None
    kd_divergence_by_teacher: dict | None = None  # several teachers: each one's, by name (teacher.names)
    # sequences of other origins (algorithm.gkd.lmbda < 1): per origin (student, dataset)
    kd_divergence_by_origin: dict | None = None
    sequences_by_origin: dict | None = None
    reward_by_origin: dict | None = None
    skd_acceptance: float | None = None  # speculative KD: proposed tokens the teacher kept
    kd_weight_mean: float | None = None  # the teacher term's importance weight, over its tokens
    entropy: float | None = None
    clip_frac: float | None = None
    grad_norm: float | None = None
    # learner.log_term_grads: the batch gradient of each term (with its coefficient) and their cosine
    pg_grad_norm: float | None = None
    kd_grad_norm: float | None = None
    term_grad_cosine: float | None = None
    sampler_mismatch_max: float | None = None  # max |mu - pi_theta| of a sampled token's probability
    sampler_mismatch_k3: float | None = None  # mean k3 of KL(mu || pi_theta) per token
    skipped_update: bool | None = None
    nonfinite_losses: int | None = None
    tis_weight_mean: float | None = None  # algorithm.tis_cap > 0
    rehearsal_loss: float | None = None  # algorithm.rehearsal.coef > 0
    teacher_nonfinite_tokens: int | None = None  # tokens a teacher gave a non-finite value (their
    teacher_nonfinite_sequences: int | None = None  # sequences got no teacher term)
    nonfinite_teachers: list | None = None  # the teacher workers that gave them
    # the driver
    kd_coef: float | None = None
    distillm_t: float | None = None  # DistiLLM's probability of the student's sequences (algorithm.distillm)
    taid_t: float | None = None  # TAID's interpolation this step trained at (divergence taid)
    staleness_max: int | None = None
    staleness_mean: float | None = None
    weights_version: int | None = None  # the engines' weights after this step's sync
    skipped_long_prompts: int | None = None
    eval_accuracy: float | None = None  # greedy, at the evaluation steps
    # seconds: from process start to the first step (its first step only), each hop, the step
    startup_s: float | None = None
    generate_s: float | None = None  # waiting for the step's rollouts
    score_s: float | None = None  # waiting for the teacher's scores
    train_s: float | None = None
    sync_s: float | None = None
    step_s: float | None = None
    tokens_per_s: float | None = None  # response tokens / step_s

    def as_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


RECORD_KEYS = frozenset(f.name for f in fields(StepRecord))
# the hops of a step, as `rayskd report` and the benchmarks split its time
PHASES = (("generate_s", "generate"), ("score_s", "teacher"), ("train_s", "learner"), ("sync_s", "weight sync"))


def _fmt_duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


class MetricsLog:
    """RUN_DIR/metrics.jsonl (one record per step), RUN_DIR/eval.jsonl (one per evaluation,
    step 0 = before training), the console's progress line and events, and the sinks of
    tracking.py (TensorBoard, W&B) with the same scalars."""

    def __init__(self, run_dir: str, total_steps: int, stream=None, sinks: list | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.eval_path = os.path.join(run_dir, "eval.jsonl")
        self.total, self.stream, self.sinks = total_steps, stream or sys.stdout, list(sinks or [])
        self.step_times: list[float] = []

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > `step` (written after the checkpoint a run resumes from)."""
        for path in (self.path, self.eval_path):
            if not os.path.exists(path):
                continue
            with open(path) as f:
                keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
            with open(path, "w") as f:
                f.writelines(keep)

    def _append(self, path: str, group: str, record: dict) -> dict:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(group, record["step"], scalars(record))
        return record

    def log(self, step: StepRecord) -> None:
        record = self._append(self.path, "train", step.as_json())
        line = (f"step {record['step']}/{self.total} | reward {_num(record.get('reward_mean'), '.3f')} | "
                f"kd {_num(record.get('kd_divergence'), '.4f')} | len {_num(record.get('response_len_mean'), '.1f')}")
        if record.get("step_s") is not None:  # (a record logged on a stop in the weight sync has no timing)
            self.step_times.append(record["step_s"])
            recent = self.step_times[-10:]
            eta = (self.total - record["step"]) * (sum(recent) / len(recent))
            line += (f" | {record['tokens_per_s']:.0f} tok/s | {record['step_s']:.1f} s/step | "
                     f"left {_fmt_duration(eta)}")
        if "eval_accuracy" in record:
            line += f" | eval {record['eval_accuracy']:.3f}"
        print(line, file=self.stream, flush=True)

    def log_eval(self, record: dict) -> None:
        """An evaluation's numbers (evaluation.summarize_eval, plus `step` and `eval_s`)."""
        self._append(self.eval_path, "eval", record)
        self.event(f"eval at step {record['step']}: {format_eval(record)} ({record['problems']} problems)")

    def event(self, message: str) -> None:
        print(f"[rayskd {time.strftime('%H:%M:%S')}] {message}", file=self.stream, flush=True)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
