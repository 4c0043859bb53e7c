#!/usr/bin/env bash
# The k-fold cross-validation with self-supervised pretraining on each fold's training images first
# (docs/pretraining.md), fold by fold, restartable:
#   BUSI_ROOT=/path/to/Dataset_BUSI_with_GT scripts/cv_pretrain.sh OUT_DIR [OVERRIDE ...]
# runs, for each fold F of FOLDS (default "0 1 2 3 4"):
#   python -m busiseg.pretrain experiment=$EXPERIMENT split=kfold split.fold=F OVERRIDE... $PRETRAIN_ARGS
#       hydra.run.dir=OUT_DIR/pretrain/F
#   python -m busiseg.train experiment=$EXPERIMENT split=kfold split.fold=F OVERRIDE...
#       init_weights=OUT_DIR/pretrain/F/checkpoints/last.ckpt hydra.run.dir=OUT_DIR/F
# PRETRAIN_ARGS (space-separated) go to the pretraining only, e.g. PRETRAIN_ARGS="trainer.max_epochs=50".
# A step with a metrics.json is done and skipped; one with checkpoints/last.ckpt but no metrics.json
# is resumed. Then: python -m busiseg.cv_summary OUT_DIR (the pretraining runs are left out).
set -euo pipefail
OUT=${1:?usage: scripts/cv_pretrain.sh OUT_DIR [OVERRIDE ...]}
shift
FOLDS=${FOLDS:-"0 1 2 3 4"}
EXPERIMENT=${EXPERIMENT:-busi_cpu}
PY=${PYTHON:-python}
read -r -a PRE <<< "${PRETRAIN_ARGS:-}"
: "${BUSI_ROOT:?set BUSI_ROOT to the Dataset_BUSI_with_GT folder}"
export BUSI_ROOT

step() {  # step MODULE RUN_DIR OVERRIDE...
  local module=$1 run=$2
  shift 2
  if [[ -f "$run/metrics.json" ]]; then
    echo "== $run: done"
  elif [[ -f "$run/checkpoints/last.ckpt" ]]; then
    echo "== $run: resuming"
    $PY -m "busiseg.$module" resume="$run"
  else
    echo "== $run: $module experiment=$EXPERIMENT $*"
    $PY -m "busiseg.$module" experiment="$EXPERIMENT" "$@" callbacks.progress_bar=null hydra.run.dir="$run"
  fi
}

for fold in $FOLDS; do
  step pretrain "$OUT/pretrain/$fold" split=kfold split.fold="$fold" "$@" ${PRE[@]+"${PRE[@]}"}
  step train "$OUT/$fold" split=kfold split.fold="$fold" "$@" init_weights="$OUT/pretrain/$fold/checkpoints/last.ckpt"
done
