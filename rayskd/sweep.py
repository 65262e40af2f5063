"""Several runs one after another in this process, on the same actors where their configs
allow (trainer.Warm): a sweep over methods, seeds or coefficients pays for the actors' start
(Ray's, vLLM's, DeepSpeed's: most of a demo run's start-up) once instead of once per run.
Each run is otherwise the run `rayskd train` would make of its config, number for number:
the learners load the student anew with a fresh optimizer, and the engines take its weights.

    from rayskd.sweep import train_all
    summaries = train_all([load_config("configs/demo.yaml", [f"run.seed={s}", f"run.output_dir=runs/s{s}"])
                           for s in range(3)])
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable

from .actors import init_ray
from .config import Config
from .trainer import Trainer, Warm, actor_count


def train_all(cfgs: Iterable[Config], driver_log: bool = False,
              after: Callable[[Config, dict], None] | None = None) -> list[dict]:
    """Train each config to its end (`Trainer.fit`'s summaries, in order). `driver_log`: each
    run's driver output (progress, events) goes to RUN_DIR/driver.log instead of stdout.
    `after(cfg, summary)`: called once each run has ended. A run that fails stops the sweep
    with its error (its last completed step checkpointed, as `rayskd train` does), every actor
    and Ray shut down; SIGTERM stops the run in progress after its checkpoint and the sweep with
    it (`rayskd resume RUN_DIR` continues either). A local Ray cluster (RAY_ADDRESS unset) is
    sized for the sweep's largest run."""
    cfgs = list(cfgs)
    warm: Warm | None = Warm(init_ray(max(actor_count(cfg) for cfg in cfgs))) if cfgs else None
    summaries = []
    try:
        for cfg in cfgs:
            trainer, warm = Trainer(cfg, warm=warm), None  # the trainer owns the actors now
            try:
                with _output(cfg.run.output_dir if driver_log else None):
                    trainer.setup()
                    summaries.append(trainer.fit())
            except BaseException:
                trainer.checkpoint_on_stop("stopped")
                trainer.shutdown()
                raise
            warm = trainer.shutdown(keep_actors=True)
            if after is not None:
                after(cfg, summaries[-1])
            if summaries[-1].get("stopped"):  # SIGTERM: the run checkpointed; the sweep ends with it
                break
    finally:
        if warm is not None:
            warm.shutdown()
    return summaries


@contextlib.contextmanager
def _output(run_dir: str | None):
    if run_dir is None:
        yield
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "driver.log"), "a") as f, contextlib.redirect_stdout(f), \
            contextlib.redirect_stderr(f):
        yield
