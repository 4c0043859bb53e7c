"""busiseg.predict: every input mode, sizes restored, folders mirrored, bad files skipped, no path escape."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from busiseg.checkpoint import CheckpointError
from busiseg.models.net import MultiTaskUnet
from busiseg.onnx_predictor import (CSV_NAME, InputError, UnsafeOutputPath, find_images, output_base,
                                    safe_output_path)
from busiseg.predict import ConfigError, predict

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")

TINY_MODEL = {
    "_target_": "busiseg.models.net.MultiTaskUnet",
    "encoder_name": "resnet18",
    "encoder_weights": None,
    "in_channels": 1,
    "decoder_channels": [16, 16, 8, 8, 8],
}


def make_tiny_checkpoint(path: Path, image_size: int = 64, arch: str = "unet", class_pooling: str = "avg",
                         decoder_attention: str | None = None) -> Path:
    """A busiseg checkpoint without training: random weights, class head made non-uniform."""
    torch.manual_seed(0)
    # scse needs 16 decoder channels or more
    decoder_channels = [16] * 5 if decoder_attention else list(TINY_MODEL["decoder_channels"])
    net = MultiTaskUnet(encoder_name="resnet18", decoder_channels=decoder_channels, arch=arch,
                        class_pooling=class_pooling, decoder_attention=decoder_attention)
    head = [m for m in net.unet.classification_head.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(head.weight, std=0.05)  # the real head starts at zero: every class 1/3
    torch.nn.init.normal_(head.bias, std=0.5)
    config = {"model": {**TINY_MODEL, "arch": arch, "class_pooling": class_pooling,
                        "decoder_channels": decoder_channels, "decoder_attention": decoder_attention},
              "data": {"image_size": image_size, "in_channels": 1}}
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"config": config}}, path)
    return path


_CKPT: list[Path] = []


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """One tiny checkpoint per session (cached: the export and ONNX tests import this fixture)."""
    if not _CKPT:
        _CKPT.append(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"))
    return _CKPT[0]


def grey_pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A bright blob on a darker textured background, so masks are neither empty nor full."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = ((xx - width * 0.4) / (width * 0.25)) ** 2 + ((yy - height * 0.5) / (height * 0.3)) ** 2 < 1
    return np.clip(60 + 120 * blob + rng.normal(0, 20, (height, width)), 0, 255).astype(np.uint8)


def _save(grey: np.ndarray, path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    else:
        Image.fromarray(grey, "L").convert(mode).save(path)


# name -> (PIL mode to save in, (width, height)); every suffix and every kind of pixel
INPUT_MODES = {
    "grey.png": ("L", (70, 50)),
    "colour/rgb.png": ("RGB", (33, 47)),
    "colour/rgba.png": ("RGBA", (128, 64)),
    "colour/palette.png": ("P", (61, 90)),
    "deep/16bit.png": ("I;16", (45, 45)),
    "deep/nested/16bit.tif": ("I;16", (80, 31)),
    "photo.jpg": ("RGB", (101, 77)),
    "dark.jpeg": ("L", (64, 64)),
    "bitmap.bmp": ("RGB", (55, 40)),
    "deep/nested/scan.tiff": ("RGB", (300, 200)),
    "binary.png": ("1", (40, 52)),
}


def write_inputs(root: Path, names=INPUT_MODES) -> dict[str, tuple[int, int]]:
    for i, (name, (mode, (w, h))) in enumerate(names.items()):
        _save(grey_pattern(w, h, i), root / name, mode)
    return {name: size for name, (_, size) in names.items()}


def run_predict(ckpt: Path, input_path: Path, output: Path, *overrides: str):
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("predict", overrides=[f"ckpt_path='{ckpt}'", f"input='{input_path}'", f"output='{output}'",
                                            "progress=false", "device=cpu", *overrides])
    return predict(cfg)


def read_rows(output: Path) -> dict[str, dict[str, str]]:
    with open(output / CSV_NAME, newline="") as fh:
        return {row["file"]: row for row in csv.DictReader(fh)}


def test_a_tiny_image_is_predicted_with_a_warning(tiny_ckpt, tmp_path, caplog):
    write_inputs(tmp_path / "in", {"dot.png": ("L", (1, 1)), "scan.png": ("L", (80, 60))})
    with caplog.at_level("WARNING", logger="busiseg.predict"):
        summary = run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "out", "overlays=false")
    assert summary.exit_code == 0 and set(read_rows(tmp_path / "out")) == {"dot.png", "scan.png"}
    assert "dot.png: 1x1 px, far smaller than an ultrasound scan" in caplog.text and "scan.png: " not in caplog.text


def test_every_input_mode_restored_to_its_size_and_mirrored(tiny_ckpt, tmp_path):
    sizes = write_inputs(tmp_path / "in")
    summary = run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "out", "batch_size=4")
    assert summary.failed == [] and summary.exit_code == 0
    rows = read_rows(tmp_path / "out")
    assert set(rows) == set(sizes)
    for name, (w, h) in sizes.items():
        stem = name.rsplit(".", 1)[0]
        mask = Image.open(tmp_path / "out" / f"{stem}_pred_mask.png")
        assert mask.mode == "L" and mask.size == (w, h), name
        values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= {0, 255}, name
        overlay = Image.open(tmp_path / "out" / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.width >= w and overlay.height > h
        row = rows[name]
        assert (int(row["width"]), int(row["height"])) == (w, h)
        assert int(row["lesion_area_px"]) == int((np.asarray(mask) > 0).sum())
        assert row["pred_class"] in ("normal", "benign", "malignant")
        probs = [float(row[f"prob_{c}"]) for c in ("normal", "benign", "malignant")]
        assert abs(sum(probs) - 1) < 1e-3
        assert row["pred_class"] == ("normal", "benign", "malignant")[int(np.argmax(probs))]
        if int(row["lesion_area_px"]):
            ys, xs = np.nonzero(np.asarray(mask))
            assert [int(row[k]) for k in ("bbox_x_min", "bbox_y_min", "bbox_x_max", "bbox_y_max")] == \
                [xs.min(), ys.min(), xs.max(), ys.max()]
    # no temp files left behind by the atomic writes
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


def test_single_file_input(tiny_ckpt, tmp_path):
    write_inputs(tmp_path, {"one.png": ("L", (90, 60))})
    summary = run_predict(tiny_ckpt, tmp_path / "one.png", tmp_path / "out")
    assert summary.exit_code == 0
    assert Image.open(tmp_path / "out" / "one_pred_mask.png").size == (90, 60)


def test_unreadable_files_skipped_and_named(tiny_ckpt, tmp_path, caplog):
    write_inputs(tmp_path / "in", {"good.png": ("L", (40, 40)), "sub/good2.png": ("RGB", (50, 30))})
    (tmp_path / "in" / "garbage.png").write_bytes(b"not an image")
    whole = (tmp_path / "in" / "good.png").read_bytes()
    Image.fromarray(grey_pattern(200, 200)).save(tmp_path / "in" / "truncated.jpg")
    data = (tmp_path / "in" / "truncated.jpg").read_bytes()
    (tmp_path / "in" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "in" / "notes.txt").write_text("not an image suffix: ignored, not failed")
    with caplog.at_level("WARNING", logger="busiseg.predict"):
        summary = run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "out", "batch_size=2")
    assert "1 file(s) under" in caplog.text and "are not images" in caplog.text and "e.g. notes.txt" in caplog.text
    failed = {Path(p).name for p, _ in summary.failed}
    assert failed == {"garbage.png", "truncated.jpg"}
    assert summary.exit_code == 1
    assert set(read_rows(tmp_path / "out")) == {"good.png", "sub/good2.png"}
    assert "garbage.png" in summary.report() and "FAILED 2" in summary.report()
    assert (tmp_path / "in" / "good.png").read_bytes() == whole  # inputs untouched


def test_busi_layout_masks_skipped_by_default(tiny_ckpt, tiny_busi, tmp_path):
    summary = run_predict(tiny_ckpt, tiny_busi, tmp_path / "out")
    assert len(summary.rows) == 12 and summary.skipped_masks == 12
    assert (tmp_path / "out" / "benign" / "benign (2)_pred_mask.png").is_file()
    assert "benign/benign (2).png" in read_rows(tmp_path / "out")
    everything = run_predict(tiny_ckpt, tiny_busi, tmp_path / "all", "skip_masks=false")
    assert len(everything.rows) == 24 and everything.skipped_masks == 0


def test_lone_mask_names_kept_in_auto_mode(tmp_path):
    write_inputs(tmp_path, {"x_mask.png": ("L", (32, 32)), "y.png": ("L", (32, 32)), "y_mask_1.png": ("L", (32, 32))})
    images, skipped = find_images(tmp_path, "auto")
    assert [i.name.as_posix() for i in images] == ["x_mask.png", "y.png"]
    assert [p.name for p in skipped] == ["y_mask_1.png"]
    assert len(find_images(tmp_path, True)[0]) == 1


def test_output_inside_input_is_not_predicted_again(tiny_ckpt, tmp_path):
    write_inputs(tmp_path / "in", {"a.png": ("L", (40, 40)), "b/c.png": ("L", (40, 40))})
    first = run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "in" / "preds")
    second = run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "in" / "preds")
    assert len(first.rows) == len(second.rows) == 2


def test_an_earlier_prediction_folder_inside_the_input_is_not_read_as_scans(tiny_ckpt, tmp_path, caplog):
    write_inputs(tmp_path / "in", {"a.png": ("L", (40, 40)), "b/c.png": ("L", (40, 40))})
    run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "in" / "out")
    (tmp_path / "in" / "notes").mkdir()  # a folder with a predictions.csv of another kind is read
    (tmp_path / "in" / "notes" / "predictions.csv").write_text("patient,diagnosis\n")
    write_inputs(tmp_path / "in" / "notes", {"d.png": ("L", (40, 40))})
    with caplog.at_level("WARNING", logger="busiseg.predict"):
        second = run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "in" / "out2")
    assert sorted(r["file"] for r in second.rows) == ["a.png", "b/c.png", "notes/d.png"]
    assert f"{tmp_path / 'in' / 'out'}: skipped, an earlier prediction folder" in caplog.text


def test_a_prediction_folder_from_before_the_pred_class_column_is_still_recognised(tmp_path):
    from busiseg.onnx_predictor import _earlier_predictions

    header = "file,class,prob_normal,prob_benign,prob_malignant,lesion_area_px,width,height,mask,overlay\n"
    (tmp_path / "predictions.csv").write_text(header)
    assert _earlier_predictions(tmp_path, ["predictions.csv"])
    (tmp_path / "predictions.csv").write_text(header.replace("file,class", "file,pred_class"))
    assert _earlier_predictions(tmp_path, ["predictions.csv"])
    (tmp_path / "predictions.csv").write_text("patient,diagnosis\n")
    assert not _earlier_predictions(tmp_path, ["predictions.csv"])


def test_same_stem_different_suffix_do_not_overwrite(tiny_ckpt, tmp_path):
    write_inputs(tmp_path / "in", {"a.png": ("L", (40, 40)), "a.jpg": ("L", (48, 40)), "b.png": ("L", (40, 40))})
    summary = run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "out", "overlays=false")
    assert summary.exit_code == 0
    assert Image.open(tmp_path / "out" / "a.png_pred_mask.png").size == (40, 40)
    assert Image.open(tmp_path / "out" / "a.jpg_pred_mask.png").size == (48, 40)
    assert (tmp_path / "out" / "b_pred_mask.png").is_file()
    assert not list((tmp_path / "out").glob("*_overlay.png"))


def test_output_names_cannot_escape(tmp_path):
    from pathlib import PurePosixPath as P

    for bad in ("../evil.png", "/etc/evil.png", "a/../../evil.png", "./.."):
        with pytest.raises(UnsafeOutputPath):
            safe_output_path(tmp_path, output_base(P(bad)))
    assert output_base(P("benign/benign (3).png")) == P("benign/benign (3)")
    assert safe_output_path(tmp_path, P("a/b_pred_mask.png")) == tmp_path.resolve() / "a" / "b_pred_mask.png"


def test_symlink_in_output_cannot_lead_outside(tiny_ckpt, tmp_path):
    write_inputs(tmp_path / "in", {"evil/x.png": ("L", (40, 40)), "fine.png": ("L", (40, 40))})
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    os.symlink(outside, tmp_path / "out" / "evil")
    summary = run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "out")
    assert [Path(p).name for p, _ in summary.failed] == ["x.png"]
    assert "outside the output folder" in summary.failed[0][1]
    assert list(outside.iterdir()) == []
    assert set(read_rows(tmp_path / "out")) == {"fine.png"}


def test_inference_group_applies(tiny_ckpt, tmp_path):
    write_inputs(tmp_path / "in", {"a.png": ("L", (120, 90)), "b.png": ("RGB", (64, 80))})
    plain = run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "plain", "overlays=false")
    refined = run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "refined", "inference=refined", "overlays=false")
    assert plain.exit_code == refined.exit_code == 0
    for name in ("a", "b"):
        mask = np.asarray(Image.open(tmp_path / "refined" / f"{name}_pred_mask.png")) > 0
        n_components = cv2.connectedComponents(mask.astype(np.uint8))[0] - 1
        assert n_components <= 1  # keep_largest


def _compose_predict(ckpts: list[Path], input_path: Path, output: Path):
    listed = ",".join(f"'{c}'" for c in ckpts)
    with initialize_config_dir(CONF, version_base="1.3"):
        return compose("predict", overrides=[f"ckpt_path=[{listed}]", f"input='{input_path}'", f"output='{output}'",
                                             "progress=false", "device=cpu", "overlays=false"])


def test_a_list_of_checkpoints_predicts_as_one_ensemble(tiny_ckpt, tmp_path):
    other = tmp_path / "other.ckpt"
    state = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    sd = state["state_dict"]
    head_bias = sorted(k for k in sd if k.startswith("net.unet.classification_head.") and k.endswith(".bias"))[-1]
    sd[head_bias] = sd[head_bias] + torch.tensor([1.0, 0.0, -1.0])
    sd["net.unet.segmentation_head.0.bias"] = sd["net.unet.segmentation_head.0.bias"] + 1.0
    torch.save(state, other)
    write_inputs(tmp_path / "in", {"a.png": ("L", (120, 90)), "b.png": ("RGB", (64, 80))})
    for name, ckpt in (("one", tiny_ckpt), ("other", other)):
        assert run_predict(ckpt, tmp_path / "in", tmp_path / name, "overlays=false").exit_code == 0
    summary = predict(_compose_predict([tiny_ckpt, other], tmp_path / "in", tmp_path / "both"))
    assert summary.exit_code == 0
    rows = {n: read_rows(tmp_path / n) for n in ("one", "other", "both")}
    assert rows["both"].keys() == rows["one"].keys() and rows["one"]
    for file, row in rows["both"].items():
        probs = {n: np.array([float(rows[n][file][f"prob_{c}"]) for c in ("normal", "benign", "malignant")])
                 for n in rows}
        assert not np.allclose(probs["one"], probs["other"], atol=1e-2)
        np.testing.assert_allclose(probs["both"], (probs["one"] + probs["other"]) / 2, atol=2e-4)
        assert (tmp_path / "both" / f"{Path(file).stem}_pred_mask.png").is_file()
    small = make_tiny_checkpoint(tmp_path / "small.ckpt", image_size=32)
    with pytest.raises(CheckpointError, match=r"small\.ckpt: trained at data.image_size=32.*same input"):
        predict(_compose_predict([tiny_ckpt, small], tmp_path / "in", tmp_path / "x"))
    with pytest.raises(ConfigError, match="twice"):
        predict(_compose_predict([tiny_ckpt, tiny_ckpt], tmp_path / "in", tmp_path / "x"))


def test_config_errors_name_the_key(tiny_ckpt, tmp_path):
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("predict", overrides=[f"output={tmp_path}/o", f"input={tmp_path}"])
    with pytest.raises(ConfigError, match="ckpt_path"):
        predict(cfg)
    with pytest.raises(ConfigError, match="batch_size"):
        run_predict(tiny_ckpt, tmp_path, tmp_path / "o", "batch_size=0")
    with pytest.raises(ConfigError, match="mask_refiner_outside=keep without mask_refiner="):
        run_predict(tiny_ckpt, tmp_path, tmp_path / "o", "mask_refiner_outside=keep")
    with pytest.raises(InputError, match="does-not-exist"):
        run_predict(tiny_ckpt, tmp_path / "does-not-exist", tmp_path / "o")
    with pytest.raises(ConfigError, match="is the input folder"):
        run_predict(tiny_ckpt, tmp_path, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        run_predict(tiny_ckpt, tmp_path / "empty", tmp_path / "o2")


def test_cli_exit_status_and_run_dir(tiny_ckpt, tmp_path):
    write_inputs(tmp_path / "in", {"ok.png": ("L", (40, 40))})
    (tmp_path / "in" / "broken.bmp").write_bytes(b"BM garbage")
    result = subprocess.run(
        [sys.executable, "-m", "busiseg.predict", f"ckpt_path={tiny_ckpt}", f"input={tmp_path / 'in'}",
         f"output={tmp_path / 'out'}", "device=cpu"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "broken.bmp" in result.stdout + result.stderr
    # the status line reaches stderr (the per-file errors are logged to the console and predict.log)
    assert result.stderr.strip().splitlines()[-1] == (
        f"busiseg.predict: error: 1 file(s) could not be predicted (listed above and in "
        f"{tmp_path / 'out' / 'predict.log'}); the other 1 are in {tmp_path / 'out'}")
    assert (tmp_path / "out" / "ok_pred_mask.png").is_file()
    # Hydra's run dir is the output folder: config and log beside the predictions, nothing in cwd/logs
    assert (tmp_path / "out" / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "out" / "predict.log").is_file()
    assert not (tmp_path / "logs").exists()
    # a second run into the same folder says that earlier files stay
    again = subprocess.run(
        [sys.executable, "-m", "busiseg.predict", f"ckpt_path={tiny_ckpt}", f"input={tmp_path / 'in' / 'ok.png'}",
         f"output={tmp_path / 'out'}", "device=cpu"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "already holds a prediction" in again.stdout + again.stderr
    # ... but not when the run cannot start: a missing checkpoint replaces nothing
    refused = subprocess.run(
        [sys.executable, "-m", "busiseg.predict", f"ckpt_path={tmp_path / 'missing.ckpt'}",
         f"input={tmp_path / 'in' / 'ok.png'}", f"output={tmp_path / 'out'}", "device=cpu"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert refused.returncode == 2 and "missing.ckpt" in refused.stderr
    assert "already holds a prediction" not in refused.stdout + refused.stderr


def test_cli_with_nothing_given_names_every_missing_key(tmp_path):
    # the run dir is the output folder: with no output Hydra itself used to fail resolving it (a traceback)
    result = subprocess.run([sys.executable, "-m", "busiseg.predict"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "ckpt_path, input, output are not set; usage: python -m busiseg.predict" in result.stderr
    assert list((tmp_path / "logs" / "predict" / "runs").glob("*/predict.log"))
