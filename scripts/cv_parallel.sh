#!/usr/bin/env bash
# The folds of one configuration at once, each its own process, all sharing one GPU (busi_gpu's
# network uses a fraction of an H100/H200, so five at once finish sooner than five in a row):
#   BUSI_ROOT=/path/to/Dataset_BUSI_with_GT scripts/cv_parallel.sh OUT_DIR [OVERRIDE ...]
# runs, for each fold F of FOLDS (default "0 1 2 3 4"), in the background:
#   python -m busiseg.train experiment=$EXPERIMENT split=kfold split.fold=F data.root=$BUSI_ROOT \
#     data.num_workers=$WORKERS OVERRIDE... hydra.run.dir=OUT_DIR/F   > OUT_DIR/F.out
# and waits for all of them; it fails if any fold failed (each fold's output is in OUT_DIR/F.out).
# EXPERIMENT defaults to busi_gpu, PYTHON to python, WORKERS (loader workers per fold) to
# (cores - 1) / number of folds. SPLITS=DIR passes split.file=DIR/F/split.json, the folds an earlier
# run saved (needed when BUSI_ROOT is a busiseg.data.resized_copy, whose pixels differ from the
# original's, so the duplicate-grouped folds must come from a run on the original).
# Then: python -m busiseg.cv_summary OUT_DIR
set -uo pipefail
OUT=${1:?usage: scripts/cv_parallel.sh OUT_DIR [OVERRIDE ...]}
shift
FOLDS=${FOLDS:-"0 1 2 3 4"}
EXPERIMENT=${EXPERIMENT:-busi_gpu}
PY=${PYTHON:-python}
: "${BUSI_ROOT:?set BUSI_ROOT to the Dataset_BUSI_with_GT folder (or a resized copy of it)}"
read -r -a folds <<<"$FOLDS"
WORKERS=${WORKERS:-$(( ($(nproc) - 1) / ${#folds[@]} ))}
if [[ -n "${SPLITS:-}" ]]; then  # every saved split checked before any fold starts
  for fold in "${folds[@]}"; do
    [[ -f "$SPLITS/$fold/split.json" ]] || { echo "no $SPLITS/$fold/split.json" >&2; exit 2; }
  done
fi
mkdir -p "$OUT"

pids=()
for fold in "${folds[@]}"; do
  split=()
  [[ -n "${SPLITS:-}" ]] && split=("split.file=$SPLITS/$fold/split.json")
  echo "== $OUT/$fold: experiment=$EXPERIMENT fold $fold ${split[*]} $* (log: $OUT/$fold.out)"
  $PY -m busiseg.train experiment="$EXPERIMENT" split=kfold split.fold="$fold" "${split[@]}" \
    data.root="$BUSI_ROOT" data.num_workers="$WORKERS" "$@" \
    callbacks.progress_bar=null hydra.run.dir="$OUT/$fold" >"$OUT/$fold.out" 2>&1 &
  pids+=("$!")
done

failed=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "== $OUT/${folds[$i]}: done"
  else
    echo "== $OUT/${folds[$i]}: FAILED (exit $?), see $OUT/${folds[$i]}.out" >&2
    failed=1
  fi
done
exit $failed
