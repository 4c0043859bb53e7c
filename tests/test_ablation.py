"""Ablation table: arms paired fold by fold against a reference arm."""

from __future__ import annotations

import json

import numpy as np
import pytest

from busiseg.ablation import AblationError, compare, main
from tests.test_cv_summary import IMAGES, K, fake_dice, fake_fold_run


def _arm(root, name, shift, assignment="a1"):
    for f in range(K):
        fake_fold_run(root / name / str(f), f, {"test/accuracy": 0.8 + shift * f, "test/dice": 0.7},
                      assignment=assignment)
        metrics = json.loads((root / name / str(f) / "metrics.json").read_text())
        (root / name / str(f) / "metrics.json").write_text(json.dumps({**metrics, "fit_seconds": 600.0}))
    return root / name


def test_paired_differences_against_the_reference(tmp_path):
    arms = {"seg_only": _arm(tmp_path, "seg_only", 0.0), "mse": _arm(tmp_path, "mse", 0.01)}
    result = compare(arms, "seg_only")
    mse = result["arms"]["mse"]
    # same fake predictions in both arms: every per-fold Dice difference is exactly 0
    lesion_folds = [f for f in range(K) if any(i % K == f and not n.startswith("normal") for i, n in enumerate(IMAGES))]
    assert sorted(f for f, d in mse["paired_dice"]["per_fold"].items() if d is not None) == lesion_folds
    assert all(d == pytest.approx(0.0) for d in mse["paired_dice"]["per_fold"].values() if d is not None)
    diffs = [0.01 * f for f in range(K)]
    assert mse["paired_accuracy"]["mean"] == pytest.approx(np.mean(diffs))
    assert mse["paired_accuracy"]["std"] == pytest.approx(np.std(diffs, ddof=1))
    assert mse["paired_accuracy"]["folds_better"] == K - 1
    assert mse["fit_minutes_per_fold"] == pytest.approx(10.0)
    lesion = [np.mean([fake_dice(n.split("/")[0], f) for i, n in enumerate(IMAGES)
                       if i % K == f and not n.startswith("normal")]) for f in lesion_folds]
    assert result["arms"]["seg_only"]["mean"]["test/dice_per_image_lesion"] == pytest.approx(np.mean(lesion))


def test_cli_writes_the_table_and_refuses_unpaired_arms(tmp_path, capsys):
    a, b = _arm(tmp_path, "seg_only", 0.0), _arm(tmp_path, "ce", 0.02)
    held = {arm: sorted(p.name for p in arm.iterdir()) for arm in (a, b)}
    assert main([f"seg_only={a}", f"ce={b}", "--out", str(tmp_path / "out")]) == 0
    # the arms' folders are read, not written into (it wrote each arm's cv_summary files there)
    assert {arm: sorted(p.name for p in arm.iterdir()) for arm in (a, b)} == held
    out = capsys.readouterr().out
    assert "| ce | accuracy |" not in out  # seg_only's class head is untrained: no accuracy pairing
    assert "| ce | dice_per_image_lesion |" in out
    seg_row = next(line for line in out.splitlines() if line.startswith("| seg_only | 5 |"))
    assert seg_row.count("n/a") == 6 and "0.800" not in seg_row  # its untrained head's accuracy is not shown
    assert (tmp_path / "out" / "ablation.md").read_text() == out
    c = _arm(tmp_path, "other", 0.0, assignment="zz")
    assert main([f"seg_only={a}", f"other={c}"]) == 2
    assert "different fold assignments" in capsys.readouterr().err
    with pytest.raises(AblationError, match="--reference"):
        compare({"ce": b}, "seg_only")


def test_against_the_classifier_only_arm_only_accuracy_is_paired(tmp_path, capsys):
    a, b = _arm(tmp_path, "cls_only", 0.0), _arm(tmp_path, "mse", 0.02)
    assert main([f"cls_only={a}", f"mse={b}", "--reference", "cls_only"]) == 0
    out = capsys.readouterr().out
    assert "| mse | accuracy |" in out
    assert "| mse | dice_per_image_lesion |" not in out  # cls_only's decoder is untrained: no Dice pairing
    acc_row = next(line for line in out.splitlines() if line.startswith("| mse | accuracy |"))
    assert acc_row.endswith("| +0.040 +- 0.032 | 4/5 |")  # a difference carries its sign, like the folds'
    assert "| +0.000 | +0.020 | +0.040 | +0.060 | +0.080 |" in acc_row
