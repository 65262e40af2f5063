#!/usr/bin/env python
"""Benchmark (not a test): the teacher's payload per response token, for each signal it can send.

    python scripts/bench_payload.py [--out benchmarks/payload.json] [--k 1,4,8] [--samples 1,4,8]

The demo's teacher (TeacherScorer, in this process) scores a shard of the demo's shape (64
sequences, 16-token prompts, 32-token responses); what travels from a teacher to a learner is
its TeacherScores, serialised as Ray serialises it (pickle protocol 5, tensors as buffers). Per
response token: the bytes of that object divided by the shard's response positions (padding
included: the tensors are [N, R, ...]). Signals: the sampled token's log-prob (k2, k3,
k1_reward, minillm), the top-k ids + log-probs + tail (topk, minillm_topk; teacher.top_k = k),
N drawn ids + log-probs + log weights (sparse; teacher.sparse_samples = N), and the final
hidden states (full; teacher.send_hidden: H values in the teacher's dtype, H = 256 for the
demo's teacher). The full vocabulary's log-probs (V x 4 bytes) are given for scale, at the
demo's V and at Qwen2.5's.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def shard(n: int = 64, prompt: int = 16, response: int = 32):
    import torch

    from rayskd.batch import RolloutShard

    g = torch.Generator().manual_seed(0)
    return RolloutShard(torch.randint(0, 13, (n, prompt), generator=g), torch.full((n,), prompt),
                        torch.randint(0, 13, (n, response), generator=g), torch.full((n,), response),
                        -torch.rand(n, response, generator=g) - 1, torch.zeros(n), torch.zeros(n, dtype=torch.bool),
                        torch.arange(n) // 8, 8, 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "payload.json"))
    p.add_argument("--k", default="1,4,8")
    p.add_argument("--samples", default="1,4,8")
    args = p.parse_args()

    from rayskd.config import load_config
    from rayskd.teacher import TeacherScorer

    s = shard()
    positions = s.response_ids_NR.numel()
    signals = [("sampled_token", [])]
    signals += [(f"topk_{k}", [f"teacher.top_k={k}"]) for k in map(int, args.k.split(","))]
    signals += [(f"sparse_{n}", [f"teacher.sparse_samples={n}"]) for n in map(int, args.samples.split(","))]
    signals += [(f"hidden_{dtype}", ["teacher.send_hidden=true", f"teacher.dtype={dtype}"])
                for dtype in ("float32", "bfloat16")]
    out = {"shard": {"sequences": s.response_ids_NR.shape[0], "response_positions": positions}, "bytes_per_token": {}}
    for name, overrides in signals:
        cfg = load_config(os.path.join(ROOT, "configs/demo.yaml"), ["teacher.dtype=float32", *overrides])
        scores = TeacherScorer(cfg.teacher.path, cfg.teacher, 13).score(s)
        size = len(pickle.dumps(scores, protocol=5))
        out["bytes_per_token"][name] = round(size / positions, 2)
        print(f"{name:>14}: {size / positions:8.2f} bytes per response token")
    for vocab in (13, 151_936):
        out["bytes_per_token"][f"full_vocab_{vocab}"] = 4 * vocab
        print(f"{'full vocab ' + str(vocab):>14}: {4 * vocab:8d} bytes per response token (fp32 log-probs)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
