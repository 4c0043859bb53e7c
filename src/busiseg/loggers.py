"""Loggers that survive a resume (docs/reliability.md).

Lightning's ``CSVLogger`` deletes the ``metrics.csv`` it finds in its folder when it starts, so resuming a run
(``resume=RUN_DIR``) used to keep only the rows logged after the checkpoint: the learning curve's first epochs
were lost. ``ResumableCSVLogger`` keeps the rows logged before the checkpoint's step and drops the later ones
(what the killed run logged after its last checkpoint, which the resumed run logs again), as TensorBoard's
``purge_step`` does for the event files. ``busiseg.train`` uses it in place of ``CSVLogger`` on a resume.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from busiseg.atomic import write_csv_atomic


class _ResumedWriter(ExperimentWriter):
    """Lightning's writer, but ``metrics.csv`` is cut at ``purge_step`` instead of deleted."""

    def __init__(self, log_dir: str, purge_step: int) -> None:
        self.purge_step = purge_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by the writer's __init__ in place of the deletion
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            kept = [row for row in reader if _step(row) < self.purge_step]
        write_csv_atomic(self.metrics_file_path, kept, header)
        self.metrics_keys = header  # later rows are appended under this header (widened if new keys come)


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that, with ``purge_step``, continues the ``metrics.csv`` of the run it resumes."""

    def __init__(self, *args: Any, purge_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._purge_step = purge_step

    @property
    @rank_zero_experiment  # other DDP ranks get Lightning's dummy writer and leave the file alone
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None and self._purge_step is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedWriter(log_dir=self.log_dir, purge_step=self._purge_step)
        return super().experiment
