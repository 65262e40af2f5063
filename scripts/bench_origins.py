"""Benchmark (not a test): what sequences of other origins and the teacher in the sampling loop
cost per step, next to plain on-policy distillation, on the demo (issue 29). Each method trains
--steps steps of the demo's config (distillation alone, the top-8 teacher signal, so that every
method trains the same term; one rollout engine, one teacher, one learner rank), one after
another; the time per step is the mean of metrics.jsonl's step_s over the steps after the first
two (warm). Writes benchmarks/origins.json and prints the README's table.

    source scripts/_env.sh && python scripts/bench_origins.py --steps 12
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["algorithm.pg_coef=0", "algorithm.kd.estimator=topk", "teacher.top_k=8", "algorithm.kd.divergence=forward_kl"]
METHODS = {
    "on-policy distillation": [],
    "GKD, dataset responses (lambda 0.5)": ["algorithm.gkd.lmbda=0.5"],
    "GKD, teacher samples (lambda 0.5)": ["algorithm.gkd.lmbda=0.5", "algorithm.gkd.off_policy=teacher",
                                          "teacher.generation.num_workers=1"],
    "sequence-level KD (teacher samples)": ["algorithm.gkd.lmbda=0", "algorithm.gkd.off_policy=teacher",
                                            "teacher.generation.num_workers=1"],
    "speculative KD (top-2, blocks of 2)": ["algorithm.skd.top_k=2", "algorithm.skd.block=2"],
    "MiniLLM mixed sampling (alpha 0.2)": ["algorithm.kd.minillm.mix_alpha=0.2"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "origins.json"))
    a = p.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "steps": a.steps, "base": BASE, "methods": {}}
    for name, overrides in METHODS.items():
        out = os.path.join(ROOT, "runs", f"origins-{stamp}", str(len(result["methods"])))
        args = ["train", "configs/demo.yaml", f"run.output_dir={out}", f"run.steps={a.steps}", "run.eval_every=0",
                *BASE, *overrides]
        print("$ rayskd " + " ".join(args), flush=True)
        r = subprocess.run([sys.executable, "-m", "rayskd", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        if r.returncode != 0:
            print(r.stdout[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed ({r.returncode})")
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]
        warm = rows[2:]
        result["methods"][name] = {
            "overrides": overrides, "step_s": statistics.mean(m["step_s"] for m in warm),
            "generate_s": statistics.mean(m["generate_s"] for m in warm),
            "score_s": statistics.mean(m["score_s"] for m in warm),
            "train_s": statistics.mean(m["train_s"] for m in warm),
            "skd_acceptance": statistics.mean(m["skd_acceptance"] for m in warm) if "skd_acceptance" in warm[0] else None,
            "sequences_by_origin": warm[-1].get("sequences_by_origin")}
        print(f"  {name}: {result['methods'][name]}", flush=True)
    base = result["methods"]["on-policy distillation"]["step_s"]
    for m in result["methods"].values():
        m["vs_on_policy"] = m["step_s"] / base
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print("| method | s/step | x on-policy | generate | score | train |")
    for name, m in result["methods"].items():
        print(f"| {name} | {m['step_s']:.2f} | {m['vs_on_policy']:.2f} | {m['generate_s']:.2f} | {m['score_s']:.2f} "
              f"| {m['train_s']:.2f} |")


if __name__ == "__main__":
    main()
