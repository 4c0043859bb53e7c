"""Cross-validation summary: fold aggregation, out-of-fold predictions, the per-run prediction writer."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from busiseg.cv_summary import CVSummaryError, PREDICTION_COLUMNS, main, summarize, write_predictions
from busiseg.data.datamodule import BusiDataModule
from busiseg.data.labels import CLASS_NAMES
from busiseg.data.splits import HoldoutSplitter
from tests.conftest import lock_folders

K = 5
IMAGES = [f"{c}/{c} ({n}).png" for c in CLASS_NAMES for n in range(1, 5)]  # 12 images


def fake_fold_run(run: Path, fold: int, metrics: dict, assignment: str = "a1", k: int = K) -> None:
    """What a k-fold training run leaves: metrics.json, split.json, predictions.csv."""
    run.mkdir(parents=True)
    fold_of = {n: i % k for i, n in enumerate(IMAGES)}
    val = [n for n in IMAGES if fold_of[n] == fold]
    meta = {"splitter": "kfold", "k": k, "fold": fold, "assignment": assignment, "fold_of": fold_of}
    (run / "split.json").write_text(json.dumps({"train": [n for n in IMAGES if n not in val], "val": val,
                                                "test": val, "meta": meta}))
    (run / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    with open(run / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PREDICTION_COLUMNS)
        w.writeheader()
        for part in ("val", "test"):
            for n in val:
                true = n.split("/")[0]
                pred = true if fold != 0 else "benign"  # fold 0's model calls everything benign
                probs = {f"prob_{c}": float(c == pred) for c in CLASS_NAMES}
                w.writerow({"part": part, "image": n, "true_class": true, "pred_class": pred, **probs,
                            "dice": fake_dice(true, fold)})


def fake_dice(true_class: str, fold: int) -> float:
    return {"normal": 1.0, "benign": 0.6, "malignant": 0.3}[true_class] + 0.01 * fold


def fold_metrics(fold: int) -> dict:
    return {"test/dice": 0.5 + 0.05 * fold, "test/accuracy": 0.9 - 0.01 * fold ** 2, "val/loss": 1.0 / (fold + 1)}


@pytest.fixture
def sweep(tmp_path) -> Path:
    for f in range(K):
        fake_fold_run(tmp_path / "sweep" / str(f), f, fold_metrics(f))
    return tmp_path / "sweep"


def test_means_and_stds_equal_the_folds_values(sweep):
    summary = summarize(sweep)
    assert summary["folds"] == list(range(K)) and summary["complete"]
    for m in fold_metrics(0):
        values = [fold_metrics(f)[m] for f in range(K)]
        assert summary["mean"][m] == pytest.approx(np.mean(values))
        assert summary["std"][m] == pytest.approx(np.std(values, ddof=1))
        assert [summary["per_fold"][f][m] for f in range(K)] == pytest.approx(values)
    written = json.loads((sweep / "cv_summary.json").read_text())
    assert written["mean"] == pytest.approx(summary["mean"])
    md = (sweep / "cv_summary.md").read_text()
    assert "| test/dice | 0.6000 |" in md and "fold 4" in md


def test_out_of_fold_predictions_cover_every_image_once(sweep):
    oof = summarize(sweep)["oof"]
    assert oof["images"] == len(IMAGES) and not oof["images_without_prediction"]
    rows = list(csv.DictReader(open(sweep / "oof_predictions.csv")))
    assert sorted(r["image"] for r in rows) == sorted(IMAGES)
    wrong = sum(1 for i, n in enumerate(IMAGES) if i % K == 0 and not n.startswith("benign/"))
    assert oof["metrics"]["accuracy"] == pytest.approx(1 - wrong / len(IMAGES))
    expected = np.mean([fake_dice(n.split("/")[0], i % K) for i, n in enumerate(IMAGES)])
    assert oof["metrics"]["dice_per_image"] == pytest.approx(expected)
    assert sum(map(sum, oof["metrics"]["confusion_matrix"])) == len(IMAGES)


def test_lesion_image_dice_per_fold_and_headline(sweep, capsys):
    summary = summarize(sweep)
    for f in range(K):
        lesion = [fake_dice(n.split("/")[0], f) for i, n in enumerate(IMAGES) if i % K == f and not n.startswith("normal")]
        got = summary["per_fold"][f].get("test/dice_per_image_lesion")
        if lesion:
            assert got == pytest.approx(np.mean(lesion)), f
        else:
            assert got is None
    assert summary["mean"]["test/dice_per_image_malignant"] < summary["mean"]["test/dice_per_image_benign"]
    md = (sweep / "cv_summary.md").read_text()
    assert md.index("## Headline") < md.index("test/dice_per_image_lesion") < md.index("## Every metric")
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("test/dice_per_image_lesion") and "out-of-fold (12 images)" in out


def test_two_stage_headline_beside_the_network_with_the_paired_gain(tmp_path, capsys):
    """Runs with the crop stage: one headline row per metric, the network's test/<m> beside test_two_stage/<m>
    and the per-fold paired difference; Dice (no two-stage value) keeps its row with that cell empty."""
    sweep = tmp_path / "sweep"
    net = [0.70, 0.80, 0.75, 0.72, 0.78]
    gain = [0.02, 0.00, 0.04, -0.01, 0.03]
    for f in range(K):
        fake_fold_run(sweep / str(f), f, {"test/dice_per_image_lesion": 0.6 + 0.01 * f, "test/accuracy": net[f],
                                          "test_two_stage/accuracy": net[f] + gain[f]})
    summary = summarize(sweep)
    md = (sweep / "cv_summary.md").read_text()
    two = [n + g for n, g in zip(net, gain)]
    row = (f"| accuracy | {np.mean(net):.4f} +- {np.std(net, ddof=1):.4f} | {np.mean(two):.4f} +- "
           f"{np.std(two, ddof=1):.4f} | {np.mean(gain):+.4f} +- {np.std(gain, ddof=1):.4f} (3 better, 1 worse of 5) |")
    assert row in md, md
    assert f"| dice_per_image_lesion | {summary['mean']['test/dice_per_image_lesion']:.4f} +- " in md
    assert md.index("| dice_per_image_lesion |") < md.index("| accuracy |") < md.index("## Every metric")
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out.splitlines()
    # the console: the stages' scores under short headers, the paired gain on its own line below (the .md has all)
    assert out[1].split() == ["metric", "network", "crop", "stage"]
    acc = next(line for line in out if line.startswith("accuracy "))
    assert acc.split() == ["accuracy", f"{np.mean(net):.4f}", "+-", f"{np.std(net, ddof=1):.4f}", f"{np.mean(two):.4f}",
                           "+-", f"{np.std(two, ddof=1):.4f}"]
    assert f"crop stage minus network, accuracy: {np.mean(gain):+.3f} +- {np.std(gain, ddof=1):.3f}" in "\n".join(out)
    assert max(len(line) for line in out[:4]) < 120


def test_figures_from_the_folds_curves_and_oof_predictions(sweep):
    for f in range(K):  # a CSV log per fold, as logger=csv/many writes it (train and val rows apart)
        (sweep / str(f) / "csv").mkdir()
        (sweep / str(f) / "csv" / "metrics.csv").write_text(
            "epoch,step,train/loss_epoch,val/dice_per_image,val/accuracy\n"
            + "".join(f"{e},{e},{1.0 - 0.1 * e},,\n{e},{e},,{0.1 * e + 0.01 * f},{0.5}\n" for e in range(4)))
    summary = summarize(sweep)
    assert summary["figures"] == ["cv_learning_curves.png", "cv_confusion_matrix.png", "cv_dice_distribution.png"]
    from PIL import Image

    for name in summary["figures"]:
        with Image.open(sweep / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert "![cv_confusion_matrix.png](cv_confusion_matrix.png)" in (sweep / "cv_summary.md").read_text()
    from busiseg.cv_summary import learning_curves

    curves = learning_curves(sweep / "2")
    assert [e for e, _ in curves["val/dice_per_image"]] == [0, 1, 2, 3]
    assert [v for _, v in curves["val/dice_per_image"]] == pytest.approx([0.1 * e + 0.02 for e in range(4)])
    assert [e for e, _ in curves["train/loss_epoch"]] == [0, 1, 2, 3]


def test_learning_curves_from_tensorboard_events_without_a_csv_log(tmp_path):
    """The default logger is TensorBoard: its runs have curves too (only a CSV log was read)."""
    from torch.utils.tensorboard import SummaryWriter

    from busiseg.cv_summary import learning_curves

    run = tmp_path / "run"
    writer = SummaryWriter(str(run / "tensorboard"))
    for epoch in range(3):
        step = 9 * epoch + 8  # Lightning logs an epoch's scalars at its last step, with the epoch beside them
        writer.add_scalar("epoch", epoch, step)
        writer.add_scalar("val/dice_per_image", 0.5 + 0.1 * epoch, step)
        writer.add_scalar("train/loss_epoch", 1.0 - 0.2 * epoch, step + 1)  # a step with no epoch: left out
    writer.close()
    curves = learning_curves(run)
    assert [e for e, _ in curves["val/dice_per_image"]] == [0, 1, 2]
    assert [v for _, v in curves["val/dice_per_image"]] == pytest.approx([0.5, 0.6, 0.7])
    assert "train/loss_epoch" not in curves and "val/accuracy" not in curves
    assert learning_curves(tmp_path / "nothing") == {}


def test_missing_duplicate_and_mismatched_folds(tmp_path, sweep, caplog):
    import shutil

    shutil.rmtree(sweep / "3")
    summary = summarize(sweep)
    assert summary["missing_folds"] == [3] and not summary["complete"]
    (sweep / "1" / "predictions.csv").unlink()  # test=false, or an older run: the per-image figures lack it
    with caplog.at_level("WARNING", logger="busiseg.cv_summary"):
        summary = summarize(sweep)
    assert summary["oof"]["runs_without_predictions"] == [str(sweep / "1")]
    assert f"no predictions.csv in {sweep / '1'}: the per-image figures" in caplog.text
    assert summary["mean"]["test/dice"] == pytest.approx(np.mean([0.5, 0.55, 0.6, 0.7]))
    fake_fold_run(sweep / "again" / "1", 1, fold_metrics(1))
    with pytest.raises(CVSummaryError, match="fold 1 appears twice"):
        summarize(sweep)
    other = tmp_path / "other"
    fake_fold_run(other / "0", 0, fold_metrics(0))
    fake_fold_run(other / "1", 1, fold_metrics(1), assignment="b2")
    with pytest.raises(CVSummaryError, match="different fold assignments"):
        summarize(other)
    with pytest.raises(CVSummaryError, match="nothing: no such folder"):
        summarize(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CVSummaryError, match="no fold runs"):
        summarize(tmp_path / "empty")
    # one fold: its values, and no standard deviation (null, not 0 and not NaN in the JSON)
    single = tmp_path / "single"
    fake_fold_run(single / "2", 2, fold_metrics(2))
    summary = summarize(single)
    assert summary["mean"]["test/dice"] == pytest.approx(0.6) and summary["std"]["test/dice"] is None
    assert "NaN" not in (single / "cv_summary.json").read_text()
    assert "| test/dice | 0.6000 |" in (single / "cv_summary.md").read_text()


def test_cli(sweep, tmp_path, capsys):
    assert main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    assert "test/dice" in capsys.readouterr().out and (tmp_path / "report" / "cv_summary.md").exists()
    assert main([str(tmp_path / "nothing")]) == 2


def test_cli_an_output_folder_that_cannot_be_written_is_named_in_one_line(sweep, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile.txt").write_text("not a folder")
    for out in (tmp_path / "afile.txt" / "x", tmp_path / "afile.txt"):  # under a file, and a file
        assert main([str(sweep), "--out", str(out)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"busiseg: error: --out {out}: {tmp_path / 'afile.txt'} is a file, so the output folder cannot be made"]
    (tmp_path / "locked").mkdir()
    lock_folders(monkeypatch, tmp_path / "locked")
    assert main([str(sweep), "--out", str(tmp_path / "locked")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"busiseg: error: --out {tmp_path / 'locked'}: {tmp_path / 'locked'} is not writable (Operation not permitted)"]
    # a write that fails all the same (the sweep dir itself, a full disk): one line too
    import busiseg.cv_summary as cv_summary

    def no_room(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(cv_summary, "write_text_atomic", no_room)
    assert main([str(sweep)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"busiseg: error: {sweep}: cannot write the summary there (OSError: No space left on device)"]
    assert not list(tmp_path.glob("locked/*")) and not (tmp_path / "afile.txt").is_dir()


class _AllBenignNoLesion(nn.Module):
    """Stub network: always 'benign', never a lesion pixel."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.dummy.device

    def forward(self, images):
        b, _, h, w = images.shape
        return torch.full((b, 1, h, w), -10.0), torch.tensor([[0.0, 5.0, 0.0]]).expand(b, 3)


