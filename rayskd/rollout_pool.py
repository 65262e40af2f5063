"""The rollout workers as one pool, with their recovery in one place.

A worker that dies (its process, or its vLLM engine: the actor then exits) is restarted by
Ray (unlimited `max_restarts`, but no task retries: Ray would re-run the call on an engine that
holds the initial weights). The pool waits for the restart, pushes the current weights, and
re-issues the same work; the per-request seeds make the retried samples the same ones.
Generation, evaluation and the weight sync all go through here, so they recover the same way.
A worker that fails more than rollout.max_failures times within FAILURE_WINDOW_S, or that Ray
can no longer restart, stops the run at once with a message.
"""
from __future__ import annotations

import contextlib
import signal
import time
from typing import Callable

import ray

from .actors import ActorGroup, TrainingError, workdir
from .batch import PromptBatch, split_prompts
from .config import engines_sleep
from .weight_sync import CollectiveSync, ObjectStoreSync

WeightSync = ObjectStoreSync | CollectiveSync

RESTARTABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)  # an actor Ray is restarting
MAX_RETRIES = 3  # of one request or scoring call
FAILURE_WINDOW_S = 600.0  # rollout.max_failures of one worker: a budget per window, not per run
REVIVE_TIMEOUT_S = 600


def kill_leftovers(processes: list[tuple[str, int, float]]) -> None:
    """SIGKILL engine processes that outlived their actor: only on this host, and only the
    very process recorded (same pid and start time, so a reused pid is never hit)."""
    import socket

    import psutil

    here = socket.gethostname()
    for host, pid, started in processes:
        if host != here:
            continue
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 1e-3:
                p.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def actor_state(actor) -> str:
    """ALIVE, RESTARTING, DEAD, ... as Ray's control store has it (no dashboard needed)."""
    from ray._private import state

    try:
        return state.actors(actor_id=actor._actor_id.hex()).get("State", "UNKNOWN")
    except Exception:
        return "UNKNOWN"


def start_rollout(cfg, model_path: str, max_model_len: int, env_vars: dict, log_dir: str | None = None,
                  teacher: bool = False) -> ActorGroup:
    """The rollout workers of `cfg` (a rayskd Config), each a vLLM engine on `model_path`.
    Ray restarts them without limit; RolloutPool budgets the restarts per window. `teacher`:
    the teacher's engines instead (teacher.generation's pool, the rollout's sampling settings;
    they never sleep and never take a weight push)."""
    import dataclasses
    import os

    from .rollout import RolloutEngine

    role = cfg.rollout
    if teacher:
        gen = cfg.teacher.generation
        role = dataclasses.replace(role, num_workers=gen.num_workers, gpus_per_worker=gen.gpus_per_worker,
                                   tensor_parallel_size=gen.tensor_parallel_size, resources=dict(cfg.teacher.resources))
    extra_path = (workdir(),)  # where a user's reward module is imported from
    return ActorGroup(
        "teacher_rollout" if teacher else "rollout", RolloutEngine, role.num_workers, role.tensor_parallel_size,
        role.gpus_per_worker,
        lambda i, pg: dict(model_path=model_path, cfg=role, reward=cfg.reward, seed=cfg.run.seed,
                           max_model_len=max_model_len, extra_path=extra_path,
                           sleeps=engines_sleep(cfg) and not teacher),
        resources=dict(role.resources), env_vars=env_vars, max_restarts=-1, task_retries=0, log_dir=log_dir)


