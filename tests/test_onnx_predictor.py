"""busiseg.onnx_predictor: imports without torch, and writes what busiseg.predict writes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busiseg.inference import restore_size
from busiseg.onnx_predictor import InputError, OnnxPredictor, find_images, predict_files, resize_bilinear
from tests.test_export import tiny_onnx  # noqa: F401  (session fixture: one export for both files)
from tests.test_predict import REPO, run_predict, tiny_ckpt, write_inputs  # noqa: F401
from tests.conftest import lock_folders

COMPARE = {"g.png": ("L", (70, 50)), "s/rgb.jpg": ("RGB", (130, 90)), "s/rgba.png": ("RGBA", (64, 64)),
           "s/t/p.bmp": ("P", (45, 77)), "s/t/w.tif": ("I;16", (200, 150)), "big.png": ("L", (400, 300))}


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path / "predictions.csv", newline="") as fh:
        return {r["file"]: r for r in csv.DictReader(fh)}


def test_imports_without_torch():
    code = "import sys; import busiseg.onnx_predictor; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr


def test_resize_matches_opencv_restore_size():
    rng = np.random.default_rng(0)
    prob = rng.random((64, 64)).astype(np.float32)
    for size in [(471, 558), (100, 37), (64, 64), (20, 30), (64, 200)]:
        np.testing.assert_allclose(resize_bilinear(prob, size), restore_size(prob, size), atol=1e-5)


def test_same_masks_and_classes_as_predict(tiny_ckpt, tiny_onnx, tmp_path):
    model, _, _ = tiny_onnx
    write_inputs(tmp_path / "in", COMPARE)
    torch_summary = run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "torch", "batch_size=3")
    images, _ = find_images(tmp_path / "in")
    onnx_summary = predict_files(OnnxPredictor(model), images, tmp_path / "onnx", batch_size=4)
    assert torch_summary.exit_code == onnx_summary.exit_code == 0
    torch_rows, onnx_rows = _rows(tmp_path / "torch"), _rows(tmp_path / "onnx")
    assert set(torch_rows) == set(onnx_rows) == set(COMPARE)
    for name, row in torch_rows.items():
        other = onnx_rows[name]
        assert row["pred_class"] == other["pred_class"], name
        for key in ("prob_normal", "prob_benign", "prob_malignant"):
            assert abs(float(row[key]) - float(other[key])) <= 2e-4, (name, key)
        a = np.asarray(Image.open(tmp_path / "torch" / row["mask"])) > 0
        b = np.asarray(Image.open(tmp_path / "onnx" / other["mask"])) > 0
        assert a.shape == b.shape
        union = (a | b).sum()
        iou = (a & b).sum() / union if union else 1.0
        assert iou >= 0.999, (name, iou)
        assert (tmp_path / "onnx" / other["overlay"]).is_file()


def test_cli(tiny_onnx, tmp_path):
    model, sidecar, _ = tiny_onnx
    write_inputs(tmp_path / "in", {"a/b.png": ("L", (50, 40)), "c.tif": ("I;16", (33, 66))})
    (tmp_path / "in" / "a" / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    result = subprocess.run([sys.executable, "-m", "busiseg.onnx_predictor", str(model), str(tmp_path / "in"),
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1  # one file failed
    assert "bad.jpg" in result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (  # the closing line, as busiseg.predict's
        f"busiseg.onnx_predictor: error: 1 file(s) could not be predicted (listed above); the other 2 are in "
        f"{tmp_path / 'out'}")
    assert Image.open(tmp_path / "out" / "a" / "b_pred_mask.png").size == (50, 40)
    assert Image.open(tmp_path / "out" / "c_pred_mask.png").size == (33, 66)
    assert set(_rows(tmp_path / "out")) == {"a/b.png", "c.tif"}


def test_missing_or_broken_sidecar_named(tiny_onnx, tmp_path):
    model, sidecar, _ = tiny_onnx
    lone = tmp_path / "lone.onnx"
    lone.symlink_to(model)
    with pytest.raises(InputError, match="lone.onnx.json"):
        OnnxPredictor(lone)
    (tmp_path / "lone.onnx.json").write_text(json.dumps({k: v for k, v in sidecar.items() if k != "image_size"}))
    with pytest.raises(InputError, match="image_size"):
        OnnxPredictor(lone)


def test_a_pytorch_checkpoint_given_as_the_onnx_model_says_to_export_it(tmp_path):
    from busiseg.onnx_predictor import read_sidecar

    with pytest.raises(InputError, match=r"last.ckpt: a PyTorch checkpoint; export it first \(python -m "
                                         r"busiseg.export ckpt_path=.*last.ckpt writes last.onnx"):
        read_sidecar(tmp_path / "last.ckpt")
    with pytest.raises(InputError, match=r"m.onnx.json: sidecar not found"):
        read_sidecar(tmp_path / "m.onnx")


def test_cli_an_output_folder_that_cannot_be_made_is_named_in_one_line(tiny_onnx, tmp_path, capsys, monkeypatch):
    """As predict: exit status 2 and one line naming the output, before the model is loaded or an image read."""
    from busiseg import onnx_predictor

    model, _, _ = tiny_onnx
    write_inputs(tmp_path / "in", {"a.png": ("L", (50, 40))})
    (tmp_path / "afile.txt").write_text("not a folder")
    monkeypatch.setattr(onnx_predictor, "OnnxPredictor", lambda *a, **k: pytest.fail("the model was loaded"))
    for out in (tmp_path / "afile.txt", tmp_path / "afile.txt" / "out"):  # a file, and a folder under a file
        assert onnx_predictor.main([str(model), str(tmp_path / "in"), str(out)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"busiseg.onnx_predictor: error: output {out}: {tmp_path / 'afile.txt'} is a file, so the output folder "
            "cannot be made"]
    (tmp_path / "locked").mkdir()
    lock_folders(monkeypatch, tmp_path / "locked")
    assert onnx_predictor.main([str(model), str(tmp_path / "in"), str(tmp_path / "locked" / "out")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"busiseg.onnx_predictor: error: output {tmp_path / 'locked' / 'out'}: {tmp_path / 'locked'} is not writable "
        "(Operation not permitted), so the output folder cannot be made"]
    assert list((tmp_path / "locked").iterdir()) == []


def test_predict_files_names_an_output_folder_it_cannot_make(tmp_path):
    """The loop shared with busiseg.predict: an InputError naming the folder (exit 2 in both tools), no OSError."""
    (tmp_path / "afile.txt").write_text("not a folder")
    with pytest.raises(InputError, match=r"output .*afile.txt/out: cannot make the folder \(NotADirectoryError"):
        predict_files(lambda images: [], [], tmp_path / "afile.txt" / "out")
