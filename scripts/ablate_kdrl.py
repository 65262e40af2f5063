"""Benchmark (not a test): why KDRL (GRPO + k2 reverse KL) ends below both of its terms alone on
the split demo (issue 30.1). The split config's runs with `learner.log_term_grads=true`, which
logs each step's GRPO and teacher-term gradient norms (with their coefficients) and the cosine
between them, over these variants (overrides of configs/demo_split.yaml):

  grpo           algorithm.kd.coef=0                 the GRPO term alone
  distill        algorithm.pg_coef=0                 the teacher term alone
  kdrl_c1        (the config: kd.coef 1, token_mean) KDRL as the comparison ran it
  kdrl_c0.1      algorithm.kd.coef=0.1
  kdrl_c0.01     algorithm.kd.coef=0.01
  kdrl_seqmean   algorithm.aggregation=seq_mean_token_mean
  kdrl_seqsum    algorithm.aggregation=seq_mean_token_sum_norm
  kdrl_masked    algorithm.kd.mask=incorrect_only, kd.norm=masked (its own tokens)
  kdrl_maskall   algorithm.kd.mask=incorrect_only, kd.norm=all (the whole batch's)

Writes benchmarks/ablation_split.json: per variant and seed the held-out numbers by step, and
the gradient statistics by step (norms, cosine, entropy, the teacher divergence, the mean reward).

    source scripts/_env.sh && python scripts/ablate_kdrl.py --seeds 1
    python scripts/ablate_kdrl.py --variants kdrl_c0.1 --seeds 3 --merge   # add runs to the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_demo import ROOT, rayskd, read_jsonl  # noqa: E402

VARIANTS = {
    "grpo": ["algorithm.kd.coef=0"],
    "distill": ["algorithm.pg_coef=0"],
    "kdrl_c1": [],
    "kdrl_c0.1": ["algorithm.kd.coef=0.1"],
    "kdrl_c0.01": ["algorithm.kd.coef=0.01"],
    "kdrl_seqmean": ["algorithm.aggregation=seq_mean_token_mean"],
    "kdrl_seqsum": ["algorithm.aggregation=seq_mean_token_sum_norm"],
    "kdrl_masked": ["algorithm.kd.mask=incorrect_only", "algorithm.kd.norm=masked"],
    "kdrl_maskall": ["algorithm.kd.mask=incorrect_only", "algorithm.kd.norm=all"],
}
SERIES = ("pg_grad_norm", "kd_grad_norm", "term_grad_cosine", "grad_norm", "entropy", "kd_divergence", "reward_mean")


def series(metrics: list[dict]) -> dict:
    return {k: [m.get(k) for m in metrics] for k in SERIES}


def window_mean(values: list, lo: int, hi: int) -> float | None:
    vals = [v for v in values[lo:hi] if v is not None]
    return round(statistics.fmean(vals), 5) if vals else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--merge", action="store_true", help="add to the existing JSON instead of replacing it")
    p.add_argument("--keep-assets", action="store_true",
                   help="train on demo_assets_split as it is (the assets the JSON's other runs used), "
                        "without `rayskd prepare-demo`, which rebuilds it whenever the builder's source changed")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "ablation_split.json"))
    p.add_argument("extra", nargs="*", help="key=value overrides for every run")
    args = p.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        p.error(f"unknown variants: {', '.join(sorted(unknown))}")
    result = {"task": "split", "config": "configs/demo_split.yaml", "runs": {}}
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
    base = os.path.join("runs", f"ablate-split-{time.strftime('%Y%m%d-%H%M%S')}")
    if not args.keep_assets:
        rayskd("prepare-demo", "--task", "split")
    for name in variants:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            run_dir = os.path.join(base, name, f"seed{seed}")
            t0 = time.time()
            rayskd("train", "configs/demo_split.yaml", f"run.output_dir={run_dir}", f"run.seed={seed}",
                   "learner.log_term_grads=true", *VARIANTS[name], *args.extra, quiet=True)
            evals = read_jsonl(os.path.join(ROOT, run_dir, "eval.jsonl"))
            metrics = read_jsonl(os.path.join(ROOT, run_dir, "metrics.jsonl"))
            s = series(metrics)
            n = len(metrics)
            result["runs"].setdefault(name, {"overrides": VARIANTS[name], "seeds": {}})["seeds"][str(seed)] = {
                "eval": [{k: e[k] for k in ("step", "greedy_accuracy", "pass@1", "pass@4", "pass@8") if k in e}
                         for e in evals],
                "windows": {f"{lo}-{hi}": {k: window_mean(v, lo, hi) for k, v in s.items()}
                            for lo, hi in ((0, 10), (10, 25), (25, 50), (50, 100)) if lo < n},
                "series": s, "wall_s": round(time.time() - t0, 1), "overrides": args.extra,
            }
            final = evals[-1]
            print(f"   {name} seed {seed}: pass@1 {final['pass@1']:.3f}, cosine (steps 0-25) "
                  f"{window_mean(s['term_grad_cosine'], 0, 25)}", flush=True)
            with open(args.out, "w") as f:  # after every run: a stopped sweep keeps what it made
                json.dump(result, f, indent=1)
    print(table(result))
    return 0


def table(result: dict) -> str:
    lines = ["| variant | pass@1 (seeds) | |g_pg| 0-25 | |g_kd| 0-25 | cos 0-25 | cos 25-100 | entropy 50-100 |",
             "|---|---|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        seeds = run["seeds"].values()
        p1 = ", ".join(f"{s['eval'][-1]['pass@1']:.3f}" for s in seeds)

        def w(key, *windows):
            vals = [s["windows"][win][key] for s in seeds for win in windows if win in s["windows"]
                    and s["windows"][win][key] is not None]
            return f"{statistics.fmean(vals):.3g}" if vals else "-"
        lines.append(f"| {name} | {p1} | {w('pg_grad_norm', '0-10', '10-25')} | {w('kd_grad_norm', '0-10', '10-25')} "
                     f"| {w('term_grad_cosine', '0-10', '10-25')} | {w('term_grad_cosine', '25-50', '50-100')} "
                     f"| {w('entropy', '50-100')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
