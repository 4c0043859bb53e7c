"""scripts/cv.sh and scripts/ablation.sh: which training commands they run, skip and resume (a fake python)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import REPO

# Stands in for python: records its arguments, and "trains" by writing hydra.run.dir/metrics.json
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
for a in "$@"; do
  case "$a" in
    hydra.run.dir=*) mkdir -p "${a#hydra.run.dir=}"; echo '{}' > "${a#hydra.run.dir=}/metrics.json" ;;
    resume=*) echo '{}' > "${a#resume=}/metrics.json" ;;
  esac
done
"""


def _run(tmp_path: Path, script: str, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    full_env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls), "BUSI_ROOT": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=60)
    return proc, calls.read_text().splitlines() if calls.exists() else []


def test_cv_runs_each_fold_once_then_skips_and_resumes(tmp_path):
    out = tmp_path / "recipe" / "e03"
    proc, calls = _run(tmp_path, "cv.sh", str(out), "trainer.max_epochs=60", "data.image_size=192", FOLDS="0 2")
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        f"-m busiseg.train experiment=busi_cpu split=kfold split.fold={f} trainer.max_epochs=60 data.image_size=192 "
        f"callbacks.progress_bar=null hydra.run.dir={out}/{f}" for f in (0, 2)]
    # fold 0 finished, fold 1 interrupted (a last.ckpt, no metrics.json), fold 2 finished
    (out / "1" / "checkpoints").mkdir(parents=True)
    (out / "1" / "checkpoints" / "last.ckpt").write_bytes(b"")
    proc, calls = _run(tmp_path, "cv.sh", str(out), "trainer.max_epochs=60", FOLDS="0 1 2", EXPERIMENT="busi_gpu")
    assert proc.returncode == 0, proc.stderr
    assert calls == [f"-m busiseg.train resume={out}/1"]
    assert f"{out}/0: done" in proc.stdout


def test_cv_needs_busi_root_and_an_output_dir(tmp_path):
    proc, calls = _run(tmp_path, "cv.sh", str(tmp_path / "x"), BUSI_ROOT="")
    assert proc.returncode != 0 and "BUSI_ROOT" in proc.stderr and calls == []
    proc, calls = _run(tmp_path, "cv.sh")
    assert proc.returncode != 0 and "usage" in proc.stderr and calls == []


def test_ablation_pairs_arms_fold_by_fold(tmp_path):
    out = tmp_path / "abl"
    proc, calls = _run(tmp_path, "ablation.sh", str(out), ARMS="seg_only ce", FOLDS="3 4")
    assert proc.returncode == 0, proc.stderr
    runs = [c.split("hydra.run.dir=")[1] for c in calls]
    assert runs == [f"{out}/seg_only/3", f"{out}/ce/3", f"{out}/seg_only/4", f"{out}/ce/4"]
    assert "split.fold=3 crop_stage=none refine_stage=none scan_stage=none loss=fixed loss.classification.kind=ce " in calls[1]
    # extra overrides reach every arm, after the arm's own
    proc, calls = _run(tmp_path, "ablation.sh", str(tmp_path / "abl2"), "scheduler=warmup_cosine", "data.batch_size=8",
                       ARMS="seg_only mse", FOLDS="0")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 2 and all("scheduler=warmup_cosine data.batch_size=8" in c for c in calls)
    assert "loss=seg_only scheduler=warmup_cosine" in calls[0]
    proc, calls = _run(tmp_path, "ablation.sh", str(out), ARMS="nope", FOLDS="0")
    assert proc.returncode != 0 and "unknown arm: nope" in proc.stderr and calls == []


