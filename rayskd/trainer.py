"""The driver. setup() places the actors, step() is one on-policy update, fit() runs the loop.

Read `step()` first: each line is one hop of the algorithm. Token data moves between actors
as Ray object refs; the driver only touches prompts, scalars and small metadata.
"""
from __future__ import annotations

import json
import os
import signal
import time

import ray

from . import checkpoint
from .actors import ActorGroup, TrainingError, start_learners
from .batch import PromptBatch, prompt_batch
from .config import Config, to_yaml
from .losses import coef_at
from .metrics import MetricsLog
from .preflight import Inputs, UsageError, check_inputs
from .rollout import RolloutEngine
from .rollout_pool import MAX_RETRIES, RolloutPool
from .teacher import TeacherScorer

STOP_AFTER_NONFINITE = 3
RESUME_LOGPROB_TOLERANCE = 1e-3  # engine vs restored learner, max |log-prob difference| on a fixed sequence


class Trainer:
    def __init__(self, cfg: Config, inputs: Inputs | None = None):
        self.cfg = cfg
        self.inputs = inputs or check_inputs(cfg)  # before anything expensive: UsageError, exit 2
        run_dir = cfg.run.output_dir
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and cfg.run.resume == "never":
            raise UsageError(f"run.output_dir: {run_dir} already holds a run; choose another output_dir "
                             f"or continue it with `rayskd resume {run_dir}`")
        from .data.dataset import PromptSampler

        self.sampler = PromptSampler(len(self.inputs.train), cfg.run.seed, cfg.data.shuffle)
        self.step_num, self.weights_version, self.rehearsal_pos = 0, 0, 0
        self.nonfinite_in_a_row = 0
        self.rollout = self.teacher = self.learner = None
        self.stop_requested = False  # set by SIGTERM: checkpoint after the current step and exit
        self._started_ray = False

    # ---- set-up ----

    def setup(self) -> None:
        cfg = self.cfg
        run_dir = cfg.run.output_dir
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        self.log = MetricsLog(run_dir, cfg.run.steps)
        self._init_ray()
        self.handle_sigterm()  # after ray.init, which installs handlers of its own
        env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": str(cfg.rollout.cpu_kv_cache_gb),
               "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
               # vLLM's INFO lines drown the progress; set VLLM_LOGGING_LEVEL=INFO to see them
               "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        inputs, extra_path = self.inputs, (os.getcwd(),)
        t0 = time.time()
        self.log.event(f"starting {cfg.rollout.num_workers} rollout, {cfg.teacher.num_workers} teacher and "
                       f"{cfg.learner.world_size} learner actors")
        rollout = ActorGroup(
            "rollout", RolloutEngine, cfg.rollout.num_workers, 1, cfg.rollout.gpus_per_worker,
            lambda i, pg: (cfg.student.path, cfg.rollout, cfg.reward, cfg.run.seed, inputs.max_model_len,
                           extra_path), resources=dict(cfg.rollout.resources), env_vars=env,
            max_restarts=MAX_RETRIES, task_retries=0)
        # teacher scorers hold no state: Ray restarts them and re-runs the scoring call
        self.teacher = ActorGroup(
            "teacher", TeacherScorer, cfg.teacher.num_workers, 1, cfg.teacher.gpus_per_worker,
            lambda i, pg: (cfg.teacher.path, cfg.teacher, inputs.tokenizer_len), resources=dict(cfg.teacher.resources),
            env_vars=env, max_restarts=MAX_RETRIES, task_retries=MAX_RETRIES)
        self.learner = start_learners(cfg, inputs.tokenizer_len, env)
        with open(os.path.join(run_dir, "placement.json"), "w") as f:
            json.dump({g.name: g.nodes() for g in (rollout, self.teacher, self.learner)}, f, indent=1)
        self.rollout = RolloutPool(rollout, self.log.event, lambda: self.weights_version,
                                   lambda: self.learner.call("export_weights")[0])
        ray.get(self.teacher.call("ready") + self.learner.call("ready"))
        self.log.event(f"actors ready in {time.time() - t0:.0f}s")
        if cfg.run.resume == "auto":
            self.restore()

    def handle_sigterm(self) -> None:
        """SIGTERM (`ray job stop`, a scheduler) asks for a checkpoint after the current step
        and a clean exit."""
        def on_sigterm(signum, frame):
            self.stop_requested = True

        signal.signal(signal.SIGTERM, on_sigterm)

    def _init_ray(self) -> None:
        if ray.is_initialized():
            return
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
            return
        cfg = self.cfg
        needed = cfg.rollout.num_workers + cfg.teacher.num_workers + cfg.learner.world_size
        ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False, log_to_driver=True)
        self._started_ray = True

    # ---- one update ----

    def step(self) -> dict:
        """Sample prompts, generate, reward (inside the rollout workers), score with the
        teacher, update the learners, push the weights to every rollout engine, log."""
        cfg, t = self.cfg, {}
        t0 = time.perf_counter()
        prompts = self._next_prompts(cfg.algorithm.prompts_per_step)
        t0_gen = time.perf_counter()
        shards = self._generate(prompts)
        t["generate_s"] = time.perf_counter() - t0_gen
        scores = self.teacher.scatter("score", shards)
        t["score_s"] = self._wait(scores)
        coef = coef_at(self.step_num, cfg.algorithm.kd.schedule, cfg.algorithm.kd.coef, cfg.algorithm.kd.coef_min,
                       cfg.algorithm.kd.decay)
        t0_train = time.perf_counter()
        results = ray.get(self.learner.call("train_step", self.step_num, coef, self.rehearsal_pos, *shards, *scores))
        t["train_s"] = time.perf_counter() - t0_train
        self.step_num += 1
        self.rehearsal_pos += cfg.algorithm.rehearsal.samples_per_step if cfg.algorithm.rehearsal.coef > 0 else 0
        t["sync_s"] = self.sync_weights()
        record = self._record(results, coef, t, time.perf_counter() - t0)
        self._check_finite(record)
        return record

    def _generate(self, prompts) -> list:
        """One generate call per rollout worker; returns refs to the shards (a worker that
        dies is revived and re-runs the same prompts: see RolloutPool)."""
        calls = self.rollout.run("generate_with_summary", self.rollout.split(prompts), self.step_num,
                                 what=f"step {self.step_num + 1}", num_returns=2)
        return [shard for shard, _ in calls]

    def _next_prompts(self, count: int) -> PromptBatch:
        return prompt_batch(self.inputs.train, self.sampler.next(count))

    @staticmethod
    def _wait(refs: list) -> float:
        t0 = time.perf_counter()
        ray.wait(refs, num_returns=len(refs))
        return time.perf_counter() - t0

    def sync_weights(self, version: int | None = None) -> float:
        """Push the learner's weights to every rollout engine as `version` (default: the next
        one); fails (never hangs) after rollout.sync_timeout_s naming the engine that did not
        finish."""
        t0 = time.perf_counter()
        self.weights_version = self.weights_version + 1 if version is None else version
        blobs = self.learner.call("export_weights")
        self.rollout.load_weights(blobs[0], self.weights_version, self.cfg.rollout.sync_timeout_s)
        ray.get(blobs[1:])
        return time.perf_counter() - t0

    def _record(self, results: list[dict], coef: float, t: dict, step_s: float) -> dict:
        sums = {k: sum(r["sums"][k] for r in results) for k in results[0]["sums"]}
        batch = results[0]["batch"]
        tokens = max(sums["tokens"], 1.0)
        record = {
            "step": self.step_num, **batch,
            # masked mean over the tokens the teacher term saw (None when the KD mask selected none)
            "kd_divergence": sums["kd_k1_sum"] / sums["kd_tokens"] if sums["kd_tokens"] else None,
            "kd_tokens": int(sums["kd_tokens"]), "kd_loss": sums["kd_loss"], "kd_coef": coef,
            "policy_loss": sums["policy_loss"], "entropy": sums["entropy"] / tokens,
            "clip_frac": sums["clip_frac"] / tokens, "grad_norm": results[0]["grad_norm"],
            "sampler_mismatch_max": max(r["mismatch_max"] for r in results),
            "sampler_mismatch_k3": sums["mismatch_k3"] / tokens,
            "tokens_per_s": batch["response_tokens"] / step_s, **t, "step_s": step_s,
            "skipped_update": any(r["skipped"] for r in results),
            "nonfinite_losses": sum(r["nonfinite"] for r in results),
            "skipped_long_prompts": self.inputs.train.skipped_too_long, "weights_version": self.weights_version,
        }
        if self.cfg.algorithm.tis_cap > 0:
            record["tis_weight_mean"] = sums["tis_weight"] / tokens
        if self.cfg.algorithm.rehearsal.coef > 0:
            record["rehearsal_loss"] = sums["rehearsal_loss"]
        return record

    def _check_finite(self, record: dict) -> None:
        if record["skipped_update"]:
            self.nonfinite_in_a_row += 1
            self.log.event(f"step {record['step']}: non-finite loss or gradient, update skipped "
                           f"({self.nonfinite_in_a_row} in a row)")
            if self.nonfinite_in_a_row >= STOP_AFTER_NONFINITE:
                raise TrainingError(f"{STOP_AFTER_NONFINITE} updates in a row had a non-finite loss or gradient; "
                                    f"stopping (lower learner.lr or check the reward and teacher)")
        else:
            self.nonfinite_in_a_row = 0

    # ---- checkpoints and resume ----

    def state_dict(self) -> dict:
        return {"step": self.step_num, "weights_version": self.weights_version, "rehearsal_pos": self.rehearsal_pos,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "sampler": self.sampler.state_dict(),
                "learner_world_size": self.cfg.learner.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.step_num, self.weights_version = state["step"], state["weights_version"]
        self.rehearsal_pos, self.nonfinite_in_a_row = state["rehearsal_pos"], state["nonfinite_in_a_row"]
        self.sampler.load_state_dict(state["sampler"])

    def save_checkpoint(self) -> str:
        """Learners write their parts into a staging directory; the driver adds its state and
        commits atomically (see checkpoint.py). Old checkpoints go only after that."""
        cfg = self.cfg
        staging = checkpoint.staging_dir(cfg.run.output_dir, self.step_num)
        ray.get(self.learner.call("save_state", staging, cfg.student.path))
        path = checkpoint.commit(cfg.run.output_dir, self.step_num, self.state_dict(), cfg.run.keep_checkpoints)
        self.log.event(f"checkpoint: {path}")
        return path

    def restore(self) -> bool:
        """Continue from the newest complete checkpoint: learner state, driver state, metrics
        truncated to it, and the restored weights pushed to every rollout engine (checked)."""
        found = checkpoint.latest(self.cfg.run.output_dir)
        if found is None:
            self.log.truncate_after(0)
            self.log.event("no complete checkpoint: starting from the beginning")
            return False
        step, path = found
        ray.get(self.learner.call("load_state", path))
        self.load_state_dict(checkpoint.load_trainer_state(path))
        self.log.truncate_after(step)
        self.sync_weights(version=self.weights_version)  # the restored weights keep their version
        seq = self.inputs.train.prompt_ids[0] + [self.inputs.eos_id]
        engines = ray.get([w.sequence_logprobs.remote(seq) for w in self.rollout.actors])
        learner = ray.get(self.learner.actors[0].sequence_logprobs.remote(seq))
        worst = max(abs(a - b) for e in engines for a, b in zip(e, learner))
        if worst > RESUME_LOGPROB_TOLERANCE:
            raise TrainingError(f"after restoring {path} the rollout engines disagree with the learner "
                                f"(max |log-prob difference| {worst:.2e})")
        self.log.event(f"resumed from {path} (step {step}); engines serve the restored weights "
                       f"(max |log-prob difference| {worst:.1e})")
        return True

    # ---- evaluation and the loop ----

    def evaluate(self) -> float | None:
        """Held-out accuracy: greedy decoding on the rollout engines, mean reward."""
        data = self.inputs.eval
        if data is None:
            return None
        n = len(data) if not self.cfg.run.eval_max_prompts else min(len(data), self.cfg.run.eval_max_prompts)
        calls = self.rollout.run("evaluate", self.rollout.split(prompt_batch(data, list(range(n)))), what="evaluation")
        results = ray.get(calls)
        return sum(r[0] for r in results) / max(sum(r[1] for r in results), 1)

    def fit(self) -> dict:
        cfg = self.cfg
        summary = {"eval_before": self.evaluate() if self.step_num == 0 else None}
        if summary["eval_before"] is not None:
            self.log.event(f"held-out accuracy before training: {summary['eval_before']:.3f}")
        record = {}
        while self.step_num < cfg.run.steps:
            record = self.step()
            due = cfg.run.eval_every and self.step_num % cfg.run.eval_every == 0
            if (due or self.step_num == cfg.run.steps) and self.inputs.eval is not None:
                record["eval_accuracy"] = self.evaluate()
            self.log.log(record)
            every = cfg.run.checkpoint_every
            if (every and self.step_num % every == 0) or self.step_num == cfg.run.steps or self.stop_requested:
                self.save_checkpoint()
            if self.stop_requested:
                self.log.event(f"stopped on request after step {self.step_num}; continue with "
                               f"`rayskd resume {cfg.run.output_dir}`")
                summary["stopped"] = True
                return summary
        summary["eval_after"] = record.get("eval_accuracy")
        summary["final_model"] = self.save_final()
        if summary["eval_before"] is not None:
            self.log.event(f"held-out accuracy: {summary['eval_before']:.3f} -> {summary['eval_after']:.3f}")
        return summary

    def save_final(self) -> str:
        path = os.path.join(self.cfg.run.output_dir, "final")
        ray.get(self.learner.call("save_pretrained", path, self.cfg.student.path))
        self.log.event(f"student saved to {path} (Hugging Face, safetensors)")
        return path

    # ---- tear-down: every path ----

    def shutdown(self) -> None:
        if self.rollout is not None:
            self.rollout.shutdown()
        for group in (self.teacher, self.learner):
            if group is not None:
                group.kill()
        self.rollout = self.teacher = self.learner = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
