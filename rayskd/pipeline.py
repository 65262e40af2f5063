"""The rollout pipeline: generation requests in flight, teacher scoring, versions, staleness.

Each step's prompts go out as `requests_per_step` generation requests, spread over the rollout
engines (the least busy first). As soon as a request's samples exist, its scoring goes to the
least busy teacher scorer, while the driver waits on anything else (`wait` and `take` keep
dispatching). With `max_staleness = k` the requests of the next k steps are in flight while the
learner trains: an engine runs its calls in the order they were sent, so a request sent before
the weight sync of version v is sampled with the weights it held then. Steps are submitted in
order, each at the start of the step k earlier, so the request of step t is sampled with weights
version max(0, t - k) and is trained on at version t: never more than k versions old. `take`
checks that bound on every request (the version each engine reports) and regenerates one that
breaks it. Every sample keeps the version it was drawn with; the learner uses the sampler's
log-probs as the behaviour policy when k >= 1.

A checkpoint saves the requests already generated for later steps (`save`), so a resumed run
trains on exactly the samples the uninterrupted run would have.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Callable

import ray

from .actors import ActorGroup, TrainingError
from .batch import (
    REPLAY, SERVED_ELSEWHERE, TEACHER, PromptBatch, RolloutSummary, concat_shards, merge_prompts, shard_from_tensors,
    shard_to_tensors, split_prompts, split_shard, summarize,
)
from .rollout_pool import MAX_RETRIES, RESTARTABLE, RolloutPool

PENDING_FILE = "pending_rollouts.safetensors"


@dataclass
class Request:
    """One generation request: some prompts of one step, on one engine, then its teachers."""
    step: int
    prompts: PromptBatch
    engine: int = -1
    shard: object = None  # ObjectRef of the RolloutShard
    summary_ref: object = None
    summary: RolloutSummary | None = None
    score: list | None = None  # ObjectRefs of the TeacherScores, one per teacher scoring it, once dispatched
    attempts: int = 0

    @property
    def by_teacher(self) -> bool:
        """The teacher's engines generate this request (GKD's teacher samples: `request_bounds`
        gives them requests of their own); never stale, its weights never change."""
        return bool(self.prompts.origins) and all(o == TEACHER for o in self.prompts.origins)

    @property
    def replayed(self) -> bool:
        """The replay buffer serves this request (DistiLLM: replay.py): old by design, its
        sampler's log-probs correct for that."""
        return bool(self.prompts.origins) and all(o == REPLAY for o in self.prompts.origins)


@dataclass
class ReadyBatch:
    """A step's requests, all generated (their scores may still be running)."""
    step: int
    requests: list[Request]

    @property
    def summaries(self) -> list[RolloutSummary]:
        return [r.summary for r in self.requests]

    def staleness(self, version: int) -> list[int]:
        """Weight versions between each sequence's sampler and the learner at `version` (the
        student's samples: the teacher's engines hold no version, and a dataset response no
        sampler; 0 when there is none of them)."""
        return [version - s.weights_version for s in self.summaries
                for o in (s.origin or [0] * len(s.uids)) if o not in SERVED_ELSEWHERE] or [0]


