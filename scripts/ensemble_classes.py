"""The 3-class accuracy of k-fold sweeps averaged into one ensemble, from their written predictions (docs/results.md, e66).

    python scripts/ensemble_classes.py SWEEP_A SWEEP_B [SWEEP_C ...] [--folds 0 1 2 3 4]

Each sweep is a k-fold run of one fold assignment, with the stages it ran (``busi_cpu``: the refine and the
crop stage). Per fold and per predictions file (RUN/predictions.csv: the network; predictions_two_stage.csv:
the crop stage's classes, where every sweep wrote it), the members' class probabilities on the test part are
averaged image by image and the class is their argmax, as ``busiseg.inference.Ensemble`` averages a network's.
It prints each member's accuracy and the ensemble's, and the ensemble minus the first member (A), paired per
fold. Nothing is run again: only classes are ensembled here; an ensemble's masks need the networks
(``python -m busiseg.ensemble_cv``). Its training time is the members' sum.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from busiseg.data.labels import CLASS_NAMES

PROBS = tuple(f"prob_{c}" for c in CLASS_NAMES)  # the predictions CSV's columns (busiseg.cv_summary)
CLASSES = np.array(CLASS_NAMES)
FILES = (("network", "predictions.csv"), ("two-stage", "predictions_two_stage.csv"))


class EnsembleError(Exception):
    """A sweep whose predictions cannot be averaged with the others'."""


def read_test(path: Path) -> dict[str, tuple[str, np.ndarray]] | None:
    """image -> (true class, class probabilities) on the test part of a predictions CSV; None when missing."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["part"] == "test"]
    try:
        return {r["image"]: (r["true_class"], np.array([float(r[k]) for k in PROBS])) for r in rows}
    except (KeyError, ValueError) as exc:
        raise EnsembleError(f"{path}: no readable class probabilities ({exc!r})") from exc


def fold_accuracies(sweeps: list[Path], fold: int, file: str) -> list[float] | None:
    """Each member's accuracy then the ensemble's on this fold; None when a member lacks the file."""
    tables = [read_test(s / str(fold) / file) for s in sweeps]
    if any(t is None for t in tables):
        if file == "predictions.csv":
            missing = next(s for s, t in zip(sweeps, tables) if t is None)
            raise EnsembleError(f"{missing / str(fold) / file} not found")
        return None
    names = sorted(tables[0])
    for sweep, table in zip(sweeps[1:], tables[1:]):
        if sorted(table) != names:
            raise EnsembleError(f"fold {fold}: {sweep} tested other images than {sweeps[0]}: "
                                "the sweeps do not share one fold assignment")
    truth = np.array([tables[0][n][0] for n in names])
    probs = np.stack([np.stack([t[n][1] for n in names]) for t in tables])  # member, image, class
    members = [float((CLASSES[p.argmax(1)] == truth).mean()) for p in probs]
    return members + [float((CLASSES[probs.mean(0).argmax(1)] == truth).mean())]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", type=Path, nargs="+", help="k-fold sweeps; the first is the reference (A)")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    if len(args.sweeps) < 2:
        print("error: give two sweeps or more", file=sys.stderr)
        return 2
    sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    names = [chr(ord("A") + i) for i in range(len(args.sweeps))]
    print("\n".join(f"{n} = {s}" for n, s in zip(names, args.sweeps)) + f"\nfolds {args.folds}\n")
    print(f"| accuracy (test part, mean +- std over folds) | {' | '.join(names)} | ensemble | ensemble - A, paired "
          "| per fold | folds better / worse |")
    print("|---|" + "---|" * (len(names) + 4))
    for label, file in FILES:
        try:
            per_fold = [fold_accuracies(args.sweeps, fold, file) for fold in args.folds]
        except EnsembleError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if any(v is None for v in per_fold):
            continue
        acc = np.array(per_fold)  # fold, member (+ ensemble last)
        d = acc[:, -1] - acc[:, 0]
        cells = " | ".join(f"{acc[:, i].mean():.3f} +- {sd(acc[:, i]):.3f}" for i in range(acc.shape[1]))
        print(f"| {label} | {cells} | {d.mean():+.3f} +- {sd(d):.3f} | {', '.join(f'{v:+.3f}' for v in d)} "
              f"| {int((d > 0).sum())} / {int((d < 0).sum())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
