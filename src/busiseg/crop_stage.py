"""The crop stage (``busiseg.models.crop_classifier``): train it for a run, or cross-validate it on a sweep.

    python -m busiseg.crop_stage train RUN [--out FILE] [settings]
    python -m busiseg.crop_stage cv OUT SWEEP [--folds 0 1 2] [settings]

``train`` trains the benign-or-malignant crop classifier on the lesion images of RUN's training part
(RUN/split.json, images from the run's data root, ground-truth lesion boxes; with ``--normal-boxes N`` also
"none" on N crops of each normal training image, the first around the run's network's peak region) and writes
``RUN/crop_classifier.pt``; ``python -m busiseg.eval ckpt_path=RUN/checkpoints/last.ckpt
crop_classifier=RUN/crop_classifier.pt`` and ``busiseg.predict ... crop_classifier=...`` then use it.

``cv`` does that for every fold of a k-fold sweep (``scripts/cv.sh``) and evaluates each fold's test part
twice by the same code (``busiseg.evaluation.runner``, at the run's ``trainer.precision``, no TTA): the
network alone (``OUT/network/F``) and with the crop stage (``OUT/two_stage/F``, its crop classifier
beside: ``crop_classifier.pt``, seeded ``--seed`` + fold, reused when its settings and images match). Both are sweep-like
folders (``split.json``, ``metrics.json``, ``predictions.csv``) that ``busiseg.cv_summary`` and
``busiseg.ablation`` read; ``OUT/crop_cv.md`` / ``.json`` hold the table with per-fold paired
differences against the network alone. The two-stage arm's ``fit_seconds`` is the network's plus the
crop classifier's. The sweep itself is only read. docs/two_stage.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from busiseg.ablation import AblationError, compare, render_markdown  # noqa: E402
from busiseg.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from busiseg.checkpoint import CheckpointError, read_checkpoint  # noqa: E402
from busiseg.cv_summary import CVSummaryError  # noqa: E402
from busiseg.data.busi import DatasetError, Record, load_record, scan_busi  # noqa: E402
from busiseg.data.crops import Box, lesion_box, normal_boxes, peak_box  # noqa: E402
from busiseg.data.splits import load_split  # noqa: E402
from busiseg.ensemble_cv import EnsembleCVError, fold_runs, run_fit_seconds, write_eval_run  # noqa: E402
from busiseg.evaluation.runner import (EvalError, EvalResults, autocast_dtype, resolve_inputs, run_network,  # noqa: E402
                                      run_precision)
from busiseg.inference import InferenceOptions, predict_probs, prepare_image, restore_size  # noqa: E402
from busiseg.models.crop_classifier import (  # noqa: E402
    CropClassifier,
    CropClassifierError,
    CropSettings,
    check_not_trained_on,
    load_crop_classifier,
    read_crop_file,
    save_crop_classifier,
    to_grey,
    train_crop_classifier,
)
from busiseg.run_info import cpu_has_bf16  # noqa: E402

log = logging.getLogger("busiseg.crop_stage")

FILE_NAME = "crop_classifier.pt"
NETWORK, TWO_STAGE = "network", "two_stage"


def training_precision(device: torch.device, requested: str = "auto") -> torch.dtype | None:
    """bf16 autocast where the device runs it natively (``auto``), else full precision."""
    if requested == "32":
        return None
    if requested == "bf16-mixed":
        return torch.bfloat16
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    return torch.bfloat16 if native else None


def stage_device(device: str, error: type[Exception] = CropClassifierError) -> torch.device:
    """``--device`` of a second stage's training: auto (CUDA when visible), cpu or cuda[:N]; ``error`` names a bad
    one."""
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        raise error(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"--device {device} but no CUDA device is visible; use --device cpu or auto")
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        ("cpu" if device == "auto" else device))


@contextlib.contextmanager
def epoch_bar(label: str, epochs: int, progress: bool = True):
    """A rich progress bar over a second stage's training epochs; yields the ``on_epoch(epoch, loss)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("train", total=epochs, loss="-")
        yield lambda epoch, loss: bar.update(task, advance=1, loss=f"{loss:.3f}")


