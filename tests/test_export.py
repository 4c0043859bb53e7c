"""busiseg.export: ONNX and TorchScript artifacts reproduce PyTorch, with a sidecar the predictor can use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from busiseg import export as export_module
from busiseg.checkpoint import load_model
from busiseg.export import ConfigError, ExportError, export
from tests.test_predict import CONF, make_tiny_checkpoint, tiny_ckpt, write_inputs  # noqa: F401  (tiny_ckpt: a fixture)
from tests.conftest import lock_folders

CHECK_IMAGES = {"a.png": ("L", (70, 50)), "b/c.jpg": ("RGB", (90, 120)), "b/d.tif": ("I;16", (64, 64))}


def run_export(ckpt: Path, *overrides: str) -> dict:
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("export", overrides=[f"ckpt_path='{ckpt}'", *overrides])
    return export(cfg)


_EXPORTED: dict[Path, tuple[Path, dict, Path]] = {}


@pytest.fixture(scope="session")
def tiny_onnx(tiny_ckpt, tmp_path_factory) -> tuple[Path, dict, Path]:
    """(model.onnx, its sidecar, the folder of real-looking images it was checked on).

    Exported once per session: test_onnx_predictor imports this fixture, which makes it a
    second fixture definition, so the result is cached here as well.
    """
    if tiny_ckpt not in _EXPORTED:
        folder = tmp_path_factory.mktemp("onnx")
        images = folder / "check"
        write_inputs(images, CHECK_IMAGES)
        sidecar = run_export(tiny_ckpt, "format=onnx", f"output='{folder / 'tiny.onnx'}'", f"check_input='{images}'")
        _EXPORTED[tiny_ckpt] = (folder / "tiny.onnx", sidecar, images)
    return _EXPORTED[tiny_ckpt]


def test_onnx_export_matches_pytorch(tiny_ckpt, tiny_onnx):
    import onnxruntime as ort

    model, sidecar, _ = tiny_onnx
    assert json.loads(Path(f"{model}.json").read_text()) == sidecar
    assert sidecar["image_size"] == 64 and sidecar["in_channels"] == 1 and sidecar["threshold"] == 0.5
    assert sidecar["class_names"] == ["normal", "benign", "malignant"]
    checks = {c["input"]: c for c in sidecar["parity"]["checks"]}
    assert any(k.startswith("real") for k in checks) and any(k.startswith("random") for k in checks)
    assert sidecar["parity"]["max_abs_diff"] <= 1e-4
    assert not list(model.parent.glob(".*partial*"))

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["mask_logits", "class_logits"]
    net, _ = load_model(tiny_ckpt)
    for shape in [(1, 1, 64, 64), (5, 1, 64, 64), (2, 1, 96, 160)]:  # dynamic batch, H/W multiples of 32
        x = torch.rand(*shape)
        mask, cls = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            ref_mask, ref_cls = net(x)
        assert mask.shape == (shape[0], 1, *shape[2:]) and cls.shape == (shape[0], 3)
        assert np.abs(mask - ref_mask.numpy()).max() <= 1e-4
        assert np.abs(cls - ref_cls.numpy()).max() <= 1e-4


@pytest.mark.parametrize("arch,class_pooling,attention", [("unetplusplus", "avg", None), ("unet", "lesion", None),
                                                           ("unet", "avg", "scse")])
def test_other_architectures_export_to_onnx_and_match_pytorch(tmp_path, arch, class_pooling, attention):
    ckpt = make_tiny_checkpoint(tmp_path / "upp.ckpt", arch=arch, class_pooling=class_pooling,
                                decoder_attention=attention)
    write_inputs(tmp_path / "check", CHECK_IMAGES)
    sidecar = run_export(ckpt, "format=onnx", f"output='{tmp_path / 'upp.onnx'}'", f"check_input='{tmp_path / 'check'}'")
    assert sidecar["parity"]["max_abs_diff"] <= 1e-4  # export compares ONNX Runtime with PyTorch itself
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "upp.onnx"), providers=["CPUExecutionProvider"])
    net, _ = load_model(ckpt)
    assert net.unet.__class__.__name__ == {"unet": "Unet", "unetplusplus": "UnetPlusPlus"}[arch]
    assert net.class_pooling == class_pooling
    assert any(m.__class__.__name__ == "SCSEModule" for m in net.modules()) == (attention == "scse")
    x = torch.rand(2, 1, 96, 64)  # not the size it was exported at: H and W are dynamic
    mask, cls = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref_mask, ref_cls = net(x)
    assert np.abs(mask - ref_mask.numpy()).max() <= 1e-4 and np.abs(cls - ref_cls.numpy()).max() <= 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_torch_formats_match_pytorch(fmt, tiny_ckpt, tiny_onnx, tmp_path, capsys):
    _, _, images = tiny_onnx
    out = tmp_path / f"tiny.{fmt}"
    sidecar = run_export(tiny_ckpt, f"format={fmt}", f"output='{out}'", f"check_input='{images}'")
    printed = capsys.readouterr().out
    assert f"parity {fmt} vs PyTorch" in printed and "real, 3 images" in printed and "OK" in printed
    assert sidecar["format"] == fmt and sidecar["parity"]["max_abs_diff"] <= 1e-4
    assert Path(f"{out}.json").is_file()
    loaded = torch.jit.load(str(out)) if fmt == "torchscript" else torch.export.load(str(out)).module()
    net, _ = load_model(tiny_ckpt)
    x = torch.rand(3, 1, 96, 64)
    with torch.no_grad():
        for a, b in zip(loaded(x), net(x)):
            assert (a - b).abs().max() <= 1e-4


def test_export_refuses_a_model_that_differs(tiny_ckpt, tmp_path, monkeypatch):
    real_runner = export_module.torchscript_runner

    def off_by_a_bit(path):
        run = real_runner(path)
        return lambda x: tuple(a + 1e-3 for a in run(x))

    monkeypatch.setattr(export_module, "torchscript_runner", off_by_a_bit)
    out = tmp_path / "m.pt"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        run_export(tiny_ckpt, "format=torchscript", f"output='{out}'", "check_input=null")
    assert list(tmp_path.iterdir()) == []  # neither the model, its temp file nor a sidecar


def test_export_errors_name_the_key(tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="format=tflite"):
        run_export(tiny_ckpt, "format=tflite")
    with pytest.raises(ConfigError, match="inference.threshold"):
        run_export(tiny_ckpt, "inference.threshold=1.5")
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("export")
    with pytest.raises(ConfigError, match="ckpt_path"):
        export(cfg)


def test_the_tolerance_scales_with_the_largest_logit():
    from busiseg.export import ParityCheck

    # a one-epoch phantom network on uniform noise: logits of 230, ONNX off by 3e-4 (1.3e-6 of them): kept
    noise = ParityCheck("random, batch 3", (3, 1, 64, 64), 3.05e-4, 1e-5, 230.3)
    assert noise.relative == pytest.approx(3.05e-4 / 230.3) and noise.relative <= 1e-5
    # the same difference on logits below 1 is measured absolutely: refused at the default 1e-5
    assert ParityCheck("real", (1, 1, 64, 64), 3.05e-4, 0.0, 0.4).relative == pytest.approx(3.05e-4)


def test_a_folder_as_output_gets_the_default_name_and_left_out_stages_are_named(tiny_ckpt, tmp_path, caplog):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(Path(tiny_ckpt).read_bytes())
    (run / "scan_classifier.pt").write_bytes(b"")  # a stage file beside the run: named, never read
    (tmp_path / "out").mkdir()
    with caplog.at_level("WARNING", logger="busiseg.export"):
        sidecar = run_export(ckpt, "format=torchscript", f"output='{tmp_path / 'out'}'", "check_input=null")
    assert (tmp_path / "out" / "last.torchscript.pt").is_file()  # not a file named "out"
    assert sidecar["second_stages_not_exported"] == ["scan_classifier.pt"]
    assert "only the network is exported; the run's scan_classifier.pt is not" in caplog.text
    sidecar = run_export(ckpt, "format=torchscript", f"output='{tmp_path / 'new'}/'", "check_input=null")
    assert (tmp_path / "new" / "last.torchscript.pt").is_file()


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tiny_ckpt, tmp_path, monkeypatch):
    """A file in the way, or a folder that takes no files (read-only, immutable, /proc): refused naming the output,
    before the checkpoint is loaded or anything exported (not after it, with the exporter's advice)."""
    monkeypatch.setattr(export_module, "load_model", lambda *a: pytest.fail("the checkpoint was loaded"))
    (tmp_path / "afile.txt").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"output=.*afile.txt/m.onnx: .*afile.txt is a file, so the output folder "
                                          r"cannot be made"):
        run_export(tiny_ckpt, f"output='{tmp_path / 'afile.txt' / 'm.onnx'}'")
    with pytest.raises(ConfigError, match=r"output=.*afile.txt/: .*afile.txt is a file"):
        run_export(tiny_ckpt, f"output='{tmp_path / 'afile.txt'}/'")  # a folder by its slash
    (tmp_path / "locked").mkdir()
    lock_folders(monkeypatch, tmp_path / "locked", Path(tiny_ckpt).parent)
    with pytest.raises(ConfigError, match=r"output=.*locked/sub/m.onnx: .*locked is not writable \(Operation not "
                                          r"permitted\), so the output folder cannot be made"):
        run_export(tiny_ckpt, f"output='{tmp_path / 'locked' / 'sub' / 'm.onnx'}'")
    assert not (tmp_path / "locked" / "sub").exists()
    with pytest.raises(ConfigError, match=r"output \(default .*\.onnx\): .* is not writable \(Operation not "
                                          r"permitted\)$"):
        run_export(tiny_ckpt)  # beside the checkpoint


