"""The refine stage end to end on a tiny phantom sweep: trained inside busiseg.train after the fit (with the crop
stage reading its masks), the same numbers from busiseg.eval with its file, predict with it, cv_summary's
refined headline; the runner's hook; and its refusals."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from busiseg.evaluation.runner import run_network
from busiseg.inference import InferenceOptions
from busiseg.models.mask_refiner import MaskRefiner, RefinerSettings, load_mask_refiner
from busiseg.refine_stage import FILE_NAME, stage_seed
from tests.test_eval import TINY, _compose, run_eval

REFINE = ["refine_stage=default", "refine_stage.size=32", "refine_stage.epochs=2", "refine_stage.batch_size=8",
          "refine_stage.decoder_channels=[32,16,16,8,8]"]
CROP = ["crop_stage=default", "crop_stage.size=32", "crop_stage.epochs=2", "crop_stage.batch_size=8"]


def _dice_rows(path):
    with open(path, newline="") as fh:
        return {r["image"]: float(r["dice"]) for r in csv.DictReader(fh) if r["part"] == "test"}


@pytest.fixture(scope="module")
def refined_sweep(tmp_path_factory):
    from busiseg.train import train

    root = tmp_path_factory.mktemp("refine")
    tiny = [o for o in TINY if not o.startswith("split.")]
    sweep = root / "sweep"
    for fold in (0, 1):
        train(_compose("train", [*tiny, *REFINE, *CROP, "split=kfold", "split.k=2", f"split.fold={fold}",
                                 "test_ckpt=last"], root, sweep / str(fold)))
    return root, sweep


def test_train_with_the_refine_stage(refined_sweep, tmp_path):
    root, sweep = refined_sweep
    run = sweep / "1"
    metrics = json.loads((run / "metrics.json").read_text())
    stage = metrics["refine_stage"]
    assert stage["file"] == str(run / FILE_NAME) and (run / "mask_refiner.png").is_file()
    assert stage["settings"]["epochs"] == 2 and stage["settings"]["seed"] == 42 + 1  # the run's seed + its fold
    split = json.loads((run / "split.json").read_text())
    refiner = load_mask_refiner(run / FILE_NAME)
    assert refiner.trained_on == [n for n in split["train"] if not n.startswith("normal/")]
    m = metrics["metrics"]
    assert {"test_refined/dice", "test_refined/accuracy", "test_two_stage/dice"} <= set(m)
    assert m["test_refined/accuracy"] == pytest.approx(m["test/accuracy"])  # the classes are the network's
    assert m["test_two_stage/dice"] == pytest.approx(m["test_refined/dice"], abs=1e-6)  # crops read refined masks
    # busiseg.eval with the file the run wrote gives the same numbers
    ckpt = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    refined, _ = run_eval(tmp_path / "a", [ckpt, f"mask_refiner={run / FILE_NAME}"])
    # the refiner alone is not the run's set of stages (it had the crop stage too): nothing of its own to check
    assert refined["mask_refiner"] == str(run / FILE_NAME) and "training_check" not in refined
    for key in ("dice", "iou", "dice_per_image", "accuracy"):
        assert refined["raw"]["as_training"][key] == pytest.approx(m[f"test_refined/{key}"], abs=1e-5), key
    both, _ = run_eval(tmp_path / "b", [ckpt, f"mask_refiner={run / FILE_NAME}",
                                        f"crop_classifier={run / 'crop_classifier.pt'}"])
    assert both["raw"]["as_training"]["accuracy"] == pytest.approx(m["test_two_stage/accuracy"], abs=1e-5)
    check = both["training_check"]  # the run's own stages: checked against its test_two_stage/* metrics
    assert check["prefix"] == "test_two_stage" and check["max_abs_diff"] <= 1e-5, check
    # predictions_refined.csv: one row per validation-fold image, labelled val and test
    assert _dice_rows(run / "predictions_refined.csv").keys() == set(split["val"])


def test_cv_summary_sets_the_refined_masks_beside_the_network(refined_sweep):
    from busiseg.cv_summary import headline_table, summarize

    _, sweep = refined_sweep
    summary = summarize(sweep)
    gain = summary["refined_gain"]["dice_per_image_lesion"]
    for f in (0, 1):
        plain = _dice_rows(sweep / str(f) / "predictions.csv")
        refined = _dice_rows(sweep / str(f) / "predictions_refined.csv")
        lesion = [n for n in plain if not n.startswith("normal/")]
        assert gain["per_fold"][f] == pytest.approx(np.mean([refined[n] - plain[n] for n in lesion]))
    table = headline_table(summary)
    assert table[0][:4] == ("metric", "network (`test/*`)", "with the refine stage (`test_refined/*`)",
                            "with the crop stage (`test_two_stage/*`)")
    rows = {row[0]: row for row in table[1:]}
    assert rows["dice_per_image_lesion"][2].startswith(f"{summary['mean']['test_refined/dice_per_image_lesion']:.4f}")
    assert rows["accuracy"][2] == "" and rows["accuracy"][3]  # the refine stage does not change the classes
    text = (sweep / "cv_summary.md").read_text()
    assert "The refine stage against the network alone, paired per fold" in text


class _Eraser(MaskRefiner):
    """A refiner that draws nothing inside its crops (which cover the whole scan)."""

    def crop_probs(self, grey, box, autocast=None):
        return np.zeros(grey.shape, np.float32), np.ones(grey.shape, np.float32)


def test_the_runner_scores_the_refined_masks(refined_sweep):
    """With a refiner that erases every drawn mask, every score at both sizes is the erased mask's."""
    from busiseg.evaluation.runner import resolve_inputs

    _, sweep = refined_sweep
    inputs = resolve_inputs({"ckpt_path": str(sweep / "0" / "checkpoints" / "last.ckpt"), "part": "test", "data": {}})
    args = (inputs.net, inputs.records, inputs.image_size, inputs.in_channels, inputs.batch_size, InferenceOptions())
    plain = run_network(*args, progress=False)
    erased = run_network(*args, progress=False, mask_refiner=_Eraser(RefinerSettings(size=32)))
    drawn = plain.scores[("raw", "original")].pred_area > 0
    assert drawn.any()
    assert (erased.scores[("raw", "original")].pred_area == 0).all()
    assert (erased.scores[("raw", "preprocessed")].pred_area == 0).all()
    assert not any(erased.final_mask(i).any() for i in range(len(erased.names)))
    assert np.array_equal(erased.probs["raw"], plain.probs["raw"])  # the classes are untouched


