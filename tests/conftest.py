"""Shared fixtures: tiny datasets written in the BUSI layout under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]


def write_case(root: Path, cls: str, n: int, size=(40, 32), masks=((8, 8, 20, 20),), image_mode="RGB",
               mask_mode="1") -> Path:
    """Write ``root/cls/cls (n).png`` with one mask file per box (x0, y0, x1, y1)."""
    folder = root / cls
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(n)
    grey = rng.integers(60, 200, (h, w), dtype=np.uint8)
    img = Image.fromarray(grey, "L").convert(image_mode)
    path = folder / f"{cls} ({n}).png"
    img.save(path)
    boxes = masks or (None,)
    for k, box in enumerate(boxes):
        m = np.zeros((h, w), np.uint8)
        if box is not None:
            x0, y0, x1, y1 = box
            m[y0:y1, x0:x1] = 255
        suffix = "_mask" if k == 0 else f"_mask_{k}"
        Image.fromarray(m, "L").convert(mask_mode).save(folder / f"{cls} ({n}){suffix}.png")
    return path


@pytest.fixture
def tiny_busi(tmp_path: Path) -> Path:
    """4 images per class, numbers with gaps, normal masks empty (RGB like real BUSI)."""
    root = tmp_path / "busi"
    for n in (1, 2, 4, 7):
        write_case(root, "benign", n)
        write_case(root, "malignant", n, masks=((2, 2, 12, 30),))
        write_case(root, "normal", n, masks=(None,), mask_mode="RGB")
    return root


def lock_folders(monkeypatch, *folders: Path) -> None:
    """Make ``folders`` take no new file, as a read-only or immutable folder would. Root writes through
    permission bits, so the output checks try an unnamed temporary file (busiseg.atomic.
    output_folder_problem); here that try fails in these folders."""
    import tempfile

    locked = {Path(f) for f in folders}
    real = tempfile.TemporaryFile

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) in locked:
            raise PermissionError(1, "Operation not permitted")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the research scripts are not a package; they import their siblings, so
    the scripts folder goes on ``sys.path`` first)."""
    import importlib.util
    import sys

    scripts = str(REPO / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
