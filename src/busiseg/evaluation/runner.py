"""Which images an evaluation sees, and the network run over them.

:func:`resolve_inputs` turns the eval config into a checkpoint, a data root and a list of
records (a part of the training run's split, or every image of a folder);
:func:`run_network` runs the network over them once and scores every image's mask in
each *view*: ``raw`` (the network's output, thresholded as the training step does) or
``postprocessed`` (with the ``inference`` options: TTA, post-processing), each at the
``preprocessed`` size (the square ``data.image_size`` the network sees, the training
step's size) and at the ``original`` size (probabilities restored with
``busiseg.inference.restore_size``, compared with the mask as it is on disk).
"""

from __future__ import annotations

import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from omegaconf import ListConfig
from omegaconf.errors import MissingMandatoryValue

from busiseg.checkpoint import MemberInputError, load_ensemble, load_model, training_run_dir
from busiseg.data.busi import DatasetError, Record, format_problems, load_record, scan_busi
from busiseg.data.dataset import resize_pair
from busiseg.data.labels import CLASS_NAMES
from busiseg.data.splits import PARTS, load_split
from busiseg.evaluation.metrics_table import MaskScore, MaskScores, score_mask
from busiseg.inference import InferenceOptions, area_resize, postprocess_mask, predict_probs, restore_size
from busiseg.models.crop_classifier import CropClassifier
from busiseg.models.scan_classifier import join_scan_probs, scan_probs
from busiseg.models.mask_refiner import MaskRefiner
from busiseg.models.metrics import SEG_THRESHOLD, classification_metrics, segmentation_metrics

log = logging.getLogger(__name__)

PART_CHOICES = (*PARTS, "all")
PIPELINES = ("raw", "postprocessed")
SIZES = ("preprocessed", "original")


class EvalError(ValueError):
    """A setting or file that makes the evaluation impossible; the message names it."""


@dataclass
class EvalInputs:
    """Everything an evaluation reads, resolved."""

    ckpt_path: Path
    net: torch.nn.Module
    train_config: dict[str, Any]
    run_dir: Path  # the training run's directory (<run>/checkpoints/x.ckpt -> <run>)
    data_root: Path
    image_size: int
    in_channels: int
    batch_size: int
    part: str
    split_file: Path | None
    records: list[Record]
    same_data_as_training: bool
    # every checkpoint evaluated: one, or the members of an ensemble (the first is ckpt_path)
    ckpt_paths: list[Path] = field(default_factory=list)

    @property
    def is_ensemble(self) -> bool:
        return len(self.ckpt_paths) > 1


def _is_set(value: Any) -> bool:
    return value not in (None, "", "???")


def inference_active(options: InferenceOptions) -> bool:
    """Does any option change the output of the plain forward pass thresholded at 0.5?"""
    return bool(options.tta_flip or any(s != 1.0 for s in options.tta_scales) or options.postprocessing
                or options.threshold != SEG_THRESHOLD)


def _select_part(records: list[Record], part: str, split_file: Path, root: Path) -> list[Record]:
    try:
        split = load_split(split_file)
    except ValueError as exc:
        raise EvalError(str(exc)) from exc
    by_name = {r.name: r for r in records}
    names = split[part]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise EvalError(
            f"{split_file}: {len(unknown)} image(s) of part '{part}' are not in {root}, e.g. {unknown[0]} "
            "(is data.root the folder the training run used?)"
        )
    if not names and not split["val"] and not split["test"]:
        raise EvalError(f"{split_file}: part '{part}' holds no images: the run trained on every image (split=all); "
                        "score it on images it never saw: data.root=/path/to/folder part=all")
    if not names:
        raise EvalError(f"{split_file}: part '{part}' holds no images; choose another part= or part=all")
    return [by_name[n] for n in names]


