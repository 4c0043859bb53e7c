"""Evaluate a checkpoint: ``python -m busiseg.eval ckpt_path=<run>/checkpoints/<name>.ckpt [overrides]``.

By default the training run's own test part (its config from the checkpoint, its
``split.json`` from the run dir); ``part=val|train|all``, ``data.root=DIR`` (or
``data=busi data.root=DIR part=all``) for other images; ``inference=refined`` to add
TTA and post-processing (reported beside the raw numbers). Writes into its run dir
(``logs/eval/runs/<time>``): ``metrics.json``, ``per_image.csv``,
``classification_report.txt``, ``figures/*.png`` and ``report.html``.
Definitions: docs/evaluation.md.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
import numpy as np  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from busiseg.checkpoint import CheckpointError  # noqa: E402
from busiseg.data.busi import DatasetError, load_record, summarize  # noqa: E402
from busiseg.data.labels import CLASS_NAMES  # noqa: E402
from busiseg.evaluation import figures, html_report  # noqa: E402
from busiseg.evaluation.metrics_table import (  # noqa: E402
    ECE_BINS,
    classification_report_text,
    classification_summary,
    segmentation_summary,
)
from busiseg.evaluation.runner import (  # noqa: E402
    SIZES,
    EvalError,
    EvalInputs,
    EvalResults,
    autocast_dtype,
    resolve_inputs,
    run_network,
    run_precision,
)
from busiseg.inference import InferenceOptions  # noqa: E402
from busiseg.models.mask_refiner import MaskRefiner, MaskRefinerError, load_mask_refiner, read_outside  # noqa: E402
from busiseg.models.mask_refiner import check_not_trained_on as check_refiner_not_trained_on  # noqa: E402
from busiseg.models.crop_classifier import (  # noqa: E402
    CropClassifier,
    CropClassifierError,
    check_crop_classes,
    check_not_trained_on,
    load_crop_classifier,
)
from busiseg.models.reporting import save_png  # noqa: E402
from busiseg.models.scan_classifier import check_not_trained_on as check_scan_not_trained_on  # noqa: E402
from busiseg.models.scan_classifier import load_scan_classifier  # noqa: E402
from busiseg.atomic import write_text_atomic  # noqa: E402
from busiseg.cli import entry_point, fail  # noqa: E402
from busiseg.train import CONFIG_DIR, write_json  # noqa: E402

log = logging.getLogger("busiseg.eval")

SCHEMA = "busiseg.eval/1"
# The training run's test step and the raw preprocessed view are the same computation;
# anything above this is a real difference (other data, split, checkpoint or precision).
TRAINING_TOLERANCE = 1e-5


def _plain(cfg: DictConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    return plain  # type: ignore[return-value]


def eval_precision(cfg: DictConfig, train_config: dict[str, Any]) -> str:
    """``precision`` of the eval config, or (null) the training run's (``run_precision``)."""
    return run_precision(train_config, cfg.get("precision"))


