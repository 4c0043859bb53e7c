"""What a run dir records so that it can be reproduced: ``config.yaml`` and ``run_info.json``.

``config.yaml`` is the resolved config (every interpolation filled in; ``resume=RUN_DIR``
reads it back). ``run_info.json`` holds the package versions, Python, platform, the git
commit of the working tree (null outside a git checkout; ``dirty`` when files differ)
and the command line. Both are written atomically; nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("busiseg", "torch", "lightning", "segmentation-models-pytorch", "albumentations", "torchmetrics",
            "hydra-core", "omegaconf", "numpy", "pillow", "opencv-python-headless", "timm")

from busiseg.atomic import write_text_atomic  # noqa: E402

CONFIG_NAME = "config.yaml"
RUN_INFO_NAME = "run_info.json"


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(cwd: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` for the checkout holding ``cwd`` (or this package)."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10)
        return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def run_info() -> dict[str, Any]:
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else [],
        "cwd": os.getcwd(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git_commit(),
    }


def record_run(output_dir: Path, config: dict[str, Any], resumed: bool = False) -> None:
    """Write ``config.yaml`` and ``run_info.json`` (a resume appends itself to ``resumes``)."""
    from omegaconf import OmegaConf

    info_path = output_dir / RUN_INFO_NAME
    info = run_info()
    if resumed and info_path.is_file():
        previous = json.loads(info_path.read_text())
        previous.setdefault("resumes", []).append(info)
        info = previous
    else:
        write_text_atomic(output_dir / CONFIG_NAME, OmegaConf.to_yaml(OmegaConf.create(config)))
    write_text_atomic(info_path, json.dumps(info, indent=2) + "\n")


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (oneDNN: avx512_bf16 or AMX), where bf16-mixed is fast.

    Lives here, not in ``busiseg.train``: that module runs as ``__main__``, whose functions the
    joblib launcher pickles by value, and ``torch.ops`` cannot be pickled.
    """
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