def test_eval_reads_beyond_the_crops_as_told(refined_sweep, tmp_path):
    """mask_refiner_outside overrides the file's refine_stage.outside: erase never draws more than keep does,
    and a bad value is refused naming the key."""
    from busiseg.evaluation.runner import EvalError

    _, sweep = refined_sweep
    run = sweep / "1"
    args = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"mask_refiner={run / FILE_NAME}"]
    kept, kept_dir = run_eval(tmp_path / "keep", args)
    erased, erased_dir = run_eval(tmp_path / "erase", [*args, "mask_refiner_outside=erase"])
    assert kept["mask_refiner_outside"] == "keep" and erased["mask_refiner_outside"] == "erase"
    with open(kept_dir / "per_image.csv", newline="") as a, open(erased_dir / "per_image.csv", newline="") as b:
        area = [(float(r["pred_area_px"]), float(q["pred_area_px"])) for r, q in zip(csv.DictReader(a), csv.DictReader(b))]
    assert any(k > 0 for k, _ in area) and all(e <= k + 1e-9 for k, e in area)
    with pytest.raises(EvalError, match="mask_refiner_outside='drop'"):
        run_eval(tmp_path / "bad", [*args, "mask_refiner_outside=drop"])
    with pytest.raises(EvalError, match="mask_refiner_outside=erase without mask_refiner="):
        run_eval(tmp_path / "alone", [args[0], "mask_refiner_outside=erase"])


