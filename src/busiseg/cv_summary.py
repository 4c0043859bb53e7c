"""Cross-validation summary: ``python -m busiseg.cv_summary SWEEP_DIR``.

Reads the fold runs of a k-fold sweep (``python -m busiseg.train -m split=kfold
split.fold=0,1,2,3,4``): every run dir under SWEEP_DIR holding ``metrics.json`` and a k-fold
``split.json``. Writes into SWEEP_DIR (or ``--out``):

- ``cv_summary.json`` / ``cv_summary.md``: mean +- std over folds of every metric, a per-fold
  table, and the out-of-fold (OOF) results: every image's prediction from the one model that
  did not train on it (nnU-Net style), with metrics pooled over all of them;
- ``oof_predictions.csv``: those predictions, one row per image.

Runs trained with the crop stage (``crop_stage=default``) also hold ``test_two_stage/*`` metrics and
``predictions_two_stage.csv``: the headline then sets them beside the network's ``test/*`` with the paired
per-fold gain, and the summary pools their out-of-fold classes too (``oof_two_stage``,
``cv_confusion_matrix_two_stage.png``). Runs trained with the refine stage (``refine_stage=default``) hold
``test_refined/*`` and ``predictions_refined.csv`` (the refined masks' Dice per image): the headline sets them
beside the network's too, with the paired per-fold gain in Dice. Runs trained with the scan stage
(``scan_stage=default``) hold ``test_scan_stage/*`` and ``predictions_scan_stage.csv``: the recipe's diagnosis
with the whole-scan classifier joined, set beside the others and pooled out of fold as the crop stage's
(``oof_scan_stage``, ``cv_confusion_matrix_scan_stage.png``).

The fold runs write their per-image predictions (``predictions.csv``, see
``write_predictions``) after testing the best checkpoint. ``CVSummaryCallback`` runs the
summary at the end of the multirun (enabled by ``split=kfold``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

from hydra.experimental.callback import Callback

from busiseg.atomic import output_folder_problem, write_csv_atomic, write_json_atomic, write_text_atomic
from busiseg.data.labels import CLASS_NAMES

log = logging.getLogger("busiseg.cv_summary")

PREDICTION_COLUMNS = ["part", "image", "true_class", "pred_class"] + [f"prob_{c}" for c in CLASS_NAMES] + ["dice"]


class CVSummaryError(ValueError):
    """The sweep dir cannot be summarised; the message names the run dirs at fault."""


# --------------------------------------------------------------------------- per run


def write_predictions(module: Any, datamodule: Any, path: str | Path, parts: Sequence[str] = ("val", "test"),
                      threshold: float = 0.5, forward_context: Callable[[], ContextManager] | None = None) -> Path:
    """Per-image predictions of ``module`` on the datamodule's ``parts``, as CSV.

    Columns: part, image (record name), true_class, pred_class, prob_<class> (softmax),
    dice (per image, mask probability > threshold, at the preprocessing size; both masks
    empty scores 1, as ``PerImageDice``). Call after ``trainer.test``, which leaves the best
    checkpoint's weights in the module. Every image of each part is predicted, whatever the
    trainer's ``limit_*_batches``. ``forward_context``: what wraps each forward pass, the
    trainer's precision (``trainer.precision_plugin.forward_context``, e.g. bf16 autocast), so
    these predictions are the ones ``trainer.test`` scored; default none (full precision).
    """
    import torch
    from torch.utils.data import DataLoader

    path = Path(path)
    rows: list[dict[str, Any]] = []
    was_training = module.training
    module.eval()
    device = module.device
    with torch.inference_mode():
        for part in parts:
            dataset = getattr(datamodule, f"{part}_dataset", None)
            if dataset is None or len(dataset) == 0:
                continue
            loader = DataLoader(dataset, batch_size=datamodule.eval_batch_size, shuffle=False, num_workers=0)
            for batch in loader:
                with forward_context() if forward_context is not None else contextlib.nullcontext():
                    mask_logits, class_logits = module(batch["image"].to(device))
                probs = torch.softmax(class_logits.float(), dim=1).cpu()
                pred = (torch.sigmoid(mask_logits.float()) > threshold).cpu().flatten(1)
                true = (batch["mask"] > 0).flatten(1)
                inter = (pred & true).sum(1).float()
                total = (pred.sum(1) + true.sum(1)).float()
                dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
                for k in range(len(probs)):
                    record = datamodule.records[int(batch["index"][k])]
                    row = {
                        "part": part,
                        "image": record.name,
                        "true_class": CLASS_NAMES[int(batch["label"][k])],
                        "pred_class": CLASS_NAMES[int(probs[k].argmax())],
                    }
                    row.update({f"prob_{c}": round(float(probs[k, i]), 6) for i, c in enumerate(CLASS_NAMES)})
                    row["dice"] = round(float(dice[k]), 6)
                    rows.append(row)
    module.train(was_training)
    write_csv_atomic(path, rows, PREDICTION_COLUMNS)
    return path


# --------------------------------------------------------------------------- the summary


def find_fold_runs(directory: str | Path) -> list[Path]:
    """Run dirs under ``directory`` (itself included) with metrics.json and a k-fold split.json
    (``busiseg.pretrain`` runs, which have no test metrics, are left out)."""
    directory = Path(directory)
    runs = []
    for metrics in sorted(directory.rglob("metrics.json")):
        run = metrics.parent
        split = run / "split.json"
        if not split.is_file():
            continue
        try:
            if json.loads(metrics.read_text()).get("task") == "pretrain":
                continue
        except (OSError, json.JSONDecodeError):
            pass  # reported when the run is read
        try:
            meta = json.loads(split.read_text()).get("meta", {})
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("splitter") == "kfold":
            runs.append(run)
    return runs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CVSummaryError(f"{path}: cannot read ({exc})") from exc


# config keys that differ between the folds of one cross-validation by design, or only say where files are kept
# or how progress is shown: not what the folds were trained with
PER_FOLD_KEYS = ("split.fold", "split.file", "resume", "ckpt_path", "task_name", "paths.", "hydra.",
                 "callbacks.progress_bar", "trainer.enable_progress_bar")
WHERE_KEYS = ("cache_dir", "dirpath", "save_dir", "default_root_dir")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def training_settings(run: Path) -> dict[str, Any] | None:
    """A run's config.yaml flattened (``a.b.c: value``), less the keys that differ per fold by design and the
    values naming the run's own folders; None where it has none."""
    try:
        import yaml

        config = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    own = str((config.get("paths") or {}).get("output_dir") or run)
    return {k: v for k, v in _flat(config).items()
            if not k.startswith(PER_FOLD_KEYS) and not k.endswith(WHERE_KEYS) and not (isinstance(v, str) and own in v)}