def stage_info(started: float, history: Sequence[float], root: Path, split_file: Path, device: torch.device,
               dtype: torch.dtype | None) -> dict[str, Any]:
    """What a second stage's file stores about its training: time, loss per epoch, images, device, precision."""
    return {"fit_seconds": round(time.perf_counter() - started, 2), "loss_per_epoch": [round(v, 5) for v in history],
            "data_root": str(root), "split_file": str(split_file), "device": str(device),
            "precision": "bf16-mixed" if dtype is not None else "32"}


def stage_figure(history: Sequence[float], ylabel: str, panels: Sequence[tuple[np.ndarray, np.ndarray | None,
                 str | None, str | None]], title: str, per_row: int) -> np.ndarray:
    """RGB picture of a second stage's training: the loss per epoch, and two rows of ``per_row`` crops as fed to
    the network; each panel is (crop uint8, an outline to draw at 0.5 or None, a title or None, its colour)."""
    from matplotlib.figure import Figure

    from busiseg.evaluation.figures import _render

    fig = Figure(figsize=(4.2 + 1.6 * per_row, 4.0), dpi=100, facecolor="white", layout="constrained")
    grid = fig.add_gridspec(2, per_row + 2)
    ax = fig.add_subplot(grid[:, :2])
    ax.plot(range(1, len(history) + 1), history, lw=1.8, marker="o" if len(history) < 20 else None, ms=3)
    ax.set(xlabel="epoch", ylabel=ylabel, title="training loss")
    ax.grid(alpha=0.3)
    for n, (crop, outline, label, colour) in enumerate(panels):
        a = fig.add_subplot(grid[n // per_row, 2 + n % per_row])
        a.imshow(crop, cmap="gray", vmin=0, vmax=255)
        if outline is not None and (outline > 0.5).any():
            a.contour(outline, levels=[0.5], colors="#55a868", linewidths=1.0)
        if label:
            a.set_title(label, fontsize=9, color=colour)
        a.axis("off")
    fig.suptitle(title, fontsize=10)
    return _render(fig)


def score_parts(net: torch.nn.Module, parts: dict[str, list[Record]], image_size: int, in_channels: int,
                batch_size: int, *, precision: str, channels_last: bool, progress: bool,
                check: Any, **stages: Any) -> dict[str, EvalResults]:
    """Each part of ``parts`` scored by the runner with a copy of ``net`` on the CPU at ``precision`` and the second
    stages ``stages`` (``crop_classifier=``, ``mask_refiner=``), after ``check(names)`` (the trained-on refusal)."""
    results = {}
    cpu_net = copy.deepcopy(net).cpu().float()  # the runner evaluates on the CPU
    for part, records in parts.items():
        check([r.name for r in records])
        results[part] = run_network(cpu_net, records, image_size, in_channels, batch_size, InferenceOptions(),
                                    progress=progress, channels_last=channels_last, autocast=autocast_dtype(precision),
                                    **stages)
    return results


INFO_KEYS = ("fit_seconds", "loss_per_epoch", "data_root", "split_file", "device", "precision")


def trained_before_stop(out: Path, settings: Any, root: Path, split_file: Path, precision: str,
                        read: Any) -> dict[str, Any] | None:
    """On a resumed run (``resume=``): the stage file the run wrote before it was stopped, when it was trained with
    these ``settings`` on images of ``split_file``'s training part only, from this data ``root``, at this
    ``precision`` (its stored dictionary, read by ``read``), so the stage is not trained again; None otherwise
    (train it). Stage files are written atomically, so one that exists is whole; a resumed run keeps its
    ``split.json`` (the run dir may have moved: the file's stored split path is not compared)."""
    if not Path(out).is_file():
        return None
    try:
        state = read(out)
        training = set(load_split(split_file)["train"])
    except Exception:  # damaged or another kind of file: train the stage again and overwrite it
        return None
    wanted = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}
    same = (state.get("settings") == wanted and state.get("data_root") == str(root)
            and state.get("precision") == precision and all(k in state for k in INFO_KEYS)
            and bool(state.get("trained_on")) and set(state["trained_on"]) <= training)
    if same:
        log.info("%s: trained before the run was stopped, with the same settings and split: reused", out)
    return state if same else None


def trained_or_reused(out: Path, settings: Any, root: Path, split_file: Path, precision: str, reuse: bool,
                      read: Any, load: Any, train: Any, save: Any) -> tuple[Any, dict[str, Any]]:
    """A second stage's model and what its file stores about its training: with ``reuse`` (a resumed run) the file
    at ``out`` when :func:`trained_before_stop` accepts it (``read``: its reader, ``load(out, state)``: its loader
    from the content ``read`` returned); otherwise
    ``train()`` (model, info, figure), written to ``out`` by ``save`` with its figure."""
    stored = trained_before_stop(out, settings, root, split_file, precision, read) if reuse else None
    if stored is not None:
        return load(out, stored), {k: stored[k] for k in INFO_KEYS}  # the file is read once
    model, info, figure = train()
    save_with_figure(model, out, figure, save, **info)
    return model, info


def stage_record(out: Path, info: dict[str, Any], trained_on: Sequence[str], settings: Any) -> dict[str, Any]:
    """What a run's ``metrics.json`` records about a second stage: its file, training time, images, settings."""
    return {"file": str(out), "fit_seconds": info["fit_seconds"], "images": len(trained_on),
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()}}


