"""Step metrics: one JSON object per step in RUN_DIR/metrics.jsonl, evaluations in
RUN_DIR/eval.jsonl, the same scalars in TensorBoard / W&B, and a progress line."""
from __future__ import annotations

import json
import math
import os
import sys
import time

from .evaluation import format_eval
from .tracking import scalars


def _fmt_duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


class MetricsLog:
    """RUN_DIR/metrics.jsonl (one record per step), RUN_DIR/eval.jsonl (one per evaluation,
    step 0 = before training), the console's progress line and events, and the sinks of
    tracking.py (TensorBoard, W&B) with the same scalars."""

    def __init__(self, run_dir: str, total_steps: int, stream=sys.stdout, sinks: list | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.eval_path = os.path.join(run_dir, "eval.jsonl")
        self.total, self.stream, self.sinks = total_steps, stream, list(sinks or [])
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

    def log(self, record: dict) -> None:
        record = self._append(self.path, "train", record)
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
