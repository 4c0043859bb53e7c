"""Hostile checkpoints are refused, nothing reaches the network, outputs stay inside their folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from busiseg.checkpoint import CheckpointError, read_checkpoint
from busiseg.train import train
from tests.conftest import REPO
from tests.test_predict import run_predict, tiny_ckpt, write_inputs  # noqa: F401
from tests.test_train import compose_train

BLOCK = """
import socket
def _refuse(*a, **k):
    raise OSError("network access attempted")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


class Payload:
    """Unpickling this runs code: it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}, "payload": Payload(marker)}, path)
    return path


def test_pickled_checkpoint_refused_everywhere(tmp_path, tiny_ckpt):  # noqa: F811
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="pickled"):
        read_checkpoint(evil)
    write_inputs(tmp_path / "in", {"a.png": ("L", (40, 40))})
    with pytest.raises(CheckpointError, match="pickled"):
        run_predict(evil, tmp_path / "in", tmp_path / "out")
    # resuming a fit from it: Lightning loads with weights_only=True and refuses
    cfg = compose_train(tmp_path, tmp_path / "data", ["trainer.max_epochs=1", "+trainer.limit_train_batches=1",
                                                      "+trainer.limit_val_batches=1", f"ckpt_path={evil}",
                                                      "test=false", "callbacks.image_logger=null"])
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        train(cfg)
    assert not marker.exists()


def _blocked(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_imports_need_no_network(tmp_path):
    code = BLOCK + "import busiseg.train, busiseg.predict, busiseg.eval, busiseg.export, busiseg.onnx_predictor, " \
                   "busiseg.audit, busiseg.cv_summary, busiseg.run_info\nprint('ok')"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_train_and_predict_run_with_sockets_blocked(tmp_path, monkeypatch, tiny_ckpt):  # noqa: F811
    _blocked(monkeypatch)
    summary = train(compose_train(tmp_path, tmp_path / "data", ["debug=fdr"]))
    assert 0.0 <= summary["metrics"]["test/dice"] <= 1.0
    write_inputs(tmp_path / "in", {"a.png": ("L", (40, 40))})
    assert run_predict(tiny_ckpt, tmp_path / "in", tmp_path / "out").exit_code == 0


def test_hostile_input_names_cannot_escape_output(tiny_ckpt, tmp_path):  # noqa: F811
    # names that look like traversal but are legal file names stay inside the output folder
    src = tmp_path / "in"
    write_inputs(src, {"x..png": ("L", (32, 32)), "[..] (1).png": ("L", (32, 32)), "sub/a .. b.png": ("L", (32, 32))})
    summary = run_predict(tiny_ckpt, src, tmp_path / "out", "overlays=false")
    out = (tmp_path / "out").resolve()
    written = [p for p in tmp_path.rglob("*_pred_mask.png")]
    assert written and all(p.resolve().is_relative_to(out) for p in written)
    assert not summary.failed and len(summary.rows) == 3
    # absolute and '..' names are refused outright: tests/test_predict.py::test_output_names_cannot_escape