def test_write_predictions(tiny_busi, tmp_path):
    dm = BusiDataModule(str(tiny_busi), image_size=32, batch_size=2, eval_batch_size=3,
                        splitter=HoldoutSplitter(0.25, 0.25, seed=0, group_duplicates=False))
    dm.setup()
    path = write_predictions(_AllBenignNoLesion(), dm, tmp_path / "predictions.csv")
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == PREDICTION_COLUMNS
    assert sorted((r["part"], r["image"]) for r in rows) == sorted(
        (p, n) for p in ("val", "test") for n in dm.split[p])
    for r in rows:
        assert r["pred_class"] == "benign"
        assert math.isclose(sum(float(r[f"prob_{c}"]) for c in CLASS_NAMES), 1.0, rel_tol=1e-5)
        # empty prediction: Dice 1 where the true mask is empty too (normal), else 0
        assert float(r["dice"]) == (1.0 if r["true_class"] == "normal" else 0.0)


class _MalignantUnderAutocast(_AllBenignNoLesion):
    """Says malignant when run under CPU autocast, benign otherwise."""

    def forward(self, images):
        masks, logits = super().forward(images)
        if torch.is_autocast_enabled("cpu"):
            logits = torch.tensor([[0.0, 0.0, 5.0]]).expand(len(images), 3)
        return masks, logits


