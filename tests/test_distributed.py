"""DDP on CPU (trainer=ddp_sim: 2 processes, gloo) through the real command line.

Lightning's DDP launcher re-runs ``python -m busiseg.train`` for rank 1, so these tests run
the command in a subprocess, as a user would. They check: one run dir (rank 1 joins the
parent's, also under ``-m``), rank-0-only files, each test image counted once, and test
metrics equal to a single-process run of the same weights on the same split.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from busiseg.distributed import OVERRIDES_ENV, RUN_DIR_ENV, child_argv
from busiseg.train import train
from tests.conftest import REPO
from tests.test_train import FAST, compose_train

DDP = ["trainer=ddp_sim"]
# metric values are sums of integer counts divided once: equal up to float32 rounding
TOL = 1e-6


@pytest.fixture(scope="module")
def ddp_data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp_data")


def run_cli(root: Path, data_dir: Path, overrides: list[str], multirun: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (RUN_DIR_ENV, OVERRIDES_ENV, "LOCAL_RANK", "RANK")}
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    cmd = [sys.executable, "-m", "busiseg.train", *(["-m"] if multirun else []), *FAST, *DDP, *overrides,
           f"paths.root_dir={root}", f"paths.data_dir={data_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def only_run_dir(root: Path) -> Path:
    runs = [p for p in (root / "logs").rglob("*") if p.is_dir() and (p / ".hydra").is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_child_argv_reuses_the_parent_job(monkeypatch):
    monkeypatch.setenv(RUN_DIR_ENV, "/runs/a b")
    monkeypatch.setenv(OVERRIDES_ENV, json.dumps(["split=kfold", "split.fold=1"]))
    monkeypatch.setenv("LOCAL_RANK", "1")
    argv = child_argv(["train.py", "-m", "split=kfold", "split.fold=0,1", "hydra.run.dir=x"])
    assert argv == ["train.py", "split=kfold", "split.fold=1", 'hydra.run.dir="/runs/a b"',
                    "hydra.output_subdir=null", "hydra/job_logging=ddp_child"]
    monkeypatch.setenv("LOCAL_RANK", "0")  # the launching process itself keeps its command line
    assert child_argv(["train.py", "-m", "a=1,2"]) == ["train.py", "-m", "a=1,2"]


def test_ddp_sim_fast_dev_run_writes_one_run_dir(tmp_path, ddp_data_dir):
    # fast_dev_run: one batch per rank; with eval batches of 8 every image of the 3-image test set
    # (2 + 1 over the ranks: an uneven shard, which a padding sampler would double-count) is in it
    run_cli(tmp_path, ddp_data_dir, ["debug=fdr"])
    run = only_run_dir(tmp_path)
    assert [p.name for p in tmp_path.rglob("metrics.json")] == ["metrics.json"]
    assert len(list(tmp_path.rglob("split.json"))) == 1
    assert not list(run.glob("*ddp_process*")), "a DDP child wrote its own log"
    assert (run / "train.log").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    n_test = sum(metrics["images_per_split"]["test"].values())
    assert sum(map(sum, metrics["test_confusion_matrix"])) == n_test  # no test image counted twice
    rows = (run / "predictions.csv").read_text().strip().splitlines()[1:]
    n_val = sum(metrics["images_per_split"]["val"].values())
    assert len(rows) == n_val + n_test
    assert "test/dice" in metrics["metrics"]


def test_ddp_sim_test_metrics_equal_single_process(tmp_path, ddp_data_dir):
    # a briefly trained checkpoint (non-empty masks, so Dice/IoU/HD are not the trivial values of
    # an untrained net), tested as it is (train=false ckpt_path=...) by one process and by two
    # DDP ranks: identical weights on identical images
    fit = train(compose_train(tmp_path / "fit", ddp_data_dir, ["trainer.max_epochs=10", "test=false"]))
    ckpt = str(Path(fit["best_checkpoint"]).parent / "last.ckpt")
    overrides = ["train=false", f"ckpt_path={ckpt}", "data.eval_batch_size=1"]
    single = train(compose_train(tmp_path / "single", ddp_data_dir, overrides))
    assert single["metrics"]["test/sensitivity"] > 0.0, single["metrics"]  # it predicts lesion pixels (not empty masks)
    assert 0.0 < single["metrics"]["test/dice"] < 1.0
    run_cli(tmp_path / "ddp", ddp_data_dir, overrides)
    ddp = json.loads((only_run_dir(tmp_path / "ddp") / "metrics.json").read_text())
    assert ddp["images_per_split"] == single["images_per_split"]
    assert ddp["test_confusion_matrix"] == single["test_confusion_matrix"]
    names = sorted(k for k in single["metrics"] if k.startswith("test/"))
    assert "test/loss" in names and "test/dice" in names
    assert names == sorted(k for k in ddp["metrics"] if k.startswith("test/"))
    for name in names:  # losses included: torchmetrics means, summed over the ranks
        assert ddp["metrics"][name] == pytest.approx(single["metrics"][name], abs=TOL), name


@pytest.mark.slow
def test_ddp_sim_under_multirun_keeps_each_job_in_its_sweep_dir(tmp_path, ddp_data_dir):
    run_cli(tmp_path, ddp_data_dir, ["debug=fdr", "seed=42,43"], multirun=True)
    sweeps = list((tmp_path / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    assert not (tmp_path / "logs" / "train" / "runs").exists(), "a DDP child started a run of its own"
    assert len(list(tmp_path.rglob("metrics.json"))) == 2
    for job in jobs:
        assert (sweeps[0] / job / "metrics.json").is_file()
