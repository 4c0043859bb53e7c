#!/usr/bin/env bash
# The ablation of docs/results.md: the busi_cpu recipe, grouped 5-fold CV, one arm per loss choice.
#   BUSI_ROOT=/path/to/Dataset_BUSI_with_GT scripts/ablation.sh [OUT_DIR [OVERRIDE ...]]
# OVERRIDEs go to every arm (e.g. scheduler=warmup_cosine: the ablation at the e06 recipe).
# ARMS (default "mse seg_only ce uncertainty cls_only") and FOLDS (default "0 1 2 3 4") pick a part.
# Runs fold by fold (every arm of fold 0, then fold 1, ...), so that the arms stay paired if it is
# stopped. Each run is scripts/cv.sh OUT_DIR/ARM for one fold: restartable (a finished run is
# skipped, an interrupted one resumed). Then: python -m busiseg.ablation mse=OUT/mse seg_only=OUT/seg_only ...
set -euo pipefail
OUT=${1:-logs/ablation}
shift || true
ARMS=${ARMS:-"mse seg_only ce uncertainty cls_only"}
FOLDS=${FOLDS:-"0 1 2 3 4"}
CV="$(dirname "$0")/cv.sh"

overrides() {
  case "$1" in
    mse) echo "loss=fixed" ;;
    ce) echo "loss=fixed loss.classification.kind=ce" ;;
    uncertainty) echo "loss=uncertainty" ;;
    seg_only) echo "loss=seg_only" ;;
    cls_only) echo "loss=cls_only" ;;
    *) echo "unknown arm: $1 (mse ce uncertainty seg_only cls_only)" >&2; return 2 ;;
  esac
}

for fold in $FOLDS; do
  for arm in $ARMS; do
    args=$(overrides "$arm")
    # shellcheck disable=SC2086
    # the ablation compares the network's tasks: busi_cpu's second stages are left out of every arm
    FOLDS="$fold" "$CV" "$OUT/$arm" crop_stage=none refine_stage=none scan_stage=none $args "$@"
  done
done