def run_network_view(run: Path, checkpoint: str, settings: CropSettings) -> StageNetwork | None:
    """RUN's network as the crop stage reads it on the normal training images (None when ``normal_boxes`` is 0)."""
    if not settings.normal_boxes:
        return None
    from busiseg.checkpoint import load_model

    net, config = load_model(run / "checkpoints" / checkpoint)
    data = config.get("data") or {}
    return StageNetwork(net, int(data["image_size"]), int(data.get("in_channels", 1)), run_precision(config))


def run_data_root(run: Path, checkpoint: str = "last.ckpt") -> Path:
    """The data root RUN was trained on, from its checkpoint's stored config (the synthetic phantom is
    written again when it is gone, as eval does)."""
    ckpt = run / "checkpoints" / checkpoint
    config = (read_checkpoint(ckpt).get("hyper_parameters") or {}).get("config") or {}
    data = config.get("data") or {}
    if not data.get("root"):
        raise CropClassifierError(f"{ckpt}: the checkpoint's config has no data.root; pass --data-root DIR")
    root = Path(str(data["root"])).expanduser()
    if data.get("synthetic") and not root.exists():
        from busiseg.data.synthetic import ensure_phantom

        ensure_phantom(root, **dict(data["synthetic"]))
    return root


@dataclasses.dataclass
class StageNetwork:
    """A run's network as the crop stage reads it on the normal training images (``normal_boxes`` > 0): at the
    run's input size and channels, under the autocast of its ``trainer.precision``, on the CPU."""

    net: torch.nn.Module
    image_size: int
    in_channels: int
    precision: str

    @classmethod
    def when_needed(cls, settings: CropSettings, net: torch.nn.Module, image_size: int, in_channels: int,
                    precision: str) -> "StageNetwork | None":
        """The network as ``settings`` needs it: None when ``normal_boxes`` is 0 (nothing reads it then)."""
        return cls(net, image_size, in_channels, precision) if settings.normal_boxes else None

    def peak_boxes(self, images: Sequence[np.ndarray], batch_size: int = 256) -> list[Box | None]:
        """The box of the network's peak region (``busiseg.data.crops.peak_box``) on each image (decoded at its
        own size with the network's ``in_channels``), in the images' order."""
        net = copy.deepcopy(self.net).cpu().float().to(memory_format=torch.contiguous_format).eval()
        dtype = autocast_dtype(self.precision)
        out: list[Box | None] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x = torch.stack([prepare_image(image, self.image_size) for image in chunk])
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                mask_p, _ = predict_probs(net, x)
            out.extend(peak_box(restore_size(mask_p[i, 0].float().numpy(), image.shape[:2]))
                       for i, image in enumerate(chunk))
        return out


def training_records(root: Path, split_file: Path) -> list[Record]:
    """The images of the split's training part, in the split's order."""
    try:
        names = load_split(split_file)["train"]
    except ValueError as exc:
        raise CropClassifierError(str(exc)) from exc
    by_name = {r.name: r for r in scan_busi(root)}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise CropClassifierError(f"{split_file}: {len(missing)} training image(s) are not in {root}, e.g. "
                                  f"{missing[0]} (is --data-root the folder the run used?)")
    return [by_name[n] for n in names]


