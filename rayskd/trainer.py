"""The driver. setup() places the actors, step() is one on-policy update, fit() runs the loop.

Read `step()` first: each line is one hop of the algorithm. Token data moves between actors
as Ray object refs; the driver only touches prompts, scalars and small metadata.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from contextlib import contextmanager

import psutil
import ray

from . import checkpoint, learner_state
from .actors import TrainingError, actor_env, init_ray, kill_processes, ray_processes, start_learners, start_teachers
from .batch import (
    DATASET, MIXED, MIXTURE, REPLAY, TEACHER, PromptBatch, batch_stats, gkd_origins, prompt_batch, reference_ids,
    teacher_last,
)
from .config import (
    Config, engines_sleep, requests_per_step, teacher_coefs, teacher_generates, teacher_names, teacher_paths, to_yaml,
)
from .evaluation import evaluate_on, hacking_warning
from .learner import LearnerSpec, StepMetrics, learner_shares, train_step_args
from .losses import TaidState, coef_at
from .metrics import MetricsLog, StepRecord
from .pipeline import ReadyBatch, RolloutPipeline
from .replay import ReplayBuffer, Threshold, distillm_origins
from .preflight import Inputs, UsageError, check_gpu_layout, check_inputs, local_gpus, resolve_models
from .rollout_pool import MAX_RETRIES, RolloutPool, start_rollout
from .tracking import open_sinks
from .weight_sync import CollectiveSync, ObjectStoreSync, choose_transport

STOP_AFTER_NONFINITE = 3
RAY_PROCESSES = ".ray-processes.json"  # a local cluster's processes, for the next run to clean up after a kill -9
PROCESS_START = psutil.Process().create_time()


def logprob_tolerance(*dtypes: str) -> float:
    """The most a log-prob may differ between two computations of the same weights in `dtypes`
    (the engines' and the learner's) when both hold them: 1e-3 when all are fp32 (other kernels),
    0.25 when one is bf16 (8 bits of mantissa: a bf16 learner against an fp32 engine measured
    0.10 on the demo student's fixed sequence). Weights that did not arrive differ by more."""
    return 1e-3 if all(d == "float32" for d in dtypes) else 0.25


def check_resume(found: tuple[int, str] | None) -> None:
    """A checkpoint this version cannot resume from: UsageError (exit 2) before anything starts.
    Any learner count and ZeRO stage can resume any checkpoint (learner_state.py)."""
    if found is not None and not os.path.isfile(learner_state.meta_path(found[1])):
        raise UsageError(f"checkpoint {found[1]} was written by an earlier rayskd (per-rank optimizer partitions, "
                         f"no {learner_state.STATE_DIR}/state.json); resume it with the version that wrote it")


class Timer:
    """Seconds of each named hop of a step: `with timer("generate_s"): ...` around the hop."""

    def __init__(self):
        self.start, self.seconds = time.perf_counter(), {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclasses.dataclass
class StopState:
    """What a stop (an error, Ctrl-C, SIGTERM) needs to know of the step in progress."""
    requested: bool = False  # SIGTERM: checkpoint after the current step and exit
    updating: bool = False  # in the learners' update: a checkpoint now could catch them half-way
    unlogged: StepRecord | None = None  # an updated step's record, until it is logged
    checkpointed_step: int = -1

    @contextmanager
    def update(self):
        """Around the learners' update: `updating` stays set if the update does not finish."""
        self.updating = True
        yield
        self.updating = False


def actor_count(cfg: Config) -> int:
    """The actors (one CPU each at least) a run of `cfg` places."""
    teachers = len(teacher_paths(cfg)) * cfg.teacher.num_workers + (1 if cfg.teacher.golden_path else 0)
    gen = cfg.teacher.generation
    return (cfg.rollout.num_workers * cfg.rollout.tensor_parallel_size + cfg.learner.world_size
            + (gen.num_workers * gen.tensor_parallel_size if teacher_generates(cfg) else 0)
            + teachers * cfg.teacher.tensor_parallel_size)


class Warm:
    """The actor groups a finished run left running for the next run of this process
    (`Trainer.shutdown(keep_actors=True)`), each under the key of what it was started with
    (`Trainer.actor_keys`). The next Trainer takes those its own config would start the same
    way, gives them a fresh start (the learners load the student anew with a new optimizer and
    the run's objective, the engines take its weights: the run's numbers are those of a run on
    new actors) and closes the rest. A sweep (scripts/compare_demo.py) so pays the actors'
    start once instead of once per run."""

    def __init__(self, started_ray: bool):
        self.started_ray = started_ray  # Ray is this process's: the last run shuts it down
        self.groups: dict[str, tuple] = {}  # key -> (group, its closer)

    def add(self, key: str, group, close) -> None:
        self.groups[key] = (group, close)

    def take(self, key: str):
        return self.groups.pop(key, (None, None))[0]

    def close(self) -> None:
        """Every group no run took: shut down, its processes gone."""
        for _, close in self.groups.values():
            close()
        self.groups.clear()

    def shutdown(self) -> None:
        """The last run is over: every group closed, and Ray, where this process started it."""
        self.close()
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


class Trainer:
    def __init__(self, cfg: Config, inputs: Inputs | None = None, lock: checkpoint.RunLock | None = None,
                 warm: Warm | None = None):
        """`inputs` and `lock`: those of a previous Trainer of this run, in this process (an
        automatic restart: the inputs were checked, and the run directory stays this process's).
        `warm`: the actors a previous run of this process left (see Warm)."""
        self.started_at = time.time() if warm else PROCESS_START  # start-up counts from here
        self.cfg = cfg = resolve_models(cfg)  # model ids -> local snapshots (exit 2 when not found)
        self.inputs = inputs or check_inputs(cfg)  # before anything expensive: UsageError, exit 2
        if not os.environ.get("RAY_ADDRESS"):  # a cluster of this machine: its GPUs
            check_gpu_layout(cfg, local_gpus(), "this machine")
        from .data.dataset import PromptSampler, data_fingerprint

        self.data = data_fingerprint(self.inputs.train, cfg.student.path)
        self.lock = self._claim(cfg.run.output_dir, lock)  # UsageError, exit 2: a directory in use, a bad resume
        self.sampler = PromptSampler(len(self.inputs.train), cfg.run.seed, cfg.data.shuffle)
        self.step_num, self.weights_version, self.rehearsal_pos = 0, 0, 0
        self.nonfinite_in_a_row = self.bad_teacher_in_a_row = 0
        # TAID's t and its momentum: training state, in every checkpoint (None: another divergence)
        self.taid = TaidState(t=cfg.algorithm.kd.taid.t_start) if cfg.algorithm.kd.divergence == "taid" else None
        # DistiLLM's replay buffer and its probability t of the student's sequences: training state,
        # in every checkpoint (None: off); its validation set, tokenised when first needed
        dm = cfg.algorithm.distillm
        self.replay = ReplayBuffer(dm.capacity) if dm.capacity else None
        self.threshold = Threshold(dm.init_threshold) if dm.capacity else None
        self.references: list[tuple[list[int], list[int]]] | None = None
        self.started_steps = 0  # in this process (a resumed run counts from its restart)
        self.rollout = self.teacher = self.learner = self.pipeline = self.golden = None
        self.teachers: list = []
        self.teacher_rollout = None  # the teacher's engines (GKD's teacher samples)
        self.stops = StopState()
        self.sleeps = engines_sleep(cfg)  # engines sleep while the learners train beside them
        self.warm = warm
        self._started_ray = warm.started_ray if warm else False

    def _claim(self, run_dir: str, lock: checkpoint.RunLock | None) -> checkpoint.RunLock:
        """The run directory, for this process alone (until it ends), and what a resume will
        continue from (checked here, before anything starts: its format, and that the data and
        tokenizer are those it was trained on)."""
        try:
            lock = lock or checkpoint.RunLock(run_dir)
        except checkpoint.RunInUse as holder:
            raise UsageError(f"run.output_dir: {run_dir} is in use by another rayskd run ({holder}); wait for it "
                             f"to end or stop it, or choose another output_dir") from None
        try:
            if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and self.cfg.run.resume == "never":
                raise UsageError(f"run.output_dir: {run_dir} already holds a run; choose another output_dir "
                                 f"or continue it with `rayskd resume {run_dir}`")
            self.resume_from, self.damaged = None, []
            self.data_changed = None
            if self.cfg.run.resume == "auto":
                self.resume_from, self.damaged = checkpoint.newest_intact(run_dir)
                check_resume(self.resume_from)
                self._check_data()
        except BaseException:
            lock.release()
            raise
        return lock

    def _check_data(self) -> None:
        """A resume trains on the data its checkpoint was trained on, unless
        run.allow_data_change says the change is meant (the sampler then starts a new pass)."""
        from .data.dataset import data_changes

        if self.resume_from is None:
            return
        saved = checkpoint.load_trainer_state(self.resume_from[1]).get("data")
        change = data_changes(saved, self.data) if saved else None
        if change and not self.cfg.run.allow_data_change:
            raise UsageError(f"data.train_path: {change} since checkpoint {self.resume_from[1]}; resume with "
                             f"run.allow_data_change=true to train on the data as it is now (its pass starts anew)")
        self.data_changed = change

    def restart(self) -> "Trainer":
        """The run again after a stop this process survived (its actors gone, Ray and the run
        directory kept): a Trainer that resumes from the newest intact checkpoint."""
        self.shutdown(keep=True)
        run = dataclasses.replace(self.cfg.run, resume="auto")
        following = Trainer(dataclasses.replace(self.cfg, run=run), self.inputs, self.lock)
        following._started_ray, self._started_ray, self.lock = self._started_ray, False, None
        return following

    # ---- set-up ----

    def setup(self) -> None:
        cfg = self.cfg
        run_dir = cfg.run.output_dir
        os.makedirs(run_dir, exist_ok=True)
        if cfg.run.resume != "auto":  # a resume writes it once it has worked
            self._write_config()
        sinks = open_sinks(run_dir, cfg.run.tensorboard, cfg.run.wandb_project, dataclasses.asdict(cfg),
                           self.resume_from[0] if self.resume_from else None)
        self.log = MetricsLog(run_dir, cfg.run.steps, sinks=sinks)
        for name, split in (("training", self.inputs.train), ("eval", self.inputs.eval)):
            if split is not None and (split.skipped_malformed or split.skipped_too_long):
                self.log.event(f"data: {len(split)} {name} prompts; skipped {split.skipped_malformed} malformed rows "
                               f"and {split.skipped_too_long} over data.max_prompt_tokens")
        self._init_ray()
        self.handle_sigterm()  # after ray.init, which installs handlers of its own
        if not self._started_ray:  # a cluster of its own: before any actor starts
            check_gpu_layout(cfg, ray.cluster_resources().get("GPU", 0), "the Ray cluster")
        env, inputs = actor_env(cfg), self.inputs
        t0 = time.time()
        teachers = len(teacher_paths(cfg))
        # a previous run's actors that this run would start the same way; the others go first
        # (their places in the cluster are this run's)
        keys, warm, self.warm = self.actor_keys(), self.warm, None
        kept = {role: group for role, key in keys.items() if warm and (group := warm.take(key)) is not None}
        if warm:
            warm.close()
        engines = f" (and {cfg.teacher.generation.num_workers} teacher rollout)" if teacher_generates(cfg) else ""
        self.log.event(f"starting {cfg.rollout.num_workers} rollout{engines}, {teachers * cfg.teacher.num_workers} "
                       f"teacher and {cfg.learner.world_size} learner actors" +
                       (f" (reusing the previous run's {', '.join(kept)}: their logs are in its directory)"
                        if kept else ""))
        logs = os.path.join(run_dir, "logs")  # each actor's output: logs/rollout_0.log, ...
        rollout = kept.get("rollout") or start_rollout(cfg, cfg.student.path, inputs.max_model_len, env, logs)
        if 0 < cfg.rollout.gpus_per_worker < 1 and "rollout" not in kept:  # sharing a GPU: vLLM measures the
            ray.get(rollout.call("ready"))  # memory it may take at start, so it starts before the others take theirs
        self.teachers = [kept.get(f"teacher{i}") or
                         start_teachers(cfg, inputs.tokenizer_len, env, logs, max_restarts=MAX_RETRIES, index=i)
                         for i in range(teachers)]
        self.teacher = self.teachers[0]  # the proxy the golden model is compared with
        if cfg.teacher.golden_path:  # the teacher-hacking monitor's golden model
            self.golden = kept.get("golden") or start_teachers(cfg, inputs.tokenizer_len, env, logs,
                                                               max_restarts=MAX_RETRIES, golden=True)
        teacher_engines = None
        if teacher_generates(cfg):
            teacher_engines = kept.get("teacher_rollout") or start_rollout(cfg, cfg.teacher.path, inputs.max_model_len,
                                                                           env, logs, teacher=True)
        if "learner" in kept:  # the student loaded anew, a new optimizer, this run's objective and seed
            self.learner = kept["learner"]
            ray.get(self.learner.call("build", LearnerSpec.from_config(cfg, inputs.tokenizer_len)))
        else:
            self.learner = start_learners(cfg, inputs.tokenizer_len, env, logs)
        groups = [g for g in (rollout, *self.teachers, self.golden, teacher_engines, self.learner) if g is not None]
        with open(os.path.join(run_dir, "placement.json"), "w") as f:
            json.dump({g.name: g.nodes() for g in groups}, f, indent=1)
        self.rollout = RolloutPool(rollout, self.log.event, cfg.rollout.max_failures)
        self.rollout.use_weights(self._weight_sync())
        if teacher_engines is not None:
            self.teacher_rollout = RolloutPool(teacher_engines, self.log.event, cfg.rollout.max_failures)
        ray.get([ref for g in groups[1:] for ref in g.call("ready")])
        if "rollout" in kept:  # the engines still serve the previous run's last weights
            self.sync_weights(version=0)
        self.log.event(f"actors ready in {time.time() - t0:.0f}s")
        if self._started_ray:  # the actors' processes too (and what they started: vLLM's engine core)
            with open(os.path.join(run_dir, RAY_PROCESSES), "w") as f:
                json.dump(ray_processes(), f)
        algo = cfg.algorithm
        skd = (("judge", algo.skd.top_k, algo.skd.block) if algo.skd.top_k else
               ("mix", algo.kd.minillm.mix_alpha, 1) if algo.kd.minillm.mix_alpha else None)
        self.pipeline = RolloutPipeline(self.rollout, self.teachers, self._next_prompts, requests_per_step(cfg),
                                        cfg.algorithm.max_staleness, cfg.run.steps, self.log.event, inputs.teacher_of,
                                        self.teacher_rollout, skd, self._replayed if self.replay is not None else None)
        if cfg.run.resume == "auto":
            self.restore()

    def actor_keys(self) -> dict[str, str]:
        """Each actor group's role and what it is started with, but for what a new run on it
        sets afresh (the learners' student, optimizer, objective and seed: Learner.build; the
        engines' weights): groups of equal keys are interchangeable between runs (Warm)."""
        cfg, inputs = self.cfg, self.inputs
        env = sorted(actor_env(cfg).items())
        engines = f"{cfg.rollout!r} {cfg.reward!r} seed={cfg.run.seed} len={inputs.max_model_len} env={env}"
        keys = {"rollout": f"rollout {cfg.student.path} sleeps={self.sleeps} {engines}",
                "learner": f"learner {cfg.learner.world_size} {cfg.learner.gpus_per_worker} "
                           f"{sorted(cfg.learner.resources.items())} env={env}"}
        for i in range(len(teacher_paths(cfg))):
            keys[f"teacher{i}"] = f"teacher{i} {cfg.teacher!r} vocab={inputs.tokenizer_len} env={env}"
        if cfg.teacher.golden_path:
            keys["golden"] = f"golden {cfg.teacher!r} vocab={inputs.tokenizer_len} env={env}"
        if teacher_generates(cfg):
            keys["teacher_rollout"] = f"teacher_rollout {cfg.teacher!r} {engines}"
        return keys

    def _weight_sync(self):
        """The transport of the weight push (rollout.weight_transport), over the layout the
        learner plans in the engines' dtype."""
        r = self.cfg.rollout
        layout = ray.get(self.learner.actors[0].weight_layout.remote(self.rollout.weights_dtype(),
                                                                      r.weight_bucket_mb << 20))
        if choose_transport(self.cfg) == "collective":
            return CollectiveSync(self.learner, layout, [r.tensor_parallel_size] * self.rollout.n, r.sync_timeout_s)
        return ObjectStoreSync(self.learner, layout)

    def _write_config(self) -> None:
        with open(os.path.join(self.cfg.run.output_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(self.cfg))

    def handle_sigterm(self) -> None:
        """SIGTERM (`ray job stop`, a scheduler) asks for a checkpoint after the current step
        and a clean exit."""
        def on_sigterm(signum, frame):
            self.stops.requested = True

        signal.signal(signal.SIGTERM, on_sigterm)

    def _init_ray(self) -> None:
        """Join the cluster, or start a local one. A local one's processes are recorded in the
        run directory: a driver killed with SIGKILL cannot stop its Ray, so the next run in this
        directory (which holds its lock, so that driver is gone) stops what is left of it."""
        cfg = self.cfg
        leftovers = os.path.join(cfg.run.output_dir, RAY_PROCESSES)
        if os.path.exists(leftovers) and not ray.is_initialized():  # (an automatic restart keeps its own)
            with open(leftovers) as f:
                killed = kill_processes(json.load(f))
            os.remove(leftovers)
            if killed:
                self.log.event(f"stopped {killed} Ray processes a previous run in this directory left behind")
        self._started_ray = self._started_ray or init_ray(actor_count(cfg))
        if self._started_ray:
            with open(leftovers, "w") as f:
                json.dump(ray_processes(), f)

    # ---- one update ----

    def step(self) -> StepRecord:
        """Take this step's rollouts (generated, rewarded inside the rollout workers, and sent
        to the teacher; the next max_staleness steps' are already generating), wait for the
        teacher's scores, update the learners (each on its share), push the weights to every
        rollout engine. Returns the step's record (logged by the caller)."""
        cfg, timer = self.cfg, Timer()
        # to this process's first step; a run on a previous run's actors: to its first step
        startup_s = time.time() - self.started_at if self.started_steps == 0 else None
        self.started_steps += 1
        with timer("generate_s"):
            batch = self.pipeline.take(self.step_num, self.weights_version)
        with timer("score_s"):
            self.pipeline.wait([ref for r in batch.requests for ref in r.score])
        coef = coef_at(self.step_num, cfg.algorithm.kd.schedule, cfg.algorithm.kd.coef, cfg.algorithm.kd.coef_min,
                       cfg.algorithm.kd.decay)
        taid_t = self.taid.t if self.taid is not None else None
        with timer("train_s"), self.rollout.asleep(self.sleeps), self.stops.update():
            metrics = self._train(batch, coef, 1.0 if taid_t is None else taid_t)
            self.step_num += 1
            self._advance_taid(metrics)
            if self.replay is not None:  # the step's fresh samples, for later steps to replay
                self.replay.add(ray.get([r.shard for r in batch.requests]))
            self.rehearsal_pos += cfg.algorithm.rehearsal.samples_per_step if cfg.algorithm.rehearsal.coef > 0 else 0
        staleness = batch.staleness(self.weights_version)
        learned = metrics.record(cfg.algorithm)
        if learned["kd_divergence_by_teacher"] is not None:
            learned["kd_divergence_by_teacher"] = dict(zip(teacher_names(cfg), learned["kd_divergence_by_teacher"]))
        record = StepRecord(step=self.step_num, **batch_stats(batch.summaries), **learned,
                            kd_coef=coef, taid_t=taid_t, staleness_max=max(staleness), staleness_mean=sum(staleness) / len(staleness),
                            skipped_long_prompts=self.inputs.train.skipped_too_long, startup_s=startup_s,
                            distillm_t=self.threshold.t if self.threshold is not None else None)
        self.stops.unlogged = record  # the update is done: its record goes out on any stop
        with timer("sync_s"):
            self.sync_weights()
        step_s = timer.elapsed()
        for name, seconds in timer.seconds.items():
            setattr(record, name, seconds)
        record.step_s, record.tokens_per_s, record.weights_version = step_s, record.response_tokens / step_s, \
            self.weights_version
        self._check_finite(record)
        return record

    def _train(self, batch: ReadyBatch, coef: float, taid_t: float) -> StepMetrics:
        """One update: each learner rank trains its share of the step's requests."""
        shares = learner_shares(batch.summaries, [r.shard for r in batch.requests], [r.score for r in batch.requests],
                                self.learner.n, self.cfg.algorithm, self.cfg.rollout.max_new_tokens, coef,
                                self.rehearsal_pos, taid_t, self.cfg.teacher.combine, teacher_coefs(self.cfg))
        updates = self.learner.call_each("train_step", [train_step_args(share) for share in shares])
        self.rollout.learner_busy = True  # (an engine restarted meanwhile waits for this step's push)
        try:
            self.pipeline.wait(updates)
        finally:
            self.rollout.learner_busy = False
        return StepMetrics.merge(ray.get(updates))

    def _advance_taid(self, metrics: StepMetrics) -> None:
        """TAID's t after this step, by the paper's adaptive rule from the teacher term's value
        (`losses.TaidState.update`); a skipped update leaves the state as it was."""
        if self.taid is None or metrics.skipped or not math.isfinite(metrics.kd_loss):
            return
        taid = self.cfg.algorithm.kd.taid
        self.taid = self.taid.update(metrics.kd_loss, self.step_num, self.cfg.run.steps, taid.t_start, taid.t_end,
                                     taid.alpha, taid.beta)

    def _next_prompts(self, step: int) -> PromptBatch:
        """The prompts of `step` (the pipeline asks for each step once, in order), each with the
        origin of its sequences (algorithm.gkd.lmbda < 1: drawn from the run seed and the step)."""
        batch = prompt_batch(self.inputs.train, self.sampler.next(self.cfg.algorithm.prompts_per_step))
        gkd = self.cfg.algorithm.gkd
        if gkd.lmbda < 1:
            off = TEACHER if gkd.off_policy == "teacher" else DATASET
            batch.origins = gkd_origins(self.cfg.run.seed, step, len(batch.uids), gkd.lmbda, off)
        if self.cfg.algorithm.skd.top_k:  # every sequence: the student's proposals, the teacher's corrections
            batch.origins = [MIXED] * len(batch.uids)
        if self.cfg.algorithm.kd.minillm.mix_alpha:  # every sequence drawn from the teacher-student mixture
            batch.origins = [MIXTURE] * len(batch.uids)
        if self.replay is not None:  # DistiLLM: the dataset's, the student's fresh or replayed
            batch.origins = distillm_origins(self.cfg.run.seed, step, len(batch.uids), self.threshold.t,
                                             step / self.cfg.run.steps, self.replay.full)
        return teacher_last(batch)

    def _replayed(self, step: int, start: int, count: int) -> tuple[PromptBatch, object]:
        """Groups start .. start + count of `step`'s draw from the replay buffer (the pipeline asks
        when it fills the step, request by request): their prompts and the shard."""
        shard = self.replay.draw(self.cfg.run.seed, step, start, count)
        prompts = prompt_batch(self.inputs.train, shard.uids_N[::shard.group_size].tolist())
        prompts.origins = [REPLAY] * count
        return prompts, shard

    def _validation_loss(self) -> float:
        """DistiLLM's validation loss: the student's token cross-entropy on the evaluation's
        reference responses (the answer column, as a dataset response is built) given their prompts."""
        if self.references is None:
            from transformers import AutoTokenizer

            tok, ev = AutoTokenizer.from_pretrained(self.cfg.student.path), self.inputs.eval
            self.references = [(ev.prompt_ids[i], reference_ids(tok, row["answer"], self.inputs.eos_id,
                                                                self.cfg.rollout.max_new_tokens)[0])
                               for i, row in enumerate(ev.rows)]
        total, count = ray.get(self.learner.call("reference_loss", self.references))[0]  # every rank: ZeRO-3
        return total / max(count, 1)

    def sync_weights(self, version: int | None = None) -> float:
        """Push the learner's weights to every rollout engine as `version` (default: the next
        one); fails (never hangs) after rollout.sync_timeout_s naming the engine that did not
        finish."""
        t0 = time.perf_counter()
        self.weights_version = self.weights_version + 1 if version is None else version
        self.rollout.sync_weights(self.weights_version, self.cfg.rollout.sync_timeout_s)
        return time.perf_counter() - t0

    def _check_finite(self, record: StepRecord) -> None:
        """Non-finite updates are skipped, non-finite teacher scores are not trained on: both
        counted and logged, and a stop (with a checkpoint, and the reason) when either persists."""
        if record.teacher_nonfinite_tokens:
            self.bad_teacher_in_a_row += 1
            self.log.event(f"step {record.step}: teacher worker(s) {record.nonfinite_teachers} gave non-finite "
                           f"log-probs on {record.teacher_nonfinite_tokens} tokens of "
                           f"{record.teacher_nonfinite_sequences} sequences, which got no teacher term "
                           f"({self.bad_teacher_in_a_row} step(s) in a row)")
            if self.bad_teacher_in_a_row >= STOP_AFTER_NONFINITE:
                raise TrainingError(f"the teacher ({self.cfg.teacher.path}, worker(s) {record.nonfinite_teachers}) "
                                    f"gave non-finite log-probs in {STOP_AFTER_NONFINITE} steps in a row; stopping "
                                    f"(check its weights for inf or NaN, and teacher.dtype)", restartable=False)
        else:
            self.bad_teacher_in_a_row = 0
        if record.skipped_update:
            self.nonfinite_in_a_row += 1
            self.log.event(f"step {record.step}: non-finite loss or gradient, update skipped "
                           f"({self.nonfinite_in_a_row} in a row)")
            if self.nonfinite_in_a_row >= STOP_AFTER_NONFINITE:
                raise TrainingError(f"{STOP_AFTER_NONFINITE} updates in a row had a non-finite loss or gradient; "
                                    f"stopping (lower learner.lr or check the reward and teacher)", restartable=False)
        else:
            self.nonfinite_in_a_row = 0

    # ---- checkpoints and resume ----

    def state_dict(self) -> dict:
        return {"step": self.step_num, "weights_version": self.weights_version, "rehearsal_pos": self.rehearsal_pos,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "sampler": self.sampler.state_dict(),
                "learner_world_size": self.cfg.learner.world_size, "zero_stage": self.cfg.learner.zero_stage,
                "data": self.data, "taid": dataclasses.asdict(self.taid) if self.taid is not None else None,
                "distillm": dataclasses.asdict(self.threshold) if self.threshold is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.step_num, self.weights_version = state["step"], state["weights_version"]
        self.rehearsal_pos, self.nonfinite_in_a_row = state["rehearsal_pos"], state["nonfinite_in_a_row"]
        if self.taid is not None and state.get("taid") is not None:  # (a run that switched to taid starts at t_start)
            self.taid = TaidState(**state["taid"])
        if self.threshold is not None and state.get("distillm") is not None:
            self.threshold = Threshold(**state["distillm"])
        if self.data_changed:  # (run.allow_data_change): the sampler's place in the old data means nothing now
            self.log.event(f"{self.data_changed} since the checkpoint: training on it as it is now, from the start "
                           f"of a new pass (run.allow_data_change)")
            return
        self.sampler.load_state_dict(state["sampler"])

    def save_checkpoint(self, wait: bool = True) -> str:
        """Learners write their parts into a staging directory; the driver adds its state and
        commits atomically (see checkpoint.py). Old checkpoints go only after that. `wait`:
        see RolloutPipeline.save."""
        cfg = self.cfg
        staging = checkpoint.staging_dir(cfg.run.output_dir, self.step_num)
        ray.get(self.learner.call("save_state", staging, cfg.student.path))
        self.pipeline.save(staging, wait=wait)
        if self.replay is not None:
            self.replay.save(staging)
        path = checkpoint.commit(cfg.run.output_dir, self.step_num, self.state_dict(), cfg.run.keep_checkpoints)
        self.stops.checkpointed_step = self.step_num
        self.log.event(f"checkpoint: {path}")
        return path

    def checkpoint_on_stop(self, why: str) -> None:
        """A stop the driver survives (an error, Ctrl-C): checkpoint the last completed step
        first, unless there is one already or the stop came in the middle of an update."""
        stops = self.stops
        if self.pipeline is None or self.step_num == stops.checkpointed_step or self.step_num == 0:
            return
        if stops.updating:
            self.log.event(f"{why}: no checkpoint of step {self.step_num + 1} (the stop came during its update); "
                           f"the newest checkpoint is the one to resume from")
            return
        if stops.unlogged is not None:  # the update is done; the stop came in the weight sync or evaluation
            self.log.log(stops.unlogged)
            stops.unlogged = None
        try:
            self.save_checkpoint(wait=False)
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            self.log.event(f"{why}: could not checkpoint step {self.step_num} ({type(cause).__name__}: {cause})")

    def restore(self) -> bool:
        """Continue from the newest intact checkpoint (found and checked before the actors
        started): learner state, driver state, metrics truncated to it, and the restored weights
        pushed to every rollout engine (checked). The run's config.yaml is rewritten (with the
        resume's overrides) only once this has worked."""
        for path, problem in self.damaged:
            self.log.event(f"checkpoint {path} is damaged ({problem}); passing over it")
        found = self.resume_from
        if found is None:
            self.log.truncate_after(0)
            self.log.event("no intact checkpoint: starting from the beginning")
            self._write_config()
            return False
        step, path = found
        ray.get(self.learner.call("load_state", path))
        self.stops.checkpointed_step = step
        self.load_state_dict(checkpoint.load_trainer_state(path))
        if self.replay is not None:
            self.replay.load(path)
        self.log.truncate_after(step)
        self.sync_weights(version=self.weights_version)  # the restored weights keep their version
        self.pipeline.load(path)  # the samples already drawn for the next steps (max_staleness >= 1)
        seq = self.inputs.train.prompt_ids[0] + [self.inputs.eos_id]
        engines = self.rollout.sequence_logprobs(seq)
        learner = ray.get(self.learner.call("sequence_logprobs", seq))[0]  # every rank: ZeRO-3 gathers
        worst = max(abs(a - b) for e in engines for a, b in zip(e, learner))
        dtypes = (self.rollout.weights.layout.dtype, "bfloat16" if self.cfg.learner.bf16 else "float32")
        if worst > logprob_tolerance(*dtypes):
            raise TrainingError(f"after restoring {path} the rollout engines disagree with the learner "
                                f"(max |log-prob difference| {worst:.2e}, more than {logprob_tolerance(*dtypes)} "
                                f"for engines in {dtypes[0]} and a learner in {dtypes[1]})")
        self.log.event(f"resumed from {path} (step {step}); engines serve the restored weights "
                       f"(max |log-prob difference| {worst:.1e}, engines {dtypes[0]}, learner {dtypes[1]})")
        self._write_config()
        return True

    # ---- evaluation and the loop ----

    def evaluate(self) -> dict | None:
        """Held-out evaluation on the rollout engines (greedy accuracy, pass@k from
        run.eval_samples samples per problem, response length), logged to eval.jsonl."""
        if self.inputs.eval is None:
            return None
        scorers = {"proxy": self.teacher, "golden": self.golden} if self.golden is not None else None
        run = self.cfg.run
        if run.eval_curve_samples and 0 < self.step_num < run.steps:  # a point of the curve between the ends
            run = dataclasses.replace(run, eval_samples=run.eval_curve_samples,
                                      eval_k=tuple(k for k in run.eval_k if k <= run.eval_curve_samples))
        result = {"step": self.step_num, **evaluate_on(self.rollout, self.inputs.eval, run, scorers)}
        if self.threshold is not None:  # DistiLLM: t rises when the validation loss has risen
            dm = self.cfg.algorithm.distillm
            result["validation_loss"] = self._validation_loss()
            self.threshold = self.threshold.update(result["validation_loss"], dm.raise_by, dm.loss_eps)
            result["distillm_t"] = self.threshold.t
        self.log.log_eval(result)
        if scorers:  # over every evaluation of the run, those before a resume included
            with open(self.log.eval_path) as f:
                if warning := hacking_warning([json.loads(line) for line in f if line.strip()]):
                    self.log.event(warning)
        return result

    def fit(self) -> dict:
        cfg = self.cfg
        before = self.evaluate() if self.step_num == 0 and cfg.run.eval_before else None
        summary = {"eval_before": before and before["greedy_accuracy"]}
        record = None
        while self.step_num < cfg.run.steps:
            record = self.step()
            due = cfg.run.eval_every and self.step_num % cfg.run.eval_every == 0
            if (due or self.step_num == cfg.run.steps) and self.inputs.eval is not None:
                record.eval_accuracy = self.evaluate()["greedy_accuracy"]
            self.log.log(record)
            self.stops.unlogged = None
            every = cfg.run.checkpoint_every
            if (every and self.step_num % every == 0) or self.step_num == cfg.run.steps or self.stops.requested:
                self.save_checkpoint()
            if self.stops.requested:
                self.log.event(f"stopped on request after step {self.step_num}; continue with "
                               f"`rayskd resume {cfg.run.output_dir}`")
                summary["stopped"] = True
                return summary
        summary["eval_after"] = record.eval_accuracy if record is not None else None
        summary["final_model"] = self.save_final()
        return summary

    def save_final(self) -> str:
        path = os.path.join(self.cfg.run.output_dir, "final")
        ray.get(self.learner.call("save_pretrained", path, self.cfg.student.path))
        self.log.event(f"student saved to {path} (Hugging Face, safetensors)")
        return path

    # ---- tear-down: every path ----

    def shutdown(self, keep: bool = False, keep_actors: bool = False) -> Warm | None:
        """Every actor, engine process and sink of the run gone; Ray (if this process started it)
        and the run directory's lock too, unless `keep` (an automatic restart reuses both).
        `keep_actors` (a run that ended): the actors, and Ray, stay for the next run of this
        process instead, in the Warm returned; the run directory is released."""
        if getattr(self, "log", None) is not None:
            self.log.close()
        if self.pipeline is not None:
            self.pipeline.shutdown()
        if self.warm is not None:  # set-up stopped before it took the previous run's actors
            self.warm.close()
            self.warm = None
        groups, warm = self._actor_groups(), None
        if keep_actors and self.learner is not None:
            warm, keys = Warm(self._started_ray), self.actor_keys()
            for role, group, close in groups:
                warm.add(keys[role], group, close)
        else:
            for _, _, close in groups:
                close()
        self.rollout = self.teacher = self.golden = self.learner = self.pipeline = self.teacher_rollout = None
        self.teachers = []
        if warm is not None:
            self._started_ray = False
            self._release(os.path.join(self.cfg.run.output_dir, RAY_PROCESSES))  # the next run records them
            return warm
        if keep:
            return None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
        self._release(os.path.join(self.cfg.run.output_dir, RAY_PROCESSES))
        return None

    def _actor_groups(self) -> list[tuple]:
        """Every actor group of the run as (its role in actor_keys, the group, what shuts it
        down: an engine pool's shutdown also ends its engines' processes)."""
        pools = [(role, p.group, p.shutdown) for role, p in (("rollout", self.rollout),
                                                             ("teacher_rollout", self.teacher_rollout)) if p is not None]
        groups = [(f"teacher{i}", g) for i, g in enumerate(self.teachers)]
        groups += [(role, g) for role, g in (("golden", self.golden), ("learner", self.learner)) if g is not None]
        return pools + [(role, g, g.kill) for role, g in groups]

    def _release(self, ray_processes_file: str) -> None:
        """The run directory: its record of Ray's processes (when this process started Ray) and
        its lock."""
        try:
            os.remove(ray_processes_file)
        except OSError:
            pass
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None
