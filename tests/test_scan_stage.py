"""The scan stage end to end on a tiny phantom sweep: trained inside busiseg.train after the crop stage, its
diagnosis the mean of the two-stage and the whole-scan classifier's probabilities image by image, the same numbers
from busiseg.eval with the run's files, predict with it, cv_summary's scan-stage columns; and its refusals."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from busiseg.data.busi import load_record, scan_busi
from busiseg.data.labels import CLASS_NAMES
from busiseg.models.scan_classifier import (ScanClassifierError, ScanSettings, join_scan_probs, load_scan_classifier,
                                            scan_probs, whole_box)
from busiseg.scan_stage import FILE_NAME
from tests.test_eval import TINY, _compose, run_eval

SCAN = ["scan_stage=default", "scan_stage.size=32", "scan_stage.epochs=2", "scan_stage.batch_size=8"]
CROP = ["crop_stage=default", "crop_stage.size=32", "crop_stage.epochs=2", "crop_stage.batch_size=8"]
PROBS = [f"prob_{c}" for c in CLASS_NAMES]


def _probs(path):
    with open(path, newline="") as fh:
        return {r["image"]: np.array([float(r[k]) for k in PROBS]) for r in csv.DictReader(fh) if r["part"] == "test"}


@pytest.fixture(scope="module")
def scanned_sweep(tmp_path_factory):
    from busiseg.train import train

    root = tmp_path_factory.mktemp("scan")
    tiny = [o for o in TINY if not o.startswith("split.")]
    sweep = root / "sweep"
    for fold in (0, 1):
        train(_compose("train", [*tiny, *CROP, *SCAN, "split=kfold", "split.k=2", f"split.fold={fold}",
                                 "test_ckpt=last"], root, sweep / str(fold)))
    return root, sweep


def test_train_with_the_scan_stage(scanned_sweep, tmp_path):
    root, sweep = scanned_sweep
    run = sweep / "1"
    metrics = json.loads((run / "metrics.json").read_text())
    stage = metrics["scan_stage"]
    assert stage["file"] == str(run / FILE_NAME) and (run / "scan_classifier.png").is_file()
    assert stage["settings"]["epochs"] == 2 and stage["settings"]["seed"] == 42 + 1  # the run's seed + its fold
    split = json.loads((run / "split.json").read_text())
    model = load_scan_classifier(run / FILE_NAME)
    assert model.trained_on == split["train"] and model.classes == tuple(CLASS_NAMES)  # every class, normal too
    m = metrics["metrics"]
    assert m["test_scan_stage/dice"] == pytest.approx(m["test_two_stage/dice"], abs=1e-6)  # the masks are unchanged
    # image by image: the mean of the two-stage probabilities and the whole-scan classifier's own
    two, scanned = _probs(run / "predictions_two_stage.csv"), _probs(run / "predictions_scan_stage.csv")
    assert sorted(scanned) == sorted(two) == sorted(split["val"])
    by_name = {r.name: r for r in scan_busi(metrics["data_root"])}
    names = sorted(two)
    own = scan_probs(model, [load_record(by_name[n])[0] for n in names])
    joined = join_scan_probs(np.stack([two[n] for n in names]), own)
    assert np.abs(np.stack([scanned[n] for n in names]) - joined).max() < 1e-4
    labels = np.array([by_name[n].label for n in names])
    assert m["test_scan_stage/accuracy"] == pytest.approx(float((joined.argmax(1) == labels).mean()))
    # busiseg.eval with the run's three files gives the same numbers
    ckpt = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    evaluated, _ = run_eval(tmp_path / "a", [ckpt, f"crop_classifier={run / 'crop_classifier.pt'}",
                                             f"scan_classifier={run / FILE_NAME}"])
    assert evaluated["scan_classifier"] == str(run / FILE_NAME)
    for key in ("accuracy", "f1_macro", "dice"):
        assert evaluated["raw"]["as_training"][key] == pytest.approx(m[f"test_scan_stage/{key}"], abs=1e-5), key
    # ... and says so: the check against the run's own numbers, for the run's stages (no file left out)
    check = evaluated["training_check"]
    assert check["prefix"] == "test_scan_stage" and check["max_abs_diff"] <= 1e-5, check
    assert {"accuracy", "dice"} <= set(check["metrics"])
    scan_only, _ = run_eval(tmp_path / "b", [ckpt, f"scan_classifier={run / FILE_NAME}"])  # the crop stage left out
    assert "training_check" not in scan_only


def test_a_run_killed_during_the_scan_stage_resumes_to_the_same_numbers(scanned_sweep, tmp_path):
    """A fold killed after its fit, while the scan stage trained (no metrics.json, no scan_classifier.pt yet):
    ``resume=`` finds the fit done and tests again; the crop classifier written before the kill is read, not
    trained again, and the scan stage is trained from its seed; the numbers are those of the run not killed."""
    import shutil

    from busiseg.crop_stage import FILE_NAME as CROP_FILE
    from busiseg.train import train

    root, sweep = scanned_sweep
    run = tmp_path / "killed"
    shutil.copytree(sweep / "1", run)
    for name in ("metrics.json", FILE_NAME, "predictions_scan_stage.csv"):
        (run / name).unlink()
    crop_written = (run / CROP_FILE).stat().st_mtime_ns
    resumed = train(_compose("train", [f"resume={run}"], root, tmp_path / "resume_log"))
    reference = json.loads((sweep / "1" / "metrics.json").read_text())
    tested = {k: v for k, v in reference["metrics"].items() if k.startswith("test")}
    assert any(k.startswith("test_scan_stage/") for k in tested) and (run / FILE_NAME).is_file()
    for key, value in tested.items():
        assert resumed["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert _probs(run / "predictions_scan_stage.csv").keys() == _probs(sweep / "1" / "predictions_scan_stage.csv").keys()
    assert (run / CROP_FILE).stat().st_mtime_ns == crop_written  # reused, not written again
    stored = json.loads((run / "metrics.json").read_text())
    # its training time as measured before the kill (the file is the copy's)
    assert {**stored["crop_stage"], "file": None} == {**reference["crop_stage"], "file": None}


def test_a_stage_file_is_reused_only_for_its_own_settings_and_split(scanned_sweep, tmp_path):
    from busiseg.crop_stage import FILE_NAME as CROP_FILE
    from busiseg.crop_stage import trained_before_stop
    from busiseg.models.crop_classifier import CropSettings, read_crop_file

    _, sweep = scanned_sweep
    run = sweep / "1"
    state = read_crop_file(run / CROP_FILE)
    settings, root, split = CropSettings(**state["settings"]), Path(state["data_root"]), Path(state["split_file"])
    assert trained_before_stop(run / CROP_FILE, settings, root, split, state["precision"], read_crop_file) is not None
    other = json.loads(split.read_text())
    other["train"] = other["train"][: len(other["train"]) // 2]
    (tmp_path / "split.json").write_text(json.dumps(other))
    for changed in ((dataclasses.replace(settings, epochs=settings.epochs + 1), root, split, state["precision"]),
                    (settings, root, tmp_path / "split.json", state["precision"]),  # a split without its images
                    (settings, root, split, "bf16-mixed" if state["precision"] == "32" else "32")):
        assert trained_before_stop(run / CROP_FILE, *changed, read_crop_file) is None
    (tmp_path / "damaged.pt").write_bytes(b"not a stage file")
    assert trained_before_stop(tmp_path / "damaged.pt", settings, root, split, state["precision"], read_crop_file) is None
    assert trained_before_stop(tmp_path / "missing.pt", settings, root, split, state["precision"], read_crop_file) is None


def test_a_complete_stage_file_is_reused_and_read_once(scanned_sweep, monkeypatch):
    """A resumed run whose stage files were written before the stop: each is reused, not trained again (the scan
    stage's was trained again on every resume: its file stores the crop classifier's settings, which were
    compared with the scan stage's own), and read once (the loader takes the content its settings were checked
    on)."""
    from omegaconf import OmegaConf

    import busiseg.models.crop_classifier as crop_module
    import busiseg.models.scan_classifier as scan_module
    from busiseg.crop_stage import FILE_NAME as CROP_FILE
    from busiseg.crop_stage import trained_or_reused
    from busiseg.scan_stage import trained_or_reused_scan
    from busiseg.train import scan_settings

    _, sweep = scanned_sweep
    run = sweep / "1"
    reads = []
    for module in (crop_module, scan_module):
        real = module.read_stage_file
        monkeypatch.setattr(module, "read_stage_file", lambda path, *a, _real=real, **k: reads.append(Path(path))
                            or _real(path, *a, **k))
    monkeypatch.setattr("busiseg.scan_stage.train_for_split", lambda *a, **k: pytest.fail("scan stage trained again"))

    def never_trained():
        raise AssertionError("crop stage trained again")

    state = crop_module.read_crop_file(run / CROP_FILE)
    reads.clear()
    model, info = trained_or_reused(run / CROP_FILE, crop_module.CropSettings(**state["settings"]),
                                    Path(state["data_root"]), Path(state["split_file"]), state["precision"], True,
                                    crop_module.read_crop_file, crop_module.load_crop_classifier, never_trained, None)
    assert reads == [run / CROP_FILE]
    assert model.trained_on == state["trained_on"] and info["fit_seconds"] == state["fit_seconds"]

    state = crop_module.read_crop_file(run / FILE_NAME)
    reads.clear()
    settings = scan_settings(OmegaConf.load(run / "config.yaml"))  # as the resumed run builds them
    model, info = trained_or_reused_scan(run / FILE_NAME, settings, Path(state["data_root"]),
                                         Path(state["split_file"]), state["precision"], True)
    assert reads == [run / FILE_NAME]
    assert model.trained_on == state["trained_on"] and info["fit_seconds"] == state["fit_seconds"]


def test_cv_summary_sets_the_scan_stage_beside_the_others(scanned_sweep):
    from busiseg.cv_summary import headline_table, summarize

    _, sweep = scanned_sweep
    summary = summarize(sweep)
    for f in (0, 1):
        m = json.loads((sweep / str(f) / "metrics.json").read_text())["metrics"]
        gain = summary["scan_stage_gain"]["accuracy"]["per_fold"][f]
        assert gain == pytest.approx(m["test_scan_stage/accuracy"] - m["test/accuracy"])
        over_crop = summary["scan_over_crop_gain"]["accuracy"]["per_fold"][f]  # what it adds to the crop stage
        assert over_crop == pytest.approx(m["test_scan_stage/accuracy"] - m["test_two_stage/accuracy"])
    images = sum(len(_probs(sweep / str(f) / "predictions_scan_stage.csv")) for f in (0, 1))
    assert summary["oof_scan_stage"]["images"] == images == summary["oof"]["images"]
    table = headline_table(summary)
    assert "with the scan stage (`test_scan_stage/*`)" in table[0]
    assert "scan stage minus network, paired per fold" in table[0]
    assert (sweep / "cv_confusion_matrix_scan_stage.png").is_file()
    text = (sweep / "cv_summary.md").read_text()
    assert "The scan stage (with the run's other stages) against the network alone" in text
    assert "The scan stage against the stages before it" in text
    assert "With the scan stage (`predictions_scan_stage.csv`)" in text


def test_predict_with_the_scan_classifier(scanned_sweep, tmp_path):
    from busiseg.predict import ConfigError
    from tests.test_predict import read_rows, run_predict, write_inputs

    _, sweep = scanned_sweep
    run = sweep / "0"
    write_inputs(tmp_path / "in")
    ckpt = run / "checkpoints" / "last.ckpt"
    plain = run_predict(ckpt, tmp_path / "in", tmp_path / "plain")
    summary = run_predict(ckpt, tmp_path / "in", tmp_path / "out", f"scan_classifier='{run / FILE_NAME}'")
    assert summary.failed == [] and summary.exit_code == 0 and plain.exit_code == 0
    before = {f: np.array([float(r[k]) for k in PROBS]) for f, r in read_rows(tmp_path / "plain").items()}
    after = {f: np.array([float(r[k]) for k in PROBS]) for f, r in read_rows(tmp_path / "out").items()}
    assert before.keys() == after.keys() and before
    assert all(abs(after[k].sum() - 1) < 1e-3 for k in after)
    assert any(np.abs(after[k] - before[k]).max() > 1e-4 for k in after)  # the scan classifier moved them
    with pytest.raises(ConfigError, match="crop-stage file"):
        run_predict(ckpt, tmp_path / "in", tmp_path / "bad", f"scan_classifier='{run / 'crop_classifier.pt'}'")


def test_the_scan_stage_refusals(scanned_sweep, tmp_path):
    from busiseg.evaluation.runner import EvalError
    from busiseg.train import ConfigError, train

    _, sweep = scanned_sweep
    # fold 1's scan classifier trained on fold 0's validation images
    with pytest.raises(EvalError, match="scan classifier was trained on"):
        run_eval(tmp_path / "a", [f"ckpt_path={sweep / '0' / 'checkpoints' / 'last.ckpt'}",
                                  f"scan_classifier={sweep / '1' / FILE_NAME}"])
    # a crop-stage file is not a scan-stage one, and the other way round
    with pytest.raises(EvalError, match="crop-stage file: pass it as crop_classifier="):
        run_eval(tmp_path / "b", [f"ckpt_path={sweep / '0' / 'checkpoints' / 'last.ckpt'}",
                                  f"scan_classifier={sweep / '0' / 'crop_classifier.pt'}"])
    with pytest.raises(EvalError, match="a scan-stage file: pass it as scan_classifier="):
        run_eval(tmp_path / "c", [f"ckpt_path={sweep / '0' / 'checkpoints' / 'last.ckpt'}",
                                  f"crop_classifier={sweep / '0' / FILE_NAME}"])
    with pytest.raises(ScanClassifierError, match="missing.pt: scan classifier not found"):
        load_scan_classifier(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match=r"scan_stage: scan classifier settings out of range: zoom=\[1.2, 1.0\]"):
        train(_compose("train", [*TINY, *SCAN, "scan_stage.zoom=[1.2,1.0]"], tmp_path, tmp_path / "d"))
    with pytest.raises(ConfigError, match=r"scan_stage.margin is not a scan-stage setting"):
        train(_compose("train", [*TINY, *SCAN, "+scan_stage.margin=3"], tmp_path, tmp_path / "d"))
    start = "scan_stage.start=network"
    with pytest.raises(ConfigError, match=r"scan_stage.start=network .* must be one of resnet18, resnet34, resnet50: "
                                          r"model.encoder_name=mobilenet_v2 \(or scan_stage.start=scratch\)"):
        train(_compose("train", [*TINY, *SCAN, start, "model.encoder_name=mobilenet_v2"], tmp_path, tmp_path / "d"))
    with pytest.raises(ConfigError, match=r"scan_stage.arch=resnet34: .* a resnet18 \(model.encoder_name\); set "
                                          r"scan_stage.arch=null"):
        train(_compose("train", [*TINY, *SCAN, start, "scan_stage.arch=resnet34"], tmp_path, tmp_path / "d"))
    with pytest.raises(ConfigError, match=r"crop_stage.start=network: the crop classifier trains from scratch"):
        train(_compose("train", [*TINY, *CROP, "+crop_stage.start=network"], tmp_path, tmp_path / "d"))
    assert not (tmp_path / "d" / "checkpoints").exists()  # refused before any training
    (tmp_path / "run").mkdir()
    proc = subprocess.run([sys.executable, "-m", "busiseg.scan_stage", "train", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "split.json: not found" in proc.stderr and "Traceback" not in proc.stderr


def test_the_scan_stage_can_start_from_the_networks_encoder(scanned_sweep, tmp_path):
    """scan_stage.start=network (e78): the classifier is a ResNet of the network's encoder (arch null) and starts
    from its weights (at a learning rate too small to move them, its trained weights are the encoder's), and its
    file says so; ``python -m busiseg.scan_stage train RUN --start network`` does the same from RUN's checkpoint."""
    from busiseg.checkpoint import load_model
    from busiseg.scan_stage import main
    from busiseg.train import train

    root, sweep = scanned_sweep
    tiny = [o for o in TINY if not o.startswith("split.")]
    still = ["scan_stage.lr=1e-12", "scan_stage.weight_decay=0", "scan_stage.epochs=1"]
    run = tmp_path / "run"
    train(_compose("train", [*tiny, *SCAN, "scan_stage.start=network", *still, "split=kfold", "split.k=2",
                             "split.fold=0", "test_ckpt=last"], root, run))
    stage = json.loads((run / "metrics.json").read_text())["scan_stage"]
    assert (stage["settings"]["arch"], stage["settings"]["start"]) == ("resnet18", "network")
    cli = tmp_path / "cli.pt"
    assert main(["train", str(sweep / "0"), "--start", "network", "--epochs", "1", "--size", "32", "--batch-size", "8",
                 "--lr", "1e-12", "--weight-decay", "0", "--out", str(cli), "--no-progress"]) == 0
    key = "layer2.0.conv1.weight"
    for source, file in ((run, run / FILE_NAME), (sweep / "0", cli)):
        encoder = load_model(source / "checkpoints" / "last.ckpt")[0].unet.encoder.state_dict()
        model = load_scan_classifier(file)
        assert (model.settings.arch, model.settings.start) == ("resnet18", "network")
        np.testing.assert_allclose(model.net.state_dict()[key].numpy(), encoder[key].numpy(), atol=1e-6)
    # the stage's default classifier of the same run starts from scratch: none of its network's weights
    encoder = load_model(sweep / "0" / "checkpoints" / "last.ckpt")[0].unet.encoder.state_dict()
    scratch = load_scan_classifier(sweep / "0" / FILE_NAME)
    assert scratch.settings.start == "scratch" and not np.allclose(scratch.net.state_dict()[key].numpy(),
                                                                   encoder[key].numpy(), atol=1e-3)


def test_whole_box_and_the_join():
    assert whole_box(np.zeros((40, 100), np.uint8)) == (20.0, 50.0, 100.0)
    a = np.array([[0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    b = np.array([[0.2, 0.7, 0.1], [0.0, 0.1, 0.9]])
    joined = join_scan_probs(a, b)
    assert np.allclose(joined, [[0.5, 0.4, 0.1], [0.1, 0.2, 0.7]]) and np.allclose(joined.sum(1), 1)
    assert joined[0].argmax() == 0 and a[0].argmax() == 0 and b[0].argmax() == 1
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 2\)"):
        join_scan_probs(a, b[:, :2])
    with pytest.raises(ScanClassifierError, match="jitter=0.6"):
        ScanSettings(jitter=0.6)


def test_the_probe_reads_a_sweep_and_pairs_against_the_two_stage_call(scanned_sweep, tmp_path):
    """scripts/probe_scan_classifier.py (e67): per fold a scan classifier on the training part, its test
    probabilities written as a predictions CSV, and the table paired against the sweep's own two-stage call."""
    import os

    from tests.conftest import REPO

    _, sweep = scanned_sweep
    root = json.loads((sweep / "0" / "metrics.json").read_text())["data_root"]
    env = {**os.environ, "BUSI_ROOT": root}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "probe_scan_classifier.py"), str(sweep),
                           str(tmp_path / "out"), "--folds", "0", "1", "--size", "32", "--epochs", "1"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    table = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert {"two-stage", "image", "two-stage + image"} <= set(table)
    two_stage = [json.loads((sweep / str(f) / "metrics.json").read_text())["metrics"]["test_two_stage/accuracy"]
                 for f in (0, 1)]
    assert table["two-stage"].split("|")[2].strip().startswith(f"{np.mean(two_stage):.4f}")
    for f in (0, 1):
        written = _probs(tmp_path / "out" / str(f) / "predictions.csv")
        assert sorted(written) == sorted(_probs(sweep / str(f) / "predictions_two_stage.csv"))
        assert all(abs(p.sum() - 1) < 1e-4 for p in written.values())
        assert load_scan_classifier(tmp_path / "out" / str(f) / "scan_classifier.pt").classes == tuple(CLASS_NAMES)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "probe_scan_classifier.py"), str(tmp_path),
                           str(tmp_path / "out2")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "split.json not found" in proc.stderr


def test_the_zoom_probe_reproduces_the_stage_at_zoom_one(scanned_sweep, tmp_path):
    """scripts/probe_scan_tta.py (x11): the run's own scan classifiers, read at zoom 1, give the run's
    test_scan_stage/accuracy; other zoom sets are paired against that; a classifier of another fold is refused."""
    import os

    from tests.conftest import REPO

    _, sweep = scanned_sweep
    script = str(REPO / "scripts" / "probe_scan_tta.py")
    root = json.loads((sweep / "0" / "metrics.json").read_text())["data_root"]
    env = {**os.environ, "BUSI_ROOT": root}
    proc = subprocess.run([sys.executable, script, str(sweep), str(sweep), "--folds", "0", "1",
                           "--zooms", "0.8,1.2"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    table = {line.split("|")[1].strip(): line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ")}
    stage = [json.loads((sweep / str(f) / "metrics.json").read_text())["metrics"]["test_scan_stage/accuracy"]
             for f in (0, 1)]
    assert table["1"][2].strip().startswith(f"{np.mean(stage):.4f}")
    zoomed = [float(line.split("0.8,1.2: ")[1]) for line in proc.stdout.splitlines() if line.startswith("fold ")]
    assert len(zoomed) == 2
    mean = float(table["0.8,1.2"][2].split("+-")[0])
    assert mean == pytest.approx(np.mean(zoomed), abs=1e-3)
    assert float(table["0.8,1.2"][3].split("+-")[0]) == pytest.approx(mean - np.mean(stage), abs=1e-4)
    # fold 0's folder holding fold 1's classifier: it was trained on some of fold 0's test images
    (tmp_path / "scan" / "0").mkdir(parents=True)
    (tmp_path / "scan" / "0" / FILE_NAME).symlink_to(sweep / "1" / FILE_NAME)
    proc = subprocess.run([sys.executable, script, str(sweep), str(tmp_path / "scan"), "--folds", "0"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "fold 0: the scan classifier was trained on" in proc.stderr
    proc = subprocess.run([sys.executable, script, str(sweep), str(sweep), "--zooms", "0.9,x"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "'0.9,x': zooms are numbers" in proc.stderr
