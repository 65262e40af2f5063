#!/usr/bin/env bash
# Benchmark (not a test): GRPO only, distillation only (reverse KL) and KDRL on the built-in
# demo with the same budget (configs/demo.yaml: steps, prompts, samples, learning rate), one
# after another on this machine. Prints each one's held-out greedy accuracy and pass@k, writes
# benchmarks/compare_demo.json, and ends with the picture of the three runs
# (benchmarks/compare_demo.png, drawn by `rayskd report`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
rayskd prepare-demo --out demo_assets
stamp=$(date +%Y%m%d-%H%M%S)
declare -A overrides=(
  [grpo]="algorithm.kd.coef=0"
  [distill_rkl]="algorithm.pg_coef=0"
  [kdrl]=""
)
mkdir -p benchmarks
for name in grpo distill_rkl kdrl; do
  echo "== $name ${overrides[$name]}"
  # shellcheck disable=SC2086
  rayskd train configs/demo.yaml run.output_dir="runs/compare-$stamp/$name" ${overrides[$name]} "$@" \
    | grep -E "eval at step|held-out accuracy:"
done
python - "$stamp" <<'PY'
import json, sys, platform, os
stamp = sys.argv[1]
rows = {}
for name in ("grpo", "distill_rkl", "kdrl"):
    recs = [json.loads(l) for l in open(f"runs/compare-{stamp}/{name}/metrics.jsonl")]
    evals = [json.loads(l) for l in open(f"runs/compare-{stamp}/{name}/eval.jsonl")]
    rows[name] = {"eval_by_step": {e["step"]: e["greedy_accuracy"] for e in evals if e["step"] > 0},
                  "final": {k: v for k, v in evals[-1].items() if k == "greedy_accuracy" or k.startswith("pass@")},
                  "seconds": round(sum(r["step_s"] for r in recs), 1)}
report = json.load(open("demo_assets/report.json"))
out = {"student_start": report["student_accuracy"], "teacher": report["teacher_accuracy"], "runs": rows,
       "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}"}
json.dump(out, open("benchmarks/compare_demo.json", "w"), indent=2)
print(f"\nheld-out accuracy (greedy, exact match); student starts at {out['student_start']:.3f}, teacher {out['teacher']:.3f}")
print(f"{'method':<14}" + "".join(f"step {s:<6}" for s in rows["kdrl"]["eval_by_step"]) + "train s")
for name, r in rows.items():
    print(f"{name:<14}" + "".join(f"{v:<11.3f}" for v in r["eval_by_step"].values()) + f"{r['seconds']}")
print("\nat the end: " + "; ".join(f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in r["final"].items())
                                  for name, r in rows.items()))
PY
rayskd report "runs/compare-$stamp/grpo" "runs/compare-$stamp/distill_rkl" "runs/compare-$stamp/kdrl" \
  --out benchmarks/compare_demo.png