def resolve_inputs(cfg: Mapping[str, Any]) -> EvalInputs:
    """Checkpoint -> (net, training config); data root, sizes and the records to evaluate.

    ``image_size`` and ``in_channels`` always come from the checkpoint (the network was
    trained at them); the data root and eval batch size come from ``data.*`` when set,
    else from the training run's config.
    """
    try:
        ckpt_value = cfg.get("ckpt_path")
    except MissingMandatoryValue:  # ckpt_path: ??? in conf/eval.yaml
        ckpt_value = None
    values = list(ckpt_value) if isinstance(ckpt_value, (list, tuple, ListConfig)) else [ckpt_value]
    if not values or not all(_is_set(v) for v in values):
        raise EvalError("ckpt_path is not set: pass ckpt_path=<run>/checkpoints/<name>.ckpt "
                        "(or a list of checkpoints, an ensemble: ckpt_path=[A.ckpt,B.ckpt])")
    part = str(cfg.get("part", "test"))
    if part not in PART_CHOICES:
        raise EvalError(f"part={part} is not one of {', '.join(PART_CHOICES)}")
    ckpt_paths = [Path(str(v)).expanduser().resolve() for v in values]
    if len(set(ckpt_paths)) != len(ckpt_paths):
        raise EvalError(f"ckpt_path lists a checkpoint twice: {[str(p) for p in ckpt_paths]}")
    ckpt_path = ckpt_paths[0]
    net, train_config = load_model(ckpt_path)
    run_dir = training_run_dir(ckpt_path)

    train_data = dict(train_config.get("data") or {})
    data = dict(cfg.get("data") or {})
    if _is_set(data.get("root")):
        root = Path(str(data["root"])).expanduser()
        synthetic = data.get("synthetic")
    else:
        if not _is_set(train_data.get("root")):
            raise EvalError(f"{ckpt_path}: the checkpoint's config has no data.root; pass data.root=DIR")
        root = Path(str(train_data["root"])).expanduser()
        synthetic = train_data.get("synthetic")
    if synthetic and not root.exists():
        from busiseg.data.synthetic import ensure_phantom

        log.info("writing the synthetic phantom the run was trained on to %s", root)
        ensure_phantom(root, **dict(synthetic))
    trained_on = Path(str(train_data["root"])).expanduser() if _is_set(train_data.get("root")) else None
    same_data = trained_on is not None and trained_on.resolve() == root.resolve()

    try:
        image_size = int(train_data["image_size"])
        in_channels = int(train_data.get("in_channels", 1))
    except (KeyError, TypeError, ValueError) as exc:
        raise EvalError(f"{ckpt_path}: the checkpoint's config lacks data.image_size / data.in_channels") from exc
    batch_size = int(data.get("eval_batch_size") or train_data.get("eval_batch_size")
                     or train_data.get("batch_size") or 16)
    if batch_size < 1:
        raise EvalError(f"data.eval_batch_size must be >= 1, got {batch_size}")

    if len(ckpt_paths) > 1:
        try:
            net = load_ensemble(net, ckpt_paths, image_size, in_channels)
        except MemberInputError as exc:
            raise EvalError(str(exc)) from exc

    records = scan_busi(root)
    split_file: Path | None = None
    if part != "all":
        if _is_set(cfg.get("split_file")):
            split_file = Path(str(cfg["split_file"])).expanduser()
            if not split_file.is_file():
                raise EvalError(f"{split_file}: split file not found (given as split_file=)")
        else:
            split_file = run_dir / "split.json"
            if not split_file.is_file():
                raise EvalError(
                    f"{split_file}: split file not found (the training run writes split.json beside checkpoints/); "
                    f"pass split_file=PATH, or part=all to evaluate every image in {root}"
                )
        records = _select_part(records, part, split_file, root)
    if len(ckpt_paths) > 1 and part != "train":
        _check_members_did_not_train_on(ckpt_paths, records)
    return EvalInputs(ckpt_path, net, train_config, run_dir, root, image_size, in_channels, batch_size, part,
                      split_file, records, same_data, ckpt_paths)