def test_the_command_line_names_an_output_under_a_file_in_one_line(tiny_ckpt, tmp_path):
    import subprocess
    import sys

    (tmp_path / "afile.txt").write_text("not a folder")
    result = subprocess.run([sys.executable, "-m", "busiseg.export", f"ckpt_path={tiny_ckpt}",
                             f"output={tmp_path}/afile.txt/m.onnx"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"busiseg.export: error: output={tmp_path}/afile.txt/m.onnx: {tmp_path}/"
                                          "afile.txt is a file, so the output folder cannot be made"], result.stderr
    assert "Traceback" not in result.stderr


def test_an_explicit_check_input_must_hold_readable_images(tiny_ckpt, tmp_path, capsys):
    """check_input=null falls back to the checkpoint's data.root quietly; a check_input the user set must work."""
    out = f"output='{tmp_path / 'm.pt'}'"
    with pytest.raises(ConfigError, match=r"check_input=.*nonexist does not exist"):
        run_export(tiny_ckpt, "format=torchscript", out, f"check_input='{tmp_path / 'nonexist'}'")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"check_input=.*zero.png: no readable images: .*zero.png: cannot read"):
        run_export(tiny_ckpt, "format=torchscript", out, f"check_input='{tmp_path / 'zero.png'}'")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"check_input=.*empty: no real images: no images under .*empty"):
        run_export(tiny_ckpt, "format=torchscript", out, f"check_input='{tmp_path / 'empty'}'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "zero.png"]  # nothing exported
    # check_images=0: random inputs only, and said so (not "no readable images" about readable ones)
    write_inputs(tmp_path / "check", CHECK_IMAGES)
    run_export(tiny_ckpt, "format=torchscript", out, f"check_input='{tmp_path / 'check'}'", "check_images=0")
    printed = capsys.readouterr().out
    assert "(no real images: check_images=0; random inputs only)" in printed and "readable" not in printed
    for bad in ("-1", "2.5"):
        with pytest.raises(ConfigError, match=rf"check_images must be an integer >= 0 .*got {bad}"):
            run_export(tiny_ckpt, "format=torchscript", out, f"check_images={bad}")


def test_number_keys_of_the_wrong_kind_name_the_key(tiny_ckpt, tmp_path, monkeypatch):
    """export() itself refuses them before any work (the command line's type check sees only keys with a
    non-null default: not opset)."""
    monkeypatch.setattr(export_module, "load_model", lambda *a: pytest.fail("the checkpoint was loaded"))
    out = f"output='{tmp_path / 'm.onnx'}'"
    for override, message in [("opset=abc", r"opset must be an integer \(an ONNX opset version\) or null, got 'abc'"),
                              ("opset=17.5", r"opset must be an integer .*got 17.5"),
                              ("tolerance=abc", r"tolerance must be a number > 0, got 'abc'"),
                              ("tolerance=nan", r"tolerance must be a number > 0, got nan"),
                              ("inference.threshold=abc", r"inference.threshold must be a number in \(0, 1\), got "
                                                          r"'abc'")]:
        with pytest.raises(ConfigError, match=message):
            run_export(tiny_ckpt, out, override)
