"""The benchmark scripts stay runnable (tiny CPU configurations; figures are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

TINY = ["model.encoder_name=resnet18", "model.decoder_channels=[16,16,8,8,8]",
        "data.synthetic.n_per_class.benign=6", "data.synthetic.n_per_class.malignant=6",
        "data.synthetic.n_per_class.normal=4"]


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--sizes", "64",
           "--batch-sizes", "2", "--steps", "2", "--warmup", "1", "--no-compile-grid", "--num-workers", "0",
           "--data-dir", str(tmp_path / "data"), "--json", str(out), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 4  # 2 precisions x channels_last on/off
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 and 0 <= r["data_wait_share"] <= 1 for r in rows)


@pytest.mark.slow
def test_train_overhead_benchmark_runs(tmp_path):
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_overhead.py"), "--size", "64", "--batches", "2",
           "--epochs", "2", "--repeats", "1", "--batch-size", "4", "--data-dir", str(tmp_path / "data"),
           "--json", str(out), "callbacks.progress_bar=null", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["busiseg"]) == len(result["plain"]) == 1 and result["ratios"][0] > 0


@pytest.mark.slow
def test_data_pipeline_benchmark_runs(tmp_path):
    out = tmp_path / "data.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "data_pipeline.py"), "--size", "64", "--epochs", "2",
           "--workers", "0", "1", "--train-batches", "1", "--batch-size", "4", "--data-dir", str(tmp_path / "data"),
           "--json", str(out), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["n_images"] == 16 and set(result["loader"]) == {"0", "1"}
