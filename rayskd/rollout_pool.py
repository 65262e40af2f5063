"""The rollout workers as one pool, with their recovery in one place.

A worker that dies is restarted by Ray (`max_restarts`, but no task retries: Ray would re-run
the call on an engine that holds the initial weights). The pool waits for the restart, pushes
the current weights, and re-issues the same work; the per-request seeds make the retried
samples the same ones. Generation, evaluation and the weight sync all go through here, so
they recover the same way.
"""
from __future__ import annotations

import signal
import time
from typing import Callable

import ray

from .actors import ActorGroup, TrainingError
from .batch import PromptBatch, split_prompts
from .weight_sync import ObjectStoreSync

RESTARTABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)  # an actor Ray is restarting
MAX_RETRIES = 3
REVIVE_TIMEOUT_S = 600


def kill_leftovers(processes: list[tuple[str, int, float]]) -> None:
    """SIGKILL engine processes that outlived their actor: only on this node, and only the
    very process recorded (same pid and start time, so a reused pid is never hit)."""
    import psutil

    here = ray.util.get_node_ip_address() if ray.is_initialized() else None
    for ip, pid, started in processes:
        if ip != here:
            continue
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 1e-3:
                p.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


class RolloutPool:
    def __init__(self, group: ActorGroup, event: Callable[[str], None], weights: ObjectStoreSync):
        """`weights` moves the learner's weights into the engines, and into a restarted one
        before it takes work again."""
        self.group, self.event, self.weights = group, event, weights
        self.engine_pids = [p for pids in ray.get(group.call("child_pids")) for p in pids]
        weights.setup(self.actors)

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

    def sync_weights(self, version: int, timeout_s: float) -> None:
        """Every engine loads the learner's current weights as `version`; fails (never hangs)
        after `timeout_s` naming the engines that did not finish. One that dies meanwhile is
        revived with the weights."""
        loads = self.weights.push(self.actors, version)
        _, pending = ray.wait(loads, num_returns=len(loads), timeout=timeout_s)
        if pending:
            late = [i for i, r in enumerate(loads) if r in pending]
            raise TrainingError(f"weight sync: rollout worker(s) {late} did not load weights version {version} "
                                f"within rollout.sync_timeout_s={timeout_s}s")
        for i, ref in enumerate(loads):
            try:
                ray.get(ref)
            except RESTARTABLE as e:
                self.event(f"rollout worker {i} failed during the weight sync ({type(e).__name__})")
                self.revive(i)

    def revive(self, i: int) -> None:
        """Wait until Ray has restarted worker i, then load the current weights into it."""
        actor = self.actors[i]
        deadline = time.time() + REVIVE_TIMEOUT_S
        while True:
            try:
                self.engine_pids += ray.get(actor.child_pids.remote(), timeout=60)
                break
            except (*RESTARTABLE, ray.exceptions.GetTimeoutError):
                if time.time() > deadline:
                    raise TrainingError(f"rollout worker {i} did not come back within {REVIVE_TIMEOUT_S} s") from None
                time.sleep(2)
        self.weights.rejoin(actor)

    def shutdown(self) -> None:
        """Shut the engines down, kill the actors, and kill any engine process left behind."""
        try:
            ray.wait(self.group.call("shutdown"), num_returns=self.n, timeout=60)
        except Exception:
            pass
        self.group.kill()
        kill_leftovers(self.engine_pids)
        self.engine_pids = []