class RolloutPool:
    def __init__(self, group: ActorGroup, event: Callable[[str], None], max_failures: int):
        """The engines serve the model they started with until `use_weights` gives the pool a
        transport for the learner's (`rayskd eval` never does)."""
        self.group, self.event, self.weights, self.max_failures = group, event, None, max_failures
        self.engine_pids = [p for pids in ray.get(group.call("child_pids")) for p in pids]
        self.failures: list[list[float]] = [[] for _ in range(group.n)]  # times each worker failed
        # the learner is in an update (Trainer.step): its weights are newer than the engines'.
        # A collective push would give a restarted engine those; it waits for the step's push
        # instead, and takes no work until then (`ready`)
        self.learner_busy = False
        self.behind: set[int] = set()  # restarted engines waiting for the next push
        self.regroup = False  # an engine restarted: the collective transport forms its group again

    def use_weights(self, weights: WeightSync) -> None:
        """From now on `weights` moves the learner's weights into the engines, and into a
        restarted one before it takes work again."""
        weights.setup(self.actors)
        self.weights = weights

    def weights_dtype(self) -> str:
        """The dtype the engines hold their weights in (a push sends them in it)."""
        return ray.get(self.actors[0].weights_dtype.remote())

    @property
    def n(self) -> int:
        return self.group.n

    @property
    def actors(self) -> list:
        return self.group.actors

    def split(self, prompts: PromptBatch) -> list[PromptBatch]:
        """Contiguous, near-equal shares of the prompts, one per worker."""
        return split_prompts(prompts, self.n)

    def run(self, method: str, parts: list, *args, what: str) -> list:
        """Call `method(parts[i], *args)` on worker i for every part and wait for all of them.
        A worker that dies is revived and its part re-run, at most MAX_RETRIES times. Returns
        each call's object ref. (Training rollouts go through rayskd/pipeline.py instead,
        which does not wait for all of them.)"""
        def submit(i):
            return getattr(self.actors[i], method).remote(parts[i], *args)

        calls = [submit(i) for i in range(len(parts))]
        for attempt in range(MAX_RETRIES + 1):
            failed = []
            for i, refs in enumerate(calls):
                try:
                    ray.get(refs)
                except RESTARTABLE as e:
                    failed.append(i)
                    self.event(f"rollout worker {i} failed during {what} ({type(e).__name__}); retrying its work")
            if not failed:
                return calls
            if attempt == MAX_RETRIES:
                break
            for i in failed:
                self.revive(i)
                calls[i] = submit(i)
        raise TrainingError(f"rollout workers {failed} kept failing during {what} after {MAX_RETRIES} retries")

    def ready(self) -> list[int]:
        """The engines that serve the pushed weights and may take work."""
        return [i for i in range(self.n) if i not in self.behind]

    def sync_weights(self, version: int, timeout_s: float) -> None:
        """Every engine loads the learner's current weights as `version`; fails (never hangs)
        after `timeout_s` naming the engines that did not finish. One that dies meanwhile is
        revived with the weights."""
        if self.regroup:
            self.weights.setup(self.actors)
            self.regroup = False
        loads = self.weights.push(self.actors, version)
        side = self.weights.side_refs  # the learner ranks' part
        _, pending = ray.wait(loads + side, num_returns=len(loads) + len(side), timeout=timeout_s)
        if pending:
            late = [i for i, r in enumerate(loads) if r in pending]
            raise TrainingError(f"weight sync: rollout worker(s) {late} did not load weights version {version} "
                                f"within rollout.sync_timeout_s={timeout_s}s" if late else
                                f"weight sync: the learner did not send weights version {version} within "
                                f"rollout.sync_timeout_s={timeout_s}s")
        self.behind.clear()
        failed = []
        for i, ref in enumerate(loads):
            try:
                ray.get(ref)
            except RESTARTABLE as e:
                self.event(f"rollout worker {i} failed during the weight sync ({type(e).__name__})")
                failed.append(i)
        try:
            ray.get(side)
        except ray.exceptions.RayTaskError:
            if not failed:  # (an engine that died takes the learner's broadcast down with it)
                raise
        for i in failed:
            self.revive(i)

    @contextlib.contextmanager
    def asleep(self, sleeps: bool):
        """Around a learner update: engines that share the learners' GPUs release their memory
        (vLLM's sleep mode) and take it back after (`sleeps`: rollout.sleep_while_training)."""
        if not sleeps:
            yield
            return
        ray.get(self.group.call("sleep"))
        try:
            yield
        finally:
            ray.get(self.group.call("wake_up"))

    def generate(self, i: int, prompts: PromptBatch, step: int) -> tuple:
        """Start engine i generating `prompts` for `step`: refs to (its shard, its summary)."""
        return self.actors[i].generate_with_summary.options(num_returns=2).remote(prompts, step)

    def generate_skd(self, i: int, prompts: PromptBatch, step: int, teacher, verdict: str, param: float,
                     block: int) -> tuple:
        """Start a request with the teacher in the sampling loop on engine i and the teacher scorer
        `teacher` (speculative.py: SKD's `judge`, MiniLLM's `mix`): refs to (its shard, its summary)."""
        from .speculative import skd_generate

        return skd_generate.remote(self.actors[i], teacher, prompts, step, verdict, param, block)

    def sequence_logprobs(self, token_ids: list[int]) -> list[list[float]]:
        """Every engine's log-probs of a fixed sequence (to check the weights it serves)."""
        return ray.get([a.sequence_logprobs.remote(token_ids) for a in self.actors])

    def revive(self, i: int) -> None:
        """Wait until Ray has restarted worker i, then load the current weights into it."""
        now = time.time()
        self.failures[i] = [t for t in self.failures[i] if now - t < FAILURE_WINDOW_S] + [now]
        if len(self.failures[i]) > self.max_failures:
            raise TrainingError(f"rollout worker {i} failed {len(self.failures[i])} times within "
                                f"{FAILURE_WINDOW_S / 60:.0f} minutes; stopping (its log: {self.group.log_file(i)})")
        actor = self.actors[i]
        deadline = now + REVIVE_TIMEOUT_S
        while True:
            try:
                self.engine_pids += ray.get(actor.child_pids.remote(), timeout=10)
                break
            except (*RESTARTABLE, ray.exceptions.GetTimeoutError):
                state = actor_state(actor)
                if state == "DEAD":
                    raise TrainingError(f"rollout worker {i} died and Ray could not restart it (its constructor "
                                        f"failed: see {self.group.log_file(i)})") from None
                if time.time() > deadline:
                    raise TrainingError(f"rollout worker {i} did not come back within {REVIVE_TIMEOUT_S} s "
                                        f"(state {state})") from None
                time.sleep(1)
        if self.weights is None:
            return
        if self.weights.name == "collective" and self.learner_busy:  # the learner is ahead of the pushed version
            self.behind.add(i)
            self.regroup = True
            return
        self.weights.rejoin(self.actors, i)  # (collective: the group formed again, with every engine)

    def shutdown(self) -> None:
        """Shut the engines down, kill the actors, and kill any engine process left behind."""
        try:
            ray.wait(self.group.call("shutdown"), num_returns=self.n, timeout=60)
        except Exception:
            pass
        self.group.kill()
        kill_leftovers(self.engine_pids)
        self.engine_pids = []