def training_lesions(root: Path, split_file: Path) -> list[Record]:
    """The benign and malignant images of the split's training part."""
    return [r for r in training_records(root, split_file) if r.label > 0]


def training_crops(records: Sequence[Record], settings: CropSettings, network: StageNetwork | None
                   ) -> tuple[list[np.ndarray], list[Box], list[int], list[str]]:
    """What the crop classifier trains on: (images, boxes, labels indexing ``settings.classes``, image names).
    Each lesion image gives its ground-truth box; with ``normal_boxes`` N > 0 each normal image gives N boxes
    (``busiseg.data.crops.normal_boxes``, drawn with ``settings.seed``, sides those of the training lesions),
    the first replaced by ``network``'s peak region on it. Images in the records' order."""
    images, boxes, labels, names = [], [], [], []
    decoded = {}
    for r in records:
        if r.label == 0 and not settings.normal_boxes:
            continue
        image, mask = load_record(r)
        decoded[r.name] = image
        if r.label > 0:
            box = lesion_box(mask)
            if box is None:
                raise CropClassifierError(f"{r.masks[0] if r.masks else r.image}: a {r.class_name} image with an "
                                          "empty mask cannot train the crop classifier")
            images.append(image)
            boxes.append(box)
            labels.append(r.label - (0 if settings.normal_boxes else 1))
            names.append(r.name)
    if not settings.normal_boxes:
        return images, boxes, labels, names
    normals = [r for r in records if r.label == 0]
    if network is None:
        raise CropClassifierError(f"normal_boxes={settings.normal_boxes} reads the run's network on the normal "
                                  "training images; none was given")
    # the grey images decoded above, unless the network reads three channels
    seen = [decoded[r.name] if network.in_channels == 1 else load_record(r, network.in_channels)[0]
            for r in normals]
    hot = dict(zip((r.name for r in normals), network.peak_boxes(seen)))
    sides = np.array([b[2] / decoded[n].shape[1] for n, b in zip(names, boxes)])
    g = np.random.default_rng(settings.seed)
    out: tuple[list, list, list, list] = ([], [], [], [])
    lesion_at = {n: i for i, n in enumerate(names)}
    for r in records:  # the split's order, lesion and normal images interleaved (as scripts/probe_normal_crops.py)
        if r.label > 0:
            these = [boxes[lesion_at[r.name]]]
        else:
            these = normal_boxes(to_grey(decoded[r.name]), settings.normal_boxes, sides, g)
            if hot[r.name] is not None:
                these[0] = hot[r.name]
        for box in these:
            for dest, value in zip(out, (decoded[r.name], box, r.label, r.name)):
                dest.append(value)
    return out


def train_for_split(root: Path, split_file: Path, settings: CropSettings, device: str = "auto",
                    precision: str = "auto", progress: bool = True, network: StageNetwork | None = None
                    ) -> tuple[CropClassifier, dict[str, Any], np.ndarray]:
    """Train the crop classifier on the lesion images of ``split_file``'s training part under ``root`` (and on
    its normal images with ``settings.normal_boxes`` > 0, which needs the run's ``network``); returns it, what
    to store beside its weights (time, loss per epoch, where the images came from) and :func:`crop_figure`."""
    dev = stage_device(device)
    records = training_records(root, split_file)
    if not settings.normal_boxes:
        records = [r for r in records if r.label > 0]
    dtype = training_precision(dev, precision)
    started = time.perf_counter()
    images, boxes, labels, names = training_crops(records, settings, network)
    what = (f"{len(records)} images of {split_file}" if settings.normal_boxes else
            f"{len(records)} lesion images of {split_file}")
    log.info("crop classifier: %s (%s), %d crops, classes %s, %d epochs on %s%s", what, root, len(labels),
             "/".join(settings.classes), settings.epochs, dev, ", bf16" if dtype is not None else "")
    with epoch_bar("crop classifier", settings.epochs, progress) as on_epoch:
        model, history = train_crop_classifier(images, boxes, labels, settings, list(dict.fromkeys(names)), dev, dtype,
                                               on_epoch=on_epoch, classes=settings.classes)
    info = stage_info(started, history, root, split_file, dev, dtype)
    log.info("crop classifier trained in %.0f s, last epoch's loss %.3f", info["fit_seconds"], history[-1])
    figure = crop_figure(history, images, boxes, labels, settings,
                         f"crop classifier: {what}, {len(labels)} crops, {info['fit_seconds']:.0f} s")
    return model.cpu(), info, figure


