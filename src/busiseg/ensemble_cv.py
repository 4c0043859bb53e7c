"""Cross-validate an ensemble of k-fold sweeps: per fold, average the members' probabilities.

    python -m busiseg.ensemble_cv OUT mse=logs/recipe/e16_one_cycle r18=logs/recipe/e18_resnet18_oc

Each ``NAME=SWEEP`` is a k-fold sweep (``scripts/cv.sh`` or ``-m ... split.fold=0,1,2,3,4``) on
the same fold assignment. For each fold, the members' checkpoints (``--checkpoint``, default
``last.ckpt``: what ``test_ckpt=last`` tested) are evaluated on that fold's test part, alone and
as one ensemble (mask and class probabilities averaged, ``busiseg.inference.Ensemble``), all by
the same code (``busiseg.evaluation.runner``: at the first member's ``trainer.precision``, bf16
autocast for ``bf16-mixed``; no TTA, mask probability > 0.5 at the preprocessing size, as the
training test step). Writes, under ``OUT``, one sweep-like folder per
arm (``ensemble/`` and each member re-evaluated, ``<NAME>/``; fold folders with ``split.json``,
``metrics.json`` and ``predictions.csv``), so ``busiseg.cv_summary`` and ``busiseg.ablation``
read them, and ``ensemble_cv.md`` / ``.json``: the ablation table of every arm with per-fold
paired differences against the first member. The ensemble's ``fit_seconds`` is the members' sum
(what training it took). A member whose run trained on a test image of the fold is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from busiseg.ablation import AblationError, _parse_arm, compare, render_markdown  # noqa: E402
from busiseg.atomic import write_csv_atomic, write_json_atomic, write_text_atomic  # noqa: E402
from busiseg.checkpoint import CheckpointError  # noqa: E402
from busiseg.cv_summary import PREDICTION_COLUMNS, CVSummaryError, find_fold_runs  # noqa: E402
from busiseg.data.busi import DatasetError  # noqa: E402
from busiseg.evaluation.runner import (  # noqa: E402
    EvalError,
    EvalResults,
    autocast_dtype,
    resolve_inputs,
    run_network,
    run_precision,
)
from busiseg.inference import InferenceOptions  # noqa: E402

log = logging.getLogger("busiseg.ensemble_cv")

ENSEMBLE = "ensemble"


class EnsembleCVError(ValueError):
    """The sweeps cannot be ensembled; the message names the sweep or run at fault."""


def fold_runs(sweep: Path) -> dict[int, Path]:
    """fold -> run dir of a k-fold sweep (from each run's split.json)."""
    runs: dict[int, Path] = {}
    for run in find_fold_runs(sweep):
        meta = json.loads((run / "split.json").read_text())["meta"]
        fold = int(meta["fold"])
        if fold in runs:
            raise EnsembleCVError(f"{sweep}: fold {fold} appears twice ({runs[fold]} and {run})")
        runs[fold] = run
    if not runs:
        raise EnsembleCVError(f"{sweep}: no fold runs (run dirs with metrics.json and a k-fold split.json)")
    return runs


def _assignment(run: Path) -> Any:
    return json.loads((run / "split.json").read_text())["meta"].get("assignment")


def write_eval_run(folder: Path, split_json: Path, results: EvalResults, fit_seconds: float | None,
                   sources: Sequence[str]) -> None:
    """A sweep-like run folder for ``results`` (split.json, metrics.json's ``test/*``, predictions.csv) that
    ``busiseg.cv_summary`` and ``busiseg.ablation`` read like a training run's."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(split_json, folder / "split.json")
    metrics = {f"test/{k}": v for k, v in results.as_training.items()}
    write_json_atomic(folder / "metrics.json", {"metrics": metrics, "fit_seconds": fit_seconds,
                                                "evaluated_by": "busiseg.ensemble_cv", "checkpoints": list(sources)})
    write_csv_atomic(folder / "predictions.csv", results.prediction_rows(), PREDICTION_COLUMNS)


def run_fit_seconds(run: Path) -> float | None:
    """The training time a run's metrics.json records (None when it records none)."""
    try:
        return float(json.loads((run / "metrics.json").read_text())["fit_seconds"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def ensemble_cv(out: Path, members: Mapping[str, Path], checkpoint: str = "last.ckpt",
                progress: bool = True) -> dict[str, Any]:
    if len(members) < 2:
        raise EnsembleCVError(f"an ensemble needs at least 2 sweeps, got {len(members)}")
    if ENSEMBLE in members:
        raise EnsembleCVError(f"'{ENSEMBLE}' names the ensemble itself; call the member something else")
    runs = {name: fold_runs(Path(sweep)) for name, sweep in members.items()}
    folds = sorted(set.intersection(*(set(r) for r in runs.values())))
    if not folds:
        raise EnsembleCVError("the sweeps share no fold: " + ", ".join(f"{n} {sorted(r)}" for n, r in runs.items()))
    for name, r in runs.items():
        extra = sorted(set(r) - set(folds))
        if extra:
            log.warning("ensemble_cv: fold(s) %s of %s left out (not in every sweep)", extra, name)
    names = list(members)
    for fold in folds:
        assignments = {n: _assignment(runs[n][fold]) for n in names}
        if len(set(map(str, assignments.values()))) > 1:
            raise EnsembleCVError(f"fold {fold}: the sweeps use different fold assignments, so the fold is not the "
                                  "same images in each: " + ", ".join(f"{n} {a}" for n, a in assignments.items()))
    out.mkdir(parents=True, exist_ok=True)
    precisions: set[str] = set()
    for fold in folds:
        ckpts = [runs[n][fold] / "checkpoints" / checkpoint for n in names]
        for c in ckpts:
            if not c.is_file():
                raise EnsembleCVError(f"{c}: checkpoint not found (--checkpoint names the file in each run's "
                                      "checkpoints/)")
        inputs = resolve_inputs({"ckpt_path": [str(c) for c in ckpts], "part": "test", "data": {}})
        channels_last = bool(inputs.train_config.get("channels_last", False))
        # as the training runs tested: the first member's precision (bf16 autocast for bf16-mixed)
        precision = run_precision(inputs.train_config)
        precisions.add(precision)
        autocast = autocast_dtype(precision)
        log.info("fold %d: %d test images, %d members", fold, len(inputs.records), len(names))
        split_json = runs[names[0]][fold] / "split.json"
        args = (inputs.records, inputs.image_size, inputs.in_channels, inputs.batch_size, InferenceOptions())
        fits = []
        for name, net, ckpt in zip(names, inputs.net.members, ckpts):
            results = run_network(net, *args, progress=progress, channels_last=channels_last, autocast=autocast)
            fits.append(run_fit_seconds(runs[name][fold]))
            write_eval_run(out / name / str(fold), split_json, results, fits[-1], [str(ckpt)])
        results = run_network(inputs.net, *args, progress=progress, channels_last=channels_last,
                              autocast=autocast)
        total = sum(fits) if all(f is not None for f in fits) else None
        write_eval_run(out / ENSEMBLE / str(fold), split_json, results, total, [str(c) for c in ckpts])
    try:
        result = compare({**{n: out / n for n in names}, ENSEMBLE: out / ENSEMBLE}, names[0])
    except AblationError as exc:
        raise EnsembleCVError(str(exc)) from exc
    result["members"] = {n: str(p) for n, p in members.items()}
    result["checkpoint"] = checkpoint
    result["precision"] = "/".join(sorted(precisions))
    write_json_atomic(out / "ensemble_cv.json", result)
    text = ("Ensemble of " + ", ".join(f"`{n}` ({p})" for n, p in members.items())
            + f"; every arm evaluated here by the same code ({checkpoint}, precision {result['precision']}, no TTA).\n\n" + render_markdown(result))
    write_text_atomic(out / "ensemble_cv.md", text)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m busiseg.ensemble_cv", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("members", nargs="+", type=_parse_arm, help="NAME=SWEEP_DIR, one per member (at least 2)")
    parser.add_argument("--checkpoint", default="last.ckpt", help="file name in each run's checkpoints/")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        ensemble_cv(args.out, dict(args.members), args.checkpoint, progress=not args.no_progress)
    except (EnsembleCVError, EvalError, CVSummaryError, CheckpointError, DatasetError) as exc:
        print(f"busiseg: error: {exc}", file=sys.stderr)
        return 2
    print((args.out / "ensemble_cv.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
