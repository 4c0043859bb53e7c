"""Same seed, same metrics; the run dir records config, split, versions and commit."""

from __future__ import annotations

import json

import yaml

from busiseg.train import train
from tests.test_train import compose_train

RUN = ["trainer=cpu", "trainer.deterministic=true", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
       "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "callbacks.image_logger=null", "seed=3"]


def test_same_seed_identical_metrics_and_run_record(tmp_path):
    data = tmp_path / "data"
    first = train(compose_train(tmp_path / "a", data, RUN))
    second = train(compose_train(tmp_path / "b", data, RUN))
    assert first["metrics"] == second["metrics"]
    a, b = (json.loads((tmp_path / d / "run" / "metrics.json").read_text()) for d in ("a", "b"))
    assert a["metrics"] == b["metrics"] and a["test_confusion_matrix"] == b["test_confusion_matrix"]
    run = tmp_path / "a" / "run"
    info = json.loads((run / "run_info.json").read_text())
    assert info["packages"]["torch"] and info["packages"]["lightning"] and info["python"]
    assert "commit" in info["git"] and info["command"]
    machine = info["machine"]  # bf16 results reproduce only on the same CPU model: the run names it
    assert machine["cpu"]["name"] and machine["cpu_capability"] and machine["torch_threads"] >= 1
    assert isinstance(machine["cpu_bf16"], bool)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["seed"] == 3 and config["paths"]["output_dir"] == str(run)  # resolved
    assert (run / "split.json").is_file()


def test_the_recorded_command_can_be_run_again():
    import busiseg.train
    from busiseg.run_info import command_line

    assert command_line([busiseg.train.__file__, "trainer=cpu", "seed=1"]) == [
        "python", "-m", "busiseg.train", "trainer=cpu", "seed=1"]
    assert command_line(["/opt/scripts/probe.py", "--folds", "0"]) == ["probe.py", "--folds", "0"]
    assert command_line([]) == []