def crop_figure(history: Sequence[float], images: Sequence[np.ndarray], boxes: Sequence[Any], labels: Sequence[int],
                settings: CropSettings, title: str, per_class: int = 4) -> np.ndarray:
    """RGB picture: the training loss per epoch, and what the classifier reads (the first ``per_class`` training
    crops of each class at the middle test margin, as fed to the network; two rows)."""
    from busiseg.data.crops import square_crop

    classes = settings.classes
    colours = {"none": "#4c72b0", "benign": "#55a868", "malignant": "#c44e52"}
    picks = [i for k in range(len(classes)) for i in [j for j, lab in enumerate(labels) if lab == k][:per_class]]
    margin = sorted(settings.test_margins)[len(settings.test_margins) // 2]
    panels = [(square_crop(to_grey(images[i]), boxes[i], margin, settings.size), None,
               classes[labels[i]], colours[classes[labels[i]]]) for i in picks]
    return stage_figure(history, "cross-entropy", panels, title, -(-len(classes) * per_class // 2))


def save_with_figure(model: Any, path: Path, figure: np.ndarray, save: Any = save_crop_classifier, **info: Any) -> Path:
    """A second stage's file (``save``: the crop classifier's by default, ``save_mask_refiner`` for the refine
    stage), and beside it ``<stem>.png`` (:func:`stage_figure`)."""
    from busiseg.models.reporting import save_png

    path = save(model, path, **info)
    save_png(figure, path.with_suffix(".png"))
    return path


def for_training_run(settings: CropSettings, root: Path, split_file: Path, net: torch.nn.Module,
                     parts: dict[str, list[Record]], image_size: int, in_channels: int, batch_size: int, *,
                     precision: str, channels_last: bool, device: str, out: Path,
                     progress: bool = True, mask_refiner: Any = None, reuse: bool = False
                     ) -> tuple[dict[str, Any], dict[str, EvalResults]]:
    """The crop stage inside ``busiseg.train`` (``crop_stage=default``): train the crop classifier on the
    lesion images of ``split_file``'s training part, write it to ``out`` (with its figure), and evaluate
    ``net`` with it on each part of ``parts`` (``{part: records}``, e.g. the test part) by the runner, at
    ``precision`` (the run's resolved ``trainer.precision``), on the CPU. Returns what the run's
    ``metrics.json`` records about the stage, and ``{part: results}``. ``mask_refiner``: the run's refine stage
    (``busiseg.models.mask_refiner.MaskRefiner``): the crops are then cut around its masks, which are scored.
    ``reuse`` (a resumed run): a file at ``out`` trained with these settings on this split is read, not retrained."""
    dtype = "bf16-mixed" if precision.startswith("bf16") else "32"
    model, info = trained_or_reused(
        out, settings, root, split_file, dtype, reuse, read_crop_file, load_crop_classifier,
        lambda: train_for_split(root, split_file, settings, device, dtype, progress,
                                StageNetwork.when_needed(settings, net, image_size, in_channels, precision)),
        save_crop_classifier)
    results = score_parts(net, parts, image_size, in_channels, batch_size, precision=precision,
                          channels_last=channels_last, progress=progress,
                          check=lambda names: check_not_trained_on(model, names, out),
                          crop_classifier=model, mask_refiner=mask_refiner)
    return stage_record(out, info, model.trained_on, settings), results


def _reusable(path: Path, settings: CropSettings, trained_on: list[str]) -> dict[str, Any] | None:
    """The stored crop classifier at ``path`` when it was trained with these settings on these images."""
    if not path.is_file():
        return None
    try:
        stored = read_crop_file(path)
        same = CropSettings(**stored["settings"]) == settings and sorted(stored.get("trained_on") or []) == trained_on
    except (CropClassifierError, KeyError, TypeError):
        return None
    return stored if same else None


def crop_cv(out: Path, sweep: Path, settings: CropSettings, folds: Sequence[int] | None = None,
            checkpoint: str = "last.ckpt", progress: bool = True) -> dict[str, Any]:
    """Per fold of ``sweep``: train (or reuse) the crop classifier, evaluate network and two-stage; compare."""
    runs = fold_runs(sweep)
    wanted = sorted(runs) if folds is None else list(folds)
    absent = [f for f in wanted if f not in runs]
    if absent:
        raise CropClassifierError(f"{sweep}: no run for fold(s) {absent} (folds found: {sorted(runs)})")
    precisions = set()
    for fold in wanted:
        run = runs[fold]
        ckpt = run / "checkpoints" / checkpoint
        inputs = resolve_inputs({"ckpt_path": str(ckpt), "part": "test", "data": {}})
        split_file = run / "split.json"
        crop_file = out / TWO_STAGE / str(fold) / FILE_NAME
        lesions = sorted(r.name for r in training_records(inputs.data_root, split_file)
                         if r.label > 0 or settings.normal_boxes)
        fold_settings = dataclasses.replace(settings, seed=settings.seed + fold)  # as scripts/probe_lesion_crops.py
        stored = _reusable(crop_file, fold_settings, lesions)
        if stored is not None:
            log.info("fold %d: reusing %s", fold, crop_file)
            model = load_crop_classifier(crop_file, stored)
            crop_seconds = float(stored.get("fit_seconds") or 0.0)
        else:
            log.info("fold %d: training the crop classifier", fold)
            network = StageNetwork.when_needed(settings, inputs.net, inputs.image_size, inputs.in_channels,
                                               run_precision(inputs.train_config))
            model, info, figure = train_for_split(inputs.data_root, split_file, fold_settings, progress=progress,
                                                  network=network)
            save_with_figure(model, crop_file, figure, run=str(run), **info)
            crop_seconds = info["fit_seconds"]
        check_not_trained_on(model, [r.name for r in inputs.records], crop_file)
        precision = run_precision(inputs.train_config)
        precisions.add(precision)
        kwargs = dict(progress=progress, channels_last=bool(inputs.train_config.get("channels_last", False)),
                      autocast=autocast_dtype(precision))
        args = (inputs.records, inputs.image_size, inputs.in_channels, inputs.batch_size, InferenceOptions())
        fit = run_fit_seconds(run)
        alone = run_network(inputs.net, *args, **kwargs)
        write_eval_run(out / NETWORK / str(fold), split_file, alone, fit, [str(ckpt)])
        staged = run_network(inputs.net, *args, crop_classifier=model, **kwargs)
        write_eval_run(out / TWO_STAGE / str(fold), split_file, staged, None if fit is None else fit + crop_seconds,
                   [str(ckpt), str(crop_file)])
        log.info("fold %d: accuracy network %.3f, two-stage %.3f", fold, alone.as_training["accuracy"],
                 staged.as_training["accuracy"])
    try:
        result = compare({NETWORK: out / NETWORK, TWO_STAGE: out / TWO_STAGE}, NETWORK)
    except AblationError as exc:
        raise CropClassifierError(str(exc)) from exc
    result.update(sweep=str(sweep), checkpoint=checkpoint, precision="/".join(sorted(precisions)),
                  crop_settings={k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()})
    write_json_atomic(out / "crop_cv.json", result)
    text = (f"`{sweep}` alone (`{NETWORK}`) and with the crop stage (`{TWO_STAGE}`), every arm evaluated here by the "
            f"same code ({checkpoint}, precision {result['precision']}, no TTA).\n\n" + render_markdown(result))
    write_text_atomic(out / "crop_cv.md", text)
    return result


def add_run_training_arguments(train: argparse.ArgumentParser, file_name: str, defaults: Any, size_help: str,
                               stage: str) -> None:
    """The ``train RUN`` arguments a run's second stage shares (the refine and scan stages): RUN, where to write, the
    images, the device, the checkpoint, the training settings every stage has (defaults from ``defaults``) and
    the seed, which defaults to the run's seed + fold as ``<stage>=default`` uses inside busiseg.train."""
    train.add_argument("run", type=Path, help="a training run dir (split.json, checkpoints/)")
    train.add_argument("--out", type=Path, help=f"output file (default RUN/{file_name})")
    train.add_argument("--data-root", type=Path, help="the images (default: the run's data.root)")
    train.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda[:N]")
    train.add_argument("--checkpoint", default="last.ckpt", help="file name in the run's checkpoints/ (its config "
                       "names the data root)")
    train.add_argument("--size", type=int, default=defaults.size, help=size_help)
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument("--seed", type=int, default=None,
                       help=f"default: the run's seed + its fold (what {stage}=default uses inside busiseg.train)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")


def _settings(args: argparse.Namespace) -> CropSettings:
    return CropSettings(size=args.size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        weight_decay=args.weight_decay, train_margin=tuple(args.train_margin), jitter=args.jitter,
                        test_margins=tuple(args.test_margins), seed=args.seed, normal_boxes=args.normal_boxes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m busiseg.crop_stage", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the crop classifier on a run's training part")
    train.add_argument("run", type=Path, help="a training run dir (split.json, checkpoints/)")
    train.add_argument("--out", type=Path, help=f"output file (default RUN/{FILE_NAME})")
    train.add_argument("--data-root", type=Path, help="the images (default: the run's data.root)")
    train.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda[:N]")
    cv = sub.add_parser("cv", help="cross-validate the crop stage on a k-fold sweep")
    cv.add_argument("out", type=Path, help="output folder")
    cv.add_argument("sweep", type=Path, help="k-fold sweep dir (one run per fold)")
    cv.add_argument("--folds", type=int, nargs="+", help="only these folds (default: every fold found)")
    for p in (train, cv):
        defaults = CropSettings()
        p.add_argument("--checkpoint", default="last.ckpt", help="file name in the run's checkpoints/ (its config "
                       "names the data root; cv evaluates it)")
        p.add_argument("--size", type=int, default=defaults.size, help="crop side fed to the classifier (px)")
        p.add_argument("--epochs", type=int, default=defaults.epochs)
        p.add_argument("--batch-size", type=int, default=defaults.batch_size)
        p.add_argument("--lr", type=float, default=defaults.lr)
        p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
        p.add_argument("--train-margin", type=float, nargs=2, default=defaults.train_margin,
                       help="training crop side = lesion box side x U(lo, hi)")
        p.add_argument("--jitter", type=float, default=defaults.jitter, help="training crop centre shift (share of side)")
        p.add_argument("--test-margins", type=float, nargs="+", default=defaults.test_margins,
                       help="crops at these margins (each also mirrored), probabilities averaged")
        p.add_argument("--seed", type=int, default=defaults.seed)
        p.add_argument("--normal-boxes", type=int, default=defaults.normal_boxes,
                       help="0: benign vs malignant; N > 0: also 'none', on N crops per normal training image (the "
                            "first around the run's network's peak region), joined into P(normal) too")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        settings = _settings(args)
        if args.command == "train":
            split_file = args.run / "split.json"
            if not split_file.is_file():
                raise CropClassifierError(f"{split_file}: not found (RUN is a training run dir: split.json, "
                                          "checkpoints/)")
            root = args.data_root or run_data_root(args.run, args.checkpoint)
            model, info, figure = train_for_split(root, split_file, settings, args.device,
                                                  progress=not args.no_progress,
                                                  network=run_network_view(args.run, args.checkpoint, settings))
            path = save_with_figure(model, args.out or args.run / FILE_NAME, figure, run=str(args.run), **info)
            print(f"crop classifier: {path} ({len(model.trained_on)} lesion images, {info['fit_seconds']:.0f} s); "
                  f"use it with: python -m busiseg.eval ckpt_path={args.run / 'checkpoints' / args.checkpoint} "
                  f"crop_classifier={path}")
        else:
            crop_cv(args.out, args.sweep, settings, args.folds, args.checkpoint, progress=not args.no_progress)
            print((args.out / "crop_cv.md").read_text(), end="")
    except (CropClassifierError, EnsembleCVError, EvalError, CVSummaryError, CheckpointError, DatasetError) as exc:
        print(f"busiseg: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
