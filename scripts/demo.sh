#!/usr/bin/env bash
# The main job on the built-in demo: prepare the demo task and models (cached), then train
# the student with KDRL (GRPO + reverse KL to the teacher) on this machine.
#   ./scripts/demo.sh                    # defaults from configs/demo.yaml
#   ./scripts/demo.sh run.steps=100      # any key=value override
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
rayskd prepare-demo --out demo_assets
exec rayskd train configs/demo.yaml run.output_dir="runs/demo-$(date +%Y%m%d-%H%M%S)" "$@"