def test_write_predictions_runs_under_the_trainers_precision(tiny_busi, tmp_path):
    # the predictions must be the ones trainer.test scored: under bf16-mixed, inside its autocast
    import lightning as L

    dm = BusiDataModule(str(tiny_busi), image_size=32, batch_size=2, eval_batch_size=3,
                        splitter=HoldoutSplitter(0.25, 0.25, seed=0, group_duplicates=False))
    dm.setup()
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    path = write_predictions(_MalignantUnderAutocast(), dm, tmp_path / "p.csv",
                             forward_context=trainer.precision_plugin.forward_context)
    assert {r["pred_class"] for r in csv.DictReader(open(path))} == {"malignant"}
    path = write_predictions(_MalignantUnderAutocast(), dm, tmp_path / "p.csv")
    assert {r["pred_class"] for r in csv.DictReader(open(path))} == {"benign"}


@pytest.mark.slow
def test_cli_kfold_multirun_then_automatic_summary(tmp_path):
    from tests.test_train import FAST

    sweep = tmp_path / "sweep"
    data_dir = tmp_path / "data"
    cmd = [sys.executable, "-m", "busiseg.train", "-m", "split=kfold", "split.k=2", "split.fold=0,1", "debug=fdr",
           f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep}"] + FAST
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((sweep / "cv_summary.json").read_text())  # written by the Hydra callback
    assert summary["folds"] == [0, 1] and summary["complete"]
    assert summary["oof"]["images"] == 22  # the FAST phantom: every image predicted out of fold once
    for m, v in summary["mean"].items():
        folds = [json.loads((sweep / str(f) / "metrics.json").read_text())["metrics"].get(m) for f in (0, 1)]
        if all(x is None for x in folds):  # per-class Dice: from the runs' predictions.csv, not metrics.json
            assert m.startswith("test/dice_per_image_"), m
            assert v == pytest.approx(np.mean([summary["per_fold"][str(f)][m] for f in (0, 1)]))
            continue
        assert v == pytest.approx(np.mean([x for x in folds if x is not None]))
    bad = subprocess.run(cmd[:3] + ["split=kfold", "split.fold=5", f"paths.log_dir={tmp_path / 'logs'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "split.fold must be in 0..4" in bad.stderr


def test_kfold_training_run_writes_what_the_summary_reads(tmp_path):
    from busiseg.train import train
    from tests.test_train import compose_train

    cfg = compose_train(tmp_path, tmp_path / "data", ["debug=fdr", "split=kfold", "split.k=3", "split.fold=2"])
    train(cfg)
    run = tmp_path / "run"
    split = json.loads((run / "split.json").read_text())
    assert split["meta"]["splitter"] == "kfold" and split["meta"]["fold"] == 2 and split["test"] == split["val"]
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    assert sorted(r["image"] for r in rows if r["part"] == "val") == sorted(split["val"])
    summary = summarize(run)  # one fold of three
    assert summary["folds"] == [2] and summary["missing_folds"] == [0, 1]
    assert summary["oof"]["images"] == len(split["val"])


def _machine(name: str, family: str, gpus: int | list = 0) -> dict:
    return {"cpu": {"name": name, "family": family, "model": "2"}, "cpu_capability": "AVX512", "cpu_bf16": True,
            "cpu_count": 2, "torch_threads": 2, "gpus": gpus}


def test_the_machine_of_each_fold_and_a_warning_when_they_differ(sweep, caplog):
    """bf16 results reproduce only on the same CPU model: the summary names the machine the folds trained on,
    and says so when they differ (or were not recorded)."""
    for f in range(K):
        (sweep / str(f) / "run_info.json").write_text(json.dumps({"machine": _machine("AMD EPYC", "26")}))
    summary = summarize(sweep)
    assert set(summary["machines"].values()) == {"AMD EPYC (family 26 model 2), AVX512, bf16 native"}
    assert "Trained on AMD EPYC (family 26 model 2), AVX512, bf16 native." in (sweep / "cv_summary.md").read_text()
    assert "different machines" not in caplog.text

    (sweep / "3" / "run_info.json").write_text(json.dumps({"machine": _machine("Intel Xeon", "6")}))
    (sweep / "4" / "run_info.json").unlink()
    (sweep / "2" / "run_info.json").write_text(json.dumps({"machine": _machine("AMD EPYC", "26", 2)}))
    (sweep / "1" / "run_info.json").write_text(json.dumps({"machine": _machine("AMD EPYC", "26", ["NVIDIA H200"])}))
    summary = summarize(sweep)
    assert summary["machines"][3].startswith("Intel Xeon (family 6") and summary["machines"][4] is None
    assert summary["machines"][2].endswith(", 2 GPU(s)") and summary["machines"][1].endswith(", GPU NVIDIA H200")
    md = (sweep / "cv_summary.md").read_text()
    assert "The folds ran on different machines" in md and "fold 4: not recorded" in md and "Trained on" not in md
    assert "different machines" in caplog.text


def test_folds_trained_with_other_settings_are_named(sweep, caplog):
    """One cross-validation is one recipe: a fold trained with other settings (a sweep folder reused with other
    overrides) is named, key by key; the run's own folders, caches and the fold number are not settings."""
    import yaml

    for f in range(K):
        config = {"seed": 42, "split": {"fold": f, "k": K, "cache_dir": f"/wt{f}/.audit_cache"},
                  "paths": {"output_dir": str(sweep / str(f))}, "model": {"encoder_name": "resnet34"},
                  "callbacks": {"best_checkpoint": {"dirpath": str(sweep / str(f) / "checkpoints")}},
                  "data": {"image_size": 128}}
        (sweep / str(f) / "config.yaml").write_text(yaml.safe_dump(config))
    summary = summarize(sweep)
    assert summary["setting_differences"] == {} and "different settings" not in caplog.text
    config = yaml.safe_load((sweep / "3" / "config.yaml").read_text())
    config["model"]["encoder_name"], config["data"]["image_size"] = "resnet18", 96
    (sweep / "3" / "config.yaml").write_text(yaml.safe_dump(config))
    summary = summarize(sweep)
    assert summary["setting_differences"] == {
        "data.image_size": {f: 96 if f == 3 else 128 for f in range(K)},
        "model.encoder_name": {f: "resnet18" if f == 3 else "resnet34" for f in range(K)}}
    assert "the folds were trained with different settings" in caplog.text and "fold 3: resnet18" in caplog.text
    assert "**The folds were trained with different settings**" in (sweep / "cv_summary.md").read_text()


def test_a_checkpoint_picked_on_the_test_fold_is_called_optimistic(sweep, caplog):
    summarize(sweep)  # metrics.json without tested_checkpoint (older runs): nothing to say
    assert "optimistic" not in caplog.text
    for f, tested in ((0, "last"), (1, str(sweep / "1" / "checkpoints" / "epoch_007.ckpt"))):
        metrics = json.loads((sweep / str(f) / "metrics.json").read_text())
        (sweep / str(f) / "metrics.json").write_text(json.dumps({**metrics, "tested_checkpoint": tested}))
    split = json.loads((sweep / "1" / "split.json").read_text())
    split["meta"]["test_is_val"] = True
    (sweep / "1" / "split.json").write_text(json.dumps(split))
    summary = summarize(sweep)
    assert summary["checkpoint_picked_on_test"] == [1]
    assert "fold(s) 1 tested the checkpoint picked by val/dice on the validation fold" in caplog.text
    assert "**Optimistic**" in (sweep / "cv_summary.md").read_text()


def test_a_headline_cell_from_some_folds_only_says_so(tmp_path):
    """The crop stage run on fold 0 only: its column is one fold's figure, and the table says so."""
    sweep = tmp_path / "sweep"
    for f in range(K):
        extra = {"test_two_stage/accuracy": 0.9} if f == 0 else {}
        fake_fold_run(sweep / str(f), f, {"test/dice_per_image_lesion": 0.6, "test/accuracy": 0.8, **extra})
    summarize(sweep)
    md = (sweep / "cv_summary.md").read_text()
    assert "| accuracy | 0.8000 +- 0.0000 | 0.9000 (1 of 5 folds) |" in md, md
