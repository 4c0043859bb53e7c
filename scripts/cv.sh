#!/usr/bin/env bash
# One configuration through the grouped k-fold cross-validation of BUSI, fold by fold, restartable:
#   BUSI_ROOT=/path/to/Dataset_BUSI_with_GT scripts/cv.sh OUT_DIR [OVERRIDE ...]
# runs, for each fold F of FOLDS (default "0 1 2 3 4"):
#   python -m busiseg.train experiment=$EXPERIMENT split=kfold split.fold=F OVERRIDE... hydra.run.dir=OUT_DIR/F
# EXPERIMENT defaults to busi_cpu, PYTHON to python. A fold with a metrics.json is done and skipped; one
# with a checkpoints/last.ckpt but no metrics.json was interrupted and is resumed (resume=OUT_DIR/F).
# Then: python -m busiseg.cv_summary OUT_DIR
# Recipe experiments (docs/results.md, experiment log): scripts/cv.sh logs/recipe/e03 trainer.max_epochs=60
set -euo pipefail
OUT=${1:?usage: scripts/cv.sh OUT_DIR [OVERRIDE ...]}
shift
FOLDS=${FOLDS:-"0 1 2 3 4"}
EXPERIMENT=${EXPERIMENT:-busi_cpu}
PY=${PYTHON:-python}
: "${BUSI_ROOT:?set BUSI_ROOT to the Dataset_BUSI_with_GT folder}"
export BUSI_ROOT

for fold in $FOLDS; do
  run="$OUT/$fold"
  if [[ -f "$run/metrics.json" ]]; then
    echo "== $run: done"
  elif [[ -f "$run/checkpoints/last.ckpt" ]]; then
    echo "== $run: resuming"
    $PY -m busiseg.train resume="$run"
  else
    echo "== $run: experiment=$EXPERIMENT fold $fold $*"
    $PY -m busiseg.train experiment="$EXPERIMENT" split=kfold split.fold="$fold" "$@" \
      callbacks.progress_bar=null hydra.run.dir="$run"
  fi
done