def test_cv_parallel_runs_every_fold_at_once_and_reports_a_failed_one(tmp_path):
    out, splits = tmp_path / "g", tmp_path / "saved"
    for f in (0, 1, 2):
        (splits / str(f)).mkdir(parents=True)
        (splits / str(f) / "split.json").write_text("{}")
    proc, calls = _run(tmp_path, "cv_parallel.sh", str(out), "augment=strong", FOLDS="0 1 2", WORKERS="2",
                       SPLITS=str(splits))
    assert proc.returncode == 0, proc.stderr
    assert sorted(calls) == [
        f"-m busiseg.train experiment=busi_gpu split=kfold split.fold={f} split.file={splits}/{f}/split.json "
        f"data.root={tmp_path} data.num_workers=2 augment=strong callbacks.progress_bar=null "
        f"hydra.run.dir={out}/{f}" for f in (0, 1, 2)]
    assert all(f"{out}/{f}: done" in proc.stdout for f in (0, 1, 2))
    # a fold whose training fails: the others finish, the script names it and exits non-zero
    fake = tmp_path / "python_fail1"
    fake.write_text(FAKE_PYTHON.replace('echo "$*" >> "$CALLS"',
                                        'echo "$*" >> "$CALLS"; [[ "$*" == *split.fold=1* ]] && exit 3'))
    fake.chmod(0o755)
    proc, calls = _run(tmp_path, "cv_parallel.sh", str(tmp_path / "h"), FOLDS="0 1 2", PYTHON=str(fake),
                       EXPERIMENT="busi_cpu")
    assert proc.returncode == 1 and f"{tmp_path}/h/1: FAILED (exit 3)" in proc.stderr
    assert len(calls) == 3 and all("experiment=busi_cpu" in c and "split.file" not in c for c in calls)
    assert (tmp_path / "h" / "0" / "metrics.json").exists() and (tmp_path / "h" / "2" / "metrics.json").exists()


def test_cv_parallel_refuses_a_missing_saved_split_before_starting_any_fold(tmp_path):
    splits = tmp_path / "saved"
    (splits / "0").mkdir(parents=True)
    (splits / "0" / "split.json").write_text("{}")
    proc, calls = _run(tmp_path, "cv_parallel.sh", str(tmp_path / "g"), FOLDS="0 1", SPLITS=str(splits))
    assert proc.returncode == 2 and f"no {splits}/1/split.json" in proc.stderr and calls == []


def test_cv_pretrain_pretrains_each_fold_then_fine_tunes_from_its_weights(tmp_path):
    out = tmp_path / "e42"
    proc, calls = _run(tmp_path, "cv_pretrain.sh", str(out), "augment=strong", FOLDS="0 3",
                       PRETRAIN_ARGS="trainer.max_epochs=100 seed=1")
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        f"-m busiseg.{module} experiment=busi_cpu split=kfold split.fold={f} augment=strong{extra} "
        f"callbacks.progress_bar=null hydra.run.dir={run}"
        for f in (0, 3)
        for module, extra, run in (
            ("pretrain", " trainer.max_epochs=100 seed=1", f"{out}/pretrain/{f}"),
            ("train", f" init_weights={out}/pretrain/{f}/checkpoints/last.ckpt", f"{out}/{f}"))]
    # fold 1: pretraining interrupted; done folds are skipped
    (out / "pretrain" / "1" / "checkpoints").mkdir(parents=True)
    (out / "pretrain" / "1" / "checkpoints" / "last.ckpt").write_bytes(b"")
    proc, calls = _run(tmp_path, "cv_pretrain.sh", str(out), "augment=strong", FOLDS="0 1")
    assert proc.returncode == 0, proc.stderr
    assert calls == [f"-m busiseg.pretrain resume={out}/pretrain/1",
                     f"-m busiseg.train experiment=busi_cpu split=kfold split.fold=1 augment=strong "
                     f"init_weights={out}/pretrain/1/checkpoints/last.ckpt callbacks.progress_bar=null "
                     f"hydra.run.dir={out}/1"]
    assert f"{out}/pretrain/0: done" in proc.stdout and f"{out}/0: done" in proc.stdout


def test_ablation_overrides_compose_with_every_second_stage_off(tmp_path):
    """Each arm's command line as Hydra composes it (the fake python only records it): the overrides must be
    ones Hydra takes (``crop_stage=null`` on a command line is refused), and the arms train the network alone."""
    from hydra import compose, initialize_config_dir

    from busiseg.train import crop_settings, refine_settings, scan_settings

    proc, calls = _run(tmp_path, "ablation.sh", str(tmp_path / "abl"), FOLDS="0")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 5  # one per arm
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        for call in calls:
            overrides = [a for a in call.split()[2:] if not a.startswith("hydra.")]
            cfg = compose("train", overrides)
            assert crop_settings(cfg) is None and refine_settings(cfg) is None and scan_settings(cfg) is None, call
            assert cfg.model.encoder_name == "resnet34" and cfg.data.image_size == 128  # still busi_cpu
