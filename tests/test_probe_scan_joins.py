"""scripts/probe_scan_joins.py (docs/results.md, x10): the joins of the two-stage and the scan classifier's classes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from tests.conftest import REPO, load_script
from tests.test_ensemble_classes import _write

SCRIPT = REPO / "scripts" / "probe_scan_joins.py"
probe = load_script("probe_scan_joins")


def test_the_weight_comes_from_the_other_folds_and_ties_go_nearest_one_half():
    grid = np.zeros((3, len(probe.WEIGHTS)))
    w = list(probe.WEIGHTS)
    grid[0, w.index(0.8)] = 1.0   # fold 0 alone prefers 0.8
    grid[1, w.index(0.3)] = 0.6
    grid[2, w.index(0.3)] = 0.6
    grid[1:, w.index(0.65)] = 0.6  # folds 1 and 2 tie 0.3 and 0.65: 0.65 is nearer 0.5
    assert probe.leave_one_out_weight(grid, 0) == 0.65
    # for fold 1, folds 0 and 2: 0.8 (mean 0.5) beats 0.3 and 0.65 (0.3): the fold's own preference is not read
    assert probe.leave_one_out_weight(grid, 1) == 0.8


def test_rules_on_one_fold(tmp_path):
    sweep, scan = tmp_path / "sweep" / "0", tmp_path / "scan" / "0"
    # the two-stage call is wrong on b1, the scan classifier on n1; the mean is right on both, being surer where
    # each is right; the network is right only on n1
    two = [("benign/b1.png", "benign", (0.6, 0.4, 0.0)), ("normal/n1.png", "normal", (0.9, 0.1, 0.0))]
    _write(sweep, two, "predictions_two_stage.csv")
    _write(sweep, [("benign/b1.png", "benign", (1.0, 0.0, 0.0)), ("normal/n1.png", "normal", (1.0, 0.0, 0.0))])
    _write(scan, [("benign/b1.png", "benign", (0.05, 0.95, 0.0)), ("normal/n1.png", "normal", (0.4, 0.6, 0.0))])
    folds = [probe.fold_tables(tmp_path / "sweep", [tmp_path / "scan"], 0)]
    rules, _ = probe.rule_accuracies(folds)
    assert rules["two-stage alone"] == [0.5] and rules["scan alone"] == [0.5]
    assert rules["mean"] == [1.0]
    # (network + two-stage + scan) / 3 on b1: (0.55, 0.45, 0): normal, wrong
    assert rules["network + two-stage + scan"] == [0.5]
    assert rules["the surer one"] == [1.0]  # b1: the scan's 0.95; n1: the two-stage's 0.9
    assert "mean, first scan only" not in rules


def test_refuses_scans_of_other_folds(tmp_path):
    _write(tmp_path / "sweep" / "0", [("benign/b1.png", "benign", (0.1, 0.8, 0.1))])
    _write(tmp_path / "sweep" / "0", [("benign/b1.png", "benign", (0.1, 0.8, 0.1))], "predictions_two_stage.csv")
    _write(tmp_path / "scan" / "0", [("benign/b2.png", "benign", (0.1, 0.8, 0.1))])
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "sweep"), str(tmp_path / "scan"),
                           "--folds", "0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "scan/0/predictions.csv: other test images" in proc.stderr
