"""Lightning DDP under Hydra: one run dir per job, rank-0 writes, evaluation without padding.

Lightning's DDP strategy (``trainer=ddp``, ``trainer=ddp_sim``) starts the other ranks of a
node by running the same command line again (its subprocess launcher). Under Hydra that
command re-composes the config: with ``-m`` each child would start the whole sweep again,
and its run dir would be the *run* pattern, not the parent's sweep job dir. Lightning adds
``hydra.run.dir=...`` to the children's command, which covers only the single-run case.

So the launching process exports its job's overrides and run dir (``share_run_dir``, called by
``train``) and a child rewrites its own ``sys.argv`` before Hydra parses it
(``adopt_parent_run``, at import of ``busiseg.train``): same overrides as the parent's job, the
parent's run dir, no ``.hydra/`` and no log file of its own (the children log their warnings and errors to
stdout: conf/hydra/job_logging/ddp_child.yaml; rank 0 logs the run). Everything else a run writes (checkpoints, metrics.json, split.json, predictions,
figures, TensorBoard) is written by global rank 0 only.

Processes started by a cluster (SLURM via ``hydra/launcher=submitit_slurm``, torchrun) do
not go through this: there every process is started by the cluster with the same
(resolved) overrides; see docs/scaling.md.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

RUN_DIR_ENV = "BUSISEG_DDP_RUN_DIR"
OVERRIDES_ENV = "BUSISEG_DDP_OVERRIDES"


def is_ddp_child() -> bool:
    """True in a process that Lightning's subprocess launcher started for a job of ours."""
    return RUN_DIR_ENV in os.environ and int(os.environ.get("LOCAL_RANK", "0") or 0) > 0


def global_rank() -> int:
    """This process's global rank: from torch.distributed once initialised, else the launcher's env."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# what Lightning's subprocess launcher sets in the launching process's own environment
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_env_before_job: dict[str, str | None] = {}


def share_run_dir(output_dir: str | os.PathLike) -> None:
    """In the launching process: tell the DDP ranks Lightning will start which job they belong to."""
    if is_ddp_child():
        return
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    os.environ[RUN_DIR_ENV] = str(output_dir)
    os.environ[OVERRIDES_ENV] = json.dumps(overrides)
    _env_before_job.clear()
    _env_before_job.update({k: os.environ.get(k) for k in _LAUNCHER_ENV})


def end_ddp_job() -> None:
    """In the launching process, after a job: close its process group and undo the launcher's env.

    Otherwise the next job of a ``-m`` sweep in the same process finds ``LOCAL_RANK`` set,
    takes its ranks for already started, and waits on the finished job's process group.
    """
    if is_ddp_child() or not _env_before_job:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in _env_before_job.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _env_before_job.clear()
    os.environ.pop(RUN_DIR_ENV, None)
    os.environ.pop(OVERRIDES_ENV, None)


def child_argv(argv: Sequence[str]) -> list[str]:
    """The command line a DDP child should run: the parent job's overrides in the parent's run dir."""
    if not is_ddp_child():
        return list(argv)
    overrides = json.loads(os.environ.get(OVERRIDES_ENV, "[]"))
    run_dir = os.environ[RUN_DIR_ENV].replace("\\", "\\\\").replace('"', '\\"')
    return [
        argv[0],
        *overrides,
        f'hydra.run.dir="{run_dir}"',
        "hydra.output_subdir=null",  # the parent's .hydra/ is the run's record
        "hydra/job_logging=ddp_child",  # one train.log, the parent's; children log their warnings to the console
    ]


def adopt_parent_run(argv: list[str] | None = None) -> None:
    """In a DDP child: rewrite ``sys.argv`` in place (see ``child_argv``); a no-op elsewhere."""
    import sys

    argv = sys.argv if argv is None else argv
    if is_ddp_child():
        argv[:] = child_argv(argv)


def eval_sampler(dataset):
    """A sampler for val/test under DDP that gives every image to exactly one rank (no padding).

    Lightning's default DistributedSampler pads the last shard with repeats, which would count
    those images twice in the synced torchmetrics states. Shards may differ by one image; the
    metric states are summed across ranks, so the result equals a single-process run's.
    Returns None in a single process (the DataLoader's sequential order).
    """
    if world_size() <= 1:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, shuffle=False)
