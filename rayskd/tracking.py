"""Where a run's numbers go besides metrics.jsonl and eval.jsonl: TensorBoard event files in
RUN_DIR/tensorboard (run.tensorboard, on by default) and Weights & Biases (run.wandb_project;
WANDB_MODE=offline writes RUN_DIR/wandb without a network). Both get the same scalars as the
JSON files, training ones under `train/`, evaluation ones under `eval/`, at the run's step.

On a resume, TensorBoard is told to drop what was logged after the checkpoint (purge_step),
and W&B continues the same run (its id is kept in RUN_DIR/wandb_id).
"""
from __future__ import annotations

import math
import os
import uuid


def scalars(record: dict) -> dict[str, float]:
    """The numeric entries of a record (bools as 0/1; lists, strings and None left out; a dict's
    entries as key/name: the per-teacher divergences)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars({f"{key}/{k}": v for k, v in value.items()}))
            continue
        if key == "step" or isinstance(value, (str, list, tuple)) or value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out


class TensorBoardSink:
    def __init__(self, run_dir: str, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def write(self, group: str, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: str, project: str, config: dict):
        import wandb

        id_file = os.path.join(run_dir, "wandb_id")
        if os.path.exists(id_file):
            run_id = open(id_file).read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_file, "w") as f:
                f.write(run_id)
        # quiet: no run summary on the console; console="off": W&B does not capture it either
        self.run = wandb.init(project=project, id=run_id, resume="allow", dir=run_dir, config=config,
                              name=os.path.basename(os.path.normpath(run_dir)),
                              settings=wandb.Settings(quiet=True, console="off"))

    def write(self, group: str, step: int, values: dict[str, float]) -> None:
        self.run.log({f"{group}/{key}": value for key, value in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(run_dir: str, tensorboard: bool, wandb_project: str | None, config: dict,
               resume_step: int | None) -> list:
    sinks = []
    if tensorboard:
        sinks.append(TensorBoardSink(run_dir, resume_step))
    if wandb_project:
        sinks.append(WandbSink(run_dir, wandb_project, config))
    return sinks
