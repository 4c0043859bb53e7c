"""Probe: is the scan stage's join (the plain mean of the two-stage and the scan classifier's probabilities) the
best one, and does a second scan classifier add anything? (docs/results.md, x10)

    python scripts/probe_scan_joins.py SWEEP SCAN [SCAN2 ...] [--folds 0 1 2 3 4]

SWEEP is a k-fold sweep of ``experiment=busi_cpu`` (SWEEP/F/predictions.csv and predictions_two_stage.csv);
each SCAN a folder of whole-scan classifiers' test probabilities on the same folds (SCAN/F/predictions.csv, as
``scripts/probe_scan_classifier.py`` writes them). Several SCANs are averaged into one scan opinion. Nothing is
trained or run again: per fold, the test part's probabilities are joined by

- ``mean`` (the rule ``scan_stage=default`` fixed before any run): (two-stage + scan) / 2;
- ``weighted, w from the other folds``: (1 - w) two-stage + w scan, w in 0.20, 0.25, ..., 0.80 picked by its
  mean accuracy on the other folds (leave one fold out, as a weight would be chosen from a finished CV; ties go
  to the w nearest 0.5);
- ``geometric``: sqrt(two-stage x scan);
- ``network + two-stage + scan``: the three averaged;
- ``the surer one``: per image, the probabilities of whichever of the two is surer (higher top probability);

and, with two SCANs or more, ``mean, first scan only`` (the stage as it runs: one classifier). Each rule's accuracy
is paired fold by fold against ``mean``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ensemble_classes import CLASSES, EnsembleError, read_test  # noqa: E402

WEIGHTS = np.round(np.arange(0.20, 0.801, 0.05), 2)


def fold_tables(sweep: Path, scans: list[Path], fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                    list[np.ndarray]]:
    """(true classes, network, two-stage, [each scan]) probabilities on the fold's test part, in one image order."""
    paths = [sweep / str(fold) / "predictions.csv", sweep / str(fold) / "predictions_two_stage.csv"]
    paths += [s / str(fold) / "predictions.csv" for s in scans]
    tables = []
    for path in paths:
        table = read_test(path)
        if table is None:
            raise EnsembleError(f"{path} not found")
        tables.append(table)
    names = sorted(tables[1])
    for path, table in zip(paths, tables):
        if sorted(table) != names:
            raise EnsembleError(f"{path}: other test images than {paths[1]} (not the same folds)")
    truth = np.array([tables[1][n][0] for n in names])
    probs = [np.stack([t[n][1] for n in names]) for t in tables]
    return truth, probs[0], probs[1], probs[2:]


def accuracy(truth: np.ndarray, probs: np.ndarray) -> float:
    return float((CLASSES[probs.argmax(1)] == truth).mean())


def leave_one_out_weight(grid: np.ndarray, fold: int) -> float:
    """The weight with the best mean accuracy over the folds other than ``fold`` (grid: fold x weight); ties go to
    the weight nearest 0.5."""
    others = np.delete(grid, fold, axis=0).mean(0)
    best = np.flatnonzero(np.isclose(others, others.max()))
    return float(WEIGHTS[best[np.argmin(np.abs(WEIGHTS[best] - 0.5))]])


def rule_accuracies(folds: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]]
                    ) -> tuple[dict[str, list[float]], list[float]]:
    """Each rule's accuracy per fold, and the weight the weighted rule took on each fold (none with one fold: no
    other fold to choose it on)."""
    rules: dict[str, list[float]] = {}
    grid = np.array([[accuracy(t, (1 - w) * two + w * np.mean(sc, 0)) for w in WEIGHTS]
                     for t, _, two, sc in folds])
    chosen = [leave_one_out_weight(grid, f) for f in range(len(folds))] if len(folds) > 1 else []
    for t, net, two, sc in folds:
        scan = np.mean(sc, 0)
        top = two.max(1) >= scan.max(1)
        for name, probs in (("mean", (two + scan) / 2), ("geometric", np.sqrt(two * scan)),
                            ("network + two-stage + scan", (net + two + scan) / 3),
                            ("the surer one", np.where(top[:, None], two, scan))):
            rules.setdefault(name, []).append(accuracy(t, probs))
        if len(sc) > 1:
            rules.setdefault("mean, first scan only", []).append(accuracy(t, (two + sc[0]) / 2))
        rules.setdefault("two-stage alone", []).append(accuracy(t, two))
        rules.setdefault("scan alone", []).append(accuracy(t, scan))
    if chosen:
        rules["weighted, w from the other folds"] = [float(grid[f, list(WEIGHTS).index(w)])
                                                     for f, w in enumerate(chosen)]
    return rules, chosen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="k-fold sweep of experiment=busi_cpu")
    ap.add_argument("scans", type=Path, nargs="+", help="folders of scan classifiers' test probabilities (F/predictions.csv)")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    try:
        folds = [fold_tables(args.sweep, args.scans, f) for f in args.folds]
    except EnsembleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rules, chosen = rule_accuracies(folds)
    sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    base = np.array(rules["mean"])
    print(f"{args.sweep} + {', '.join(map(str, args.scans))}: folds {args.folds}; paired = minus `mean`, fold by fold")
    print(f"weights chosen on the other folds: {', '.join(f'{w:.2f}' for w in chosen) or 'none (one fold)'}\n")
    print("| join | accuracy | paired | per fold | folds better / worse |\n|---|---|---|---|---|")
    for name, acc in rules.items():
        a = np.array(acc)
        d = a - base
        print(f"| {name} | {a.mean():.3f} +- {sd(a):.3f} | {d.mean():+.3f} +- {sd(d):.3f} | "
              f"{', '.join(f'{v:+.3f}' for v in d)} | {int((d > 0).sum())} / {int((d < 0).sum())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
