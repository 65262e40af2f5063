"""Pure orchestration logic of the driver, with fakes (no Ray): prompt splitting over the
rollout pool and the non-finite-loss policy."""
import pytest

from rayskd.batch import PromptBatch
from rayskd.metrics import StepRecord
from rayskd.rollout_pool import RolloutPool
from rayskd.trainer import STOP_AFTER_NONFINITE, Trainer, TrainingError


class FakeGroup:
    def __init__(self, n):
        self.n = n


class FakeLog:
    def __init__(self):
        self.events = []

    def event(self, message):
        self.events.append(message)


def bare_trainer(rollout_workers=3):
    t = Trainer.__new__(Trainer)
    t.rollout, t.log, t.nonfinite_in_a_row = FakeGroup(rollout_workers), FakeLog(), 0
    return t


def test_split_prompts_contiguous_and_complete():
    pool = RolloutPool.__new__(RolloutPool)
    pool.group = FakeGroup(3)
    b = PromptBatch(list(range(8)), [[i] for i in range(8)], [str(i) for i in range(8)], ["a"] * 8)
    parts = pool.split(b)
    assert [p.uids for p in parts] == [[0, 1, 2], [3, 4], [5, 6, 7]]
    assert sum((p.prompt_ids for p in parts), []) == b.prompt_ids


def test_stop_after_three_non_finite_updates_in_a_row():
    t = bare_trainer()
    for _ in range(STOP_AFTER_NONFINITE - 1):
        t._check_finite(StepRecord(step=1, skipped_update=True))
    t._check_finite(StepRecord(step=2, skipped_update=False))  # a good step resets the count
    assert t.nonfinite_in_a_row == 0
    for _ in range(STOP_AFTER_NONFINITE - 1):
        t._check_finite(StepRecord(step=3, skipped_update=True))
    with pytest.raises(TrainingError, match="non-finite"):
        t._check_finite(StepRecord(step=4, skipped_update=True))
    assert len(t.log.events) == 2 * (STOP_AFTER_NONFINITE - 1) + 1
