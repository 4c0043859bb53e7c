"""scripts/ensemble_classes.py: the accuracy of sweeps' class probabilities averaged image by image."""

from __future__ import annotations

import csv
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "ensemble_classes.py"
HEADER = ["part", "image", "true_class", "pred_class", "prob_normal", "prob_benign", "prob_malignant", "dice"]


def _write(run, rows, file="predictions.csv"):
    run.mkdir(parents=True, exist_ok=True)
    with open(run / file, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for image, true, probs in rows:
            for part in ("val", "test"):
                w.writerow([part, image, true, "unused", *probs, 0.5])


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_averages_the_probabilities_then_takes_the_argmax(tmp_path):
    # A is right on m1 only by a hair and wrong on b1; B is wrong on m1 and right on b1 with confidence:
    # the mean is right on both, which neither member is.
    _write(tmp_path / "a" / "0", [("malignant/m1.png", "malignant", (0.0, 0.45, 0.55)),
                                  ("benign/b1.png", "benign", (0.0, 0.4, 0.6)),
                                  ("normal/n1.png", "normal", (0.9, 0.1, 0.0))])
    _write(tmp_path / "b" / "0", [("malignant/m1.png", "malignant", (0.5, 0.0, 0.5 - 1e-3)),
                                  ("benign/b1.png", "benign", (0.0, 0.9, 0.1)),
                                  ("normal/n1.png", "normal", (0.2, 0.8, 0.0))])
    proc = _run(tmp_path / "a", tmp_path / "b", "--folds", "0")
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| network"))
    # A: m1 right, b1 wrong, n1 right = 2/3; B: m1 wrong (normal), b1 right, n1 wrong = 1/3;
    # mean: m1 (0.25, 0.225, 0.525) right, b1 (0, 0.65, 0.35) right, n1 (0.55, 0.45, 0) right = 3/3
    assert "| 0.667 +- 0.000 | 0.333 +- 0.000 | 1.000 +- 0.000 | +0.333 +- 0.000 | +0.333 | 1 / 0 |" in row
    assert "two-stage" not in proc.stdout  # neither wrote predictions_two_stage.csv


def test_refuses_other_folds_and_missing_files(tmp_path):
    _write(tmp_path / "a" / "0", [("benign/b1.png", "benign", (0.1, 0.8, 0.1))])
    _write(tmp_path / "b" / "0", [("benign/b2.png", "benign", (0.1, 0.8, 0.1))])
    proc = _run(tmp_path / "a", tmp_path / "b", "--folds", "0")
    assert proc.returncode == 2 and "do not share one fold assignment" in proc.stderr
    proc = _run(tmp_path / "a", tmp_path / "c", "--folds", "0")
    assert proc.returncode == 2 and "predictions.csv not found" in proc.stderr
    proc = _run(tmp_path / "a", "--folds", "0")
    assert proc.returncode == 2 and "two sweeps or more" in proc.stderr
