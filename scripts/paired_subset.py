"""Two k-fold sweeps of one fold assignment compared on the images both tested, fold by fold (docs/results.md, e64).

    python scripts/paired_subset.py SWEEP_A SWEEP_B [--exclude conf/exclude/busi_axilla.yaml] [--folds 0 1 2 3 4]

For a sweep run with ``exclude=...`` (B) against one without (A): the images it left out are in A's test parts
only, so the run's own test metrics are not paired with A's. This reads each fold's per-image predictions
(RUN/predictions.csv, predictions_refined.csv, predictions_two_stage.csv, predictions_scan_stage.csv; the test part) and scores both sweeps on
the images both tested, less those in ``--exclude`` (a YAML file with an ``exclude:`` list, as conf/exclude/*.yaml):
lesion-image Dice (the mean of the per-image Dice of benign and malignant images, as ``test/dice_per_image_lesion``)
and 3-class accuracy, of the network, its refined masks, the two-stage classes and the scan stage's (the recipe's
diagnosis) where the runs wrote them. With
B = A and ``--exclude``, it gives A's numbers without those images. Nothing is trained or re-scored: the Dice of
each image is the one its run wrote.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import yaml

# (row label, predictions file, what is read): the network's Dice and classes, then its stages'
WAYS = (
    ("lesion-image Dice, network", "predictions.csv", "dice"),
    ("lesion-image Dice, refined", "predictions_refined.csv", "dice"),
    ("accuracy, network", "predictions.csv", "accuracy"),
    ("accuracy, two-stage", "predictions_two_stage.csv", "accuracy"),
    ("accuracy, scan stage", "predictions_scan_stage.csv", "accuracy"),
)


def read_test(path: Path) -> dict[str, dict[str, str]] | None:
    """The test part's rows of a predictions CSV by image name; None when the file is missing."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f) if r["part"] == "test"}


def score(rows: dict[str, dict[str, str]], names: set[str], what: str) -> float:
    """Lesion-image Dice or accuracy of these rows over ``names``."""
    chosen = [rows[n] for n in sorted(names)]
    if what == "dice":
        return float(np.mean([float(r["dice"]) for r in chosen if r["true_class"] != "normal"]))
    return float(np.mean([r["pred_class"] == r["true_class"] for r in chosen]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="sweep A (the reference)")
    ap.add_argument("b", type=Path, help="sweep B")
    ap.add_argument("--exclude", type=Path, help="YAML with an exclude: list of image names left out of both")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    drop: set[str] = set()
    if args.exclude:
        try:
            drop = set(yaml.safe_load(args.exclude.read_text())["exclude"])
        except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
            print(f"error: {args.exclude}: cannot read an exclude: list ({exc})", file=sys.stderr)
            return 2
    values: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in WAYS}
    counts = []
    for fold in args.folds:
        tables = {}
        for side in (args.a, args.b):
            for file in dict.fromkeys(file for _, file, _ in WAYS):  # each file read once
                tables[side, file] = read_test(side / str(fold) / file)
            if tables[side, "predictions.csv"] is None:
                print(f"error: {side / str(fold) / 'predictions.csv'} not found", file=sys.stderr)
                return 2
        names = (set(tables[args.a, "predictions.csv"]) & set(tables[args.b, "predictions.csv"])) - drop
        only_b = set(tables[args.b, "predictions.csv"]) - set(tables[args.a, "predictions.csv"])
        if only_b:
            print(f"error: fold {fold}: {len(only_b)} image(s) tested by B only, e.g. {sorted(only_b)[0]}: "
                  "the sweeps do not share one fold assignment", file=sys.stderr)
            return 2
        counts.append(len(names))
        for label, file, what in WAYS:
            a, b = tables[args.a, file], tables[args.b, file]
            if a is not None and b is not None:
                values[label].append((score(a, names, what), score(b, names, what)))
    sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    print(f"A = {args.a}\nB = {args.b}\nfolds {args.folds}: {sum(counts)} images tested by both"
          + (f" less {args.exclude}" if args.exclude else "") + f" ({', '.join(map(str, counts))} per fold)\n")
    print("| metric (test part, mean +- std over folds) | A | B | B - A, paired | per fold | folds better / worse |")
    print("|---|---|---|---|---|---|")
    for label, _, _ in WAYS:
        if len(values[label]) != len(args.folds):
            continue
        a, b = (np.array(v) for v in zip(*values[label]))
        d = b - a
        print(f"| {label} | {a.mean():.3f} +- {sd(a):.3f} | {b.mean():.3f} +- {sd(b):.3f} | {d.mean():+.3f} +- "
              f"{sd(d):.3f} | {', '.join(f'{v:+.3f}' for v in d)} | {int((d > 0).sum())} / {int((d < 0).sum())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