def settings_differences(settings: Mapping[int, Mapping[str, Any] | None]) -> dict[str, dict[int, Any]]:
    """``{key: {fold: value}}`` for every setting that is not the same in all folds with a config.yaml."""
    known = {f: s for f, s in settings.items() if s is not None}
    keys = sorted({k for s in known.values() for k in s})
    return {k: {f: s.get(k) for f, s in known.items()} for k in keys
            if len({json.dumps(s.get(k), sort_keys=True, default=str) for s in known.values()}) > 1}


def machine_of(run: Path) -> str | None:
    """One line naming the machine a run trained on (its ``run_info.json``), or None where it was not recorded."""
    try:
        m = json.loads((run / "run_info.json").read_text()).get("machine")
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict):
        return None
    cpu = m.get("cpu") or {}
    gpus = m.get("gpus")
    line = f"{cpu.get('name')} (family {cpu.get('family')} model {cpu.get('model')}), {m.get('cpu_capability')}"
    line += ", bf16 native" if m.get("cpu_bf16") else ", no native bf16"
    if isinstance(gpus, list) and gpus:
        line += f", GPU {', '.join(gpus)}"
    elif isinstance(gpus, int) and gpus > 0:
        line += f", {gpus} GPU(s)"
    return line


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, float("nan")  # one fold has no spread to report (shown as the mean alone)
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)  # sample std over folds
    return mean, math.sqrt(var)


