"""DistiLLM's adaptive off-policy reuse (arXiv 2402.03898; docs/algorithms.md, "DistiLLM's
adaptive off-policy reuse"), as the authors' code does it: each prompt's sequences are the
dataset's reference response with probability 1 - t, else the student's, either fresh samples
or, once the replay buffer is full, with probability step / steps a group replayed from it. t
starts at algorithm.distillm.init_threshold and rises by raise_by (to at most 1) at an
evaluation whose validation loss (the student's token cross-entropy on the held-out reference
responses) is at least loss_eps above the one that last raised it (the first: before training).

The buffer keeps the student's sampled groups (prompt, G responses, their rewards and the
sampler's log-probs), the oldest out first; a replayed group keeps its sampler's log-probs, so
the GRPO term's ratio corrects for its age (the one rule of losses.importance_weights).
"""
from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass

import torch

from .batch import (
    DATASET, REPLAY, STUDENT, RolloutShard, concat_shards, select_rows, shard_from_tensors, shard_to_tensors,
)

BUFFER_FILE = "replay_buffer.safetensors"


def distillm_origins(seed: int, step: int, count: int, t: float, progress: float, full: bool) -> list[int]:
    """Each of a step's `count` prompts' origin: u < t (1 - progress) the student's fresh samples;
    t (1 - progress) <= u < t replayed (fresh while the buffer is not full); u >= t the dataset's
    response. One uniform u per prompt from (seed, step): a resumed run draws the same."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 104729)
    u = torch.rand(count, generator=gen, dtype=torch.float64)
    fresh = t * (1.0 - progress)
    return [STUDENT if x < fresh or (x < t and not full) else REPLAY if x < t else DATASET for x in u.tolist()]


@dataclass
class Threshold:
    """t, and the validation loss it was last raised at (None before the first evaluation)."""
    t: float
    last_loss: float | None = None

    def update(self, loss: float, raise_by: float, eps: float) -> "Threshold":
        if self.last_loss is None:
            return Threshold(self.t, loss)
        if loss >= self.last_loss + eps:
            return Threshold(min(self.t + raise_by, 1.0), loss)
        return self


class ReplayBuffer:
    """The student's earlier sampled groups, at most `capacity`, oldest out first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.groups: deque[RolloutShard] = deque()

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def full(self) -> bool:
        return len(self.groups) >= self.capacity

    def add(self, shards: list[RolloutShard]) -> None:
        """A step's samples, in order: their groups the student sampled afresh (not the dataset's
        responses, not replayed ones)."""
        for shard in shards:
            g = shard.group_size
            for start in range(0, shard.num_sequences, g):
                if int(shard.origin_N[start]) == STUDENT:
                    self.groups.append(select_rows(shard, torch.arange(start, start + g)))
        while len(self.groups) > self.capacity:
            self.groups.popleft()

    def draw(self, seed: int, step: int, start: int, count: int) -> RolloutShard:
        """Groups start .. start + count of the step's draw, uniform without replacement (a
        permutation from (seed, step): a step's requests take consecutive parts), marked replayed."""
        if start + count > len(self.groups):
            raise ValueError(f"{start + count} groups asked of a replay buffer holding {len(self.groups)}")
        order = torch.randperm(len(self.groups), generator=torch.Generator().manual_seed(seed * 1_000_003 + step + 7))
        shard = concat_shards([self.groups[i] for i in order[start:start + count].tolist()])
        shard.origin_N = torch.full_like(shard.origin_N, REPLAY)
        shard.stats = {}
        return shard

    def save(self, directory: str) -> None:
        from safetensors.torch import save_file

        tensors, meta = {}, []
        for i, group in enumerate(self.groups):
            t, m = shard_to_tensors(group, str(i))
            tensors.update(t)
            meta.append(m)
        save_file(tensors, os.path.join(directory, BUFFER_FILE), metadata={"groups": json.dumps(meta)})

    def load(self, directory: str) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.path.join(directory, BUFFER_FILE)
        self.groups.clear()
        if not os.path.exists(path):
            return
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["groups"])
        tensors = load_file(path)
        self.groups.extend(shard_from_tensors(tensors, str(i), m) for i, m in enumerate(meta))
        while len(self.groups) > self.capacity:  # (a resume with a smaller capacity)
            self.groups.popleft()