def inference_options(cfg: DictConfig) -> InferenceOptions:
    """The ``inference`` group as InferenceOptions; a bad value is one error naming the key."""
    node = cfg.get("inference")
    if not node:
        return InferenceOptions()
    try:
        return hydra.utils.instantiate(node, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        raise EvalError(str(cause)) from exc


# --------------------------------------------------------------------------- metrics.json
def _finite(value: Any) -> Any:
    """NaN / inf -> None, recursively, so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value


# the run's metrics a stage's view reproduces: the last stage given names them (the scan stage's join the crop
# stage's classes and the refined masks; the crop stage reads the refined masks)
STAGE_METRICS = (("scan_stage", "test_scan_stage"), ("crop_stage", "test_two_stage"), ("refine_stage", "test_refined"))


def check_against_training(inputs: EvalInputs, results: EvalResults,
                           stages: dict[str, Path] | None = None,
                           refiner_outside: str | None = None) -> dict[str, Any] | None:
    """Compare the raw preprocessed view with the training run's ``test/*`` metrics when they
    measure the same thing: test part, the run's split.json, its data root, the checkpoint it tested. With second
    stages (``stages``: ``{"crop_stage"|"refine_stage"|"scan_stage": file}``), the run's metrics of those stages
    (``test_scan_stage/*``, ``test_two_stage/*`` or ``test_refined/*``), when they are the very stages the run
    trained (the same files, none left out)."""
    metrics_file = inputs.run_dir / "metrics.json"
    if inputs.is_ensemble or inputs.part != "test" or not inputs.same_data_as_training or not metrics_file.is_file():
        return None
    if inputs.split_file is None or inputs.split_file.resolve() != (inputs.run_dir / "split.json").resolve():
        return None
    try:
        summary = json.loads(metrics_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s: cannot read the training run's metrics (%s)", metrics_file, exc)
        return None
    # the file the test step scored: "last" (test_ckpt=last) is the fit's final weights, which
    # last.ckpt holds; a path is that checkpoint; none (older runs) means the best checkpoint
    tested = summary.get("tested_checkpoint") or summary.get("best_checkpoint")
    tested = "last.ckpt" if tested == "last" else tested
    if not tested or Path(tested).name != inputs.ckpt_path.name:
        return None
    stages = stages or {}
    ran = {k: Path(summary[k]["file"]).name for k, _ in STAGE_METRICS if (summary.get(k) or {}).get("file")}
    if stages and {k: Path(v).name for k, v in stages.items()} != ran:
        return None  # other stage files than the run's, or some of them only: other numbers than its own
    outside = ((summary.get("refine_stage") or {}).get("settings") or {}).get("outside", "keep")
    if stages.get("refine_stage") and refiner_outside not in (None, outside):
        return None
    prefix = next((name for key, name in STAGE_METRICS if key in stages), "test")
    train_metrics = summary.get("metrics") or {}
    compared = {}
    for key, value in results.as_training.items():
        ref = train_metrics.get(f"{prefix}/{key}")
        if value is None or ref is None:
            continue
        compared[key] = {"eval": value, "training": float(ref), "abs_diff": abs(value - float(ref))}
    if not compared:
        return None
    return {"metrics_json": str(metrics_file), "tolerance": TRAINING_TOLERANCE, "prefix": prefix,
            "max_abs_diff": max(v["abs_diff"] for v in compared.values()), "metrics": compared}


def build_metrics(inputs: EvalInputs, options: InferenceOptions, results: EvalResults,
                  ece_bins: int = ECE_BINS, crop_classifier: Path | None = None,
                  mask_refiner: Path | None = None, refiner_outside: str | None = None,
                  scan_classifier: Path | None = None) -> dict[str, Any]:
    """The content of metrics.json (schema in docs/evaluation.md)."""
    final = results.final
    true_area = results.scores[(final, "original")].true_area
    predicted = results.probs[final].argmax(axis=1)
    payload: dict[str, Any] = {
        "schema": SCHEMA,
        "checkpoint": str(inputs.ckpt_path),
        "ensemble": [str(p) for p in inputs.ckpt_paths] if inputs.is_ensemble else None,
        # the crop stage (busiseg.models.crop_classifier): class probabilities are the two-stage ones
        "crop_classifier": str(crop_classifier) if crop_classifier else None,
        # the refine stage (busiseg.models.mask_refiner): masks are the refined ones
        "mask_refiner": str(mask_refiner) if mask_refiner else None,
        "mask_refiner_outside": refiner_outside,
        # the scan stage (busiseg.models.scan_classifier): class probabilities averaged with its own
        "scan_classifier": str(scan_classifier) if scan_classifier else None,
        "training_run_dir": str(inputs.run_dir),
        "data_root": str(inputs.data_root.resolve()),
        "part": inputs.part,
        "split_file": str(inputs.split_file) if inputs.split_file else None,
        "image_size": inputs.image_size,
        "in_channels": inputs.in_channels,
        "class_names": list(CLASS_NAMES),
        "pipelines": list(results.pipelines),
        "sizes": list(SIZES),
        "final": final,
        "inference": {k: getattr(options, k) for k in options.__dataclass_fields__},
        "counts": {
            "images": len(results.names),
            "per_class": {c: int((results.labels == k).sum()) for k, c in enumerate(CLASS_NAMES)},
            "lesion_images": int((true_area > 0).sum()),
            "predicted_per_class": {c: int((predicted == k).sum()) for k, c in enumerate(CLASS_NAMES)},
        },
    }
    for p in results.pipelines:
        payload[p] = {
            "classification": classification_summary(results.probs[p], results.labels, CLASS_NAMES, ece_bins),
            "segmentation": {s: segmentation_summary(results.scores[(p, s)], results.labels) for s in SIZES},
        }
    payload["raw"]["as_training"] = results.as_training
    # with second stages: the run's own metrics of those stages, when they are the stages it trained
    stages = {k: v for k, v in (("crop_stage", crop_classifier), ("refine_stage", mask_refiner),
                                 ("scan_stage", scan_classifier)) if v}
    check = check_against_training(inputs, results, stages, refiner_outside)
    if check is not None:
        payload["training_check"] = check
    return _finite(payload)


# --------------------------------------------------------------------------- per_image.csv
def write_per_image_csv(path: Path, results: EvalResults) -> None:
    """One row per image; the main columns are the final view at the original size."""
    final = results.final
    orig = results.scores[(final, "original")]
    pre = results.scores[(final, "preprocessed")]
    probs = results.probs[final]
    extra_raw = final != "raw"
    header = ["file", "true_class", "pred_class", *(f"prob_{c}" for c in CLASS_NAMES), "dice", "iou", "hd95",
              "true_area_px", "pred_area_px", "height", "width", "dice_preprocessed", "iou_preprocessed"]
    if extra_raw:
        header += ["pred_class_raw", "dice_raw", "iou_raw"]
        raw = results.scores[("raw", "original")]
        raw_pred = results.probs["raw"].argmax(axis=1)
    dice, iou, dice_s, iou_s = orig.dice, orig.iou, pre.dice, pre.iou
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i, name in enumerate(results.names):
            hd = orig.hd95[i]
            row = [name, CLASS_NAMES[results.labels[i]], CLASS_NAMES[int(probs[i].argmax())],
                   *(f"{v:.6f}" for v in probs[i]), f"{dice[i]:.6f}", f"{iou[i]:.6f}",
                   "" if not np.isfinite(hd) else f"{hd:.3f}", int(orig.true_area[i]), int(orig.pred_area[i]),
                   int(results.sizes[i, 0]), int(results.sizes[i, 1]), f"{dice_s[i]:.6f}", f"{iou_s[i]:.6f}"]
            if extra_raw:
                row += [CLASS_NAMES[int(raw_pred[i])], f"{raw.dice[i]:.6f}", f"{raw.iou[i]:.6f}"]
            writer.writerow(row)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- figures
def _pick_samples(results: EvalResults, n: int, seed: int) -> dict[str, list[int]]:
    """A random sample (seeded); the worst by Dice, among all images and among lesion images
    (on most data the normal images with any false positive, Dice 0, fill the first list;
    ties: the larger error area first; the second list only where it differs from the first);
    the misclassified images, surest first."""
    count = len(results.names)
    n = min(n, count)
    if not n:
        return {}
    rng = np.random.default_rng(seed)
    s = results.scores[(results.final, "original")]
    order = np.lexsort((-(s.fp + s.fn), s.dice))  # lexsort: the last key is the primary one
    lesion = order[s.true_area[order] > 0]
    picks = {"random": sorted(rng.choice(count, size=n, replace=False).tolist()), "worst": order[:n].tolist()}
    if lesion[:n].tolist() != picks["worst"]:  # where the worst are all lesion images, one grid says it
        picks["worst_lesion"] = lesion[:n].tolist()
    probs = results.probs[results.final]
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != results.labels)
    if wrong.size:  # the surest mistakes first: a mistake with a good mask is in no Dice grid
        picks["misclassified"] = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:n].tolist()
    return picks


def _grid(results: EvalResults, picks: list[int], in_channels: int, title: str) -> np.ndarray:
    images, trues, preds = [], [], []
    for i in picks:
        image, mask = load_record(results.records[i], in_channels)
        images.append(image)
        trues.append(mask)
        preds.append(results.final_mask(i))
    probs = results.probs[results.final][picks]
    dice = results.scores[(results.final, "original")].dice[picks]
    return figures.sample_grid_figure(images, trues, preds, results.labels[picks], probs.argmax(axis=1), probs,
                                      [results.names[i] for i in picks], dice, title)


def write_figures(folder: Path, inputs: EvalInputs, results: EvalResults, metrics: dict[str, Any],
                  samples: int = 8, seed: int = 0) -> list[tuple[str, Path, str]]:
    """Every PNG; returns (heading, path, caption) for the report."""
    folder.mkdir(parents=True, exist_ok=True)
    final = results.final
    cls = metrics[final]["classification"]
    probs = results.probs[final]
    where = f"{inputs.part} part" if inputs.part != "all" else "all images"
    stages = [name for key, name in (("mask_refiner", "refine"), ("crop_classifier", "crop"),
                                     ("scan_classifier", "scan")) if metrics.get(key)]
    pipeline = final
    if stages:
        listed = stages[0] if len(stages) == 1 else f"{', '.join(stages[:-1])} and {stages[-1]}"
        pipeline += f" with the {listed} stage{'s' if len(stages) > 1 else ''}"
    subtitle = f"{where} of {inputs.data_root.name}, {len(results.names)} images, {pipeline}"
    view = f"{pipeline}, original size"
    out: list[tuple[str, Path, str]] = []

    def save(name: str, heading: str, array: np.ndarray, caption: str) -> None:
        path = folder / name
        save_png(array, path)
        out.append((heading, path, caption))

    save("confusion_matrix.png", "Confusion matrix",
         figures.confusion_matrix_figure(np.array(cls["confusion_matrix"]), CLASS_NAMES, subtitle),
         "Rows: true class, columns: predicted class (arg-max of the class probabilities).")
    save("roc_curves.png", "ROC curves", figures.roc_figure(probs, results.labels, CLASS_NAMES, subtitle),
         "One class against the other two, from that class's probability.")
    save("reliability_diagram.png", "Reliability diagram",
         figures.reliability_figure(probs, results.labels, cls["ece_bins"], cls["ece"], subtitle),
         "Top-label calibration: accuracy of the predicted class against its mean probability, per bin.")
    save("dice_distribution.png", "Dice per image by class",
         figures.dice_distribution_figure(results.scores[(final, "original")].dice, results.labels, CLASS_NAMES,
                                          f"{subtitle}, original size", seed),
         f"Per-image Dice ({view}).")
    picks = _pick_samples(results, samples, seed)
    grids = (("random", "samples_random.png", "Random sample", f"Random sample of {{n}} — {subtitle}",
              f"Image | true mask | predicted mask ({view}), drawn with seed {seed}."),
             ("worst", "samples_worst.png", "Worst cases by Dice", f"Lowest Dice — {subtitle}",
              f"The {{n}} images with the lowest Dice ({view}); ties: the larger error area first."),
             ("worst_lesion", "samples_worst_lesion.png", "Worst lesion images by Dice",
              f"Lowest Dice among lesion images — {subtitle}",
              f"The {{n}} benign or malignant images with the lowest Dice ({view})."),
             ("misclassified", "samples_misclassified.png", "Misclassified images",
              f"Misclassified, surest first — {subtitle}",
              f"The {{n}} misclassified images (of {{wrong}}) the model was surest of ({view})."))
    wrong = int((probs.argmax(axis=1) != results.labels).sum())
    for key, name, heading, title, caption in grids:
        if picks.get(key):
            n = len(picks[key])
            save(name, heading, _grid(results, picks[key], inputs.in_channels, title.replace("{n}", str(n))),
                 caption.replace("{n}", str(n)).replace("{wrong}", str(wrong)))
    return out


# --------------------------------------------------------------------------- report.html
def _copies_fact(copies: dict[str, Any] | None) -> str:
    """The report's line on ``copies_of_training``."""
    if copies is None:
        return "not looked for (a part of the run's own split, or copies_check=off)"
    if not copies["checked"]:
        return f"not checked: {copies['why']}"
    found = copies["images"]
    if not found:
        return f"none (against the {copies['training_images']} training images)"
    shown = ", ".join(f"{c['image']} ~ {c['training_images'][0]}" for c in found[:5])
    scored = ("left out of every score here (copies_check=exclude)" if copies.get("excluded")
              else "their scores flatter the model")
    return (f"{len(found)} evaluated image(s) are copies of training images; {scored}: "
            f"{shown}{', ...' if len(found) > 5 else ''} (all in metrics.json)")


def write_report(path: Path, cfg: DictConfig, inputs: EvalInputs, metrics: dict[str, Any],
                 figure_list: list[tuple[str, Path, str]], report_text: str) -> None:
    final = metrics["final"]
    S = metrics["image_size"]
    counts = metrics["counts"]
    opts = ", ".join(f"{k}={v}" for k, v in metrics["inference"].items())
    facts = [
        ("checkpoint", metrics["checkpoint"]),
        ("data root", metrics["data_root"]),
        ("images", f"{counts['images']} ({', '.join(f'{c} {n}' for c, n in counts['per_class'].items())}); "
                   f"{inputs.part if inputs.part != 'all' else 'every image'}"
                   + (f" of {metrics['split_file']}" if metrics["split_file"] else "")),
        ("network input", f"{S}×{S}, {metrics['in_channels']} channel(s)"),
        ("crop stage", metrics.get("crop_classifier") or "none (the network's classes)"),
        ("refine stage", metrics.get("mask_refiner") or "none (the network's masks)"),
        ("scan stage", metrics.get("scan_classifier") or "none"),
        ("copies of training images", _copies_fact(metrics.get("copies_of_training"))),
        ("inference options", opts + ("" if final != "raw" else " (all off: raw only)")),
    ]
    notes = (
        f"<b>raw</b>: the network's output, mask = probability &gt; 0.5, as the training step scores it. "
        + ("<b>postprocessed</b>: with the inference options above (TTA, post-processing). " if final != "raw" else "")
        + f"<b>{S}×{S}</b>: at the network's input size against the resized true mask (the training test step's "
        f"numbers). <b>original size</b>: probabilities resized back to each image's size and compared with the mask "
        f"on disk. <i>Pixels pooled</i>: pixel counts summed over all images first; <i>mean per image</i>: each image "
        f"counts once, an image with empty true and predicted masks scores 1. HD95 only on lesion images; a missed "
        f"lesion (empty prediction) scores the image diagonal. Definitions: docs/evaluation.md."
    )
    sections = [
        (f"Segmentation per class ({final}, original size)",
         html_report.table(html_report.PER_CLASS_HEADER,
                           html_report.per_class_rows(metrics[final]["segmentation"]["original"]))),
        (f"Segmentation per class ({final}, {S}×{S})",
         html_report.table(html_report.PER_CLASS_HEADER,
                           html_report.per_class_rows(metrics[final]["segmentation"]["preprocessed"]))),
        (f"Classification per class ({final})",
         html_report.table(html_report.CLASSIFICATION_HEADER,
                           html_report.classification_rows(metrics[final]["classification"]))
         + html_report.folded("classification_report.txt", report_text)),
    ]
    check = metrics.get("training_check")
    if check:
        sections.append(("Reproduces the training run's test step",
                         html_report.training_check_table(check, TRAINING_TOLERANCE)))
    configs = [("this evaluation's config", OmegaConf.to_yaml(OmegaConf.create(_plain(cfg)))),
               ("the training run's config (from the checkpoint)",
                OmegaConf.to_yaml(OmegaConf.create(inputs.train_config)))]
    page = html_report.render_report(
        title=f"busiseg evaluation — {Path(metrics['checkpoint']).name}", facts=facts,
        headline=html_report.headline_table(metrics), sections=sections, figures=figure_list, configs=configs,
        notes=notes)
    write_text_atomic(path, page)


def _stage_path(cfg: DictConfig, inputs: EvalInputs, key: str, without: str) -> Path | None:
    """The second-stage file given as ``key=FILE``; None when unset, saying so (``without``: what is evaluated
    then) when the run has its own beside its checkpoint (``RUN/<key>.pt``, from training with the stage)."""
    value = cfg.get(key)
    if value in (None, ""):
        beside = inputs.run_dir / f"{key}.pt"
        if beside.is_file() and not inputs.is_ensemble:
            log.info("%s add %s=%s", without, key, beside)
        return None
    return Path(str(value)).expanduser()


def load_crop_stage(cfg: DictConfig, inputs: EvalInputs) -> tuple[CropClassifier | None, Path | None]:
    """``crop_classifier=FILE``: the crop stage, refused when it was trained on an evaluated image."""
    path = _stage_path(cfg, inputs, "crop_classifier", "the network's classes; for the run's two-stage ones")
    if path is None:
        return None, None
    try:
        model = load_crop_classifier(path)
        check_crop_classes(model.classes, path)
        if inputs.part != "train":
            check_not_trained_on(model, [r.name for r in inputs.records], path)
    except CropClassifierError as exc:
        raise EvalError(str(exc)) from exc
    log.info("crop stage: %s (trained on %d lesion images)", path, len(model.trained_on))
    return model, path


def load_refine_stage(cfg: DictConfig, inputs: EvalInputs) -> tuple[MaskRefiner | None, Path | None]:
    """``mask_refiner=FILE``: the refine stage, refused when it was trained on an evaluated image."""
    path = _stage_path(cfg, inputs, "mask_refiner", "the network's masks; for the run's refined ones")
    if path is None:
        if cfg.get("mask_refiner_outside") not in (None, ""):
            raise EvalError(f"mask_refiner_outside={cfg.get('mask_refiner_outside')} without mask_refiner=: it sets "
                            "how the refine stage reads beyond its crops; pass mask_refiner=RUN/mask_refiner.pt too")
        return None, None
    try:
        model = read_outside(load_mask_refiner(path), cfg.get("mask_refiner_outside"))
        if inputs.part != "train":
            check_refiner_not_trained_on(model, [r.name for r in inputs.records], path)
    except MaskRefinerError as exc:
        raise EvalError(str(exc)) from exc
    log.info("refine stage: %s (trained on %d lesion images; outside its crops: %s)", path, len(model.trained_on),
             model.settings.outside)
    return model, path


def load_scan_stage(cfg: DictConfig, inputs: EvalInputs) -> tuple[CropClassifier | None, Path | None]:
    """``scan_classifier=FILE``: the scan stage, refused when it was trained on an evaluated image."""
    path = _stage_path(cfg, inputs, "scan_classifier", "without the scan stage; for the run's diagnosis")
    if path is None:
        return None, None
    try:
        model = load_scan_classifier(path)
        if inputs.part != "train":
            check_scan_not_trained_on(model, [r.name for r in inputs.records], path)
    except CropClassifierError as exc:  # ScanClassifierError is one
        raise EvalError(str(exc)) from exc
    log.info("scan stage: %s (trained on %d images)", path, len(model.trained_on))
    return model, path


COPIES_CHECK = ("report", "exclude", "off")


def copies_check(cfg: DictConfig, inputs: EvalInputs) -> tuple[EvalInputs, dict[str, Any] | None]:
    """``part=all``: the evaluated images that are copies of training images
    (:func:`busiseg.evaluation.copies.check_copies`). ``copies_check=report`` names them; ``exclude`` also leaves
    them out of every score (the inputs returned are then the others); ``off`` (or a part of the run's own split,
    where the splits keep copies on one side): None."""
    mode = cfg.get("copies_check", "report")
    mode = ("report" if mode else "off") if isinstance(mode, bool) else str(mode)  # copies_check=true|false too
    if mode not in COPIES_CHECK:
        raise EvalError(f"copies_check={cfg.get('copies_check')} is not one of {', '.join(COPIES_CHECK)}")
    if inputs.part != "all" or mode == "off":
        return inputs, None
    from busiseg.audit import _progress, duplicate_params
    from busiseg.evaluation.copies import check_copies

    try:
        params = duplicate_params(cfg.get("duplicates"))
    except ValueError as exc:
        raise EvalError(str(exc)) from exc
    root = (inputs.train_config.get("data") or {}).get("root")
    found = check_copies(inputs.records, [Path(p) for p in inputs.ckpt_paths],
                         Path(str(root)).expanduser() if root else None, params,
                         _progress("Looking for copies of training images", bool(cfg.get("progress", True))),
                         exclude=mode == "exclude")
    found["excluded"] = mode == "exclude" and bool(found.get("images"))
    if found["excluded"]:
        copies = {c["image"] for c in found["images"]}
        kept = [r for r in inputs.records if r.name not in copies]
        if not kept:
            raise EvalError(f"copies_check=exclude: every one of the {len(inputs.records)} evaluated images is a copy "
                            "of a training image; nothing is left to score")
        log.info("copies_check=exclude: the %d copies are left out of every score; %d images scored", len(copies),
                 len(kept))
        inputs = dataclasses.replace(inputs, records=kept)
    return inputs, found


# --------------------------------------------------------------------------- entry
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation the config describes and write every output; returns metrics.json's content."""
    options = inference_options(cfg)
    inputs, copies = copies_check(cfg, resolve_inputs(cfg))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    counts = summarize(inputs.records)
    if inputs.is_ensemble:
        log.info("ensemble of %d checkpoints (probabilities averaged): %s", len(inputs.ckpt_paths),
                 ", ".join(str(p) for p in inputs.ckpt_paths))
    log.info("evaluating %s on %d images (%s) of %s, part %s", inputs.ckpt_path, len(inputs.records),
             ", ".join(f"{c} {n}" for c, n in counts.items()), inputs.data_root, inputs.part)
    precision = eval_precision(cfg, inputs.train_config)
    crop_model, crop_path = load_crop_stage(cfg, inputs)
    refiner, refiner_path = load_refine_stage(cfg, inputs)
    scan_model, scan_path = load_scan_stage(cfg, inputs)
    results = run_network(inputs.net, inputs.records, inputs.image_size, inputs.in_channels, inputs.batch_size,
                          options, progress=bool(cfg.get("progress", True)),
                          channels_last=bool(inputs.train_config.get("channels_last", False)),
                          autocast=autocast_dtype(precision), crop_classifier=crop_model, mask_refiner=refiner,
                          scan_classifier=scan_model)
    ece_bins = int(cfg.get("ece_bins") or ECE_BINS)
    metrics = build_metrics(inputs, options, results, ece_bins, crop_path, refiner_path,
                            refiner.settings.outside if refiner is not None else None, scan_path)
    metrics["precision"] = precision
    metrics["copies_of_training"] = copies
    write_json(output_dir / "metrics.json", metrics)
    write_per_image_csv(output_dir / "per_image.csv", results)
    report_text = classification_report_text(metrics[results.final]["classification"], CLASS_NAMES)
    (output_dir / "classification_report.txt").write_text(report_text)
    fig_cfg = cfg.get("figures") or {}
    figure_list = write_figures(output_dir / "figures", inputs, results, metrics,
                                samples=int(fig_cfg.get("samples", 8)), seed=int(fig_cfg.get("seed", 0)))
    write_report(output_dir / "report.html", cfg, inputs, metrics, figure_list, report_text)

    def fmt(v: float | None, digits: int = 4) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    # the raw view first where post-processing or a stage changes it, so the console shows what they bring
    staged = [name for key, name in (("mask_refiner", "refine"), ("crop_classifier", "crop"),
                                     ("scan_classifier", "scan")) if metrics.get(key)]
    with_stages = f" (with the {', '.join(staged)} stage{'s' if len(staged) > 1 else ''})" if staged else ""
    for view in dict.fromkeys(("raw", results.final)):
        overall = metrics[view]["segmentation"]["original"]["overall"]
        cls = metrics[view]["classification"]
        log.info("%s%s, original size: Dice/image %s, IoU/image %s, HD95 %s px; accuracy %s, macro F1 %s", view,
                 with_stages,
                 fmt(overall["dice_per_image"]), fmt(overall["iou_per_image"]), fmt(overall["hd95"], 2),
                 fmt(cls["accuracy"]), fmt(cls["macro"]["f1"]))
    check = metrics.get("training_check")
    if check:
        level = logging.INFO if check["max_abs_diff"] <= TRAINING_TOLERANCE else logging.WARNING
        log.log(level, "training run's %s/* metrics reproduced to %.1e (raw%s, at the network's %d px input, as the "
                "training's test scores them; %s)", check.get("prefix", "test"), check["max_abs_diff"],
                " with the run's second stages" if check.get("prefix", "test") != "test" else "",
                metrics["image_size"], check["metrics_json"])
    log.info("report: %s", output_dir / "report.html")
    return metrics


@entry_point("busiseg", CONFIG_DIR, "eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (EvalError, DatasetError, CheckpointError) as exc:
        fail(log, exc, 2)


if __name__ == "__main__":
    main()
