"""Predict masks and classes for new images: ``python -m busiseg.predict ckpt_path=CKPT input=IN output=OUT``.

``input`` is an image or a folder (walked recursively); ``ckpt_path=[A.ckpt,B.ckpt,...]`` predicts
with an ensemble (mask and class probabilities averaged). For ``benign/benign (3).png`` the
output folder gets ``benign/benign (3)_pred_mask.png`` (0/255 at the image's original
size) and ``benign/benign (3)_overlay.png``, plus one ``predictions.csv`` for the run.
The ``inference`` config group (TTA, post-processing) applies. Unreadable files are
reported by name and skipped; the exit status is 1 when any file failed, 2 when the run
could not start. Hydra's run dir is the output folder itself (``.hydra/`` and
``predict.log`` beside the predictions). See docs/deployment.md.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, ListConfig  # noqa: E402

from busiseg.checkpoint import CheckpointError, load_ensemble, load_model  # noqa: E402
from busiseg.cli import entry_point, fail, override_values, require  # noqa: E402
from busiseg.data.labels import CLASS_NAMES  # noqa: E402
from busiseg.inference import Ensemble, InferenceOptions, postprocess_mask, predict_probs, prepare_image, restore_size  # noqa: E402
from busiseg.models.crop_classifier import (CropClassifier, CropClassifierError, check_crop_classes,  # noqa: E402
                                            load_crop_classifier)
from busiseg.models.scan_classifier import join_scan_probs, load_scan_classifier, scan_probs  # noqa: E402
from busiseg.models.mask_refiner import MaskRefiner, MaskRefinerError, load_mask_refiner, read_outside  # noqa: E402
from busiseg.atomic import output_folder_problem  # noqa: E402
from busiseg.onnx_predictor import (DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, InputError, PredictionSummary,  # noqa: E402
                                    find_images, predict_files)

log = logging.getLogger("busiseg.predict")

CONFIG_DIR = os.environ.get("BUSISEG_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))


USAGE = "python -m busiseg.predict ckpt_path=CKPT input=FILE_OR_FOLDER output=FOLDER [key=value ...]"


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


class TorchPredictor:
    """A checkpoint's network: uint8 images -> (bool mask at the image's size, class probabilities)."""

    def __init__(self, net: torch.nn.Module, image_size: int, in_channels: int, options: InferenceOptions,
                 device: str | torch.device = "cpu", class_names: tuple[str, ...] = CLASS_NAMES,
                 crop_classifier: CropClassifier | None = None, mask_refiner: MaskRefiner | None = None,
                 scan_classifier: CropClassifier | None = None):
        self.net = net.to(device).eval()
        self.image_size = image_size
        self.in_channels = in_channels
        self.options = options
        self.device = torch.device(device)
        self.class_names = class_names
        # the crop stage: class probabilities from the network and the lesion-crop classifier
        self.crop_classifier = crop_classifier.to(device) if crop_classifier is not None else None
        # the refine stage: masks re-drawn on the lesion crop at the image's own size (before the crop stage)
        self.mask_refiner = mask_refiner.to(device) if mask_refiner is not None else None
        # the scan stage: class probabilities averaged with a whole-scan classifier's (after the crop stage)
        self.scan_classifier = scan_classifier.to(device) if scan_classifier is not None else None

    def __call__(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        batch = torch.stack([prepare_image(im, self.image_size) for im in images]).to(self.device)
        mask_probs, class_probs = predict_probs(self.net, batch, self.options)
        mask_probs, class_probs = mask_probs.cpu().numpy(), class_probs.cpu().numpy()
        full = [restore_size(mask_probs[i, 0], image.shape[:2]) for i, image in enumerate(images)]
        if self.mask_refiner is not None:
            full = self.mask_refiner.refine(images, full, self.options.threshold)
        if self.crop_classifier is not None:
            class_probs, _ = self.crop_classifier.refine(images, full, class_probs, self.options.threshold)
            class_probs = class_probs.astype(np.float32)
        if self.scan_classifier is not None:
            class_probs = join_scan_probs(class_probs, scan_probs(self.scan_classifier, images)).astype(np.float32)
        return [(postprocess_mask(full[i], class_probs[i], self.options), class_probs[i]) for i in range(len(images))]


def _data_setting(config: dict[str, Any], key: str, ckpt: str) -> int:
    try:
        return int(config["data"][key])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{ckpt}: the stored config has no usable data.{key}") from None


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return name


def _skip_masks(value: Any) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise ConfigError(f"skip_masks must be true, false or auto, got {value!r}")


def load_predictor(ckpt_path: str | Path | Sequence[str | Path], options: InferenceOptions,
                   device: str = "cpu", crop_classifier: str | Path | None = None,
                   mask_refiner: str | Path | None = None, mask_refiner_outside: str | None = None,
                   scan_classifier: str | Path | None = None) -> TorchPredictor:
    """The checkpoint's network with its training image size and channels. A list of checkpoints is
    one ensemble (:class:`busiseg.inference.Ensemble`: mask and class probabilities averaged); its
    members must have been trained at the same ``data.image_size`` and ``data.in_channels``.
    ``crop_classifier``: a crop-stage file (``busiseg.crop_stage train``), or None. ``mask_refiner``: a
    refine-stage file (``refine_stage=default`` in busiseg.train, ``busiseg.refine_stage train``), or None;
    ``mask_refiner_outside`` (keep, erase) overrides how it reads beyond its crops (None: as its file stores it).
    ``scan_classifier``: a scan-stage file (``scan_stage=default`` in busiseg.train, ``busiseg.scan_stage
    train``), or None."""
    crop = None
    if crop_classifier not in (None, ""):
        try:
            crop = load_crop_classifier(str(crop_classifier))
            check_crop_classes(crop.classes, crop_classifier)
        except CropClassifierError as exc:
            raise ConfigError(str(exc)) from exc
        log.info("crop stage: %s", crop_classifier)
    refiner = None
    if mask_refiner not in (None, ""):
        try:
            refiner = read_outside(load_mask_refiner(str(mask_refiner)), mask_refiner_outside)
        except MaskRefinerError as exc:
            raise ConfigError(str(exc)) from exc
        log.info("refine stage: %s", mask_refiner)
    scan = None
    if scan_classifier not in (None, ""):
        try:
            scan = load_scan_classifier(str(scan_classifier))
        except CropClassifierError as exc:  # ScanClassifierError is one
            raise ConfigError(str(exc)) from exc
        log.info("scan stage: %s", scan_classifier)
    paths = [str(p) for p in ckpt_path] if isinstance(ckpt_path, (list, tuple, ListConfig)) else [str(ckpt_path)]
    if not paths:
        raise ConfigError("ckpt_path is an empty list: pass ckpt_path=CKPT or ckpt_path=[A.ckpt,B.ckpt]")
    if len({str(Path(p).expanduser().resolve()) for p in paths}) != len(paths):
        raise ConfigError(f"ckpt_path lists a checkpoint twice: {paths}")
    net, config = load_model(paths[0])
    image_size = _data_setting(config, "image_size", paths[0])
    in_channels = _data_setting(config, "in_channels", paths[0])
    if len(paths) > 1:
        net = load_ensemble(net, paths, image_size, in_channels)
    return TorchPredictor(net, image_size, in_channels, options, device, crop_classifier=crop, mask_refiner=refiner,
                          scan_classifier=scan)


def predict(cfg: DictConfig) -> PredictionSummary:
    """Predict every image under ``cfg.input`` into ``cfg.output``; return the summary (nothing raised per file)."""
    ckpt_path, input_path, output = require(cfg, ("ckpt_path", "input", "output"), USAGE, ConfigError)
    batch_size = int(cfg.get("batch_size", 8))
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if cfg.get("mask_refiner") in (None, "") and cfg.get("mask_refiner_outside") not in (None, ""):
        raise ConfigError(f"mask_refiner_outside={cfg.get('mask_refiner_outside')} without mask_refiner=: it sets how "
                          "the refine stage reads beyond its crops; pass mask_refiner=RUN/mask_refiner.pt too")
    max_pixels = cfg.get("max_pixels", DEFAULT_MAX_PIXELS)
    if max_pixels is not None and int(max_pixels) < 1:
        raise ConfigError(f"max_pixels must be >= 1 or null (no limit), got {max_pixels}")
    try:
        options = hydra.utils.instantiate(cfg.inference, _convert_="all")
    except Exception as exc:  # hydra wraps the dataclass's ValueError
        raise ConfigError(f"inference: {exc.__cause__ or exc}") from exc
    output = Path(output)
    if Path(input_path).is_dir() and Path(input_path).resolve() == output.resolve():
        raise ConfigError(f"output={output} is the input folder; choose another folder (a subfolder is fine) so "
                          f"predictions do not mix with the images")
    images, skipped = find_images(input_path, _skip_masks(cfg.get("skip_masks", "auto")), exclude=[output])
    if not images:
        raise InputError(f"input {input_path}: no images found ({', '.join(IMAGE_SUFFIXES)}; hidden files and "
                         f"mask files are skipped)")
    predictor = load_predictor(ckpt_path, options, _device(str(cfg.get("device", "auto"))), cfg.get("crop_classifier"),
                               cfg.get("mask_refiner"), cfg.get("mask_refiner_outside"), cfg.get("scan_classifier"))
    if (output / "predictions.csv").is_file():  # said once the run can start (a missing checkpoint replaces nothing)
        log.warning("output %s already holds a prediction: its predictions.csv is replaced by this run's, and masks "
                    "and overlays of images this run does not read stay there; use a new output folder to keep runs "
                    "apart", output)
    members = len(predictor.net.members) if isinstance(predictor.net, Ensemble) else 1
    log.info("%d image(s) from %s, %s %s, image size %d", len(images), input_path,
             f"ensemble of {members} checkpoints" if members > 1 else "checkpoint", ckpt_path, predictor.image_size)
    return predict_files(predictor, images, output, batch_size=batch_size, overlays=bool(cfg.get("overlays", True)),
                         progress=bool(cfg.get("progress", True)) and Path(input_path).is_dir(),
                         skipped_masks=len(skipped), max_pixels=max_pixels)


def output_problem(argv: Sequence[str]) -> str | None:
    """What is wrong with ``input`` or ``output``, found before Hydra makes the output its run dir: an ``input``
    that does not exist (nothing to do, so no output folder is left behind); an ``output`` that is the ``input``
    folder (Hydra would write .hydra/ and predict.log among the images), or a folder that cannot be made (a file
    in the way, no permission: Hydra would fail with a traceback)."""
    given = override_values(argv, ("input", "output"))
    if given.get("input") not in (None, "") and not Path(str(given["input"])).expanduser().exists():
        return f"input {given['input']}: no such file or folder"
    if "output" not in given or given["output"] in (None, ""):
        return None
    output = Path(str(given["output"])).expanduser()
    if "input" in given and Path(str(given["input"])).is_dir() and \
            Path(str(given["input"])).resolve() == output.resolve():
        return (f"output={given['output']} is the input folder; choose another folder (a subfolder is fine) so "
                f"predictions do not mix with the images")
    problem = output_folder_problem(output)  # tried, not judged by permission bits (root, /proc, immutable)
    return f"output={given['output']}: {problem}" if problem else None


@entry_point("busiseg.predict", CONFIG_DIR, "predict", precheck=output_problem)
def main(cfg: DictConfig) -> None:
    try:
        summary = predict(cfg)
    except (ConfigError, CheckpointError, InputError) as exc:
        fail(log, exc, 2, prog="busiseg.predict")
    # Hydra's logging prints to the console and to predict.log in the output folder.
    log.info("%s", summary.report())
    if summary.failed:  # each failure is logged above (console and predict.log); the status line goes to stderr
        print(summary.failure_line("busiseg.predict", summary.output / "predict.log"), file=sys.stderr)
        sys.exit(summary.exit_code)


if __name__ == "__main__":
    main()