def summarize(directory: str | Path, out_dir: str | Path | None = None, write: bool = True) -> dict[str, Any]:
    """Aggregate the fold runs under ``directory``; write the summary files (into ``out_dir``, by default
    ``directory``; nothing with ``write=False``); return the summary."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CVSummaryError(f"{directory}: no such folder (give the sweep folder holding the fold runs)")
    runs = find_fold_runs(directory)
    if not runs:
        raise CVSummaryError(
            f"{directory}: no fold runs found (run dirs with metrics.json and a split.json made by split=kfold)"
        )
    folds: dict[int, dict[str, Any]] = {}
    ks, assignments = set(), set()
    for run in runs:
        meta = _read_json(run / "split.json")["meta"]
        fold = int(meta["fold"])
        if fold in folds:
            raise CVSummaryError(
                f"fold {fold} appears twice: {folds[fold]['dir']} and {run} (a sweep over more than the folds, "
                "e.g. seed=1,2, or two sweeps in one folder: give each set of folds its own folder, e.g. "
                "'hydra.sweep.subdir=seed${seed}/${split.fold}', and summarise each of them)"
            )
        ks.add(int(meta["k"]))
        assignments.add(meta.get("assignment"))
        metrics = dict(_read_json(run / "metrics.json").get("metrics", {}))
        predictions = _read_predictions(run / "predictions.csv")
        metrics.update(_per_class_dice(predictions or []))
        refined = _read_predictions(run / REFINED_PREDICTIONS)
        if refined is not None:
            metrics.update(_per_class_dice(refined, "test_refined"))
        folds[fold] = {"dir": run, "meta": meta, "metrics": metrics, "predictions": predictions,
                       **{key: _read_predictions(run / name) for key, name, _, _ in CLASS_STAGES},
                       "machine": machine_of(run), "settings": training_settings(run),
                       "tested": _read_json(run / "metrics.json").get("tested_checkpoint")}
    if len(ks) > 1 or len(assignments) > 1:
        raise CVSummaryError(
            f"{directory}: the runs use different fold assignments (k {sorted(ks)}; seeds or data differ), "
            "so their folds are not one cross-validation"
        )
    k = ks.pop()
    missing = [f for f in range(k) if f not in folds]
    if missing:
        log.warning("cv_summary: fold(s) %s of %d missing under %s", missing, k, directory)

    order = sorted(folds)
    machines = {f: folds[f]["machine"] for f in order}
    if len(set(machines.values())) > 1:
        log.warning("cv_summary: the folds ran on different machines (%s); bf16 results reproduce bit for bit only "
                    "on the same CPU model", "; ".join(f"fold {f}: {m or 'not recorded'}" for f, m in machines.items()))
    differences = settings_differences({f: folds[f]["settings"] for f in order})
    if differences:
        log.warning("cv_summary: the folds were trained with different settings, so their mean is not one "
                    "recipe's: %s", _differences_text(differences))
    # the test part is the validation fold (split.test_fraction=0) and the checkpoint was picked on it
    picked_on_test = [f for f in order if folds[f]["meta"].get("test_is_val")
                      and folds[f]["tested"] not in (None, "last")]
    if picked_on_test:
        log.warning("cv_summary: %s", _picked_on_test_text(picked_on_test))
    names = sorted({m for f in order for m in folds[f]["metrics"]})
    per_fold = {f: {m: folds[f]["metrics"].get(m) for m in names} for f in order}
    mean, std = {}, {}
    for m in names:
        mean[m], std[m] = _mean_std([per_fold[f][m] for f in order])
        std[m] = std[m] if math.isfinite(std[m]) else None  # null in the JSON, not NaN

    oof_rows, oof_missing_runs = [], []
    for f in order:
        if folds[f]["predictions"] is None:
            oof_missing_runs.append(str(folds[f]["dir"]))
            continue
        oof_rows += [{"fold": f, **row} for row in folds[f]["predictions"] if row["part"] == "val"]
    if oof_missing_runs:
        # the per-image figures (lesion-image Dice, per-class Dice, out of fold) then come from the other folds
        log.warning("cv_summary: no predictions.csv in %s: the per-image figures (lesion-image Dice, Dice per "
                    "class, out of fold) are the other folds' only", ", ".join(oof_missing_runs))
    seen: dict[str, int] = {}
    for row in oof_rows:
        if row["image"] in seen:
            raise CVSummaryError(
                f"{row['image']} is in the validation part of folds {seen[row['image']]} and {row['fold']}: "
                "the runs do not share one fold assignment"
            )
        seen[row["image"]] = row["fold"]
    expected = {n for f in order for n, fold in folds[f]["meta"].get("fold_of", {}).items() if fold in folds}
    uncovered = sorted(expected - set(seen)) if not oof_missing_runs else []

    # the crop and scan stages' classes (crop_stage=default, scan_stage=default): out of fold when every run
    # wrote them
    staged_oof = {}
    for key, _, _, _ in CLASS_STAGES:
        rows = [{"fold": f, **row} for f in order for row in folds[f][key] or [] if row["part"] == "val"]
        with_stage = all(folds[f][key] is not None for f in order)
        staged_oof[f"oof_{key}"] = {"images": len(rows), "metrics": _oof_metrics(rows)} if with_stage else None

    summary = {
        "directory": str(directory),
        "k": k,
        "folds": order,
        "missing_folds": missing,
        "complete": not missing and not oof_missing_runs and not uncovered,
        "runs": {f: str(folds[f]["dir"]) for f in order},
        "machines": machines,
        "setting_differences": differences,
        "checkpoint_picked_on_test": picked_on_test,
        "mean": mean,
        "std": std,
        "per_fold": per_fold,
        "oof": {
            "images": len(oof_rows),
            "metrics": _oof_metrics(oof_rows),
            "runs_without_predictions": oof_missing_runs,
            "images_without_prediction": uncovered,
            "predictions": oof_rows,
        },
        **staged_oof,
        "two_stage_gain": _stage_gain(per_fold, order, "test_two_stage", TWO_STAGE_PAIRED),
        "scan_stage_gain": _stage_gain(per_fold, order, "test_scan_stage", TWO_STAGE_PAIRED),
        # what the scan stage adds to the stages before it (its probabilities are averaged into theirs)
        "scan_over_crop_gain": _stage_gain(per_fold, order, "test_scan_stage", TWO_STAGE_PAIRED, "test_two_stage"),
        "refined_gain": _stage_gain(per_fold, order, "test_refined", REFINED_PAIRED),
    }
    if not write:
        return summary
    out_dir = Path(out_dir) if out_dir else directory
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        summary["figures"] = []
        try:
            summary["figures"] = write_figures(summary, out_dir)
        except Exception as exc:  # noqa: BLE001 - a figure must never cost the summary
            log.warning("cv_summary: figures not written (%s: %s)", type(exc).__name__, exc)
        _write_json(out_dir / "cv_summary.json", summary)
        write_text_atomic(out_dir / "cv_summary.md", render_markdown(summary))
        write_csv_atomic(out_dir / "oof_predictions.csv", oof_rows, ["fold"] + PREDICTION_COLUMNS)
    except OSError as exc:  # a file in the way, no permission, a full disk
        raise CVSummaryError(f"{out_dir}: cannot write the summary there ({exc.__class__.__name__}: "
                             f"{exc.strerror or exc})") from exc
    log.info("cv_summary: %d fold(s) of %d, %d out-of-fold predictions -> %s", len(order), k, len(oof_rows),
             out_dir / "cv_summary.md")
    return summary


# the cross-validation's headline: lesion-image Dice and the diagnosis (README, docs/results.md)
# and, for runs with the refine stage (refine_stage=default), the refined masks' Dice, and for runs with the crop
# stage (crop_stage=default), the two-stage classes
HEADLINE = ("test/dice_per_image_lesion", "test/dice_per_image_benign", "test/dice_per_image_malignant",
            "test/dice", "test/iou", "test/accuracy", "test/recall_normal", "test/recall_benign",
            "test/recall_malignant", "test/f1_macro", "test/auroc_macro",
            "test_refined/dice_per_image_lesion", "test_refined/dice_per_image_benign",
            "test_refined/dice_per_image_malignant", "test_refined/dice", "test_refined/iou",
            "test_two_stage/accuracy", "test_two_stage/recall_normal", "test_two_stage/recall_benign",
            "test_two_stage/recall_malignant", "test_two_stage/f1_macro", "test_two_stage/auroc_macro",
            "test_scan_stage/accuracy", "test_scan_stage/recall_normal", "test_scan_stage/recall_benign",
            "test_scan_stage/recall_malignant", "test_scan_stage/f1_macro", "test_scan_stage/auroc_macro")
# the crop stage's per-image predictions beside a run's predictions.csv (busiseg.train, crop_stage=default)
TWO_STAGE_PREDICTIONS = "predictions_two_stage.csv"
# the refine stage's (refine_stage=default): the refined masks' Dice per image
REFINED_PREDICTIONS = "predictions_refined.csv"
# the scan stage's (scan_stage=default): the recipe's diagnosis with the whole-scan classifier joined
SCAN_STAGE_PREDICTIONS = "predictions_scan_stage.csv"
# the stages that change the classes: (the summary's key, predictions file, name, metric prefix)
CLASS_STAGES = (("two_stage", TWO_STAGE_PREDICTIONS, "crop stage", "test_two_stage"),
                ("scan_stage", SCAN_STAGE_PREDICTIONS, "scan stage", "test_scan_stage"))
# the second stages a headline sets beside the network's test/*: (metric prefix, column title, the summary's
# key of its paired per-fold gain)
STAGES = (("test_refined", "with the refine stage", "refined_gain"),
          ("test_two_stage", "with the crop stage", "two_stage_gain"),
          ("test_scan_stage", "with the scan stage", "scan_stage_gain"))


def _read_predictions(path: Path) -> list[dict[str, str]] | None:
    """A run's predictions.csv rows (None without the file); an error names missing columns."""
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        absent = set(PREDICTION_COLUMNS) - set(reader.fieldnames or [])
        if absent:
            raise CVSummaryError(f"{path}: lacks the column(s) {', '.join(sorted(absent))}")
        return list(reader)


