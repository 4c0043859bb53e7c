"""The crop stage end to end on a tiny phantom run: train it for a run, evaluate and predict with it,
cross-validate it on a sweep; and its refusals."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from busiseg.crop_stage import FILE_NAME, crop_cv, main
from busiseg.data.labels import CLASS_NAMES
from busiseg.evaluation.runner import EvalError
from busiseg.models.crop_classifier import (
    CropClassifierError,
    CropSettings,
    load_crop_classifier,
    save_crop_classifier,
)
from busiseg.predict import ConfigError
from tests.test_eval import _as_fold, _copy_run, run_eval, trained_run  # noqa: F401 - the fixture
from tests.test_predict import read_rows, run_predict, write_inputs

FAST = ["--size", "32", "--epochs", "2", "--batch-size", "8", "--no-progress"]
FAST_SETTINGS = CropSettings(size=32, epochs=2, batch_size=8)


def _probs(csv_path: Path, key: str = "file") -> dict[str, np.ndarray]:
    with open(csv_path, newline="") as fh:
        return {r[key]: np.array([float(r[f"prob_{c}"]) for c in CLASS_NAMES]) for r in csv.DictReader(fh)
                if r.get("part", "test") == "test"}


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_train_for_a_run_then_eval_and_predict(trained_run, tmp_path):  # noqa: F811
    ckpt, _ = trained_run
    ckpt = _copy_run(ckpt, tmp_path / "run")  # the stage is written beside the run
    run = ckpt.parent.parent
    assert main(["train", str(run), "--checkpoint", ckpt.name, *FAST]) == 0
    crop_file = run / FILE_NAME
    with Image.open(run / "crop_classifier.png") as im:  # loss curve and the crops it reads
        assert im.width >= 600 and im.height >= 300
    model = load_crop_classifier(crop_file)
    split = json.loads((run / "split.json").read_text())
    assert sorted(model.trained_on) == sorted(n for n in split["train"] if not n.startswith("normal/"))
    assert model.settings == FAST_SETTINGS

    plain, plain_out = run_eval(tmp_path / "plain", [f"ckpt_path={ckpt}"])
    staged, staged_out = run_eval(tmp_path / "staged", [f"ckpt_path={ckpt}", f"crop_classifier={crop_file}"])
    assert plain["crop_classifier"] is None and staged["crop_classifier"] == str(crop_file)
    assert "training_check" in plain and "training_check" not in staged  # other classes: nothing to reproduce
    # the masks are the network's: every segmentation figure the same (HD95 to float rounding: its distance
    # transforms are not bit-reproducible from one call to the next)
    before_seg, after_seg = _leaves(plain["raw"]["segmentation"]), _leaves(staged["raw"]["segmentation"])
    assert before_seg.keys() == after_seg.keys()
    for key, value in before_seg.items():
        assert after_seg[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    before, after = _probs(plain_out / "per_image.csv"), _probs(staged_out / "per_image.csv")
    assert before.keys() == after.keys() and before
    changed = 0
    for name, p in before.items():
        np.testing.assert_allclose(after[name].sum(), 1.0, atol=1e-5)
        assert after[name][0] == pytest.approx(p[0], abs=1e-6)  # P(normal) is the network's
        changed += not np.allclose(after[name], p, atol=1e-6)
    assert changed > 0
    assert "crop stage" in (staged_out / "report.html").read_text()

    # a crop classifier that saw a test image is refused, naming the file
    leaky = tmp_path / "leaky.pt"
    model.trained_on.append(split["test"][0])
    save_crop_classifier(model, leaky)
    with pytest.raises(EvalError, match=r"leaky.pt: the crop classifier was trained on 1 of"):
        run_eval(tmp_path / "leak", [f"ckpt_path={ckpt}", f"crop_classifier={leaky}"])

    # predict: the same class rule on the test scans (as files) and new images; P(normal) untouched, masks untouched
    import shutil

    write_inputs(tmp_path / "in", {"a.png": ("L", (120, 90)), "b.png": ("RGB", (64, 80)), "c.png": ("L", (200, 150))})
    root = Path(json.loads((run / "metrics.json").read_text())["data_root"])
    for name in split["test"]:
        shutil.copy(root / name, tmp_path / "in" / name.replace("/", "_"))
    assert run_predict(ckpt, tmp_path / "in", tmp_path / "p0", "overlays=false").exit_code == 0
    assert run_predict(ckpt, tmp_path / "in", tmp_path / "p1", "overlays=false",
                       f"crop_classifier={crop_file}").exit_code == 0
    rows0, rows1 = read_rows(tmp_path / "p0"), read_rows(tmp_path / "p1")
    assert rows0.keys() == rows1.keys()
    moved = 0
    for file in rows0:
        p0 = np.array([float(rows0[file][f"prob_{c}"]) for c in CLASS_NAMES])
        p1 = np.array([float(rows1[file][f"prob_{c}"]) for c in CLASS_NAMES])
        assert p1[0] == pytest.approx(p0[0], abs=1e-4) and p1.sum() == pytest.approx(1.0, abs=1e-4)
        assert rows0[file]["lesion_area_px"] == rows1[file]["lesion_area_px"]
        moved += not np.allclose(p1, p0, atol=1e-6)
    assert moved > 0  # the crop classifier's view was used (a predict that ignored it passed before)
    with pytest.raises(ConfigError, match=r"nope.pt: crop classifier not found"):
        run_predict(ckpt, tmp_path / "in", tmp_path / "p2", f"crop_classifier={tmp_path / 'nope.pt'}")


def test_crop_cv_on_a_sweep(trained_run, tmp_path, caplog):  # noqa: F811
    ckpt, run_metrics = trained_run
    sweep = tmp_path / "sweep"
    _as_fold(ckpt, sweep)
    out = tmp_path / "cv"
    result = crop_cv(out, sweep, FAST_SETTINGS, progress=False)
    assert set(result["arms"]) == {"network", "two_stage"} and result["reference"] == "network"
    network = json.loads((out / "network" / "0" / "metrics.json").read_text())
    two = json.loads((out / "two_stage" / "0" / "metrics.json").read_text())
    for key in ("dice", "dice_per_image", "accuracy"):  # the network arm reproduces the run's test step
        assert network["metrics"][f"test/{key}"] == pytest.approx(run_metrics["metrics"][f"test/{key}"], abs=1e-5)
    assert two["metrics"]["test/dice"] == network["metrics"]["test/dice"]
    crop_file = out / "two_stage" / "0" / FILE_NAME
    assert crop_file.with_suffix(".png").is_file()
    stored = load_crop_classifier(crop_file)
    fit = json.loads((sweep / "0" / "metrics.json").read_text())["fit_seconds"]
    crop_seconds = torch.load(crop_file, weights_only=True)["fit_seconds"]
    assert two["fit_seconds"] == pytest.approx(fit + crop_seconds)
    assert two["checkpoints"] == [str(sweep / "0" / "checkpoints" / "last.ckpt"), str(crop_file)]
    # the two-stage probabilities are the combination rule applied to the network's
    p_net = _probs(out / "network" / "0" / "predictions.csv", "image")
    p_two = _probs(out / "two_stage" / "0" / "predictions.csv", "image")
    assert p_net.keys() == p_two.keys()
    for name in p_net:
        assert p_two[name][0] == pytest.approx(p_net[name][0], abs=1e-6)
    assert "Paired per-fold difference against `network`" in (out / "crop_cv.md").read_text()
    assert not set(stored.trained_on) & set(p_net)

    mtime = crop_file.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="busiseg.crop_stage"):
        again = crop_cv(out, sweep, FAST_SETTINGS, progress=False)
    assert "reusing" in caplog.text and crop_file.stat().st_mtime_ns == mtime
    assert again["arms"]["two_stage"]["mean"] == result["arms"]["two_stage"]["mean"]
    crop_cv(out, sweep, CropSettings(size=32, epochs=2, batch_size=8, seed=1), progress=False)
    assert crop_file.stat().st_mtime_ns != mtime  # other settings: trained again
    with pytest.raises(CropClassifierError, match=r"no run for fold\(s\) \[3\]"):
        crop_cv(out, sweep, FAST_SETTINGS, folds=[3], progress=False)


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "busiseg.crop_stage", "train", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"busiseg: error: {tmp_path / 'nope' / 'split.json'}: not found (RUN is a training " \
                                  "run dir: split.json, checkpoints/)"
    proc = subprocess.run([sys.executable, "-m", "busiseg.crop_stage", "cv", str(tmp_path / "o"), str(tmp_path),
                           "--size", "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "size=8 (at least 16 px)" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "split.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "busiseg.crop_stage", "train", str(tmp_path / "run"),
                           "--data-root", str(tmp_path), "--device", "gpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--device must be auto, cpu or cuda[:N], got 'gpu'" in proc.stderr


STAGE = ["crop_stage=default", "crop_stage.size=32", "crop_stage.epochs=2", "crop_stage.batch_size=8"]


def test_train_with_the_crop_stage_then_cv_summary(tmp_path):
    """crop_stage=default in busiseg.train: the classifier beside the run, test_two_stage/* equal to what
    busiseg.eval computes with that file, and cv_summary's two-stage headline and out-of-fold rows."""
    from busiseg.cv_summary import headline_rows, summarize
    from busiseg.train import train
    from tests.test_eval import TINY, _compose

    tiny = [o for o in TINY if not o.startswith("split.")]
    sweep = tmp_path / "sweep"
    for fold in (0, 1):
        train(_compose("train", [*tiny, *STAGE, "split=kfold", "split.k=2", f"split.fold={fold}", "test_ckpt=last"],
                       tmp_path, sweep / str(fold)))
    run = sweep / "0"
    metrics = json.loads((run / "metrics.json").read_text())
    stage = metrics["crop_stage"]
    assert stage["file"] == str(run / FILE_NAME) and (run / "crop_classifier.png").is_file()
    assert stage["settings"]["epochs"] == 2 and stage["settings"]["seed"] == 42  # the run's seed
    split = json.loads((run / "split.json").read_text())
    assert sorted(load_crop_classifier(run / FILE_NAME).trained_on) == sorted(
        n for n in split["train"] if not n.startswith("normal/"))
    m = metrics["metrics"]
    assert m["test_two_stage/dice"] == pytest.approx(m["test/dice"], abs=1e-5)  # the masks are the network's
    # the same numbers busiseg.eval gives with the file the run wrote
    staged, _ = run_eval(tmp_path / "eval", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                                             f"crop_classifier={run / FILE_NAME}"])
    for key in ("accuracy", "auroc_macro", "f1_macro", "recall_malignant"):
        assert staged["raw"]["as_training"][key] == pytest.approx(m[f"test_two_stage/{key}"], abs=1e-5), key
    # predictions_two_stage.csv: the validation fold is the test part, both labelled; P(normal) the network's
    plain, two = _probs(run / "predictions.csv", "image"), _probs(run / "predictions_two_stage.csv", "image")
    assert plain.keys() == two.keys() == set(split["val"])
    assert all(two[n][0] == pytest.approx(plain[n][0], abs=1e-5) for n in plain)

    summary = summarize(sweep)
    assert summary["oof_two_stage"]["images"] == summary["oof"]["images"] == len(split["val"]) + len(split["train"])
    rows = dict((name, mean) for name, mean, _ in headline_rows(summary))
    assert rows["test_two_stage/accuracy"] == pytest.approx(
        np.mean([json.loads((sweep / str(f) / "metrics.json").read_text())["metrics"]["test_two_stage/accuracy"]
                 for f in (0, 1)]))
    assert "cv_confusion_matrix_two_stage.png" in summary["figures"]
    text = (sweep / "cv_summary.md").read_text()
    assert "With the crop stage" in text and "The crop stage against the network alone, paired per fold" in text
    for f in (0, 1):  # the paired gain: two-stage minus network, fold by fold
        fm = json.loads((sweep / str(f) / "metrics.json").read_text())["metrics"]
        assert summary["two_stage_gain"]["accuracy"]["per_fold"][f] == pytest.approx(
            fm["test_two_stage/accuracy"] - fm["test/accuracy"])


def test_crop_stage_config_errors_name_the_key(tmp_path):
    from busiseg.train import ConfigError as TrainConfigError, train
    from tests.test_eval import TINY, _compose

    with pytest.raises(TrainConfigError, match=r"crop_stage: crop classifier settings out of range: epochs=0"):
        train(_compose("train", [*TINY, *STAGE, "crop_stage.epochs=0"], tmp_path, tmp_path / "a"))
    with pytest.raises(TrainConfigError, match=r"crop_stage.depth is not a crop-stage setting"):
        train(_compose("train", [*TINY, *STAGE, "+crop_stage.depth=3"], tmp_path, tmp_path / "b"))
    assert not (tmp_path / "a" / "checkpoints").exists()  # refused before any training


def test_normal_boxes_train_none_on_the_network_peak_and_join_p_normal(trained_run, tmp_path):  # noqa: F811
    """``--normal-boxes N``: "none" learnt on N crops of each normal training image, the first around the run's
    network's peak region on it; eval then joins P(normal) with the crop's P(none) (combine_none_probs)."""
    from busiseg.crop_stage import StageNetwork, run_network_view, training_crops, training_records
    from busiseg.data.crops import peak_box
    from busiseg.inference import predict_probs, prepare_image, restore_size
    from busiseg.data.busi import load_record
    from busiseg.models.crop_classifier import NONE_CLASSES

    ckpt, _ = trained_run
    ckpt = _copy_run(ckpt, tmp_path / "run")
    run = ckpt.parent.parent
    settings = CropSettings(size=32, epochs=2, batch_size=8, normal_boxes=2)
    network = run_network_view(run, ckpt.name, settings)
    assert isinstance(network, StageNetwork) and run_network_view(run, ckpt.name, FAST_SETTINGS) is None
    from busiseg.crop_stage import run_data_root
    records = training_records(run_data_root(run, ckpt.name), run / "split.json")
    normals = [r for r in records if r.label == 0]
    assert normals and len(normals) < len(records)
    images, boxes, labels, names = training_crops(records, settings, network)
    assert len(labels) == len(records) + len(normals)  # one box per lesion image, two per normal one
    assert [names.count(r.name) for r in records] == [2 if r.label == 0 else 1 for r in records]  # split order
    assert set(labels) == {0, 1, 2} and all(lab == r.label for r, lab in zip(
        [next(r for r in records if r.name == n) for n in names], labels))
    # the first box of a normal image is the network's peak region on it
    first = names.index(normals[0].name)
    image = load_record(normals[0])[0]
    with torch.no_grad():
        mask_p, _ = predict_probs(network.net.float().eval(), prepare_image(image, network.image_size)[None])
    assert boxes[first] == pytest.approx(peak_box(restore_size(mask_p[0, 0].numpy(), image.shape[:2])), abs=1.0)
    with pytest.raises(CropClassifierError, match="normal_boxes=2 reads the run's network"):
        training_crops(records, settings, None)

    assert main(["train", str(run), "--checkpoint", ckpt.name, *FAST, "--normal-boxes", "2"]) == 0
    model = load_crop_classifier(run / FILE_NAME)
    assert model.classes == NONE_CLASSES and model.settings.normal_boxes == 2
    split = json.loads((run / "split.json").read_text())
    assert sorted(model.trained_on) == sorted(split["train"])  # the normal images too
    plain, plain_out = run_eval(tmp_path / "plain", [f"ckpt_path={ckpt}"])
    _, staged_out = run_eval(tmp_path / "staged", [f"ckpt_path={ckpt}", f"crop_classifier={run / FILE_NAME}"])
    before, after = _probs(plain_out / "per_image.csv"), _probs(staged_out / "per_image.csv")
    assert before.keys() == after.keys() and before
    moved = [n for n in before if abs(after[n][0] - before[n][0]) > 1e-6]
    assert moved  # P(normal) is no longer the network's alone where a mask is drawn
    for name in before:
        np.testing.assert_allclose(after[name].sum(), 1.0, atol=1e-5)
