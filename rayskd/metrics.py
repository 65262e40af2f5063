"""Step metrics: one JSON object per step in RUN_DIR/metrics.jsonl, and a progress line."""
from __future__ import annotations

import json
import math
import os
import sys
import time


def _fmt_duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsLog:
    def __init__(self, run_dir: str, total_steps: int, stream=sys.stdout):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.total, self.stream = total_steps, stream
        self.step_times: list[float] = []

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > `step` (written after the checkpoint a run resumes from)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def log(self, record: dict) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.step_times.append(record.get("step_s", 0.0))
        recent = self.step_times[-10:]
        eta = (self.total - record["step"]) * (sum(recent) / len(recent))
        kd = record.get("kd_divergence")
        line = (f"step {record['step']}/{self.total} | reward {record['reward_mean']:.3f} | "
                f"kd {kd if kd is None else format(kd, '.4f')} | len {record['response_len_mean']:.1f} | "
                f"{record['tokens_per_s']:.0f} tok/s | {record['step_s']:.1f} s/step | left {_fmt_duration(eta)}")
        if "eval_accuracy" in record:
            line += f" | eval {record['eval_accuracy']:.3f}"
        print(line, file=self.stream, flush=True)

    def event(self, message: str) -> None:
        print(f"[rayskd {time.strftime('%H:%M:%S')}] {message}", file=self.stream, flush=True)
