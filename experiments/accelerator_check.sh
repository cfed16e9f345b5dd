#!/usr/bin/env bash
# The prepared accelerator check (<= 8 minutes on one H100/H200): MoE layer vs
# dense FFN, the ~1B LM train step, DTop-p vs top-k; JSON + markdown in OUT_DIR.
#
#   experiments/accelerator_check.sh OUT_DIR            # on the GPU
#   experiments/accelerator_check.sh OUT_DIR --dry_run  # tiny, on a CPU
#   DRY_RUN=1 experiments/accelerator_check.sh OUT_DIR
#
# See experiments/accelerator_check.py for the steps and the targets.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-experiments/reports/accelerators}"
shift || true
exec python experiments/accelerator_check.py --out="$OUT" "$@"
