"""What a run dir records so that it can be reproduced: ``config.yaml`` and ``run_info.json``.

``config.yaml`` is the resolved config (every interpolation filled in; ``resume=RUN_DIR``
reads it back). ``run_info.json`` holds the package versions, Python, platform, the
machine (CPU model and family, the instruction set torch's kernels use, whether bf16 is
native, threads, GPU), the git commit of the working tree (null outside a git checkout;
``dirty`` when files differ) and the command line. The machine matters: bf16 kernels round
differently per CPU model, so a run reproduces bit for bit only on the same model
(docs/reliability.md). Both are written atomically; nothing here touches the network.
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


def _first_processor() -> dict[str, str]:
    """The first processor's block of Linux ``/proc/cpuinfo`` (``key: value``); empty where there is none."""
    block: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if block:
                        break  # the first processor's block is enough
                    continue
                key, _, value = line.partition(":")
                block.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return block


def cpu_model() -> dict[str, str | None]:
    """The CPU's model name, vendor family and model number (Linux ``/proc/cpuinfo``; elsewhere the platform's)."""
    block = _first_processor()
    found: dict[str, str | None] = {"name": block.get("model name"), "family": block.get("cpu family"),
                                    "model": block.get("model")}
    if found["name"] is None:
        found["name"] = platform.processor() or None
    return found


def machine() -> dict[str, Any]:
    """What the numbers of a run depend on beyond the code: CPU model, kernel ISA, bf16, threads, GPU."""
    import torch

    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    from lightning.fabric.accelerators.cuda import num_cuda_devices

    # a count that does not initialise CUDA (NVML), and device names only where CUDA is already up:
    # initialising it here would break forked DDP workers
    count = num_cuda_devices()
    gpus = [torch.cuda.get_device_name(i) for i in range(count)] if torch.cuda.is_initialized() else count
    return {"cpu": cpu_model(), "cpu_capability": capability, "cpu_bf16": cpu_has_bf16(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpus": gpus}


def command_line(argv: list[str] | None = None) -> list[str]:
    """The command as it can be run again: ``python -m busiseg.train ...`` for a busiseg module (``sys.argv[0]``
    is then the module's file), else the script's name and its arguments."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return []
    script = Path(argv[0])
    package = Path(__file__).resolve().parent
    if script.suffix == ".py" and script.resolve().parent == package:
        return ["python", "-m", f"busiseg.{script.stem}", *argv[1:]]
    return [script.name, *argv[1:]]


def run_info() -> dict[str, Any]:
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command_line(),
        "cwd": os.getcwd(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": machine(),
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


# CPU flags (Linux /proc/cpuinfo) of instructions that compute in bfloat16: x86's AVX-512 BF16 and AMX, Arm's BF16
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags() -> frozenset[str] | None:
    """The first processor's instruction-set flags (``flags`` on x86, ``Features`` on Arm) from Linux
    ``/proc/cpuinfo``; None where there is none to read."""
    block = _first_processor()
    value = block.get("flags", block.get("Features"))
    return None if value is None else frozenset(value.split())


def native_bf16(flags: frozenset[str] | None, onednn_bf16: bool) -> bool:
    """Whether bfloat16 runs natively: oneDNN has a bf16 path (``onednn_bf16``) and, where the CPU's flags can be
    read, the CPU has bf16 instructions. oneDNN's own answer is yes on any AVX-512 CPU (it emulates bf16 with
    avx512bw there: Skylake-SP to Ice Lake Xeons), where bf16-mixed trains several times slower than fp32."""
    if not onednn_bf16:
        return False
    return flags is None or bool(flags & NATIVE_BF16_FLAGS)


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (avx512_bf16 or AMX; Arm's BF16), where bf16-mixed is fast.

    Lives here, not in ``busiseg.train``: that module runs as ``__main__``, whose functions the
    joblib launcher pickles by value, and ``torch.ops`` cannot be pickled.
    """
    import torch

    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return native_bf16(cpu_flags(), onednn)