def _per_class_dice(predictions: Sequence[Mapping[str, str]], prefix: str = "test") -> dict[str, float]:
    """Mean per-image Dice of a run's test part from its predictions.csv rows: on lesion images
    (benign and malignant: ``test/dice_per_image_lesion``, the figure papers on BUSI report)
    and per class (``test/dice_per_image_<class>``; on normal images 1 = nothing predicted).
    ``prefix``: ``test_refined`` for the refine stage's predictions_refined.csv."""
    rows = [r for r in predictions if r["part"] == "test"]
    out: dict[str, float] = {}
    groups = {c: [r for r in rows if r["true_class"] == c] for c in CLASS_NAMES}
    groups["lesion"] = [r for r in rows if r["true_class"] != CLASS_NAMES[0]]
    for name, group in groups.items():
        if group:
            out[f"{prefix}/dice_per_image_{name}"] = sum(float(r["dice"]) for r in group) / len(group)
    return out


def headline_rows(summary: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """(metric, mean, std) of the headline metrics the summary has."""
    return [(m, summary["mean"][m], summary["std"][m]) for m in HEADLINE if m in summary["mean"]]


def headline_stages(summary: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The second stages (``STAGES`` entries) whose headline metrics the summary holds."""
    mean = summary["mean"]
    return [st for st in STAGES if any(m.startswith(st[0] + "/") for m in HEADLINE if m in mean)]


def headline_table(summary: Mapping[str, Any]) -> list[tuple[str, ...]] | None:
    """The headline side by side for runs with a second stage: a header row, then rows of (metric, network
    ``test/<m>``, each stage's ``<prefix>/<m>``, each stage's paired per-fold gain), every cell formatted ("" where
    there is none; a stage's cell only where the headline lists it). None unless the runs have a stage's
    metrics (then the plain ``headline_rows`` are the headline)."""
    mean, std = summary["mean"], summary["std"]
    stages = headline_stages(summary)
    if not stages:
        return None
    header = ("metric", "network (`test/*`)", *(f"{title} (`{prefix}/*`)" for prefix, title, _ in stages),
              *(f"{title.split()[-2]} stage minus network, paired per fold" for _, title, _ in stages))
    rows = [header]
    for m in (h.split("/", 1)[1] for h in HEADLINE if h.startswith("test/")):
        net = f"test/{m}"
        named = [f"{prefix}/{m}" for prefix, _, _ in stages]
        if net not in mean and not any(n in mean and n in HEADLINE for n in named):
            continue
        cells = [_fmt_pm(mean[net], std[net]) + _coverage(summary, net) if net in mean else ""]
        cells += [_fmt_pm(mean[n], std[n]) + _coverage(summary, n) if n in mean and n in HEADLINE else ""
                  for n in named]
        for _, _, key in stages:
            g = (summary.get(key) or {}).get(m)
            cells.append("" if g is None else (f"{g['mean']:+.4f}" + (f" +- {g['std']:.4f}" if g["std"] is not None
                                                                      else "")
                                               + f" ({g['folds_better']} better, {g['folds_worse']} worse"
                                               + f" of {len(g['per_fold'])})"))
        rows.append((m, *cells))
    return rows


def _coverage(summary: Mapping[str, Any], metric: str) -> str:
    """" (k of n folds)" where only some folds hold ``metric`` (e.g. the crop stage run on some), else ""."""
    folds = summary["folds"]
    have = sum(summary["per_fold"][f].get(metric) is not None for f in folds)
    return "" if have == len(folds) else f" ({have} of {len(folds)} folds)"


CURVES = (("val/dice_per_image", "validation Dice per image"), ("val/accuracy", "validation accuracy"),
          ("train/loss_epoch", "training loss"))


def learning_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(epoch, value), ...]}`` from a run's CSV log (``logger=csv`` or ``many``), else from its
    TensorBoard events (the default logger), if it has either."""
    files = sorted(run.glob("csv/**/metrics.csv")) + sorted(run.glob("csv/metrics.csv"))
    curves: dict[str, list[tuple[int, float]]] = {m: [] for m, _ in CURVES}
    for path in dict.fromkeys(files):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                for m, _ in CURVES:
                    if row.get(m) not in (None, "") and row.get("epoch") not in (None, ""):
                        curves[m].append((int(float(row["epoch"])), float(row[m])))
    if not files and (run / "tensorboard").is_dir():
        curves = _tensorboard_curves(run / "tensorboard")
    return {m: sorted(dict(v).items()) for m, v in curves.items() if v}


def _tensorboard_curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The curves of :data:`CURVES` from TensorBoard event files, each step mapped to the epoch Lightning logged
    beside it (its ``epoch`` scalar); empty where the events cannot be read."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        tags = set(events.Tags().get("scalars", []))
        epoch_at = {e.step: int(e.value) for e in events.Scalars("epoch")} if "epoch" in tags else {}
        return {m: [(epoch_at[e.step], float(e.value)) for e in events.Scalars(m) if e.step in epoch_at]
                for m, _ in CURVES if m in tags}
    except Exception as exc:  # noqa: BLE001 - a figure must never cost the summary
        log.warning("cv_summary: %s: learning curves not read (%s: %s)", folder, type(exc).__name__, exc)
        return {}


def write_figures(summary: Mapping[str, Any], out_dir: Path) -> list[str]:
    """cv_learning_curves.png (every fold), cv_confusion_matrix.png and cv_dice_distribution.png
    (out-of-fold predictions); returns the files written."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from busiseg.evaluation.figures import confusion_matrix_figure, dice_distribution_figure
    from busiseg.models.reporting import save_png

    written = []
    curves = {f: learning_curves(Path(run)) for f, run in summary["runs"].items()}
    if any(curves.values()):
        fig = Figure(figsize=(5.0 * len(CURVES), 4.2), dpi=100, facecolor="white", layout="constrained")
        axes = fig.subplots(1, len(CURVES))
        for ax, (metric, title) in zip(axes, CURVES):
            for f, c in curves.items():
                if metric in c:
                    epochs, values = zip(*c[metric])
                    ax.plot(epochs, values, lw=1.5, marker="o" if len(epochs) < 20 else None, ms=3,
                            label=f"fold {f}")  # a marker: a one-epoch curve is a point
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
        axes[0].legend(loc="lower right")
        fig.suptitle(f"Learning curves, {len(curves)} fold(s): {summary['directory']}", fontsize=11)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        save_png(np.asarray(canvas.buffer_rgba())[..., :3].copy(), out_dir / "cv_learning_curves.png")
        written.append("cv_learning_curves.png")
    oof = summary["oof"]
    if oof["images"]:
        n = oof["images"]
        sub = f"out-of-fold, {n} images, {len(summary['folds'])} fold(s)"
        save_png(confusion_matrix_figure(np.array(oof["metrics"]["confusion_matrix"]), subtitle=sub),
                 out_dir / "cv_confusion_matrix.png")
        labels = np.array([CLASS_NAMES.index(r["true_class"]) for r in oof["predictions"]])
        dice = np.array([float(r["dice"]) for r in oof["predictions"]])
        save_png(dice_distribution_figure(dice, labels, subtitle=f"the network's masks, {sub}"),
                 out_dir / "cv_dice_distribution.png")
        written += ["cv_confusion_matrix.png", "cv_dice_distribution.png"]
    for key, _, name, _ in CLASS_STAGES:
        staged = summary.get(f"oof_{key}")
        if staged and staged["images"]:
            sub = f"with the {name}, out-of-fold, {staged['images']} images, {len(summary['folds'])} fold(s)"
            save_png(confusion_matrix_figure(np.array(staged["metrics"]["confusion_matrix"]), subtitle=sub),
                     out_dir / f"cv_confusion_matrix_{key}.png")
            written.append(f"cv_confusion_matrix_{key}.png")
    return written


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    write_json_atomic(path, payload, indent=1, default=str)


def _oof_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Metrics pooled over every out-of-fold prediction (each image once)."""
    if not rows:
        return {}
    n = len(rows)
    confusion = [[0] * len(CLASS_NAMES) for _ in CLASS_NAMES]
    for r in rows:
        confusion[CLASS_NAMES.index(r["true_class"])][CLASS_NAMES.index(r["pred_class"])] += 1
    out: dict[str, Any] = {
        "accuracy": sum(confusion[i][i] for i in range(len(CLASS_NAMES))) / n,
        "dice_per_image": sum(float(r["dice"]) for r in rows) / n,
    }
    recalls = []
    for i, c in enumerate(CLASS_NAMES):
        support = sum(confusion[i])
        if support:
            out[f"recall_{c}"] = confusion[i][i] / support
            recalls.append(out[f"recall_{c}"])
            out[f"dice_per_image_{c}"] = sum(float(r["dice"]) for r in rows if r["true_class"] == c) / support
    out["recall_macro"] = sum(recalls) / len(recalls) if recalls else float("nan")
    out["confusion_matrix"] = confusion
    return out


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _fmt_pm(mean: Any, std: Any) -> str:
    """``mean +- std``, or the mean alone where there is no std (a single fold)."""
    if std is None or (isinstance(std, float) and not math.isfinite(std)):
        return _fmt(mean)
    return f"{_fmt(mean)} +- {_fmt(std)}"


TWO_STAGE_PAIRED = ("accuracy", "recall_normal", "recall_benign", "recall_malignant", "f1_macro", "auroc_macro")
REFINED_PAIRED = ("dice_per_image_lesion", "dice_per_image_benign", "dice_per_image_malignant", "dice", "iou")


def _stage_gain(per_fold: Mapping[int, Mapping[str, Any]], folds: Sequence[int], prefix: str,
                metrics: Sequence[str], base: str = "test") -> dict[str, Any] | None:
    """Per fold, a second stage's ``<prefix>/<m>`` minus ``<base>/<m>`` (the network's ``test/*`` by default; the
    same images), for each of ``metrics``: ``{m: {"per_fold", "mean", "std", "folds_better", "folds_worse"}}``;
    None unless every fold has both of some metric."""
    out: dict[str, Any] = {}
    for m in metrics:
        pairs = {f: (per_fold[f].get(f"{prefix}/{m}"), per_fold[f].get(f"{base}/{m}")) for f in folds}
        if not folds or any(a is None or b is None for a, b in pairs.values()):
            continue
        diffs = {f: float(a) - float(b) for f, (a, b) in pairs.items()}
        mean, std = _mean_std(list(diffs.values()))
        out[m] = {"per_fold": diffs, "mean": mean, "std": std if math.isfinite(std) else None,
                  "folds_better": sum(d > 0 for d in diffs.values()), "folds_worse": sum(d < 0 for d in diffs.values())}
    return out or None


def _gain_line(m: str, g: Mapping[str, Any]) -> str:
    folds = ", ".join(f"{d:+.3f}" for d in g["per_fold"].values())
    std = f" +- {g['std']:.3f}" if g["std"] is not None else ""
    return (f"{m}: {g['mean']:+.3f}{std} (per fold {folds}; better in {g['folds_better']}, worse in "
            f"{g['folds_worse']} of {len(g['per_fold'])})")


def _pooled_lines(m: Mapping[str, Any]) -> list[str]:
    """Pooled out-of-fold metrics and their confusion matrix, as markdown lines."""
    lines = ["", "| pooled metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in m.items() if k != "confusion_matrix"]
    lines += ["", "Confusion matrix (rows true, columns predicted):", "",
              "| | " + " | ".join(CLASS_NAMES) + " |", "|---|" + "---|" * len(CLASS_NAMES)]
    lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(CLASS_NAMES, m["confusion_matrix"])]
    return lines


def _differences_text(differences: Mapping[str, Mapping[Any, Any]], shown: int = 6) -> str:
    items = [f"{k} ({', '.join(f'fold {f}: {v}' for f, v in values.items())})"
             for k, values in list(differences.items())[:shown]]
    more = f" and {len(differences) - shown} more" if len(differences) > shown else ""
    return "; ".join(items) + more


def _picked_on_test_text(folds: Sequence[int]) -> str:
    return (f"fold(s) {', '.join(map(str, folds))} tested the checkpoint picked by val/dice on the validation fold, "
            "which is also their test part (split.test_fraction=0, test_ckpt=best): those test metrics are "
            "optimistic; test_ckpt=last tests the weights each fit ends with (experiment=busi_cpu does)")


def render_markdown(summary: Mapping[str, Any]) -> str:
    s = summary
    lines = [f"# Cross-validation summary: {s['directory']}", ""]
    missing = f" (missing: {s['missing_folds']})" if s["missing_folds"] else ""
    lines.append(f"{len(s['folds'])} of {s['k']} folds{missing}. Mean +- sample std over folds.")
    if s.get("setting_differences"):
        lines += ["", "**The folds were trained with different settings**, so their mean is not one recipe's: "
                  + _differences_text(s["setting_differences"]) + "."]
    if s.get("checkpoint_picked_on_test"):
        lines += ["", "**Optimistic**: " + _picked_on_test_text(s["checkpoint_picked_on_test"]) + "."]
    machines = s.get("machines") or {}
    if len(set(machines.values())) == 1 and None not in machines.values():
        lines.append(f"Trained on {next(iter(machines.values()))}.")
    elif machines:
        lines += ["", "The folds ran on different machines (bf16 results reproduce bit for bit only on the same CPU "
                  "model): " + "; ".join(f"fold {f}: {m or 'not recorded'}" for f, m in machines.items()) + "."]
    head, table = headline_rows(s), headline_table(s)
    if table:
        lines += ["", "## Headline", "", "| " + " | ".join(table[0]) + " |", "|---" * len(table[0]) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    elif head:
        lines += ["", "## Headline", "", "| metric | mean +- std |", "|---|---|"]
        lines += [f"| {m} | {_fmt_pm(mu, sd)} |" for m, mu, sd in head]
    if s.get("refined_gain"):
        lines += ["", "The refine stage against the network alone, paired per fold (`test_refined/*` minus `test/*`):",
                  ""]
        lines += [f"- {_gain_line(m, g)}" for m, g in s["refined_gain"].items()]
    if s.get("two_stage_gain"):
        lines += ["", "The crop stage against the network alone, paired per fold (`test_two_stage/*` minus `test/*`):", ""]
        lines += [f"- {_gain_line(m, g)}" for m, g in s["two_stage_gain"].items()]
    if s.get("scan_stage_gain"):
        lines += ["", "The scan stage (with the run's other stages) against the network alone, paired per fold "
                  "(`test_scan_stage/*` minus `test/*`):", ""]
        lines += [f"- {_gain_line(m, g)}" for m, g in s["scan_stage_gain"].items()]
    if s.get("scan_over_crop_gain"):
        lines += ["", "The scan stage against the stages before it, paired per fold "
                  "(`test_scan_stage/*` minus `test_two_stage/*`):", ""]
        lines += [f"- {_gain_line(m, g)}" for m, g in s["scan_over_crop_gain"].items()]
    if head:
        lines += ["", "## Every metric"]
    lines += ["", "| metric | mean | std |", "|---|---|---|"]
    lines += [f"| {m} | {_fmt(s['mean'][m])} | {_fmt(s['std'][m])} |" for m in s["mean"]]
    lines += ["", "## Per fold", ""]
    folds = s["folds"]
    lines += ["| metric | " + " | ".join(f"fold {f}" for f in folds) + " |", "|---|" + "---|" * len(folds)]
    lines += [f"| {m} | " + " | ".join(_fmt(s["per_fold"][f][m]) for f in folds) + " |" for m in s["mean"]]
    if s.get("figures"):
        lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in s["figures"]]
    oof = s["oof"]
    lines += ["", "## Out-of-fold predictions", ""]
    if not oof["images"]:
        lines.append("None (the fold runs wrote no predictions.csv).")
        return "\n".join(lines) + "\n"
    lines.append(f"{oof['images']} images, each predicted by the model of the fold that held it out.")
    if oof["runs_without_predictions"]:
        lines.append(f"Runs without predictions.csv: {', '.join(oof['runs_without_predictions'])}.")
    if oof["images_without_prediction"]:
        lines.append(f"{len(oof['images_without_prediction'])} image(s) of the folds have no prediction.")
    lines += _pooled_lines(oof["metrics"])
    staged = s.get("oof_two_stage")
    if staged and staged["images"]:
        lines += ["", f"With the crop stage (`{TWO_STAGE_PREDICTIONS}`): the same {staged['images']} images, the "
                  "two-stage classes (the masks, so the Dice, are the network's).", ""]
        lines += _pooled_lines(staged["metrics"])
    staged = s.get("oof_scan_stage")
    if staged and staged["images"]:
        lines += ["", f"With the scan stage (`{SCAN_STAGE_PREDICTIONS}`): the same {staged['images']} images, the "
                  "recipe's classes (the mean of the two-stage or the network's and the whole-scan classifier's).",
                  ""]
        lines += _pooled_lines(staged["metrics"])
    lines += ["", "<details><summary>Every image</summary>", "",
              "| image | fold | true | predicted | " + " | ".join(f"p({c})" for c in CLASS_NAMES) + " | dice |",
              "|---|---|---|---|" + "---|" * (len(CLASS_NAMES) + 1)]
    for r in sorted(oof["predictions"], key=lambda r: r["image"]):
        probs = " | ".join(f"{float(r[f'prob_{c}']):.3f}" for c in CLASS_NAMES)
        lines.append(f"| {r['image']} | {r['fold']} | {r['true_class']} | {r['pred_class']} | {probs} | "
                     f"{float(r['dice']):.3f} |")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry points


class CVSummaryCallback(Callback):
    """Hydra callback: summarise the folds when a multirun ends (never fails the sweep)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not find_fold_runs(sweep_dir):
            return
        try:
            summarize(sweep_dir)
        except CVSummaryError as exc:
            log.warning("cv_summary: %s", exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m busiseg.cv_summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="the k-fold sweep dir (holds one run dir per fold)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.out is not None:  # before the runs are read; a write that fails later is reported as well
            problem = output_folder_problem(args.out)
            if problem is not None:
                raise CVSummaryError(f"--out {args.out}: {problem}")
        summary = summarize(args.directory, args.out)
    except CVSummaryError as exc:
        print(f"busiseg: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(summary['folds'])} of {summary['k']} folds, mean +- std over folds")
    table = headline_table(summary)
    if table:
        # the console's table: the stages' scores under short headers; the paired gains are the lines below and
        # every column is in cv_summary.md (the full table is about 300 characters wide)
        keep = [i for i, head in enumerate(table[0]) if "paired per fold" not in head]
        table = [tuple(re.sub(r"\s*\(test[^)]*\)$", "", row[i].replace("`", "")).replace("with the ", "")
                       if r == 0 else row[i].replace("`", "") for i in keep) for r, row in enumerate(table)]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    else:
        rows = headline_rows(summary) or [(m, summary["mean"][m], summary["std"][m]) for m in summary["mean"]
                                          if m.startswith(("test/", "val/"))]
        width = max((len(m) for m, _, _ in rows), default=0)
        for m, mu, sd in rows:
            print(f"{m:<{width}}  {_fmt_pm(mu, sd)}")
    if summary["oof"]["metrics"]:
        oof = summary["oof"]["metrics"]
        print(f"out-of-fold ({summary['oof']['images']} images): accuracy {_fmt(oof['accuracy'])}, "
              f"confusion (rows true {'/'.join(CLASS_NAMES)}): {oof['confusion_matrix']}")
    if "dice_per_image_lesion" in (summary.get("refined_gain") or {}):
        print(f"refine stage minus network, {_gain_line('dice_per_image_lesion', summary['refined_gain']['dice_per_image_lesion'])}")
    for m in ("accuracy", "recall_malignant"):
        if m in (summary.get("two_stage_gain") or {}):
            print(f"crop stage minus network, {_gain_line(m, summary['two_stage_gain'][m])}")
    if "accuracy" in (summary.get("scan_stage_gain") or {}):
        print(f"scan stage minus network, {_gain_line('accuracy', summary['scan_stage_gain']['accuracy'])}")
    if "accuracy" in (summary.get("scan_over_crop_gain") or {}):
        print(f"scan stage minus crop stage, {_gain_line('accuracy', summary['scan_over_crop_gain']['accuracy'])}")
    for key, _, name, _ in CLASS_STAGES:
        staged = summary.get(f"oof_{key}")
        if staged and staged["metrics"]:
            print(f"out-of-fold with the {name} ({staged['images']} images): accuracy "
                  f"{_fmt(staged['metrics']['accuracy'])}, confusion: {staged['metrics']['confusion_matrix']}")
    print(f"summary: {(args.out or args.directory) / 'cv_summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
