"""Atomic file writes: a temporary file beside the target, then ``os.replace``.

A run killed mid-write leaves the old file (or none), never half a file that a later
run would trust. Standard library only (the ONNX predictor imports this without torch).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, payload: Any, indent: int = 2, default: Any = None) -> None:
    write_text_atomic(path, json.dumps(payload, indent=indent, default=default) + "\n")


def write_csv_atomic(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """A CSV with a header of ``columns`` and one line per row (keys not in ``columns`` are left out)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def output_folder_problem(folder: str | Path) -> str | None:
    """Why the folder ``folder`` cannot be made or written into, found before any work: a file in the way, or its
    nearest existing folder takes no new file (tried with an unnamed temporary file, so that root, a read-only or
    immutable folder and ``/proc`` are judged by what happens, not by permission bits); None when it can. Nothing
    is left behind. predict, the ONNX predictor, export and cv_summary check their output with it."""
    folder = Path(folder).expanduser()
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, so the output folder cannot be made"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return (f"{existing} is not writable ({exc.strerror or exc})"
                + (", so the output folder cannot be made" if existing != folder else ""))
    return None