def _check_members_did_not_train_on(ckpt_paths: list[Path], records: list[Record]) -> None:
    """An ensemble is only as clean as its dirtiest member: refuse one whose training part (its run's
    split.json) names an evaluated image (names are class/file, so a copy of the same data counts too)."""
    evaluated = {r.name for r in records}
    for path in ckpt_paths:
        run = training_run_dir(path)
        split_file = run / "split.json"
        if not split_file.is_file():
            raise EvalError(f"{split_file}: not found, so it is unknown which images ensemble member {path} "
                            "trained on (use checkpoints inside their training run dirs)")
        try:
            trained = set(load_split(split_file)["train"])
        except ValueError as exc:
            raise EvalError(str(exc)) from exc
        seen = sorted(evaluated & trained)
        if seen:
            raise EvalError(f"{path}: ensemble member trained on {len(seen)} of the {len(evaluated)} images evaluated "
                            f"(e.g. {seen[0]}, in {split_file}); members of a k-fold ensemble must share the fold")


# --------------------------------------------------------------------------- running the network
@dataclass
class EvalResults:
    """Per-image outcomes, in the order of ``names``.

    ``probs[pipeline]``: class probabilities (N, 3); ``scores[(pipeline, size)]``: mask scores;
    ``as_training``: the training test step's metrics (its torchmetrics objects and
    definitions) on the raw preprocessed view. The predicted mask of the final view (last
    pipeline, original size) of every image is kept bit-packed: :meth:`final_mask`.
    """

    names: list[str]
    labels: np.ndarray
    sizes: np.ndarray  # (N, 2) original height, width
    pipelines: tuple[str, ...]
    probs: dict[str, np.ndarray]
    scores: dict[tuple[str, str], MaskScores]
    as_training: dict[str, float | None]
    records: list[Record] = field(repr=False, default_factory=list)
    _packed: list[np.ndarray] = field(repr=False, default_factory=list)

    @property
    def final(self) -> str:
        return self.pipelines[-1]

    def final_mask(self, i: int) -> np.ndarray:
        h, w = (int(v) for v in self.sizes[i])
        return np.unpackbits(self._packed[i], count=h * w).reshape(h, w).astype(bool)

    def prediction_rows(self, parts: Sequence[str] = ("val", "test")) -> list[dict[str, Any]]:
        """predictions.csv rows (``busiseg.cv_summary.PREDICTION_COLUMNS``) of the raw view: Dice at the
        preprocessing size (both empty = 1), one row per image and part of ``parts`` (under k-fold the
        validation fold is the test part, and cv_summary reads the "val" rows out of fold)."""
        dice_per_image = self.scores[("raw", "preprocessed")].dice
        rows = []
        for i, name in enumerate(self.names):
            probs = self.probs["raw"][i]
            row = {"image": name, "true_class": CLASS_NAMES[int(self.labels[i])],
                   "pred_class": CLASS_NAMES[int(probs.argmax())],
                   **{f"prob_{c}": round(float(probs[k]), 6) for k, c in enumerate(CLASS_NAMES)},
                   "dice": round(float(dice_per_image[i]), 6)}
            rows += [{"part": part, **row} for part in parts]
        return rows


def unreadable_records(records: Sequence[Record], in_channels: int) -> str:
    """One message naming every record of ``records`` whose image or masks cannot be read, or whose mask has
    another size than its image ("" when all can be used):
    called on the first unreadable file, so that one run names them all and a run that meets none reads
    nothing twice."""
    problems = []
    for record in records:
        try:
            load_record(record, in_channels)
        except DatasetError as exc:
            problems.append(str(exc))
    return format_problems(f"{len(problems)} file(s) cannot be used", problems) if problems else ""


def _decode(record: Record, in_channels: int, image_size: int):
    """Original image and mask, and the pair at the preprocessing size, exactly as the training cache."""
    image, mask = load_record(record, in_channels)
    image_s, mask_s = resize_pair(image, mask, image_size)
    return image, mask, image_s, mask_s