class RolloutPipeline:
    def __init__(self, pool: RolloutPool, teachers: list[ActorGroup], prompts_for: Callable[[int], PromptBatch],
                 requests_per_step: int, max_staleness: int, end_step: int, event: Callable[[str], None],
                 teacher_of: list[int] | None = None, teacher_pool: RolloutPool | None = None,
                 skd: tuple | None = None, replay: Callable[[int, int, int], tuple] | None = None):
        """`prompts_for(step)` draws the prompts of `step` (called once per step, in order).
        `teachers`: each teacher's pool; `teacher_of`: each dataset row's teacher (routed), or
        None: every teacher scores every sequence (one teacher, or an ensemble). `teacher_pool`:
        the teacher's own engines, for the requests it generates (GKD's teacher samples).
        `replay(step, start, count)`: (their prompts, a RolloutShard) of the step's replayed groups
        start .. start + count."""
        self.pool, self.teachers, self.prompts_for, self.teacher_pool = pool, teachers, prompts_for, teacher_pool
        self.replay = replay
        self.requests_per_step, self.max_staleness, self.end_step = requests_per_step, max_staleness, end_step
        self.event, self.teacher_of = event, teacher_of
        # the teacher in the sampling loop: (verdict, its parameter, block), and the scorer asked next
        self.skd, self.skd_next = skd, 0
        self.inflight: dict[int, list[Request]] = {}
        self.scoring: list[tuple[tuple[int, int], object]] = []  # ((teacher, worker), ref) not known to be finished

    # ---- submitting ----

    def fill(self, step: int) -> None:
        """Have steps step .. step + max_staleness in flight (none past the run's end)."""
        for s in range(step, min(step + self.max_staleness + 1, self.end_step)):
            if s not in self.inflight:
                self.inflight[s] = [Request(s, part) for part in split_prompts(self.prompts_for(s),
                                                                               self.requests_per_step)]
                for r in self.inflight[s]:
                    self._generate(r)

    def _generate(self, r: Request) -> None:
        """Send `r` to the ready engine with the fewest requests still generating; with none
        ready (restarted ones wait for the next weight push) it waits (`_send_waiting`). A
        replayed request is served at once, and goes to the teachers."""
        if r.replayed:  # the step's replayed groups are one draw, cut in request order
            before = self.inflight[r.step][:next(i for i, q in enumerate(self.inflight[r.step]) if q is r)]
            start = sum(len(q.prompts.uids) for q in before if q.replayed)
            r.prompts, shard = self.replay(r.step, start, len(r.prompts.uids))
            r.engine, r.shard, r.summary_ref, r.summary = -1, ray.put(shard), None, summarize(shard)
            self._score(r)
            return
        pool = self._pool(r)
        load = {i: 0 for i in pool.ready()}
        for q in self._pending():
            if q.engine in load and q is not r and q.by_teacher == r.by_teacher:
                load[q.engine] += 1
        r.summary, r.score = None, None
        if not load:
            r.engine, r.shard, r.summary_ref = -1, None, None
            return
        r.engine = min(load, key=load.get)
        if self.skd is not None and not r.by_teacher:  # the student proposes, a teacher scorer corrects
            scorer = self.teachers[0].actors[self.skd_next % self.teachers[0].workers]
            self.skd_next += 1
            r.shard, r.summary_ref = pool.generate_skd(r.engine, r.prompts, r.step, scorer, *self.skd)
            return
        r.shard, r.summary_ref = pool.generate(r.engine, r.prompts, r.step)

    def _pool(self, r: Request) -> RolloutPool:
        return self.teacher_pool if r.by_teacher else self.pool

    def _send_waiting(self) -> None:
        """Send the requests that waited for a ready engine."""
        for r in self._pending():
            if r.summary_ref is None:
                self._generate(r)

    def _score(self, r: Request) -> None:
        """Send `r`'s samples to each teacher that scores them (routed: the sequences of its
        prompts only), each to the worker of its pool with the fewest scoring calls outstanding."""
        if self.scoring:
            done = set(ray.wait([ref for _, ref in self.scoring], num_returns=len(self.scoring), timeout=0)[0])
            self.scoring = [(t, ref) for t, ref in self.scoring if ref not in done]
        r.score = []
        for teacher, rows in self._teacher_rows(r):
            load = [0] * self.teachers[teacher].workers
            for (t, worker), _ in self.scoring:
                load[worker] += t == teacher
            worker = load.index(min(load))
            ref = self.teachers[teacher].call_worker(worker, "score", r.shard, *([rows] if rows is not None else []))
            r.score.append(ref)
            self.scoring.append(((teacher, worker), ref))

    def _teacher_rows(self, r: Request) -> list[tuple[int, list[int] | None]]:
        """(teacher, the request's sequences it scores, None: all) for each teacher of `r`."""
        if self.teacher_of is None:
            return [(t, None) for t in range(len(self.teachers))]
        rows: dict[int, list[int]] = {}
        for i, uid in enumerate(r.summary.uids):
            rows.setdefault(self.teacher_of[uid], []).append(i)
        return sorted(rows.items())

    # ---- waiting while dispatching ----

    def _pending(self) -> list[Request]:
        return [r for reqs in self.inflight.values() for r in reqs if r.summary is None]

    def pump(self, block: bool) -> None:
        """Collect the requests that finished generating and send each to a teacher; with
        `block`, first wait until at least one finishes. A failed engine is revived and its
        request re-sent (same seeds: same samples, unless the weights moved on meanwhile)."""
        pending = [r for r in self._pending() if r.summary_ref is not None]
        if not pending:
            return
        refs = [r.summary_ref for r in pending]
        ready, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
        ready = set(ready)
        for r in pending:
            if r.summary_ref not in ready:
                continue
            try:
                r.summary = ray.get(r.summary_ref)
            except RESTARTABLE as e:
                r.attempts += 1
                self.event(f"rollout worker {r.engine} failed during step {r.step + 1} ({type(e).__name__}); "
                           f"retrying its request")
                if r.attempts > MAX_RETRIES:
                    raise TrainingError(f"rollout requests of step {r.step + 1} kept failing after {MAX_RETRIES} "
                                        f"retries") from None
                self._pool(r).revive(r.engine)
                self._generate(r)
                continue
            self._score(r)

    def wait(self, refs: list) -> None:
        """Wait for `refs`, dispatching finished generations to the teachers meanwhile."""
        while True:
            _, not_ready = ray.wait(refs, num_returns=len(refs), timeout=0)
            if not not_ready:
                return
            pending = [r for r in self._pending() if r.summary_ref is not None]
            if not pending:
                ray.wait(refs, num_returns=len(refs))
                return
            ray.wait([*not_ready, *(r.summary_ref for r in pending)], num_returns=1)
            self.pump(block=False)

    def take(self, step: int, version: int) -> ReadyBatch:
        """The requests of `step`, all generated and sent to the teachers; the following steps'
        requests are sent first, so they generate while this one trains. A request sampled
        more than max_staleness versions before `version` is regenerated."""
        self.fill(step)
        self._send_waiting()
        while True:
            while any(r.summary is None for r in self.inflight[step]):
                if any(r.summary_ref is None for r in self.inflight[step]):
                    raise TrainingError(f"step {step + 1}: no rollout engine is ready to generate its samples")
                self.pump(block=True)
            stale = [r for r in self.inflight[step] if version - r.summary.weights_version > self.max_staleness
                     and not r.by_teacher and not r.replayed]
            if not stale:
                return ReadyBatch(step, self.inflight.pop(step))
            self.event(f"step {step + 1}: {len(stale)} request(s) sampled more than {self.max_staleness} versions "
                       f"ago; regenerating them")
            for r in stale:
                r.attempts += 1
                if r.attempts > MAX_RETRIES:
                    raise TrainingError(f"step {step + 1}: rollout engine {r.engine} still samples with weights "
                                        f"version {r.summary.weights_version}, more than algorithm.max_staleness="
                                        f"{self.max_staleness} behind the learner's {version}")
                self._generate(r)

    # ---- checkpoints ----

    def save(self, directory: str, wait: bool = True) -> None:
        """Write the requests already sent for later steps (their samples are fetched here).
        `wait=False` (a checkpoint on the way out): a request not finished, or whose engine
        failed, is written as its prompts only and generated again after the resume, with the
        same seeds."""
        from safetensors.torch import save_file

        tensors, meta = {}, []
        if wait:
            self._send_waiting()
        for step in sorted(self.inflight):
            for i, r in enumerate(self.inflight[step]):
                while wait and r.summary is None:  # a retried request must finish first
                    self.pump(block=True)
                entry = {"step": step, "index": i, "prompts": asdict(r.prompts)}
                shard = self._finished_shard(r) if not wait else ray.get(r.shard)
                if shard is not None:
                    t, m = shard_to_tensors(shard, f"{step}.{i}")
                    tensors.update(t)
                    entry.update(m)
                meta.append(entry)
        save_file(tensors, os.path.join(directory, PENDING_FILE), metadata={"requests": json.dumps(meta)})

    @staticmethod
    def _finished_shard(r: Request):
        """The samples of `r` if its engine delivered them, else None (without waiting)."""
        if r.shard is None or not ray.wait([r.shard], timeout=0)[0]:
            return None
        try:
            return ray.get(r.shard)
        except Exception:
            return None

    def load(self, directory: str) -> None:
        """Put the saved requests back in flight: samples go to the teachers (their scores are
        recomputed), requests saved as prompts only to the engines. A resume with another
        request count per step (other numbers of engines or learner ranks) re-splits each step's
        saved samples by whole groups; a step saved only partly generated is then generated
        again whole."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.path.join(directory, PENDING_FILE)
        if not os.path.exists(path):
            return
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["requests"])
        tensors = load_file(path)
        steps: dict[int, list] = {}
        for m in meta:
            shard = shard_from_tensors(tensors, f"{m['step']}.{m['index']}", m) if "group_size" in m else None
            steps.setdefault(m["step"], []).append((PromptBatch(**m["prompts"]), shard))
        for step, saved in sorted(steps.items()):
            if len(saved) != self.requests_per_step:
                prompts = merge_prompts([p for p, _ in saved])
                shards = [s for _, s in saved]
                if any(s is None for s in shards):
                    self.event(f"step {step + 1}: its saved samples were only partly generated and the request count "
                               f"changed ({len(saved)} -> {self.requests_per_step}); generating them again")
                    shards = [None] * self.requests_per_step
                else:
                    shards = split_shard(concat_shards(shards), self.requests_per_step)
                saved = list(zip(split_prompts(prompts, self.requests_per_step), shards))
            for prompts, shard in saved:
                r = Request(step, prompts)
                self.inflight.setdefault(step, []).append(r)
                if shard is None:
                    self._generate(r)
                    continue
                r.shard, r.summary = ray.put(shard), summarize(shard)
                self._score(r)

    def shutdown(self) -> None:
        self.inflight.clear()
        self.scoring.clear()
