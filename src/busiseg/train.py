"""Train the multi-task U-Net: ``python -m busiseg.train [overrides]``.

Builds everything from ``conf/`` with Hydra, fits, tests the best checkpoint, writes
``metrics.json`` in the run dir and returns ``cfg.optimized_metric`` for sweepers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from busiseg.atomic import write_csv_atomic, write_json_atomic  # noqa: E402
from busiseg.checkpoint import CheckpointError, load_init_weights, training_run_dir  # noqa: E402
from busiseg.cli import entry_point, fail  # noqa: E402
from busiseg.cv_summary import (PREDICTION_COLUMNS, REFINED_PREDICTIONS, SCAN_STAGE_PREDICTIONS,  # noqa: E402
                                TWO_STAGE_PREDICTIONS, write_predictions)
from busiseg.data.busi import DatasetError, summarize  # noqa: E402
from busiseg.data.dataset import CACHE_MODES  # noqa: E402
from busiseg.data.device_augment import from_augment_config  # noqa: E402
from busiseg.data.mixing import BatchMix  # noqa: E402
from busiseg.data.labels import CLASS_NAMES  # noqa: E402
from busiseg.data.splits import PARTS, load_split  # noqa: E402
from busiseg.distributed import adopt_parent_run, end_ddp_job, share_run_dir  # noqa: E402
from busiseg.models.guards import (NONFINITE_ACTIONS, AtomicCheckpointIO, GracefulInterrupt,  # noqa: E402
                                   FitClock, NonFiniteLossError, ResumeState, TrainingInterrupted,
                                   fit_or_raise_interrupted)
from busiseg.models.crop_classifier import CropClassifierError, CropSettings  # noqa: E402
from busiseg.models.mask_refiner import MaskRefinerError, RefinerSettings  # noqa: E402
from busiseg.models.scan_classifier import ScanClassifierError, ScanSettings  # noqa: E402
from busiseg.models.module import MultiTaskModule  # noqa: E402
from busiseg.run_info import CONFIG_NAME, cpu_has_bf16, record_run  # noqa: E402
from busiseg.models.net import EncoderWeightsUnavailable  # noqa: E402

log = logging.getLogger("busiseg.train")

# a DDP rank started by Lightning's launcher joins its parent's job and run dir (busiseg.distributed)
adopt_parent_run()

CONFIG_DIR = os.environ.get("BUSISEG_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


# Lightning's precisions busiseg accepts; ``auto`` is resolved by :func:`resolve_precision` first
PRECISIONS = ("32", "32-true", "64", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")


def check_config(cfg: DictConfig) -> None:
    """Catch impossible values before any heavy work, naming the key."""
    data = cfg.data
    if not cfg.get("train", True) and not cfg.get("test", True):
        raise ConfigError("train=false test=false: nothing to do (train=false ckpt_path=FILE tests a checkpoint; "
                          "busiseg.eval ckpt_path=FILE evaluates one)")
    if data.get("root") in (None, "", "???"):
        raise ConfigError("data.root is not set: pass data.root=/path/to/Dataset_BUSI_with_GT or set BUSI_ROOT")
    for key, value in (("data.image_size", data.image_size), ("seed", cfg.get("seed", 0)),
                       ("trainer.max_epochs", cfg.trainer.get("max_epochs", 1))):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a whole number, got {value!r}")
    size = int(data.image_size)
    epochs = int(cfg.trainer.get("max_epochs", 1))
    if epochs < 1 and epochs != -1:
        raise ConfigError(f"trainer.max_epochs must be >= 1 (or -1: until stopped), got {epochs}")
    lr = (cfg.get("optimizer") or {}).get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ConfigError(f"optimizer.lr must be a number > 0, got {lr!r}")
    if data.get("cache", "memory") not in CACHE_MODES:
        raise ConfigError(f"data.cache must be one of {', '.join(CACHE_MODES)}, got {data.get('cache')!r}")
    if size < 32 or size % 32:
        raise ConfigError(f"data.image_size must be a multiple of 32 and >= 32 (the U-Net halves it 5 times), "
                          f"got {size}")
    if data.get("device_resident") and _multi_process(cfg.trainer):
        raise ConfigError("data.device_resident=true is a one-process option (every DDP rank would hold the whole "
                          "training set and draw the same batches): set data.device_resident=false with "
                          f"trainer.strategy={_strategy_name(cfg.trainer)}")
    precision = str(cfg.trainer.get("precision", 32))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} is not one of auto, {', '.join(PRECISIONS)}")
    accelerator = cfg.trainer.get("accelerator", "auto")
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator=gpu but no CUDA device is visible; use trainer=cpu or trainer=default (auto)")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision == "16-mixed" and on_cpu:  # Lightning would run it as bf16-mixed, the run recording 16-mixed
        raise ConfigError("trainer.precision=16-mixed needs a GPU; on CPU use 32 or bf16-mixed")
    if data.get("device_resident") and not cfg.get("augment_on_device") and cfg.augment.get("_target_", "").split(".")[-1] != "no_augmentation":
        raise ConfigError("data.device_resident=true skips the CPU augmentation: set augment_on_device=true (or augment=none)")
    if precision.startswith("bf16") and accelerator in ("gpu", "cuda") and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"trainer.precision={precision}: this GPU has no bfloat16; use 16-mixed or 32")
    if precision == "bf16-mixed" and on_cpu and not cpu_has_bf16():
        log.warning("trainer.precision=bf16-mixed on a CPU without bfloat16 instructions (no avx512_bf16 or AMX): "
                    "it will be emulated, 13-20x slower than trainer.precision=32 on one such CPU "
                    "(docs/performance.md, 4b); trainer.precision=auto picks 32 here")
    split = cfg.get("split") or {}
    if ("fold" in split and not float(split.get("test_fraction") or 0) and cfg.get("test_ckpt", "best") == "best"
            and cfg.get("train", True) and cfg.get("test", True)):
        log.warning("split=kfold with split.test_fraction=0: the validation fold is the test part, and "
                    "test_ckpt=best picks the checkpoint by val/dice on the images it then scores, so the test "
                    "metrics are optimistic; test_ckpt=last tests the weights the fit ends with (experiment=busi_cpu "
                    "does)")
    nonfinite = (cfg.get("guard") or {}).get("nonfinite", "stop")
    if nonfinite not in NONFINITE_ACTIONS:
        raise ConfigError(f"guard.nonfinite must be one of {', '.join(NONFINITE_ACTIONS)}, got {nonfinite!r}")
    step_ckpt = (cfg.get("callbacks") or {}).get("step_checkpoint")
    if step_ckpt and int(step_ckpt.get("every_n_train_steps") or 0) < 1:
        raise ConfigError("callbacks.step_checkpoint.every_n_train_steps must be >= 1 "
                          "(or callbacks.step_checkpoint=null to save only at epoch ends)")
    if cfg.get("test_ckpt", "best") not in ("best", "last"):
        raise ConfigError(f"test_ckpt must be best or last, got {cfg.get('test_ckpt')!r}")
    crop_settings(cfg)
    refine_settings(cfg)
    scan_settings(cfg)
    split = cfg.get("split") or {}
    if "fold" in split and not 0 <= int(split.fold) < int(split.k):
        raise ConfigError(f"split.fold must be in 0..{int(split.k) - 1} (split.k={split.k}), got {split.fold}")
    if cfg.get("test", True) and cfg.get("test_ckpt", "best") == "best" and not split_has_part(cfg, "val") \
            and split_has_part(cfg, "test"):
        raise ConfigError(f"test_ckpt=best picks the checkpoint by its validation score, but {_no_part(cfg, 'val')} "
                          "leaves no validation images: set test_ckpt=last (the weights the fit ends with)")


def _same_score(a: Any, b: Any) -> bool:
    return a is not None and b is not None and float(a) == float(b)


def validate_quietly(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule,
                     ckpt_path: str) -> dict[str, Any]:
    """The ``val/*`` metrics of ``ckpt_path``'s weights, validated with the loggers detached (the curves keep the
    epochs' own points) and no checkpoint saved (only a fit saves); none with a weight-averaging callback."""
    from lightning.pytorch.callbacks import WeightAveraging

    if any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks):
        # it would swap its running average (the last epoch's) in over the loaded weights
        log.info("val/* in metrics.json are the last epoch's: with weight averaging the kept checkpoint is not "
                 "validated again")
        return {}
    loggers = trainer.loggers
    trainer.loggers = []
    try:
        trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True, verbose=False)
    finally:
        trainer.loggers = loggers
    return {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def split_has_part(cfg: DictConfig, part: str) -> bool:
    """Whether the run's split will hold images in ``part`` (val or test), from the config alone: a k-fold split
    always has its validation fold; a holdout one has none where its ``{part}_fraction`` is 0 (``split=all``);
    with ``split.file``, the file says (an unreadable file is the datamodule's to report)."""
    split = cfg.get("split") or {}
    if split.get("file"):
        try:
            return bool(load_split(split.file)[part])
        except ValueError:
            return True
    if "fold" in split:  # k-fold: the validation fold, which is the test part too unless split.test_fraction > 0
        return True
    return float(split.get(f"{part}_fraction", 1.0)) > 0


def _no_part(cfg: DictConfig, part: str) -> str:
    """How the config came to leave ``part`` empty, for a message."""
    split = cfg.get("split") or {}
    if split.get("file"):
        return f"split.file={split.file}"
    return f"split.{part}_fraction={float(split.get(f'{part}_fraction', 0)):g}"


def _stage_settings(cfg: DictConfig, group: str, settings_class: type, errors: tuple[type, ...],
                    **when_null: Any) -> Any:
    """A second stage's config group as its settings dataclass (None when the group is null); an unknown key or
    a value out of range is a ConfigError naming it. ``when_null``: values for keys left null in the group."""
    stage = cfg.get(group)
    if not stage:
        return None
    values = OmegaConf.to_container(stage, resolve=True)
    fields = {f.name for f in dataclasses.fields(settings_class)}
    unknown = sorted(set(values) - fields)
    if unknown:
        label = group.replace("_", "-")
        raise ConfigError(f"{group}.{unknown[0]} is not a {label} setting (known: {', '.join(sorted(fields))})")
    values.update({k: v for k, v in when_null.items() if values.get(k) is None})
    try:
        return settings_class(**values)
    except (*errors, TypeError, ValueError) as exc:
        raise ConfigError(f"{group}: {exc}") from exc


def crop_settings(cfg: DictConfig) -> CropSettings | None:
    """The ``crop_stage`` group's settings (None when the group is null or ``crop_stage=none``); a bad value names its key.
    The crop classifier trains from scratch (``start: network`` is the scan stage's)."""
    settings = _stage_settings(cfg, "crop_stage", CropSettings, (CropClassifierError,))
    if settings is not None and settings.start != "scratch":
        raise ConfigError(f"crop_stage.start={settings.start}: the crop classifier trains from scratch (starting from "
                          "the network's encoder is the scan stage's: scan_stage.start=network)")
    return settings


def refine_settings(cfg: DictConfig) -> RefinerSettings | None:
    """The ``refine_stage`` group's settings (None when the group is null or ``refine_stage=none``); a bad value names its key. Its
    ``seed: null`` is the run's seed plus the k-fold fold (``busiseg.refine_stage.stage_seed``)."""
    from busiseg.refine_stage import stage_seed

    return _stage_settings(cfg, "refine_stage", RefinerSettings, (MaskRefinerError,),
                           seed=stage_seed(int(cfg.get("seed", 42)), cfg.get("split")))


def scan_settings(cfg: DictConfig) -> ScanSettings | None:
    """The ``scan_stage`` group's settings (None when the group is null or ``scan_stage=none``); a bad value names its key. Its
    ``seed: null`` is the run's seed plus the k-fold fold, as the refine stage's; ``arch: null`` is the network's
    encoder (``model.encoder_name``) with ``start: network``, else resnet18. ``start: network`` with an encoder
    the classifier cannot be is a ConfigError before the fit."""
    from busiseg.models.crop_classifier import ARCHS
    from busiseg.refine_stage import stage_seed

    stage = cfg.get("scan_stage") or {}
    encoder = str((cfg.get("model") or {}).get("encoder_name", ""))
    from_network = stage.get("start") == "network"
    if from_network and encoder not in ARCHS:
        raise ConfigError(f"scan_stage.start=network starts the scan classifier from the network's encoder, which "
                          f"must be one of {', '.join(ARCHS)}: model.encoder_name={encoder} (or scan_stage.start=scratch)")
    settings = _stage_settings(cfg, "scan_stage", ScanSettings, (ScanClassifierError,),
                               seed=stage_seed(int(cfg.get("seed", 42)), cfg.get("split")),
                               arch=encoder if from_network else "resnet18")
    if settings is not None and from_network and settings.arch != encoder:
        raise ConfigError(f"scan_stage.arch={settings.arch}: scan_stage.start=network starts the scan classifier from "
                          f"the network's encoder, a {encoder} (model.encoder_name); set scan_stage.arch=null")
    return settings


def _stage_parts(datamodule: L.LightningDataModule, evaluate: bool) -> tuple[dict[str, list], bool]:
    """The parts a second stage scores (``{part: records}``: the test part, and the validation part when it is
    another one) and whether the test part is the validation fold (k-fold)."""
    names = {p: [datamodule.records[i] for i in getattr(datamodule, f"{p}_dataset").indices] for p in ("val", "test")}
    same = [r.name for r in names["val"]] == [r.name for r in names["test"]]  # k-fold: the test part is the val fold
    parts = {} if not evaluate else {"test": names["test"]} if same and names["test"] else \
        {p: v for p, v in names.items() if v}
    return parts, same


def _stage_outputs(results: dict[str, Any], same: bool, prefix: str, path: Path) -> dict[str, float]:
    """``{prefix}/*`` metrics of the test part, and every scored part's per-image rows written to ``path``."""
    metrics = {f"{prefix}/{k}": v for k, v in results["test"].as_training.items()} if "test" in results else {}
    rows = [row for part, result in results.items()
            for row in result.prediction_rows(("val", "test") if same else (part,))]
    if rows:
        write_csv_atomic(path, rows, PREDICTION_COLUMNS)
    return metrics


def run_refine_stage(cfg: DictConfig, module: MultiTaskModule, datamodule: L.LightningDataModule, output_dir: Path,
                     evaluate: bool) -> tuple[Any, dict[str, Any], dict[str, float]]:
    """``refine_stage=default``: the mask refiner trained on the run's training part (RUN/mask_refiner.pt and
    .png) and, with ``evaluate``, the test part (and the validation part when it is another one) scored with its
    masks, with the weights the test part was scored with, written to RUN/predictions_refined.csv. Returns the
    refiner, what metrics.json records about the stage and the ``test_refined/*`` metrics."""
    from busiseg.refine_stage import FILE_NAME, for_training_run

    parts, same = _stage_parts(datamodule, evaluate)
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    progress = bool((cfg.get("callbacks") or {}).get("progress_bar")) and bool(cfg.trainer.get("enable_progress_bar", True))
    refiner, info, results = for_training_run(
        refine_settings(cfg), Path(datamodule.root), output_dir / "split.json", module.net, parts,
        int(cfg.data.image_size), int(cfg.data.in_channels), int(datamodule.eval_batch_size),
        precision=str(cfg.trainer.precision), channels_last=bool(cfg.get("channels_last", False)),
        device="cpu" if accelerator == "cpu" else "auto", out=output_dir / FILE_NAME, progress=progress,
        reuse=bool(cfg.get("resume")))
    return refiner, info, _stage_outputs(results, same, "test_refined", output_dir / REFINED_PREDICTIONS)


def run_crop_stage(cfg: DictConfig, module: MultiTaskModule, datamodule: L.LightningDataModule, output_dir: Path,
                   evaluate: bool, mask_refiner: Any = None) -> tuple[dict[str, Any], dict[str, float]]:
    """``crop_stage=default``: the crop classifier trained on the run's training part (RUN/crop_classifier.pt
    and .png) and, with ``evaluate``, the two-stage classes of the test part (and of the validation part,
    for cv_summary's out-of-fold rows) with the weights the test part was scored with, written to
    RUN/predictions_two_stage.csv. ``mask_refiner``: the run's refine stage, whose masks the crops are then cut
    around (and scored). Returns what metrics.json records about the stage and the ``test_two_stage/*`` metrics."""
    from busiseg.crop_stage import FILE_NAME, for_training_run

    parts, same = _stage_parts(datamodule, evaluate)
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    progress = bool((cfg.get("callbacks") or {}).get("progress_bar")) and bool(cfg.trainer.get("enable_progress_bar", True))
    info, results = for_training_run(
        crop_settings(cfg), Path(datamodule.root), output_dir / "split.json", module.net, parts,
        int(cfg.data.image_size), int(cfg.data.in_channels), int(datamodule.eval_batch_size),
        precision=str(cfg.trainer.precision), channels_last=bool(cfg.get("channels_last", False)),
        device="cpu" if accelerator == "cpu" else "auto", out=output_dir / FILE_NAME, progress=progress,
        reuse=bool(cfg.get("resume")),
        mask_refiner=mask_refiner)
    return info, _stage_outputs(results, same, "test_two_stage", output_dir / TWO_STAGE_PREDICTIONS)


def run_scan_stage(cfg: DictConfig, module: MultiTaskModule, datamodule: L.LightningDataModule, output_dir: Path,
                   evaluate: bool, mask_refiner: Any = None, crop_classifier: Any = None
                   ) -> tuple[dict[str, Any], dict[str, float]]:
    """``scan_stage=default``: the whole-scan classifier trained on the run's training part
    (RUN/scan_classifier.pt and .png) and, with ``evaluate``, the recipe's diagnosis of the test part (and of the
    validation part when it is another one): the mean of its class probabilities and the network's, or the
    two-stage ones with the run's crop stage, on the run's refined masks with its refine stage; written to
    RUN/predictions_scan_stage.csv. Returns what metrics.json records about the stage and the
    ``test_scan_stage/*`` metrics."""
    from busiseg.scan_stage import FILE_NAME, for_training_run

    parts, same = _stage_parts(datamodule, evaluate)
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    progress = bool((cfg.get("callbacks") or {}).get("progress_bar")) and bool(cfg.trainer.get("enable_progress_bar", True))
    info, results = for_training_run(
        scan_settings(cfg), Path(datamodule.root), output_dir / "split.json", module.net, parts,
        int(cfg.data.image_size), int(cfg.data.in_channels), int(datamodule.eval_batch_size),
        precision=str(cfg.trainer.precision), channels_last=bool(cfg.get("channels_last", False)),
        device="cpu" if accelerator == "cpu" else "auto", out=output_dir / FILE_NAME, progress=progress,
        reuse=bool(cfg.get("resume")),
        crop_classifier=crop_classifier, mask_refiner=mask_refiner)
    return info, _stage_outputs(results, same, "test_scan_stage", output_dir / SCAN_STAGE_PREDICTIONS)


def _on_gpu(trainer_cfg: DictConfig) -> bool:
    return trainer_cfg.get("accelerator", "auto") in ("gpu", "cuda", "auto") and torch.cuda.is_available()


def resolve_precision(cfg: DictConfig) -> None:
    """``trainer.precision=auto`` -> ``bf16-mixed`` where the training device runs bfloat16 natively
    (a GPU with bf16, a CPU with avx512_bf16 or AMX), else ``32``: emulated bf16 on a CPU without
    those instructions is several times slower than fp32 (docs/performance.md, 4b). The config is
    changed in place before anything reads it, so the run's config.yaml, its checkpoints and
    ``busiseg.eval`` (which evaluates at the training precision) all see the value it ran at."""
    if str(cfg.trainer.get("precision")) != "auto":
        return
    gpu = _on_gpu(cfg.trainer)
    native = torch.cuda.is_bf16_supported() if gpu else cpu_has_bf16()
    cfg.trainer.precision = "bf16-mixed" if native else "32"
    log.info("trainer.precision=auto: %s on this %s (%s bfloat16 instructions)", cfg.trainer.precision,
             "GPU" if gpu else "CPU", "with" if native else "without")


def _strategy_name(trainer_cfg: DictConfig) -> str:
    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, DictConfig):
        return str(strategy.get("_target_", "")).rsplit(".", 1)[-1]
    return str(strategy)


def _multi_process(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer config starts several training processes (DDP, FSDP, several nodes)."""
    name = _strategy_name(trainer_cfg).lower()
    return int(trainer_cfg.get("num_nodes", 1) or 1) > 1 or any(k in name for k in ("ddp", "fsdp", "deepspeed"))


def resume_config(cfg: DictConfig) -> DictConfig:
    """For ``resume=RUN_DIR``: the run's stored config pointed at its own dir, split and last checkpoint.

    Without ``RUN_DIR/config.yaml`` (a run from before it was written) the given config is
    used with ``paths.output_dir=RUN_DIR``.
    """
    run = Path(str(cfg.resume)).expanduser()
    last = run / "checkpoints" / "last.ckpt"
    if run.is_file():  # a checkpoint of the run given for the run
        raise ConfigError(f"resume={run}: a file; resume= takes the run dir (resume={training_run_dir(run)}), and "
                          "resumes from its checkpoints/last.ckpt")
    if not run.is_dir():
        raise ConfigError(f"resume={run}: no such run dir")
    if not last.is_file():
        raise ConfigError(f"resume={run}: no checkpoints/last.ckpt to resume from (the run stopped before its "
                          f"first checkpoint; start it again)")
    stored = run / CONFIG_NAME
    if stored.is_file():
        container = OmegaConf.to_container(OmegaConf.load(stored))
        # the stored config is resolved: checkpoint and logger folders name the dir the run was made in; a run dir
        # moved or copied since writes into itself, not into the old place (nor into the original of a copy)
        made_in = str((container.get("paths") or {}).get("output_dir") or "")
        if made_in and Path(made_in).resolve() != run.resolve():
            container = _moved(container, made_in.rstrip("/"), str(run.resolve()))
            log.info("resume=%s: the run was made in %s; its folders are taken to be here", run, made_in)
        resumed = OmegaConf.create(container)
    else:
        resumed = cfg.copy()
    with open_dict(resumed):
        resumed.resume = str(run)
        resumed.paths.output_dir = str(run)
        resumed.ckpt_path = str(last)
        if (run / "split.json").is_file() and resumed.get("split") is not None:
            resumed.split.file = str(run / "split.json")
    return resumed


def _moved(node: Any, old: str, new: str) -> Any:
    """``node`` (plain containers) with every string naming ``old`` or a path under it pointed at ``new``."""
    if isinstance(node, dict):
        return {k: _moved(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_moved(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old + "/")):
        return new + node[len(old):]
    return node


def _resumed_step(ckpt_path: str | None) -> int | None:
    """The logger step a checkpoint resumes at (TensorBoard hides later events of the killed run)."""
    if not ckpt_path:
        return None
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        # the next step logged after the restore (Lightning saves its step counter one behind)
        return int(ckpt["global_step"])
    except Exception:  # an unreadable checkpoint is reported by trainer.fit itself
        return None


def _plain(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as plain, resolved containers (Hydra's own node left out)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)  # present only when composed with return_hydra_config
    return plain  # type: ignore[return-value]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = "null" if v is None else v
        else:
            out[key] = str(v)
    return out


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write: a killed run never leaves a half-written file."""
    write_json_atomic(path, payload, indent=2)


def _scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """Epoch-level scalars under ``prefix`` (per-step duplicates dropped, ``_epoch`` suffix removed)."""
    return {
        k.removesuffix("_epoch"): float(v)
        for k, v in sorted(metrics.items())
        if k.startswith(prefix) and not k.endswith("_step") and torch.as_tensor(v).numel() == 1
    }


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The datamodule of ``cfg.data`` with its augmentation and splitter (its split goes to the run dir)."""
    on_device = bool(cfg.get("augment_on_device", False))
    return hydra.utils.instantiate(
        cfg.data,
        # augment on the CPU per sample, or (augment_on_device) on the training device per batch
        train_transform=None if on_device else hydra.utils.instantiate(cfg.augment),
        splitter=hydra.utils.instantiate(cfg.split),
        split_out=str(Path(cfg.paths.output_dir) / "split.json"),
        _convert_="object",
    )


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback]) -> L.Trainer:
    """The trainer of ``cfg.trainer`` with ``callbacks`` + those of ``cfg.callbacks``, the exact-resume and
    interrupt guards, and the loggers of ``cfg.logger``."""
    output_dir = Path(cfg.paths.output_dir)
    configured = {k: c for k, c in (cfg.get("callbacks") or {}).items() if c}
    validating = split_has_part(cfg, "val")  # split=all: no validation part
    if not validating:
        # split=all: no validation part, so nothing to pick a best checkpoint or stop early by
        watching = [k for k, c in configured.items() if str(c.get("monitor") or "").startswith("val/")]
        if watching:
            log.info("%s leaves no validation images: %s %s (watching %s) %s off; checkpoints/last.ckpt holds the "
                     "weights the fit ends with", _no_part(cfg, "val"), "callbacks" if len(watching) > 1 else "callback",
                     ", ".join(watching), ", ".join(sorted({str(configured[k].monitor) for k in watching})),
                     "are" if len(watching) > 1 else "is")
        configured = {k: c for k, c in configured.items() if k not in watching}
    if not any(c for c in (cfg.get("logger") or {}).values()):
        # ~logger: Lightning's learning-rate monitor refuses a trainer without a logger (a traceback after the data
        # was read); it has nothing to write to, so it is left out
        needing = [k for k, c in configured.items() if str(c.get("_target_", "")).endswith("LearningRateMonitor")]
        if needing:
            log.info("no logger: callbacks.%s (a learning-rate monitor) is off", ", callbacks.".join(needing))
        configured = {k: c for k, c in configured.items() if k not in needing}
    callbacks = [hydra.utils.instantiate(c) for c in configured.values()] + callbacks
    # always on: exact resume (epoch position, RNG states) and a checkpoint on SIGTERM/SIGINT
    callbacks += [ResumeState(), GracefulInterrupt(output_dir / "checkpoints"), FitClock()]
    purge_step = _resumed_step(cfg.get("ckpt_path"))
    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if not c:
            continue
        target = str(c.get("_target_", ""))
        if purge_step is not None and target.endswith("TensorBoardLogger"):
            # events the killed run logged after its last checkpoint are hidden, not duplicated
            loggers.append(hydra.utils.instantiate(c, purge_step=purge_step))
        elif purge_step is not None and target.endswith("CSVLogger"):
            # Lightning's CSVLogger would delete the resumed run's metrics.csv: keep its rows before the checkpoint
            loggers.append(hydra.utils.instantiate(c, _target_="busiseg.loggers.ResumableCSVLogger",
                                                   purge_step=purge_step))
        else:
            loggers.append(hydra.utils.instantiate(c))
    # split=all: no validation loop at all (not an empty one, which Lightning warns about at every epoch)
    no_val = {} if validating else {"limit_val_batches": 0}
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                   plugins=[AtomicCheckpointIO()], **no_val)


def build_batch_mix(cfg: DictConfig) -> BatchMix | None:
    """The ``mix`` group's Mixup/CutMix of training batches, seeded by the run's seed; None for mix=none."""
    if not cfg.get("mix"):
        return None
    return hydra.utils.instantiate(cfg.mix, seed=int(cfg.get("seed") or 0))


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, MultiTaskModule, L.Trainer]:
    """Instantiate datamodule, module and trainer from the config (no training)."""
    resolve_precision(cfg)  # train() has done it already; the benchmarks call build() directly
    on_device = bool(cfg.get("augment_on_device", False))
    datamodule = build_datamodule(cfg)
    net = hydra.utils.instantiate(cfg.model)
    extra_callbacks: list[L.Callback] = []
    if cfg.get("init_weights") and not cfg.get("ckpt_path"):
        # a new fit from pretrained network weights (resume and ckpt_path bring their own weights)
        extra_callbacks.append(load_init_weights(net, str(cfg.init_weights), _plain(cfg)["model"]))
    module = MultiTaskModule(
        net=net,
        loss=hydra.utils.instantiate(cfg.loss),
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        config=_plain(cfg),
        channels_last=bool(cfg.get("channels_last", False)),
        compile=bool(cfg.get("compile", False)),
        device_augment=from_augment_config(OmegaConf.to_container(cfg.augment)) if on_device else None,
        batch_mix=build_batch_mix(cfg),
    )
    module.nonfinite = str((cfg.get("guard") or {}).get("nonfinite", "stop"))
    return datamodule, module, build_trainer(cfg, extra_callbacks)


_RESUME_LOG: list[logging.Handler] = []


def _log_into_the_resumed_run(run: Path) -> None:
    """The resumed process's log goes on in RUN/train.log too (Hydra writes it to the resume's own run dir), so
    the run's log does not end at the interruption."""
    root = logging.getLogger()
    for handler in _RESUME_LOG:  # one resumed run per process at a time (tests run several)
        root.removeHandler(handler)
        handler.close()
    _RESUME_LOG.clear()
    target = (run / "train.log").resolve()
    if any(getattr(h, "baseFilename", None) == str(target) for h in root.handlers):
        return  # the resume runs in the run dir itself
    handler = logging.FileHandler(target, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    _RESUME_LOG.append(handler)
    own = _hydra_config().get("runtime", {}).get("output_dir")
    log.info("resumed: this process's log goes on in %s%s", target, f" (and in {own}/train.log)" if own else "")


def _hydra_config() -> DictConfig | dict:
    """Hydra's own config of this job; empty when not under Hydra (a config composed by hand)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else {}


def _overrides_beside_resume() -> list[str]:
    """The command line's overrides other than ``resume=`` and Hydra's own (which a resume does not apply)."""
    task = list(_hydra_config().get("overrides", {}).get("task") or [])
    return [o for o in task if not o.split("=", 1)[0].lstrip("+~").startswith(("resume", "hydra."))]


def prepare_run(cfg: DictConfig) -> tuple[DictConfig, bool, Path]:
    """What every fitting entry point does first: the stored config for ``resume=RUN_DIR``, the
    precision resolved, the config checked, the seed set, the run dir made.
    Returns ``(config, resumed, run dir)``."""
    resumed = bool(cfg.get("resume"))
    if resumed:
        ignored = _overrides_beside_resume()
        cfg = resume_config(cfg)
        _log_into_the_resumed_run(Path(cfg.paths.output_dir))
        if ignored:
            log.warning("resume= continues the run with the settings it was started with: %s ignored (for other "
                        "settings, start a new run from its weights: ckpt_path=%s)", " ".join(ignored), cfg.ckpt_path)
    resolve_precision(cfg)
    check_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return cfg, resumed, output_dir


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, write metrics.json; return the metrics."""
    cfg, resumed, output_dir = prepare_run(cfg)
    share_run_dir(output_dir)  # for the DDP ranks Lightning may start
    try:
        datamodule, module, trainer = build(cfg)
    except InstantiationException as exc:  # e.g. a negative loss weight: the ValueError names the key
        if isinstance(exc.__cause__, EncoderWeightsUnavailable):
            raise exc.__cause__ from None  # its own one-line message, not Hydra's wrapping of it
        if not isinstance(exc.__cause__, ValueError) or isinstance(exc.__cause__, DatasetError):
            raise
        raise ConfigError(str(exc.__cause__).strip()) from exc
    if trainer.is_global_zero:
        record_run(output_dir, _plain(cfg), resumed=resumed)

    if cfg.get("train", True):
        fit_or_raise_interrupted(trainer, module, datamodule, cfg.get("ckpt_path"), output_dir, "busiseg.train")
    # across resumes: the time the checkpoint stored plus this process's (build_trainer adds the clock)
    fit_seconds = next(c for c in trainer.callbacks if isinstance(c, FitClock)).seconds()
    fit_metrics = dict(trainer.callback_metrics)
    if cfg.get("train", True) and trainer.is_global_zero:
        fit_metrics = _with_fit_record(output_dir, fit_metrics, fit_seconds)

    best_ckpt = None
    picker = trainer.checkpoint_callback  # the first ModelCheckpoint: the best one, unless it is off (split=all)
    if picker is not None and picker.monitor is not None and not trainer.fast_dev_run:
        best_ckpt = picker.best_model_path or None
    test_metrics: dict[str, Any] = {}
    test_ckpt = cfg.get("test_ckpt", "best")
    if cfg.get("train", True) and test_ckpt == "best" and best_ckpt and picker.best_model_score is not None \
            and not _same_score(fit_metrics.get(picker.monitor), picker.best_model_score):
        # the kept checkpoint is an earlier epoch's: metrics.json, the HPARAMS tab and the value a sweeper gets
        # report its validation scores, not the last epoch's
        fit_metrics.update(validate_quietly(trainer, module, datamodule, best_ckpt))
    tested: str | None = None
    testing = bool(cfg.get("test", True))
    if testing:
        datamodule.setup("test")  # the fit has set it up (this returns at once); with train=false, here
    if testing and not len(datamodule.test_dataset):
        log.info("no test part (%s): nothing is scored; checkpoints/last.ckpt holds the weights the fit ended with",
                 _no_part(cfg, "test"))
        testing = False
    if testing:
        if not cfg.get("train", True) and cfg.get("ckpt_path"):
            tested = str(cfg.ckpt_path)  # train=false ckpt_path=...: test that checkpoint's weights
        elif test_ckpt == "best":
            tested = best_ckpt
            if tested is None:
                log.warning("no best checkpoint (fast_dev_run or no checkpoint callback): testing the current weights")
        else:
            # test_ckpt=last: the weights the fit ended with, chosen by nothing that saw the
            # validation part (honest k-fold CV, where the validation fold is the test fold)
            tested = None
        trainer.test(module, datamodule=datamodule, ckpt_path=tested, weights_only=True)
        test_metrics = dict(trainer.callback_metrics)
        if trainer.is_global_zero:  # per-image predictions, for cv_summary's out-of-fold results
            write_predictions(module, datamodule, output_dir / "predictions.csv",
                              forward_context=trainer.precision_plugin.forward_context)

    metrics = {**_scalars(fit_metrics, "val/"), **_scalars(fit_metrics, "train/"), **_scalars(test_metrics, "test/")}
    crop_stage = refine_stage = scan_stage = refiner = None
    if cfg.get("refine_stage") and trainer.is_global_zero:
        refiner, refine_stage, refined = run_refine_stage(cfg, module, datamodule, output_dir, testing)
        metrics.update(refined)
        if refined:
            # the lesion-image Dice is cv_summary's (from predictions_refined.csv); the run logs the pooled Dice
            log.info("refine stage: test Dice %.4f (the network alone: %.4f); refiner %s",
                     refined["test_refined/dice"], metrics.get("test/dice", float("nan")), refine_stage["file"])
    if cfg.get("crop_stage") and trainer.is_global_zero:
        crop_stage, two_stage = run_crop_stage(cfg, module, datamodule, output_dir, testing,
                                               refiner)
        metrics.update(two_stage)
        if two_stage:
            log.info("crop stage: test accuracy %.4f (the network alone: %.4f); classifier %s",
                     two_stage["test_two_stage/accuracy"], metrics.get("test/accuracy", float("nan")), crop_stage["file"])
    if cfg.get("scan_stage") and trainer.is_global_zero:
        from busiseg.models.crop_classifier import load_crop_classifier

        # the crop stage as its file stores it (the file loads to the same weights and kernels as the trained one)
        crop_model = load_crop_classifier(crop_stage["file"]) if crop_stage else None
        scan_stage, scanned = run_scan_stage(cfg, module, datamodule, output_dir, testing,
                                             refiner, crop_model)
        metrics.update(scanned)
        if scanned:
            log.info("scan stage: test accuracy %.4f (the network alone: %.4f); classifier %s",
                     scanned["test_scan_stage/accuracy"], metrics.get("test/accuracy", float("nan")), scan_stage["file"])
    summary = {
        "metrics": metrics,
        "best_checkpoint": best_ckpt,
        # the checkpoint file the test part was scored with; "last": the weights the fit ended with
        "tested_checkpoint": tested or ("last" if test_ckpt == "last" and testing else None),
        "epochs_trained": trainer.current_epoch,
        "fit_seconds": round(fit_seconds, 2),
        "class_names": list(CLASS_NAMES),
        "test_confusion_matrix": (
            module.test_confusion_result.tolist() if module.test_confusion_result is not None else None
        ),
        "images_per_split": {
            p: summarize([datamodule.records[i] for i in getattr(datamodule, f"{p}_dataset").indices]) for p in PARTS
        },
        "data_root": str(datamodule.root),
        # crop_stage=default: the crop classifier's file, training time and settings (test_two_stage/* above)
        "crop_stage": crop_stage,
        # refine_stage=default: the mask refiner's file, training time and settings (test_refined/* above; with
        # the crop stage too, test_two_stage/* are scored on the refined masks)
        "refine_stage": refine_stage,
        # scan_stage=default: the whole-scan classifier's file, training time and settings (test_scan_stage/*
        # above: the recipe's diagnosis, its classes averaged with the two-stage ones when the crop stage ran)
        "scan_stage": scan_stage,
    }
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", summary)
        # under hparams/: TensorBoard writes these as scalars at step 0, which under their own names would add a
        # point at step 0 to every val/ and test/ curve
        hparam_metrics = {f"hparams/{k}": v for k, v in metrics.items()
                          if k.startswith(("test/", "val/", "test_two_stage/", "test_refined/", "test_scan_stage/"))
                          and "loss" not in k}
        params = _flatten(_plain(cfg))
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):  # the HPARAMS tab pairs params with these metrics
                lg.log_hyperparams(params, metrics=hparam_metrics)
            else:
                lg.log_hyperparams(params)
            lg.save()
        log.info("metrics: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()
                                             if k.startswith(("test/", "test_two_stage/", "test_refined/", "test_scan_stage/")) and v is not None}))
        log.info("run dir: %s", output_dir)
    end_ddp_job()  # the next job of a sweep starts its own DDP ranks
    return summary


FIT_RECORD = "fit_record.json"


def _with_fit_record(output_dir: Path, fit_metrics: dict[str, Any], fit_seconds: float) -> dict[str, Any]:
    """The fit's last-epoch ``train/*`` metrics, kept in RUN/fit_record.json when the fit ends: a resume after
    the fit had ended (a kill during the test or a second stage) runs no epoch, so it has none of its own and
    takes them from there (metrics.json lost them)."""
    train_metrics = _scalars(fit_metrics, "train/")
    path = output_dir / FIT_RECORD
    if train_metrics:
        write_json(path, {"train_metrics": train_metrics, "fit_seconds": round(fit_seconds, 2)})
        return fit_metrics
    try:
        stored = json.loads(path.read_text())["train_metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return fit_metrics
    log.info("the fit had ended before this resume: train/* metrics from %s", path)
    return {**stored, **fit_metrics}


def interrupted_outside_fit(cfg: DictConfig) -> str:
    """What a Ctrl-C outside the fit leaves, and how to go on: the run resumes from its last checkpoint (a finished
    fit is not run again, and the second-stage files already written are reused)."""
    run = Path(str(cfg.resume)).expanduser() if cfg.get("resume") else Path(str(cfg.paths.output_dir))
    if (run / "checkpoints" / "last.ckpt").is_file():
        return (f"interrupted (Ctrl-C); continue with python -m busiseg.train resume={run} (what the fit saved and "
                "the second-stage files already written are reused)")
    return f"interrupted (Ctrl-C) before the first checkpoint: nothing to resume in {run}; start the run again"


@entry_point("busiseg", CONFIG_DIR, "train")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except (DatasetError, ConfigError, CheckpointError, EncoderWeightsUnavailable, CropClassifierError,
            MaskRefinerError) as exc:
        fail(log, exc, 2)
    except NonFiniteLossError as exc:
        fail(log, exc, 1)
    except TrainingInterrupted as exc:
        fail(log, exc, 128 + exc.signum, prefix="", level=logging.WARNING)
    except KeyboardInterrupt:  # Ctrl-C outside the fit (whose own handler saves a checkpoint): data, test, stages
        fail(log, TrainingInterrupted(interrupted_outside_fit(cfg), 2), 130, prefix="", level=logging.WARNING)
    value = summary["metrics"].get(cfg.get("optimized_metric") or "")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
