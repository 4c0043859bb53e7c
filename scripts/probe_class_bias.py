"""Probe: would shifting the recipe's class call towards a class, the shift chosen on the other folds, raise
its accuracy? (docs/results.md, x12)

    python scripts/probe_class_bias.py SWEEP [--file predictions_scan_stage.csv] [--folds 0 1 2 3 4]

SWEEP is a k-fold sweep with per-image predictions (SWEEP/F/FILE; docs/runs/busi_cpu is one). Nothing is run
again: per fold, the class is argmax(log P + [0, a, b]) (a shift of benign and of malignant against normal),
with (a, b) on a grid of -1.5..1.5 in steps of 0.1 chosen by its accuracy on the other folds' test parts
pooled (leave one fold out, as a shift would be chosen from a finished CV; ties go to the smallest shift), and
paired fold by fold against the plain argmax. Well-calibrated probabilities leave nothing to gain here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ensemble_classes import CLASSES, EnsembleError, read_test  # noqa: E402

STEPS = np.round(np.arange(-1.5, 1.501, 0.1), 1)
GRID = [(a, b) for a in STEPS for b in STEPS]


def fold_table(sweep: Path, file: str, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(true classes, class probabilities) on the fold's test part."""
    table = read_test(sweep / str(fold) / file)
    if table is None:
        raise EnsembleError(f"{sweep / str(fold) / file} not found")
    names = sorted(table)
    return np.array([table[n][0] for n in names]), np.stack([table[n][1] for n in names])


def shifted_accuracy(truth: np.ndarray, probs: np.ndarray, shift: tuple[float, float]) -> float:
    logits = np.log(np.clip(probs, 1e-6, None)) + np.array([0.0, *shift])
    return float((CLASSES[logits.argmax(1)] == truth).mean())


def chosen_shift(truth: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """The grid's shift with the highest accuracy on these images (ties: the smallest)."""
    scores = np.array([shifted_accuracy(truth, probs, s) for s in GRID])
    best = [GRID[i] for i in np.flatnonzero(scores >= scores.max() - 1e-12)]
    return min(best, key=lambda s: (s[0] ** 2 + s[1] ** 2, s))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--file", default="predictions_scan_stage.csv")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    try:
        tables = {f: fold_table(args.sweep, args.file, f) for f in args.folds}
    except EnsembleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    base, shifted = [], []
    for fold, (truth, probs) in tables.items():
        others = [tables[g] for g in args.folds if g != fold]
        shift = chosen_shift(np.concatenate([t for t, _ in others]), np.concatenate([p for _, p in others]))
        base.append(shifted_accuracy(truth, probs, (0.0, 0.0)))
        shifted.append(shifted_accuracy(truth, probs, shift))
        print(f"fold {fold}: argmax {base[-1]:.3f}; shift (benign {shift[0]:+.1f}, malignant {shift[1]:+.1f}) "
              f"from the other folds {shifted[-1]:.3f}")
    b, s = np.array(base), np.array(shifted)
    d = s - b
    sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    print(f"{args.file}: argmax {b.mean():.3f} +- {sd(b):.3f}; shifted {s.mean():.3f} +- {sd(s):.3f}; paired "
          f"{d.mean():+.3f} +- {sd(d):.3f} ({', '.join(f'{v:+.3f}' for v in d)}; {int((d > 0).sum())} better, "
          f"{int((d < 0).sum())} worse)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
