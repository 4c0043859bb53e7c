"""docs/runs/busi_cpu: the headline sweep's fold runs, less their networks (docs/runs/README.md).

Each committed fold must be one run's own files (its predictions are those its metrics were computed from, on its
own test part), and ``busiseg.cv_summary`` must keep reading them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from busiseg.cv_summary import main
from tests.conftest import REPO

RUNS = REPO / "docs" / "runs" / "busi_cpu"
FOLDS = sorted(p for p in RUNS.iterdir() if p.is_dir()) if RUNS.is_dir() else []
# each per-image file and the metrics.json prefix computed from it
STAGES = {"predictions.csv": "test", "predictions_two_stage.csv": "test_two_stage",
          "predictions_scan_stage.csv": "test_scan_stage"}


def _test_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["part"] == "test"]


def test_the_committed_runs_are_there():
    assert FOLDS, f"{RUNS}: no fold runs"


@pytest.mark.parametrize("run", FOLDS, ids=lambda p: f"fold{p.name}")
def test_a_committed_fold_is_one_runs_own_files(run):
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    split = json.loads((run / "split.json").read_text())
    assert split["meta"]["fold"] == int(run.name) and not set(split["train"]) & set(split["test"])
    for name, prefix in STAGES.items():
        rows = _test_rows(run / name)
        assert sorted(r["image"] for r in rows) == sorted(split["test"]), name
        accuracy = sum(r["pred_class"] == r["true_class"] for r in rows) / len(rows)
        assert accuracy == pytest.approx(metrics[f"{prefix}/accuracy"], abs=1e-6), name
    refined = _test_rows(run / "predictions_refined.csv")
    assert sorted(r["image"] for r in refined) == sorted(split["test"])


def test_cv_summary_reads_the_committed_runs(tmp_path):
    assert main([str(RUNS), "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "cv_summary.json").read_text())
    assert summary["folds"] == [int(p.name) for p in FOLDS]
    for key in ("test_refined/dice_per_image_lesion", "test_scan_stage/accuracy"):
        assert key in summary["mean"], key
    assert summary["oof_scan_stage"]["images"] == sum(len(_test_rows(p / "predictions.csv")) for p in FOLDS)