def _to_tensor(image_s: np.ndarray) -> torch.Tensor:
    """As busiseg.data.dataset.BusiDataset without a transform: float (C, S, S) in [0, 1]."""
    t = torch.from_numpy(np.require(image_s, requirements=["C", "W"])).float().div_(255.0)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def _float_or_none(v: torch.Tensor) -> float | None:
    x = float(v)
    return x if np.isfinite(x) else None


PRECISIONS = ("32", "bf16-mixed", "16-mixed")


def run_precision(train_config: dict[str, Any], requested: Any = None) -> str:
    """The precision to evaluate at: ``requested`` (one of PRECISIONS), or (None) the training run's
    ``trainer.precision``, which its test step ran at: bf16 autocast for ``bf16-mixed``. A precision
    autocast does not cover (32, 64, the ``*-true`` ones) is full precision, ``32``."""
    value = requested
    if value is None:
        value = (train_config.get("trainer") or {}).get("precision")
        value = str(value) if str(value) in PRECISIONS else "32"
    value = str(value)
    if value not in PRECISIONS:
        raise EvalError(f"precision={value} is not one of {', '.join(PRECISIONS)} (null: the training run's)")
    return value


def autocast_dtype(precision: Any) -> torch.dtype | None:
    """The autocast dtype of a Lightning ``trainer.precision`` (``bf16-mixed`` -> bfloat16,
    ``16-mixed`` -> float16), None for full precision (32, 64, and the ``*-true`` ones, whose
    weights are already in that dtype when trained, and loaded as float32 here)."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))


def run_network(net: torch.nn.Module, records: list[Record], image_size: int, in_channels: int, batch_size: int,
                options: InferenceOptions, progress: bool = True, channels_last: bool = False,
                autocast: torch.dtype | None = None, crop_classifier: CropClassifier | None = None,
                mask_refiner: MaskRefiner | None = None, scan_classifier: CropClassifier | None = None) -> EvalResults:
    """Run the network over the records in batches of ``batch_size`` (the training run's
    eval batch size by default, so the test step's batches are reproduced exactly) and
    score every view. ``channels_last``: NHWC memory format, as a run trained with
    ``channels_last=true`` tested (same kernels, same rounding). ``autocast``: each forward
    pass under ``torch.autocast`` with this dtype, as a run trained with ``bf16-mixed``
    tested (None: full precision). ``crop_classifier``: the crop stage
    (:class:`busiseg.models.crop_classifier.CropClassifier`) turns each view's class probabilities
    into the two-stage ones (from the crop around that view's largest predicted component, at the
    original size) before anything is scored; the masks are the network's. ``mask_refiner``: the refine
    stage (:class:`busiseg.models.mask_refiner.MaskRefiner`) re-draws each view's mask probabilities at the
    image's own size inside the crops around its largest component, before anything else reads them (the
    crop stage then crops around the refined mask); at the preprocessing size the refined map is
    area-averaged down (``cv2.INTER_AREA``), so every score, at both sizes, is the refined mask's.
    ``scan_classifier``: the scan stage (:mod:`busiseg.models.scan_classifier`) reads each whole image once and
    each view's class probabilities (two-stage ones with ``crop_classifier``) become their mean with its own."""
    pipelines = PIPELINES if inference_active(options) else PIPELINES[:1]
    seg_metrics = segmentation_metrics("")
    cls_metrics = classification_metrics("")
    probs: dict[str, list[np.ndarray]] = {p: [] for p in pipelines}
    scores: dict[tuple[str, str], list[MaskScore]] = {(p, s): [] for p in pipelines for s in SIZES}
    packed: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    net = net.eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar, ThreadPoolExecutor(4) as pool:
        task = bar.add_task("eval", total=len(records))
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            try:
                decoded = list(pool.map(lambda r: _decode(r, in_channels, image_size), batch))
            except DatasetError as exc:
                raise DatasetError(unreadable_records(records[start:], in_channels) or str(exc)) from None
            images = torch.stack([_to_tensor(d[2]) for d in decoded])
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            true_s = torch.from_numpy(np.stack([d[3] for d in decoded])).unsqueeze(1)
            labels = torch.tensor([r.label for r in batch], dtype=torch.long)

            with torch.autocast(images.device.type, dtype=autocast) if autocast is not None else nullcontext():
                out = {"raw": predict_probs(net, images, InferenceOptions())}
                if "postprocessed" in pipelines:
                    tta = options.tta_flip or any(s != 1.0 for s in options.tta_scales)
                    out["postprocessed"] = predict_probs(net, images, options) if tta else out["raw"]
            # mask probabilities at each image's own size, once per view (the same maps when no TTA)
            full: dict[str, list[np.ndarray]] = {}
            for p in pipelines:
                full[p] = full["raw"] if p != "raw" and out[p][0] is out["raw"][0] else [
                    restore_size(out[p][0][i, 0].numpy(), d[1].shape) for i, d in enumerate(decoded)]
            if mask_refiner is not None:
                shared = {p: p != "raw" and full[p] is full["raw"] for p in pipelines}  # no TTA: one map, refined once
                for p in pipelines:
                    if shared[p]:
                        full[p], out[p] = full["raw"], (out["raw"][0], out[p][1])
                        continue
                    threshold = SEG_THRESHOLD if p == "raw" else options.threshold
                    full[p] = mask_refiner.refine([d[0] for d in decoded], full[p], threshold, autocast)
                    small = np.stack([area_resize(f, image_size) for f in full[p]])[:, None]
                    out[p] = (torch.from_numpy(small).float(), out[p][1])
            if crop_classifier is not None:
                for p in pipelines:
                    threshold = SEG_THRESHOLD if p == "raw" else options.threshold
                    combined, _ = crop_classifier.refine([d[0] for d in decoded], full[p], out[p][1].numpy(),
                                                         threshold, autocast)
                    out[p] = (out[p][0], torch.from_numpy(combined).float())
            if scan_classifier is not None:
                scan = scan_probs(scan_classifier, [d[0] for d in decoded], autocast)
                for p in pipelines:
                    out[p] = (out[p][0], torch.from_numpy(join_scan_probs(out[p][1].numpy(), scan)).float())
            seg_metrics.update(out["raw"][0], true_s.int())
            cls_metrics.update(out["raw"][1], labels)

            for p in pipelines:
                probs[p].append(out[p][1].numpy().astype(np.float64))
            for i, (image, mask, _, mask_s) in enumerate(decoded):
                sizes.append(mask.shape)
                for p in pipelines:
                    mask_prob = out[p][0][i, 0].numpy()
                    class_prob = out[p][1][i].numpy()
                    if p == "raw":  # the training step's rule: probability > 0.5
                        pred_s, pred_o = mask_prob > SEG_THRESHOLD, full[p][i] > SEG_THRESHOLD
                    else:
                        pred_s = postprocess_mask(mask_prob, class_prob, options)
                        pred_o = postprocess_mask(full[p][i], class_prob, options)
                    scores[(p, "preprocessed")].append(score_mask(mask_s, pred_s))
                    scores[(p, "original")].append(score_mask(mask, pred_o))
                    if p == pipelines[-1]:
                        packed.append(np.packbits(pred_o.ravel()))
            bar.advance(task, len(batch))

    with warnings.catch_warnings():  # torchmetrics warns about absent classes; the summaries say it plainly
        warnings.simplefilter("ignore", UserWarning)
        computed = {**seg_metrics.compute(), **cls_metrics.compute()}
    as_training = {k: _float_or_none(v) for k, v in computed.items()}
    return EvalResults(
        names=[r.name for r in records],
        labels=np.array([r.label for r in records], dtype=np.int64),
        sizes=np.array(sizes, dtype=np.int64).reshape(-1, 2),
        pipelines=pipelines,
        probs={p: np.concatenate(v) if v else np.zeros((0, 3)) for p, v in probs.items()},
        scores={k: MaskScores(v) for k, v in scores.items()},
        as_training=dict(sorted(as_training.items())),
        records=list(records),
        _packed=packed,
    )
