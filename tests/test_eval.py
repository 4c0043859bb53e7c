"""Evaluation: metrics against hand-computed values, every output file, and equality with
the training run's own test step (a tiny run trained once per session)."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

from busiseg.checkpoint import CheckpointError
from busiseg.data.labels import CLASS_NAMES
from busiseg.eval import evaluate
from busiseg.evaluation.metrics_table import (
    MaskScores,
    auroc,
    classification_report_text,
    classification_summary,
    expected_calibration_error,
    hd95,
    score_mask,
    segmentation_summary,
)
from busiseg.evaluation.runner import EvalError
from busiseg.train import train
from tests.conftest import REPO, write_case

# --------------------------------------------------------------------------- hand-computed metrics


def _square(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return m


def test_dice_iou_and_hd95_of_two_shifted_squares():
    # 4x4 squares, the prediction shifted 2 px right: TP 8, FP 8, FN 8.
    true = _square((12, 12), (2, 5), (2, 5))
    pred = _square((12, 12), (2, 5), (4, 7))
    s = score_mask(true, pred)
    assert (s.tp, s.fp, s.fn, s.tn) == (8, 8, 8, 144 - 24)
    assert s.dice == pytest.approx(16 / 32)
    assert s.iou == pytest.approx(8 / 24)
    # boundary distances pred -> true, by hand: [0,0,1,2] on the top and bottom rows,
    # 1,1 on the left column, 2,2 on the right column; P95 of the 12 values = 2; symmetric.
    assert s.hd95 == pytest.approx(2.0)


def test_hd95_interpolates_the_95th_percentile():
    # The same square predicted exactly plus one stray pixel 10 px right of its boundary:
    # pred -> true distances are twelve 0 and one 10; P95 (linear) = 0.4 * 10.
    true = _square((12, 20), (2, 5), (2, 5))
    pred = true.copy()
    pred[3, 15] = True
    assert hd95(true, pred) == pytest.approx(4.0)
    assert hd95(true, pred, percentile=100) == pytest.approx(10.0)


def test_hd95_and_dice_rules_for_empty_masks():
    empty = np.zeros((12, 20), bool)
    lesion = _square((12, 20), (2, 5), (2, 5))
    assert math.isnan(hd95(empty, lesion))  # not a lesion image
    assert math.isnan(hd95(empty, empty))
    assert hd95(lesion, empty) == pytest.approx(math.hypot(12, 20))  # missed lesion: the diagonal
    both_empty = score_mask(empty, empty)
    assert both_empty.dice == 1.0 and both_empty.iou == 1.0
    assert score_mask(empty, lesion).dice == 0.0


def test_hd95_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    from scipy.spatial.distance import cdist

    from busiseg.evaluation.metrics_table import boundary

    for _ in range(5):
        a = rng.random((30, 40)) > 0.7
        b = rng.random((30, 40)) > 0.7
        pa, pb = np.argwhere(boundary(a)), np.argwhere(boundary(b))
        d = cdist(pa, pb)
        expected = max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))
        assert hd95(a, b) == pytest.approx(expected, abs=1e-4)


def test_segmentation_summary_by_hand():
    shape = (12, 12)
    lesion_true = _square(shape, (2, 5), (2, 5))
    lesion_pred = _square(shape, (2, 5), (4, 7))
    empty = np.zeros(shape, bool)
    stray = _square(shape, (0, 1), (0, 1))  # 4 px false positive on a normal image
    scores = MaskScores([score_mask(lesion_true, lesion_pred), score_mask(empty, empty), score_mask(empty, stray)])
    labels = np.array([1, 0, 0])
    summary = segmentation_summary(scores, labels)
    overall = summary["overall"]
    assert overall["images"] == 3 and overall["lesion_images"] == 1
    assert overall["dice"] == pytest.approx(2 * 8 / (2 * 8 + 12 + 8))  # pixels pooled: FP 8 + 4
    assert overall["iou"] == pytest.approx(8 / (8 + 12 + 8))
    assert overall["sensitivity"] == pytest.approx(8 / 16)
    assert overall["precision"] == pytest.approx(8 / 20)
    assert overall["specificity"] == pytest.approx((120 + 144 + 140) / (120 + 144 + 140 + 12))
    assert overall["dice_per_image"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert overall["sensitivity_per_image"] == pytest.approx(0.5)  # defined on the lesion image only
    assert overall["precision_per_image"] == pytest.approx((0.5 + 0.0) / 2)  # undefined for the empty prediction
    assert overall["hd95"] == pytest.approx(2.0) and overall["hd95_median"] == pytest.approx(2.0)
    normal = summary["normal"]
    assert normal["dice_per_image"] == pytest.approx(0.5)  # one of two normal images predicted empty
    assert normal["dice"] == 0.0 and normal["sensitivity"] is None and normal["hd95"] is None
    assert normal["empty_predictions_on_normal_images"] == 1
    assert summary["malignant"]["images"] == 0 and summary["malignant"]["dice"] is None


PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
LABELS = np.array([0, 1, 2, 2])


def test_classification_summary_by_hand():
    s = classification_summary(PROBS, LABELS, ece_bins=10)
    assert s["accuracy"] == pytest.approx(3 / 4)
    assert s["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    pc = s["per_class"]
    assert (pc["normal"]["precision"], pc["normal"]["recall"], pc["normal"]["f1"]) == (1.0, 1.0, 1.0)
    assert pc["benign"]["precision"] == pytest.approx(0.5) and pc["benign"]["f1"] == pytest.approx(2 / 3)
    assert pc["malignant"]["recall"] == pytest.approx(0.5) and pc["malignant"]["f1"] == pytest.approx(2 / 3)
    assert pc["benign"]["specificity"] == pytest.approx(2 / 3) and pc["malignant"]["specificity"] == 1.0
    assert s["macro"]["f1"] == pytest.approx(7 / 9)
    assert s["weighted"]["f1"] == pytest.approx((1 + 2 / 3 + 2 * 2 / 3) / 4)
    # malignant: positives 0.3, 0.8 against negatives 0.1, 0.3 -> (1 + 0.5 + 1 + 1) / 4 (a tie counts half)
    assert pc["malignant"]["auroc"] == pytest.approx(0.875)
    assert s["macro"]["auroc"] == pytest.approx((1 + 1 + 0.875) / 3)
    # one sample per bin: (|1-.7| + |1-.6| + |0-.5| + |1-.8|) / 4
    assert s["ece"] == pytest.approx(0.35)
    assert s["brier"] == pytest.approx((0.14 + 0.26 + 0.78 + 0.06) / 4)


def test_ece_pools_a_bin():
    # 0.62 (right) and 0.68 (wrong) share the bin [0.6, 0.7): accuracy 0.5, mean confidence 0.65
    probs = np.array([[0.62, 0.38, 0.0], [0.68, 0.32, 0.0]])
    assert expected_calibration_error(probs, np.array([0, 1]), n_bins=10) == pytest.approx(0.15)


def test_ece_and_auroc_agree_with_torchmetrics():
    from torchmetrics.functional.classification import multiclass_auroc, multiclass_calibration_error

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 3)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 3, 200)
    tm_ece = multiclass_calibration_error(torch.tensor(probs), torch.tensor(labels), num_classes=3, n_bins=15)
    assert expected_calibration_error(probs, labels, 15) == pytest.approx(float(tm_ece), abs=1e-6)  # float32 there
    tm_auc = multiclass_auroc(torch.tensor(probs), torch.tensor(labels), num_classes=3, average=None)
    for k in range(3):
        assert auroc(labels == k, probs[:, k]) == pytest.approx(float(tm_auc[k]), abs=1e-6)


def test_auroc_is_exact_in_counts():
    # 3 positives above 7 negatives: adding up the rates gave 0.9999999999999999
    positive = np.r_[np.ones(3, bool), np.zeros(7, bool)]
    scores = np.r_[np.linspace(1, 2, 3), np.linspace(0, 0.5, 7)]
    assert auroc(positive, scores) == 1.0
    # one tie between a positive and a negative counts half a pair of the 3 * 7
    scores[3] = scores[0]
    assert auroc(positive, scores) == (21 - 0.5) / 21


def test_absent_class_rules():
    probs = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])
    s = classification_summary(probs, np.array([1, 1, 2]))
    assert s["per_class"]["normal"]["auroc"] is None  # no positives
    assert s["macro"]["auroc"] == pytest.approx(1.0)
    # normal is neither true nor predicted: left out of the macro average
    assert s["macro"]["f1"] == pytest.approx(1.0)


def test_classification_report_layout():
    text = classification_report_text(classification_summary(PROBS, LABELS))
    lines = text.splitlines()
    assert re.match(r"^\s+precision\s+recall\s+f1-score\s+support$", lines[0])
    assert re.search(r"^\s+benign\s+0\.500\s+1\.000\s+0\.667\s+1$", text, re.M)
    assert re.search(r"^\s+accuracy\s+0\.750\s+4$", text, re.M)
    assert re.search(r"^\s+macro avg\s+0\.833\s+0\.833\s+0\.778\s+4$", text, re.M)
    assert re.search(r"^weighted avg\s+", text, re.M)


# --------------------------------------------------------------------------- a tiny trained run

TINY = [
    "data.image_size=64",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "data.synthetic.n_per_class.benign=8",
    "data.synthetic.n_per_class.malignant=8",
    "data.synthetic.n_per_class.normal=6",
    "data.synthetic.min_size=96",
    "data.synthetic.max_size=128",
    "model.encoder_name=resnet18",
    "model.decoder_channels=[32,16,16,8,8]",
    "split.test_fraction=0.3",
    "debug=limit",  # a few batches
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1.0",  # the whole test part, as eval sees it
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.image_logger=null",
    "callbacks.early_stopping=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def _compose(config_name: str, overrides: list[str], root: Path, output_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name=config_name, return_hydra_config=True, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.data_dir = str(root / "data")
        cfg.paths.log_dir = str(root / "logs")
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[Path, dict]:
    """A one-epoch run (a few batches) on a 22-image phantom: (best checkpoint, the run's metrics.json). Its network
    is barely trained (it calls the test images benign): the tests that use it check that eval reproduces what
    the run measured, not that the numbers are good."""
    root = tmp_path_factory.mktemp("eval_train")
    summary = train(_compose("train", TINY, root, root / "run"))
    return Path(summary["best_checkpoint"]), json.loads((root / "run" / "metrics.json").read_text())


def run_eval(tmp_path: Path, overrides: list[str]) -> tuple[dict, Path]:
    out = tmp_path / "eval"
    metrics = evaluate(_compose("eval", ["progress=false", *overrides], tmp_path, out))
    return metrics, out


TRAINING_KEYS = ("dice", "iou", "sensitivity", "specificity", "precision", "dice_per_image", "accuracy",
                 "precision_macro", "recall_macro", "f1_macro", "specificity_macro", "auroc_macro",
                 "recall_normal", "recall_benign", "recall_malignant")


def test_eval_reproduces_the_training_test_step(trained_run, tmp_path):
    ckpt, run_metrics = trained_run
    metrics, _ = run_eval(tmp_path, [f"ckpt_path={ckpt}"])
    test = {k.removeprefix("test/"): v for k, v in run_metrics["metrics"].items() if k.startswith("test/")}
    assert metrics["counts"]["images"] == sum(run_metrics["images_per_split"]["test"].values())
    assert metrics["pipelines"] == ["raw"]
    # the torchmetrics objects of the training step, on the raw view at the preprocessing size
    for key in TRAINING_KEYS:
        assert metrics["raw"]["as_training"][key] == pytest.approx(test[key], abs=1e-5), key
    assert metrics["training_check"]["max_abs_diff"] <= 1e-5
    # and this module's own numbers, where the definitions coincide
    seg = metrics["raw"]["segmentation"]["preprocessed"]["overall"]
    cls = metrics["raw"]["classification"]
    mine = {
        "dice": seg["dice"], "iou": seg["iou"], "sensitivity": seg["sensitivity"],
        "specificity": seg["specificity"], "precision": seg["precision"], "dice_per_image": seg["dice_per_image"],
        "accuracy": cls["accuracy"], "precision_macro": cls["macro"]["precision"],
        "recall_macro": cls["macro"]["recall"], "f1_macro": cls["macro"]["f1"],
        "specificity_macro": cls["macro"]["specificity"], "auroc_macro": cls["macro"]["auroc"],
        **{f"recall_{c}": cls["per_class"][c]["recall"] for c in CLASS_NAMES},
    }
    for key, value in mine.items():
        assert value == pytest.approx(test[key], abs=1e-5), key
    assert np.array(cls["confusion_matrix"]).tolist() == run_metrics["test_confusion_matrix"]


def _probs(out: Path) -> np.ndarray:
    with open(out / "per_image.csv", newline="") as f:
        return np.array([[float(r[f"prob_{c}"]) for c in CLASS_NAMES] for r in csv.DictReader(f)])


def test_eval_reproduces_a_bf16_run_tested_with_its_last_weights(tmp_path):
    # as experiment=busi_cpu: bf16 autocast, channels_last, the last weights tested (last.ckpt)
    root = tmp_path / "bf16"
    extra = ["trainer.precision=bf16-mixed", "channels_last=true", "test_ckpt=last"]
    summary = train(_compose("train", [*TINY, *extra], root, root / "run"))
    assert summary["tested_checkpoint"] == "last"
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    metrics, out = run_eval(tmp_path / "a", [f"ckpt_path={ckpt}"])
    assert metrics["precision"] == "bf16-mixed"
    # compared at all: the check follows tested_checkpoint, not best_checkpoint
    assert metrics["training_check"]["max_abs_diff"] <= 1e-5, metrics["training_check"]
    full, out32 = run_eval(tmp_path / "b", [f"ckpt_path={ckpt}", "precision=32"])
    assert full["precision"] == "32"
    # the forward passes really ran at another precision: bf16 rounding moves the probabilities
    assert np.abs(_probs(out) - _probs(out32)).max() > 1e-4
    with pytest.raises(EvalError, match="precision=8"):
        run_eval(tmp_path / "c", [f"ckpt_path={ckpt}", "precision=8"])
    # busiseg.ensemble_cv re-evaluates its members at the training run's precision too: a member
    # reproduces the run's own test predictions (bf16), which float32 does not (checked above)
    from busiseg.ensemble_cv import ensemble_cv

    _as_fold(ckpt, tmp_path / "m1")
    _as_fold(ckpt, tmp_path / "m2")
    result = ensemble_cv(tmp_path / "ens", {"m1": tmp_path / "m1", "m2": tmp_path / "m2"}, progress=False)
    assert result["precision"] == "bf16-mixed"
    assert "precision bf16-mixed" in (tmp_path / "ens" / "ensemble_cv.md").read_text()

    def _test_part_probs(csv_path: Path) -> dict[str, list[float]]:
        with open(csv_path, newline="") as f:
            return {r["image"]: [float(r[f"prob_{c}"]) for c in CLASS_NAMES]
                    for r in csv.DictReader(f) if r["part"] == "test"}

    trained = _test_part_probs(root / "run" / "predictions.csv")
    member = _test_part_probs(tmp_path / "ens" / "m1" / "0" / "predictions.csv")
    assert member.keys() == trained.keys() and trained
    for image, probs in trained.items():
        assert member[image] == pytest.approx(probs, abs=2e-6), image


def test_eval_writes_every_file(trained_run, tmp_path):
    ckpt, _ = trained_run
    metrics, out = run_eval(tmp_path, [f"ckpt_path={ckpt}", "figures.samples=4"])
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("raw", "counts", "class_names", "inference", "checkpoint", "part"):
        assert key in on_disk
    for size in ("preprocessed", "original"):
        groups = on_disk["raw"]["segmentation"][size]
        assert set(groups) == {"overall", *CLASS_NAMES}
        assert {"dice", "iou", "sensitivity", "specificity", "precision", "hd95"} <= set(groups["overall"])
    cls = on_disk["raw"]["classification"]
    assert {"accuracy", "per_class", "macro", "weighted", "ece", "confusion_matrix"} <= set(cls)
    assert set(cls["per_class"]["benign"]) >= {"precision", "recall", "f1", "specificity", "auroc", "support"}

    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == metrics["counts"]["images"]
    assert {"file", "true_class", "pred_class", "prob_normal", "prob_benign", "prob_malignant", "dice", "iou",
            "true_area_px", "pred_area_px"} <= set(rows[0])
    dice = np.array([float(r["dice"]) for r in rows])
    assert dice.mean() == pytest.approx(metrics["raw"]["segmentation"]["original"]["overall"]["dice_per_image"],
                                        abs=1e-5)
    for r in rows:
        assert sum(float(r[f"prob_{c}"]) for c in CLASS_NAMES) == pytest.approx(1.0, abs=1e-5)

    report = (out / "classification_report.txt").read_text()
    assert "precision" in report and "macro avg" in report and "weighted avg" in report

    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    always = {"confusion_matrix.png", "dice_distribution.png", "reliability_diagram.png", "roc_curves.png",
              "samples_random.png", "samples_worst.png"}
    # the lesion grid only where it differs from the worst one; the mistakes' grid where there are mistakes
    assert always <= set(pngs) <= always | {"samples_worst_lesion.png", "samples_misclassified.png"}
    wrong = sum(r["true_class"] != r["pred_class"] for r in rows)
    assert ("samples_misclassified.png" in pngs) == (wrong > 0)
    for name in pngs:
        with Image.open(out / "figures" / name) as im:
            assert im.width >= 400 and im.height >= 300, name

    page = (out / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]{0,40})', page)
    assert len(sources) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "Headline" in page and "Reproduces the training run" in page and "ckpt_path" in page


@pytest.fixture
def folder(tmp_path) -> Path:
    """A plain folder in the BUSI layout, never seen by the run."""
    root = tmp_path / "folder"
    for n in (1, 2, 3):
        write_case(root, "benign", n, size=(90, 70), masks=((20, 20, 50, 45),))
        write_case(root, "malignant", n, size=(80, 100), masks=((10, 30, 40, 70), (50, 10, 60, 20)))
        write_case(root, "normal", n, size=(70, 70), masks=(None,), mask_mode="RGB")
    return root


def test_eval_on_a_plain_folder_with_postprocessing(trained_run, tmp_path, folder):
    ckpt, _ = trained_run
    metrics, out = run_eval(tmp_path, [f"ckpt_path={ckpt}", "data=busi", f"data.root={folder}", "part=all",
                                       "inference=refined"])
    assert metrics["counts"]["images"] == 9 and metrics["part"] == "all" and metrics["split_file"] is None
    assert metrics["image_size"] == 64  # from the checkpoint, not data/busi.yaml's 128
    assert metrics["pipelines"] == ["raw", "postprocessed"] and metrics["final"] == "postprocessed"
    assert "training_check" not in metrics
    for p in ("raw", "postprocessed"):
        assert metrics[p]["segmentation"]["original"]["overall"]["images"] == 9
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert {r["file"] for r in rows} == {f"{c}/{c} ({n}).png" for c in CLASS_NAMES for n in (1, 2, 3)}
    assert {"dice_raw", "pred_class_raw"} <= set(rows[0])
    assert {int(r["height"]) for r in rows} == {70, 100}  # original sizes
    page = (out / "report.html").read_text()
    assert "postprocessed, original size" in page and "raw, 64×64 (as training)" in page
    # the post-processing acts: the same TTA without it scores other masks (an eval that only thresholded passed)
    _, tta_only = run_eval(tmp_path / "tta_only", [f"ckpt_path={ckpt}", "data=busi", f"data.root={folder}", "part=all",
                                                   "inference=refined", "inference.min_component_px=0",
                                                   "inference.fill_holes=false", "inference.keep_largest=false",
                                                   "inference.class_gating=false"])
    plain = {r["file"]: (r["dice"], r["pred_area_px"]) for r in csv.DictReader(open(tta_only / "per_image.csv"))}
    assert any(plain[r["file"]] != (r["dice"], r["pred_area_px"]) for r in rows)


def test_eval_on_a_folder_without_malignant_images(trained_run, tmp_path):
    root = tmp_path / "two_classes"
    write_case(root, "benign", 1, size=(60, 50), masks=((10, 10, 30, 30),))
    write_case(root, "normal", 1, size=(60, 50), masks=(None,), mask_mode="RGB")
    (root / "malignant").mkdir()
    metrics, out = run_eval(tmp_path, [f"ckpt_path={trained_run[0]}", f"data.root={root}", "part=all"])
    cls = metrics["raw"]["classification"]
    assert cls["per_class"]["malignant"]["support"] == 0 and cls["per_class"]["malignant"]["auroc"] is None
    assert metrics["raw"]["segmentation"]["original"]["malignant"]["images"] == 0
    # four figures, the random and worst grids, and the mistakes' grid where the model makes any
    wrong = cls["confusion_matrix"][0][0] + cls["confusion_matrix"][1][1] + cls["confusion_matrix"][2][2] < 2
    figures_written = {p.name for p in (out / "figures").glob("*.png")}
    assert {"confusion_matrix.png", "samples_random.png", "samples_worst.png"} <= figures_written
    assert ("samples_misclassified.png" in figures_written) == wrong
    json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))


def test_every_unreadable_image_is_named_in_one_error(trained_run, tmp_path, folder):
    from busiseg.data.busi import DatasetError

    (folder / "benign" / "benign (2).png").write_bytes(b"")  # empty
    (folder / "normal" / "normal (3).png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # truncated
    with pytest.raises(DatasetError) as info:
        run_eval(tmp_path, [f"ckpt_path={trained_run[0]}", f"data.root={folder}", "part=all"])
    lines = str(info.value).splitlines()
    assert lines[0] == "2 file(s) cannot be used:" and all(line.startswith("  - ") for line in lines[1:])
    named = sorted(Path(line.removeprefix("  - ").split(": ")[0]).name for line in lines[1:])
    assert named == ["benign (2).png", "normal (3).png"]


def test_clear_errors(trained_run, tmp_path):
    ckpt, _ = trained_run
    with pytest.raises(CheckpointError, match="missing.ckpt: checkpoint not found"):
        run_eval(tmp_path, [f"ckpt_path={tmp_path / 'missing.ckpt'}"])
    with pytest.raises(EvalError, match="ckpt_path is not set"):
        run_eval(tmp_path, [])
    with pytest.raises(EvalError, match="part=holdout"):
        run_eval(tmp_path, [f"ckpt_path={ckpt}", "part=holdout"])
    # a checkpoint away from its run: no split.json beside it
    lone = tmp_path / "elsewhere" / "model.ckpt"
    lone.parent.mkdir()
    shutil.copy(ckpt, lone)
    with pytest.raises(EvalError, match=r"elsewhere/split.json: split file not found.*part=all"):
        run_eval(tmp_path, [f"ckpt_path={lone}"])
    with pytest.raises(EvalError, match="inference.threshold"):
        run_eval(tmp_path, [f"ckpt_path={ckpt}", "inference.threshold=2"])


def _copy_run(ckpt: Path, dest: Path) -> Path:
    """A copy of the training run dir (checkpoint, split.json, metrics.json) elsewhere."""
    shutil.copytree(ckpt.parent.parent, dest)
    return dest / "checkpoints" / ckpt.name


def test_ensemble_of_a_network_with_itself_equals_the_network(trained_run, tmp_path):
    ckpt, _ = trained_run
    single, _ = run_eval(tmp_path / "single", [f"ckpt_path={ckpt}"])
    twin = _copy_run(ckpt, tmp_path / "twin")
    both, out = run_eval(tmp_path / "both", [f"ckpt_path=[{ckpt},{twin}]"])
    assert both["ensemble"] == [str(ckpt.resolve()), str(twin.resolve())] and single["ensemble"] is None
    assert "training_check" not in both and "training_check" in single
    for size in ("preprocessed", "original"):
        a = single["raw"]["segmentation"][size]["overall"]
        b = both["raw"]["segmentation"][size]["overall"]
        assert b["dice_per_image"] == pytest.approx(a["dice_per_image"], abs=1e-6)
    assert both["raw"]["classification"]["accuracy"] == single["raw"]["classification"]["accuracy"]
    assert both["counts"] == single["counts"]


def test_ensemble_errors(trained_run, tmp_path):
    ckpt, _ = trained_run
    with pytest.raises(EvalError, match="twice"):
        run_eval(tmp_path, [f"ckpt_path=[{ckpt},{ckpt}]"])
    # a member that trained on the images evaluated: refused, naming the member and an image
    leaky = _copy_run(ckpt, tmp_path / "leaky")
    split = json.loads((leaky.parent.parent / "split.json").read_text())
    split["train"] = split["train"] + split["test"][:1]
    (leaky.parent.parent / "split.json").write_text(json.dumps(split))
    with pytest.raises(EvalError, match=rf"leaky.*trained on 1 of the .* images evaluated .*{re.escape(split['test'][0])}"):
        run_eval(tmp_path, [f"ckpt_path=[{ckpt},{leaky}]"])
    # part=train asks for training images on purpose: no refusal
    metrics, _ = run_eval(tmp_path / "train_part", [f"ckpt_path=[{ckpt},{leaky}]", "part=train"])
    assert metrics["part"] == "train"
    # a member trained at another input size
    other = _copy_run(ckpt, tmp_path / "other")
    state = torch.load(other, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["config"]["data"]["image_size"] = 96
    torch.save(state, other)
    with pytest.raises(EvalError, match=r"other.*image_size=96.*members must take the same input"):
        run_eval(tmp_path, [f"ckpt_path=[{ckpt},{other}]"])


def _as_fold(run_ckpt: Path, sweep: Path, fold: int = 0, assignment: str = "a1") -> Path:
    """The trained run copied into ``sweep/<fold>`` and labelled as fold ``fold`` of a 2-fold CV."""
    ckpt = _copy_run(run_ckpt, sweep / str(fold))
    split_file = sweep / str(fold) / "split.json"
    split = json.loads(split_file.read_text())
    split["meta"].update({"splitter": "kfold", "fold": fold, "k": 2, "assignment": assignment})
    split_file.write_text(json.dumps(split))
    if ckpt.name != "last.ckpt":
        shutil.copy(ckpt, ckpt.parent / "last.ckpt")
    return ckpt.parent / "last.ckpt"


def test_ensemble_cv(trained_run, tmp_path):
    from busiseg.ensemble_cv import EnsembleCVError, ensemble_cv

    ckpt, run_metrics = trained_run
    a = _as_fold(ckpt, tmp_path / "a")
    b = _as_fold(ckpt, tmp_path / "b")
    state = torch.load(b, map_location="cpu", weights_only=True)  # member b: other weights
    sd = state["state_dict"]
    sd["net.unet.classification_head.3.bias"] = sd["net.unet.classification_head.3.bias"] + torch.tensor([1.0, 0.0, -1.0])
    sd["net.unet.segmentation_head.0.bias"] = sd["net.unet.segmentation_head.0.bias"] + 1.0
    torch.save(state, b)
    out = tmp_path / "ens"
    result = ensemble_cv(out, {"a": tmp_path / "a", "b": tmp_path / "b"}, progress=False)
    assert set(result["arms"]) == {"a", "b", "ensemble"} and result["reference"] == "a"
    assert result["precision"] == "32"
    # member a re-evaluated by the same code reproduces its training run's test step
    a_metrics = json.loads((out / "a" / "0" / "metrics.json").read_text())["metrics"]
    for key in ("accuracy", "dice", "dice_per_image"):
        assert a_metrics[f"test/{key}"] == pytest.approx(run_metrics["metrics"][f"test/{key}"], abs=1e-5), key
    rows = {n: [r for r in csv.DictReader(open(out / n / "0" / "predictions.csv")) if r["part"] == "test"]
            for n in ("a", "b", "ensemble")}
    assert len(rows["ensemble"]) == sum(run_metrics["images_per_split"]["test"].values())
    # and the same per-image Dice as the training run's own predictions.csv
    trained = {r["image"]: float(r["dice"]) for r in csv.DictReader(open(ckpt.parent.parent / "predictions.csv"))
               if r["part"] == "test"}
    assert {r["image"]: float(r["dice"]) for r in rows["a"]} == pytest.approx(trained, abs=1e-5)
    probs = {n: np.array([[float(r[f"prob_{c}"]) for c in CLASS_NAMES] for r in rows[n]]) for n in rows}
    assert not np.allclose(probs["a"], probs["b"], atol=1e-3)
    np.testing.assert_allclose(probs["ensemble"], (probs["a"] + probs["b"]) / 2, atol=2e-6)
    ens = json.loads((out / "ensemble" / "0" / "metrics.json").read_text())
    assert ens["fit_seconds"] == pytest.approx(2 * run_metrics["fit_seconds"])
    assert "Paired per-fold difference against `a`" in (out / "ensemble_cv.md").read_text()

    with pytest.raises(EnsembleCVError, match="at least 2"):
        ensemble_cv(tmp_path / "x", {"a": tmp_path / "a"}, progress=False)
    _as_fold(ckpt, tmp_path / "c", assignment="other")
    with pytest.raises(EnsembleCVError, match="different fold assignments"):
        ensemble_cv(tmp_path / "x", {"a": tmp_path / "a", "c": tmp_path / "c"}, progress=False)
    with pytest.raises(EnsembleCVError, match="best.ckpt: checkpoint not found"):
        ensemble_cv(tmp_path / "x", {"a": tmp_path / "a", "b": tmp_path / "b"}, checkpoint="best.ckpt", progress=False)


def test_cli_missing_checkpoint_is_one_clear_error(tmp_path):
    missing = tmp_path / "nope.ckpt"
    cmd = [sys.executable, "-m", "busiseg.eval", f"ckpt_path={missing}", f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"busiseg: error: {missing}: checkpoint not found" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_full_run(trained_run, tmp_path):
    ckpt, _ = trained_run
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "busiseg.eval", f"ckpt_path={ckpt}", "progress=false", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training_check"]["max_abs_diff"] <= 1e-5
    assert (out / "report.html").exists() and (out / ".hydra" / "config.yaml").exists()


def test_without_the_copies_check_the_network_pass_names_every_unreadable_image(trained_run, tmp_path, folder):
    from busiseg.data.busi import DatasetError

    (folder / "benign" / "benign (2).png").write_bytes(b"")
    (folder / "malignant" / "malignant (1)_mask.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError) as info:
        run_eval(tmp_path, [f"ckpt_path={trained_run[0]}", f"data.root={folder}", "part=all", "copies_check=off"])
    message = str(info.value)
    assert message.startswith("2 file(s) cannot be used:") and "benign (2).png" in message
    assert "malignant (1)_mask.png" in message


def test_sample_picks_show_each_grid_once_and_the_surest_mistakes():
    from types import SimpleNamespace

    from busiseg.eval import _pick_samples

    scores = SimpleNamespace(dice=np.array([0.9, 0.1, 0.5, 0.95]), fp=np.zeros(4), fn=np.zeros(4),
                             true_area=np.array([10, 10, 10, 10]))  # every image a lesion image
    probs = np.array([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.9, 0.05, 0.05]])
    results = SimpleNamespace(names=["a", "b", "c", "d"], final="raw", scores={("raw", "original"): scores},
                              probs={"raw": probs}, labels=np.array([1, 1, 1, 1]))
    picks = _pick_samples(results, 2, seed=0)
    assert picks["worst"] == [1, 2] and "worst_lesion" not in picks  # the same grid twice is shown once
    # d (a good mask, Dice 0.95) is the surest mistake: in no Dice grid, first among the mistakes
    assert picks["misclassified"] == [3, 2]
    scores.true_area = np.array([10, 0, 10, 10])  # b is a normal image: the lesion grid differs now
    assert _pick_samples(results, 2, seed=0)["worst_lesion"] == [2, 0]
