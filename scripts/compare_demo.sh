#!/usr/bin/env bash
# Benchmark (not a test): GRPO only, distillation only, KDRL, KDRL annealed + masked and GRPO
# with DPH-RL rehearsal (forward KL, JS) on a built-in demo task at the same budget, each with
# several seeds; writes benchmarks/compare_TASK.{json,png} and prints the README's table.
#   ./scripts/compare_demo.sh --task split --seeds 3      # 18 runs on 2 CPU cores, the actors shared per seed
#   ./scripts/compare_demo.sh --task arith --seeds 1 --methods grpo,kdrl run.steps=30
# See scripts/compare_demo.py for what each method overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
exec python scripts/compare_demo.py "$@"
