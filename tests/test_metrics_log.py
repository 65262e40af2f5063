"""The run's files and console lines (no actors): a step record without timing (logged on a stop
during the weight sync: issue 11's fourth crash) still logs, evaluations go to eval.jsonl, and a
resume's truncation drops later records from both files."""
import io
import json

import pytest

from rayskd.metrics import MetricsLog, StepRecord


class Recorder:
    def __init__(self):
        self.rows = []

    def write(self, group, step, values):
        self.rows.append((group, step, values))

    def close(self):
        pass


def test_records_evaluations_truncation_and_sinks(tmp_path):
    out, sink = io.StringIO(), Recorder()
    log = MetricsLog(str(tmp_path), 10, stream=out, sinks=[sink])
    full = StepRecord(step=1, reward_mean=0.5, kd_divergence=0.25, response_len_mean=4.0, tokens_per_s=100.0,
                      step_s=1.0, prompt_uids=[1, 2], skipped_update=False)
    log.log(full)
    log.log(StepRecord(step=2, reward_mean=0.5, kd_divergence=None, response_len_mean=4.0))  # stopped in the sync
    log.log_eval({"step": 2, "problems": 3, "greedy_accuracy": 1 / 3, "pass@1": 0.25, "response_len_mean": 4.0})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 1/10 | reward 0.500 | kd 0.2500 | len 4.0 | 100 tok/s")
    assert lines[1] == "step 2/10 | reward 0.500 | kd n/a | len 4.0"
    assert lines[2].endswith("eval at step 2: greedy 0.333 | pass@1 0.250 | len 4.0 (3 problems)")
    assert sink.rows[0] == ("train", 1, {"reward_mean": 0.5, "kd_divergence": 0.25, "response_len_mean": 4.0,
                                         "tokens_per_s": 100.0, "step_s": 1.0, "skipped_update": 0.0})
    assert sink.rows[2][0] == "eval" and sink.rows[2][2]["pass@1"] == 0.25
    log.truncate_after(1)
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1]
    assert open(tmp_path / "eval.jsonl").read() == ""


def test_a_record_key_is_defined_once():
    """Every key a step logs is a field of StepRecord: a producer's unknown name fails at once,
    and what the report and the benchmarks read exists."""
    from rayskd.metrics import PHASES, RECORD_KEYS

    with pytest.raises(TypeError, match="reward_meen"):
        StepRecord(step=1, reward_meen=0.5)
    assert {key for key, _ in PHASES} <= RECORD_KEYS
    assert StepRecord(step=3, kd_divergence=None, grad_norm=1.5).as_json() == {"step": 3, "grad_norm": 1.5}
