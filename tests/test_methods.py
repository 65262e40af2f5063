"""Issue 28.8: the README's methods table, row by row. Every row's overrides make a valid
config on configs/demo.yaml and every teacher estimator and divergence rayskd offers has a row
(in every test run); each row trains 2 steps on the demo (`./scripts/test.sh -m methods --dist load`:
~45 s of CPU per row for the start-up alone, so not in the default run)."""
import os
import re
import shlex

import pytest

from rayskd.config import load_config
from rayskd.losses import DIVERGENCES, TEACHER_ESTIMATORS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")


def methods_table() -> list[tuple[str, list[str]]]:
    """(method, overrides) of each row of the README's methods table."""
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text[text.index("<!-- methods-table"):text.index("<!-- end of methods-table -->")]
    rows = []
    for line in table.splitlines()[3:]:  # the marker, the header, the separator
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        overrides = re.fullmatch(r"`([^`]*)`", cells[2])
        assert len(cells) == 4 and overrides, f"a methods row needs 4 cells, overrides in backticks: {line}"
        rows.append((cells[0], shlex.split(overrides.group(1))))
    return rows


ROWS = methods_table()


def test_every_row_is_a_valid_config_and_every_objective_has_a_row():
    estimators, divergences = set(), set()
    for method, overrides in ROWS:
        cfg = load_config(DEMO, overrides)
        if cfg.algorithm.kd.coef > 0:
            estimators.add(cfg.algorithm.kd.estimator)
            if TEACHER_ESTIMATORS[cfg.algorithm.kd.estimator].distribution:
                divergences.add(cfg.algorithm.kd.divergence)
    assert estimators == set(TEACHER_ESTIMATORS), set(TEACHER_ESTIMATORS) - estimators
    assert divergences == set(DIVERGENCES), set(DIVERGENCES) - divergences


@pytest.fixture(scope="module")
def rehearsal_data(demo_assets):
    """The DPH-RL row's samples (runs/demo_rehearsal.jsonl, as the row names it), presampled
    from the demo student once."""
    from test_system import rayskd

    path = os.path.join(ROOT, "runs", "demo_rehearsal.jsonl")
    if not os.path.exists(path):
        r = rayskd("presample", DEMO, f"algorithm.rehearsal.data_path={path}", "algorithm.rehearsal.presample_samples=4",
                   "algorithm.rehearsal.presample_min_correct=1", "--max-prompts", "200", cwd=ROOT)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return path


@pytest.mark.slow
@pytest.mark.methods
@pytest.mark.parametrize("method,overrides", ROWS, ids=[m for m, _ in ROWS])
def test_every_row_trains_two_steps_on_the_demo(method, overrides, request, tmp_path, no_leftover_engines):
    from test_system import FAST, metrics, rayskd

    if any(o.startswith("algorithm.rehearsal.data_path=") for o in overrides):
        request.getfixturevalue("rehearsal_data")
    else:
        request.getfixturevalue("demo_assets")
    run = tmp_path / "run"
    r = rayskd("train", DEMO, *overrides, "run.steps=2", f"run.output_dir={run}", "learner.world_size=1", *FAST,
               cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2]
    for m in rows:
        assert m["skipped_update"] is False and m["grad_norm"] > 0, m
        cfg = load_config(DEMO, overrides)
        if cfg.algorithm.kd.coef > 0:
            assert m["kd_loss"] != 0, m
        if cfg.algorithm.rehearsal.coef > 0:
            assert "rehearsal_loss" in m, m
        if cfg.algorithm.skd.top_k:  # speculative KD reports how much of the student's proposals the teacher kept
            assert 0 < m["skd_acceptance"] < 1 and m["sequences_by_origin"]["mixed"] == 256, m
        if cfg.algorithm.kd.minillm.mix_alpha:  # about 1 - alpha of the tokens are the student's
            assert 0.6 < m["skd_acceptance"] < 0.95 and m["sequences_by_origin"]["mixture"] == 256, m
        if cfg.algorithm.gkd.lmbda < 1:  # the off-policy origin's sequences are there, beside the student's
            off = cfg.algorithm.gkd.off_policy
            assert m["sequences_by_origin"][off] > 0 and m["kd_divergence_by_origin"][off] is not None, m
