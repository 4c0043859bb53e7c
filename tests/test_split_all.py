"""``split=all``: the model to keep once cross-validation has measured the recipe. Every image trains, with the
three second stages; nothing is scored, no callback waits for a validation score, and busiseg.eval scores the whole
pipeline on a folder of images it never saw (the held-back check), but not on the run's own images."""

from __future__ import annotations

import json
import logging
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from busiseg.data.busi import scan_busi
from busiseg.data.synthetic import ensure_phantom
from busiseg.evaluation.runner import EvalError
from busiseg.models.crop_classifier import load_crop_classifier
from busiseg.models.mask_refiner import load_mask_refiner
from busiseg.models.scan_classifier import load_scan_classifier
from busiseg.train import ConfigError, build_trainer, check_config, train
from tests.test_eval import TINY, _compose, run_eval
from tests.test_refine_stage import REFINE
from tests.test_scan_stage import CROP, SCAN

TINY_ALL = [o for o in TINY if not o.startswith("split.") and o != "callbacks.early_stopping=null"]
STAGE_FILES = ("mask_refiner", "crop_classifier", "scan_classifier")


@contextmanager
def _said():
    """The messages busiseg.train logs (at INFO and above) inside the block."""
    lines, logger = [], logging.getLogger("busiseg.train")

    class Handler(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, level = Handler(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def all_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("all")
    with _said() as said:
        # the default callbacks, early stopping and the best checkpoint by val/dice included: split=all turns them off
        summary = train(_compose("train", [*TINY_ALL, "split=all", "test_ckpt=last", *REFINE, *CROP, *SCAN], root,
                                 root / "run"))
    return root, root / "run", {**summary, "said": said}


def test_every_image_trains_and_nothing_is_scored(all_run):
    root, run, summary = all_run
    split = json.loads((run / "split.json").read_text())
    images = sorted(r.name for r in scan_busi(summary["data_root"]))
    assert sorted(split["train"]) == images and split["val"] == split["test"] == []
    metrics = json.loads((run / "metrics.json").read_text())
    assert not [k for k in metrics["metrics"] if not k.startswith("train/")]  # no val/, test/ or stage scores
    assert metrics["best_checkpoint"] is None and metrics["tested_checkpoint"] is None
    assert metrics["epochs_trained"] == 1
    # no best-by-val/dice checkpoint, no early stop; last.ckpt holds the weights the fit ended with
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert not list(run.glob("predictions*.csv"))
    # the second stages trained on every image they learn from
    lesions = sorted(n for n in images if not n.startswith("normal/"))
    assert sorted(load_mask_refiner(run / "mask_refiner.pt").trained_on) == lesions
    assert sorted(load_crop_classifier(run / "crop_classifier.pt").trained_on) == lesions
    assert sorted(load_scan_classifier(run / "scan_classifier.pt").trained_on) == images
    assert all(metrics[f"{s}"]["file"] for s in ("refine_stage", "crop_stage", "scan_stage"))
    said = "\n".join(summary["said"])
    assert "split.val_fraction=0 leaves no validation images: callbacks model_checkpoint, early_stopping " \
           "(watching val/dice) are off" in said
    assert "no test part (split.test_fraction=0): nothing is scored" in said


def _held_back(folder, seed=7):
    """A phantom of other images in the BUSI layout, numbered from 1001 (names the run never trained on)."""
    ensure_phantom(folder, seed=seed, n_per_class={"benign": 4, "malignant": 4, "normal": 3}, min_size=96,
                   max_size=128)
    for path in sorted(folder.rglob("*.png")):
        path.rename(path.with_name(re.sub(r"\((\d+)\)", lambda m: f"({int(m.group(1)) + 1000})", path.name)))
    return folder


def test_eval_scores_the_whole_pipeline_on_held_back_images(all_run, tmp_path):
    root, run, _ = all_run
    held = _held_back(tmp_path / "held_back")
    files = [f"{s}={run / (s + '.pt')}" for s in STAGE_FILES]
    metrics, out = run_eval(tmp_path / "e", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"data.root={held}",
                                             "part=all", *files])
    assert metrics["counts"]["images"] == 11
    assert all(metrics[s] == str(run / (s + ".pt")) for s in STAGE_FILES)
    assert (out / "per_image.csv").read_text().count("(10") == 11  # every held-back image, scored once
    copies = metrics["copies_of_training"]
    assert copies["checked"] and copies["training_images"] == 22 and copies["images"] == []


def test_eval_names_held_back_images_that_are_copies_of_training_images(all_run, tmp_path):
    root, run, summary = all_run
    held = _held_back(tmp_path / "held_back")
    # one training scan slipped into the held-back folder under another name, re-encoded as RGB
    trained = Path(summary["data_root"]) / "malignant" / "malignant (3).png"
    Image.open(trained).convert("RGB").save(held / "malignant" / "malignant (2000).png")
    shutil.copy(trained.with_name("malignant (3)_mask.png"), held / "malignant" / "malignant (2000)_mask.png")
    ckpt = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    metrics, out = run_eval(tmp_path / "e", [ckpt, f"data.root={held}", "part=all"])
    assert metrics["copies_of_training"]["images"] == [{"image": "malignant/malignant (2000).png",
                                                        "training_images": ["malignant/malignant (3).png"]}]
    assert "1 evaluated image(s) are copies of training images" in (out / "report.html").read_text()
    assert metrics["counts"]["images"] == 12  # named, and scored with the others
    # ... or left out of every score
    kept, out = run_eval(tmp_path / "x", [ckpt, f"data.root={held}", "part=all", "copies_check=exclude"])
    assert kept["copies_of_training"]["excluded"] and kept["copies_of_training"]["images"] == \
        metrics["copies_of_training"]["images"]
    assert kept["counts"]["images"] == 11 and "malignant (2000)" not in (out / "per_image.csv").read_text()
    assert "left out of every score here (copies_check=exclude)" in (out / "report.html").read_text()
    for off in ("off", "false"):
        assert run_eval(tmp_path / off, [ckpt, f"data.root={held}", "part=all", f"copies_check={off}"]
                        )[0]["copies_of_training"] is None
    with pytest.raises(EvalError, match=r"copies_check=drop is not one of report, exclude, off"):
        run_eval(tmp_path / "bad", [ckpt, f"data.root={held}", "part=all", "copies_check=drop"])


def test_a_checkpoint_away_from_its_run_is_checked_with_the_training_images_it_stores(all_run, tmp_path, caplog):
    root, run, summary = all_run
    held = _held_back(tmp_path / "held_back")
    trained = Path(summary["data_root"]) / "benign" / "benign (3).png"
    shutil.copy(trained, held / "benign" / "benign (2000).png")
    shutil.copy(trained.with_name("benign (3)_mask.png"), held / "benign" / "benign (2000)_mask.png")
    lone = tmp_path / "lone" / "model.ckpt"  # no split.json beside it or above it
    lone.parent.mkdir()
    shutil.copy(run / "checkpoints" / "last.ckpt", lone)
    with caplog.at_level("INFO", logger="busiseg.evaluation.copies"):
        metrics, _ = run_eval(tmp_path / "e", [f"ckpt_path={lone}", f"data.root={held}", "part=all"])
    copies = metrics["copies_of_training"]
    assert copies["checked"] and copies["training_images"] == 22
    assert copies["images"] == [{"image": "benign/benign (2000).png", "training_images": ["benign/benign (3).png"]}]
    assert "the 22 training images it stores are compared" in caplog.text


def test_eval_refuses_the_runs_own_images(all_run, tmp_path):
    _, run, _ = all_run
    ckpt = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    with pytest.raises(EvalError, match=r"part 'test' holds no images: the run trained on every image \(split=all\)"):
        run_eval(tmp_path / "a", [ckpt])
    with pytest.raises(EvalError, match=r"the scan classifier was trained on 22 of the 22 images evaluated"):
        run_eval(tmp_path / "b", [ckpt, "part=all", f"scan_classifier={run / 'scan_classifier.pt'}"])


def test_no_validation_part_refuses_test_ckpt_best_before_training(tmp_path):
    # a test part but no validation part: "best" would have nothing to be best by
    cfg = _compose("train", [*TINY_ALL, "split.val_fraction=0"], tmp_path, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"test_ckpt=best .* split.val_fraction=0 leaves no validation images: "
                                          r"set test_ckpt=last"):
        check_config(cfg)
    check_config(_compose("train", [*TINY_ALL, "split.val_fraction=0", "test_ckpt=last"], tmp_path, tmp_path / "r"))
    check_config(_compose("train", [*TINY_ALL, "split=all"], tmp_path, tmp_path / "r2"))  # nothing to test


def test_one_callback_left_out_is_named_and_no_validation_loop_runs(tmp_path):
    with _said() as said:
        trainer = build_trainer(_compose("train", [*TINY_ALL, "split=all", "callbacks.early_stopping=null"], tmp_path,
                                         tmp_path / "run"), [])
    assert any("callback model_checkpoint (watching val/dice) is off" in line for line in said)
    assert trainer.limit_val_batches == 0 and trainer.checkpoint_callback.monitor is None  # last.ckpt's only
