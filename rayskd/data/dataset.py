"""JSONL prompt datasets and a prompt sampler whose position is part of the run's state."""
from __future__ import annotations

import json
import os

import torch


class DataError(ValueError):
    pass


def read_jsonl(path: str, prompt_key: str, answer_key: str) -> list[dict]:
    """Rows with `prompt_key` and `answer_key`; a clear DataError for a missing file, a bad
    line or missing keys, and for an empty file."""
    if not os.path.isfile(path):
        raise DataError(f"dataset not found: {path}")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            for key in (prompt_key, answer_key):
                if not isinstance(row, dict) or key not in row:
                    raise DataError(f"{path}:{n}: missing key {key!r} (set data.prompt_key / data.answer_key)")
            rows.append({"prompt": str(row[prompt_key]), "answer": str(row[answer_key])})
    if not rows:
        raise DataError(f"dataset is empty: {path}")
    return rows


class PromptDataset:
    """Tokenised prompts; prompts longer than max_prompt_tokens are skipped and counted."""

    def __init__(self, rows: list[dict], tokenizer, max_prompt_tokens: int):
        self.rows, self.prompt_ids, self.skipped_too_long = [], [], 0
        for row in rows:
            ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            if len(ids) > max_prompt_tokens or len(ids) == 0:
                self.skipped_too_long += 1
                continue
            self.rows.append(row)
            self.prompt_ids.append(ids)

    def __len__(self) -> int:
        return len(self.rows)


class PromptSampler:
    """Walks the dataset in a seeded random order, epoch after epoch. State is (epoch,
    position): restoring it continues exactly where a run stopped."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(count - len(out), self.size - self.position)
            out += self._order(self.epoch)[self.position:self.position + take]
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise DataError(f"the dataset changed size since the checkpoint ({state['size']} -> {self.size} prompts)")
        self.epoch, self.position = state["epoch"], state["position"]
