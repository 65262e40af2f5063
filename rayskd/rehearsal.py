"""DPH-RL rehearsal data: responses of the initial student with per-token reference
log-probs (made by presample.py). Training adds coef x the f-divergence to the initial
policy on a chunk of these samples every step."""
from __future__ import annotations

import json

import torch

from .batch import RehearsalRows, pad_rows
from .config import Config


class RehearsalSet:
    def __init__(self, rows: list[dict]):
        if not rows:
            raise ValueError("the rehearsal set is empty: no prompt was solved reliably by the initial student")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, start: int, count: int) -> RehearsalRows:
        """`count` samples from position `start`, wrapping around (the position is run state)."""
        rows = [self.rows[(start + i) % len(self.rows)] for i in range(count)]
        return RehearsalRows(
            prompt_ids_NP=pad_rows([r["prompt_ids"] for r in rows]),
            prompt_len_N=torch.tensor([len(r["prompt_ids"]) for r in rows]),
            response_ids_NR=pad_rows([r["response_ids"] for r in rows]),
            response_len_N=torch.tensor([len(r["response_ids"]) for r in rows]),
            ref_logp_NR=pad_rows([r["ref_logp"] for r in rows], 0.0, torch.float32))


def meta_path(path: str) -> str:
    """Beside the rehearsal JSONL: how its reference log-probs were computed."""
    return path + ".meta.json"


def rehearsal_meta(cfg: Config) -> dict:
    """What the reference log-probs depend on beyond the model: the learner must compute its
    own at the same temperature and in the same dtype (preflight compares them)."""
    return {"temperature": cfg.rollout.temperature, "dtype": "bfloat16" if cfg.learner.bf16 else "float32"}


def load_rehearsal(path: str) -> RehearsalSet:
    with open(path) as f:
        return RehearsalSet([json.loads(line) for line in f if line.strip()])
