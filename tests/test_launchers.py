"""Hydra launchers: SLURM via submitit (no SLURM here: compose + the sbatch script it would submit),
joblib for local parallel jobs (CPU folds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from tests.conftest import REPO
from tests.test_train import FAST, compose_train


def sbatch_script(launcher_cfg, folder: Path) -> str:
    """The sbatch file hydra-submitit-launcher would submit, built the way its ``launch`` builds the executor."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    launcher = instantiate(launcher_cfg)
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")


@pytest.fixture
def fake_srun(tmp_path, monkeypatch):
    """submitit checks that srun exists before it writes anything: a stand-in that is never run."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")


def test_slurm_launcher_takes_resources_from_the_config(tmp_path, data_dir, fake_srun):
    cfg = compose_train(tmp_path, data_dir, ["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4",
                                             "trainer.num_nodes=2", "hydra.launcher.partition=gpu",
                                             "hydra.launcher.timeout_min=90", "split=kfold", "split.fold=3"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 2)
    assert cfg.trainer.sync_batchnorm and cfg.trainer.strategy == "ddp"
    script = sbatch_script(launcher, tmp_path / "submitit")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --time=90", "srun"):
        assert line in script, line


def test_slurm_job_array_of_single_gpu_folds(tmp_path, data_dir, fake_srun):
    cfg = compose_train(tmp_path, data_dir, ["hydra/launcher=slurm", "trainer=gpu", "split=kfold"])
    script = sbatch_script(cfg.hydra.launcher, tmp_path / "submitit")  # trainer=gpu has no num_nodes: 1 node
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=1"):
        assert line in script, line


def test_parallel_launcher_composes(tmp_path, data_dir):
    cfg = compose_train(tmp_path, data_dir, ["hydra/launcher=parallel", "hydra.launcher.n_jobs=3"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 3
    assert type(instantiate(cfg.hydra.launcher)).__name__.endswith("Launcher")


@pytest.mark.slow
def test_parallel_launcher_runs_cpu_folds(tmp_path, data_dir):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "busiseg.train", "-m", *FAST, "debug=fdr", "hydra/launcher=parallel",
           "trainer=cpu", "split=kfold", "split.k=2", "split.fold=0,1", "test=false",
           f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "logs" / "train" / "multiruns").iterdir())
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]
    assert all((sweep / j / "metrics.json").is_file() for j in ("0", "1"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("launcher_data")


def test_slurm_is_the_same_config_as_submitit_slurm(tmp_path, data_dir):
    # conf/hydra/launcher/submitit_slurm.yaml must shadow the plugin's own config of that name
    # (resources from trainer.*), and `slurm` is an alias of it
    a = compose_train(tmp_path, data_dir, ["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=8"])
    b = compose_train(tmp_path, data_dir, ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8"])
    from omegaconf import OmegaConf
    assert OmegaConf.to_container(a.hydra.launcher, resolve=True) == OmegaConf.to_container(b.hydra.launcher, resolve=True)
    assert a.hydra.launcher.gpus_per_node == 8 and a.hydra.launcher.timeout_min == 240


def test_submitit_slurm_prints_no_schema_warning(tmp_path):
    # the shadowing is deliberate: the CLI must not tell users about Hydra's deprecated schema matching
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "default"}
    cmd = [sys.executable, "-m", "busiseg.train", "hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=2",
           f"paths.root_dir={tmp_path}", "--cfg", "hydra", "-p", "hydra.launcher"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gpus_per_node: ${trainer.devices}" in proc.stdout
    assert "ConfigStore schema" not in proc.stderr + proc.stdout
