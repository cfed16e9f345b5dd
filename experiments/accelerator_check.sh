#!/usr/bin/env bash
# The prepared accelerator check (<= 8 minutes on one H100/H200): DTop-p vs
# top-k at `small`, MoD vs dense at equal training FLOPs, the MoE layer vs the
# dense FFN, the ~1B LM train step, and that step with dot_product (cuDNN
# flash) attention against xla; JSON + markdown in OUT_DIR.
#
#   experiments/accelerator_check.sh OUT_DIR            # on the GPU
#   experiments/accelerator_check.sh OUT_DIR --dry_run  # tiny, on a CPU
#   DRY_RUN=1 experiments/accelerator_check.sh OUT_DIR
#
# Nothing needs installing: the checkout goes on PYTHONPATH and `python3`
# (or $PYTHON) runs it. See experiments/accelerator_check.py for the parts,
# their expected device-minutes and how those were estimated.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT="${1:-experiments/reports/accelerators}"
shift || true
exec "${PYTHON:-python3}" experiments/accelerator_check.py --out="$OUT" "$@"