def test_predict_with_the_mask_refiner(refined_sweep, tmp_path):
    import shutil

    from tests.test_predict import read_rows, run_predict

    _, sweep = refined_sweep
    run = sweep / "0"
    # the fold's test scans (phantom lesions the network draws, so the refiner has crops to re-draw)
    root = Path(json.loads((run / "metrics.json").read_text())["data_root"])
    (tmp_path / "in").mkdir()
    for name in json.loads((run / "split.json").read_text())["test"]:
        if not name.startswith("normal/"):
            shutil.copy(root / name, tmp_path / "in" / name.replace("/", "_"))
    ckpt = run / "checkpoints" / "last.ckpt"
    plain = run_predict(ckpt, tmp_path / "in", tmp_path / "plain")
    summary = run_predict(ckpt, tmp_path / "in", tmp_path / "out", f"mask_refiner='{run / FILE_NAME}'")
    assert summary.failed == [] and summary.exit_code == 0
    erased = run_predict(ckpt, tmp_path / "in", tmp_path / "erased", f"mask_refiner='{run / FILE_NAME}'",
                         "mask_refiner_outside=erase")
    assert erased.failed == [] and erased.exit_code == 0 and plain.exit_code == 0
    area = {d: {n: int(r["lesion_area_px"]) for n, r in read_rows(tmp_path / d).items()}
            for d in ("plain", "out", "erased")}
    assert area["plain"].keys() == area["out"].keys() == area["erased"].keys() and any(area["plain"].values())
    # the refiner re-drew masks (a predictor that loaded it and never used it passed before)
    assert any(area["out"][n] != area["plain"][n] for n in area["plain"]), area
    assert all(area["erased"][n] <= area["out"][n] for n in area["out"])  # erase never draws more than keep
    (tmp_path / "bad.pt").write_bytes(b"not a file")
    from busiseg.predict import ConfigError

    with pytest.raises(ConfigError, match="mask_refiner_outside='drop'"):
        run_predict(ckpt, tmp_path / "in", tmp_path / "bad_outside", f"mask_refiner='{run / FILE_NAME}'",
                    "mask_refiner_outside=drop")

    with pytest.raises(ConfigError, match="bad.pt"):
        run_predict(ckpt, tmp_path / "in", tmp_path / "out2", f"mask_refiner='{tmp_path / 'bad.pt'}'")


def test_eval_refuses_a_refiner_trained_on_the_evaluated_images(refined_sweep, tmp_path):
    from busiseg.evaluation.runner import EvalError

    _, sweep = refined_sweep
    # fold 1's refiner trained on fold 0's validation images
    with pytest.raises(EvalError, match="mask refiner"):
        run_eval(tmp_path, [f"ckpt_path={sweep / '0' / 'checkpoints' / 'last.ckpt'}",
                            f"mask_refiner={sweep / '1' / FILE_NAME}"])


def test_refine_stage_config_errors_name_the_key(tmp_path):
    from busiseg.train import ConfigError, train

    with pytest.raises(ConfigError, match=r"refine_stage: mask refiner settings out of range: .*blend='max'"):
        train(_compose("train", [*TINY, *REFINE, "refine_stage.blend=max"], tmp_path, tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"refine_stage: mask refiner settings out of range: .*outside='drop'"):
        train(_compose("train", [*TINY, *REFINE, "refine_stage.outside=drop"], tmp_path, tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"refine_stage.depth is not a refine-stage setting"):
        train(_compose("train", [*TINY, *REFINE, "+refine_stage.depth=3"], tmp_path, tmp_path / "b"))
    assert not (tmp_path / "a" / "checkpoints").exists()  # refused before any training


def test_stage_seed_and_the_cli_refusals(tmp_path):
    assert stage_seed(42, {"fold": 3, "k": 5}) == 45 and stage_seed(7, {"name": "holdout"}) == 7
    (tmp_path / "run").mkdir()
    proc = subprocess.run([sys.executable, "-m", "busiseg.refine_stage", "train", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "split.json: not found" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "run" / "split.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "busiseg.refine_stage", "train", str(tmp_path / "run"), "--seed", "0",
                           "--data-root", str(tmp_path), "--device", "gpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--device must be auto, cpu or cuda[:N], got 'gpu'" in proc.stderr
