"""scripts/paired_subset.py: two sweeps scored on the images both tested, less an exclude list."""

from __future__ import annotations

import csv
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "paired_subset.py"
HEADER = ["part", "image", "true_class", "pred_class", "prob_normal", "prob_benign", "prob_malignant", "dice"]


def _write(run, rows, name="predictions.csv"):
    run.mkdir(parents=True, exist_ok=True)
    with open(run / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for image, true, pred, dice in rows:
            for part in ("val", "test"):
                w.writerow([part, image, true, pred, 0.3, 0.3, 0.4, dice])


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_scores_both_on_the_common_images_less_the_list(tmp_path):
    a_rows = [("benign/b1.png", "benign", "benign", 0.8), ("benign/ax.png", "benign", "normal", 0.0),
              ("normal/n1.png", "normal", "normal", 1.0), ("malignant/m1.png", "malignant", "benign", 0.6)]
    b_rows = [("benign/b1.png", "benign", "benign", 0.9), ("normal/n1.png", "normal", "normal", 1.0),
              ("malignant/m1.png", "malignant", "malignant", 0.7)]
    _write(tmp_path / "a" / "0", a_rows)
    _write(tmp_path / "b" / "0", b_rows)
    (tmp_path / "ex.yaml").write_text("exclude:\n  - normal/n1.png\n")
    proc = _run(tmp_path / "a", tmp_path / "b", "--folds", "0", "--exclude", tmp_path / "ex.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "2 images tested by both" in proc.stdout  # ax.png: A only; n1.png: excluded
    dice = next(line for line in proc.stdout.splitlines() if line.startswith("| lesion-image Dice, network"))
    assert "| 0.700 +- 0.000 | 0.800 +- 0.000 | +0.100" in dice  # (0.8 + 0.6) / 2 against (0.9 + 0.7) / 2
    acc = next(line for line in proc.stdout.splitlines() if line.startswith("| accuracy, network"))
    assert "| 0.500 +- 0.000 | 1.000 +- 0.000 | +0.500" in acc
    assert "refined" not in proc.stdout and "scan stage" not in proc.stdout  # no such files: those rows left out


def test_the_scan_stage_row_reads_its_own_file(tmp_path):
    rows = [("benign/b1.png", "benign", "normal", 0.8), ("malignant/m1.png", "malignant", "benign", 0.6)]
    for side in ("a", "b"):
        _write(tmp_path / side / "0", rows)
        _write(tmp_path / side / "0", [("benign/b1.png", "benign", "benign", 0.8),
                                       ("malignant/m1.png", "malignant", "benign", 0.6)], "predictions_scan_stage.csv")
    proc = _run(tmp_path / "a", tmp_path / "b", "--folds", "0")
    assert proc.returncode == 0, proc.stderr
    scan = next(line for line in proc.stdout.splitlines() if line.startswith("| accuracy, scan stage"))
    assert "| 0.500 +- 0.000 | 0.500 +- 0.000 | +0.000" in scan  # the network's rows score 0.000
    assert "| accuracy, network | 0.000 +- 0.000" in proc.stdout


def test_refuses_sweeps_of_different_folds(tmp_path):
    _write(tmp_path / "a" / "0", [("benign/b1.png", "benign", "benign", 0.8)])
    _write(tmp_path / "b" / "0", [("benign/b2.png", "benign", "benign", 0.8)])
    proc = _run(tmp_path / "a", tmp_path / "b", "--folds", "0")
    assert proc.returncode == 2 and "do not share one fold assignment" in proc.stderr
    proc = _run(tmp_path / "a", tmp_path / "c", "--folds", "0")
    assert proc.returncode == 2 and "predictions.csv not found" in proc.stderr
