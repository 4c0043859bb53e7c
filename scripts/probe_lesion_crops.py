"""Probe: does a second classifier on the lesion crop, at the image's original resolution, tell benign from
malignant better than the multi-task network's class head at 128 px? (docs/results.md, e46-e48; the
framework's stage is ``python -m busiseg.crop_stage``, docs/two_stage.md: this probe also scores the
other ways of combining the two, and the ground-truth box)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/probe_lesion_crops.py SWEEP [SWEEP ...] \
        [--folds 0 1 2 3 4] [--seed 0] [--out per_image.csv]

Each SWEEP is a k-fold sweep (``scripts/cv.sh``): SWEEP/F/split.json and SWEEP/F/checkpoints/last.ckpt per fold;
several sweeps on the same folds share each fold's crop classifier (trained once).
For each fold, the crop classifier (``busiseg.models.crop_classifier``: a ResNet-18, 1 channel, from scratch) is trained on the training part's lesion
images only, on square crops around the ground-truth lesion box (side 1.2-3.0x the box, centre shifted up to
20 %, flips, brightness/contrast), benign vs malignant. On the held-out part, the sweep's network gives the
class and the mask (at its trainer.precision, as its own test step ran); the crop classifier (bf16 where the
CPU has it natively) reads square crops around the largest component of that predicted mask (margins 1.5, 2.0,
2.5, each mirrored, averaged). Crops are cut at the image's own scale and area-averaged when shrunk
(``busiseg.data.crops``).
Printed per fold and as mean +- std over folds with the paired difference against the network alone:

- ``stage1``: the network's own class;
- ``crop``: the crop classifier's class wherever the network calls a lesion and drew a mask;
- ``average``: there, benign vs malignant by the mean of the crop classifier's and the network's
  (renormalised) probabilities;
- ``hierarchical``: P(normal) from the network, P(type | lesion) that mean, on every image with a drawn mask
  (the framework's rule, ``busiseg.crop_stage``);
- ``oracle_box``: ``crop`` on the ground-truth box instead of the predicted one (a diagnostic, never a result).

Test images' ground truth is used only for ``oracle_box`` and the scores."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from busiseg.checkpoint import load_model
from busiseg.data.busi import load_record, root_from_env, scan_busi
from busiseg.data.crops import lesion_box
from busiseg.data.labels import CLASS_NAMES
from busiseg.evaluation.metrics_table import classification_summary
from busiseg.evaluation.runner import autocast_dtype, run_precision
from busiseg.inference import InferenceOptions, postprocess_mask, predict_probs, prepare_image, restore_size
from busiseg.models.crop_classifier import CropClassifier, CropSettings, combine_class_probs, train_crop_classifier
from busiseg.run_info import cpu_has_bf16

# the crop classifier in bf16 where the CPU has it natively (emulated bf16 is many times slower: docs/performance.md)
CROP_DTYPE = torch.bfloat16 if cpu_has_bf16() else None


def train_classifier(images, boxes, labels, args, seed) -> CropClassifier:
    """The framework's crop classifier (busiseg.models.crop_classifier), printing the loss every 10 epochs."""
    settings = CropSettings(size=args.size, epochs=args.epochs, train_margin=tuple(args.train_margin),
                            jitter=args.jitter, test_margins=tuple(args.test_margins), seed=seed)

    def report(epoch: int, loss: float) -> None:
        if epoch % 10 == 9 or epoch == settings.epochs - 1:
            print(f"  epoch {epoch + 1}: loss {loss:.3f}", flush=True)

    net, _ = train_crop_classifier(images, boxes, labels, settings, autocast=CROP_DTYPE, on_epoch=report)
    return net


def classify(net: CropClassifier, images, boxes) -> np.ndarray:
    """(N, 2) benign/malignant probabilities, averaged over the test margins and their mirror images."""
    return net.lesion_probs(images, boxes, autocast=CROP_DTYPE)


NAMES = CLASS_NAMES  # label 0 is normal; labels 1, 2 are the crop classifier's classes 0, 1


def scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy, per-class recall and macro F1 of hard class decisions (the project's classification summary)."""
    summary = classification_summary(np.eye(len(NAMES))[pred], truth, NAMES)
    return {"accuracy": summary["accuracy"], "f1_macro": summary["macro"]["f1"],
            **{f"recall_{c}": summary["per_class"][c]["recall"] for c in NAMES}}


WAYS = ("stage1", "crop", "average", "hierarchical", "oracle_box")


def two_stage(net, run: Path, held: list[str], decoded, records, args) -> tuple[np.ndarray, dict, np.ndarray]:
    """The sweep run's own class and mask on the held-out images, and the crop classifier's ways of combining them:
    (true labels, way -> predicted labels, crop classifier's (N, 2) probabilities, NaN where no mask was drawn)."""
    unet, cfg = load_model(run / "checkpoints" / "last.ckpt")
    image_size = cfg["data"]["image_size"]
    truth = np.array([records[n].label for n in held])
    x = torch.stack([prepare_image(decoded[n][0], image_size) for n in held])
    dtype = autocast_dtype(run_precision(cfg))  # as the sweep's own test step ran
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        mask_p, class_p = predict_probs(unet, x)
    class_p = class_p.numpy()
    stage1 = class_p.argmax(1)
    largest = InferenceOptions(keep_largest=True)
    boxes = [lesion_box(postprocess_mask(restore_size(mask_p[i, 0].numpy(), decoded[n][1].shape), None, largest))
             for i, n in enumerate(held)]
    gt_boxes = [lesion_box(decoded[n][1]) for n in held]
    drawn = [i for i in range(len(held)) if boxes[i] is not None]
    p2 = np.full((len(held), 2), np.nan)
    if drawn:
        p2[drawn] = classify(net, [decoded[held[i]][0] for i in drawn], [boxes[i] for i in drawn])
    crop_pred, avg_pred, oracle = stage1.copy(), stage1.copy(), stage1.copy()
    for i in drawn:
        s1 = class_p[i, 1:] / class_p[i, 1:].sum()  # the network's benign/malignant call, given a lesion
        mean = (s1 + p2[i]) / 2
        if stage1[i] > 0:  # the crop classifier decides benign vs malignant where stage 1 sees a lesion
            crop_pred[i] = 1 + int(p2[i].argmax())
            avg_pred[i] = 1 + int(mean.argmax())
    # hierarchical: the framework's rule (busiseg.crop_stage): P(normal) from stage 1, P(type | lesion) the mean,
    # on every image with a drawn mask (so a lesion probability can overturn a narrow "normal")
    hier = combine_class_probs(class_p, p2).argmax(1)
    # diagnostic only: the same classifier on the ground-truth box (what perfect localisation would give)
    lesion_gt = [i for i in range(len(held)) if gt_boxes[i] is not None and stage1[i] > 0]
    if lesion_gt:
        pg = classify(net, [decoded[held[i]][0] for i in lesion_gt], [gt_boxes[i] for i in lesion_gt])
        for k, i in enumerate(lesion_gt):
            oracle[i] = 1 + int(pg[k].argmax())
    return truth, dict(zip(WAYS, (stage1, crop_pred, avg_pred, hier, oracle))), p2


def print_table(sweep: Path, per_fold: dict[str, list[dict[str, float]]]) -> None:
    folds = len(per_fold["stage1"])
    print(f"\n{sweep}: {folds} folds, mean +- std over folds; paired = minus stage1, fold by fold")
    print("| way | accuracy | paired | folds better | macro F1 | recall normal / benign / malignant |")
    print("|---|---|---|---|---|---|")
    base = np.array([s["accuracy"] for s in per_fold["stage1"]])
    for w in WAYS:
        acc = np.array([s["accuracy"] for s in per_fold[w]])
        d = acc - base
        f1 = np.array([s["f1_macro"] for s in per_fold[w]])
        rec = " / ".join(f"{np.mean([s[f'recall_{c}'] for s in per_fold[w]]):.3f}" for c in NAMES)
        print(f"| {w} | {acc.mean():.3f} +- {acc.std(ddof=1) if len(acc) > 1 else 0:.3f} | "
              f"{d.mean():+.3f} +- {d.std(ddof=1) if len(d) > 1 else 0:.3f} ({', '.join(f'{v:+.3f}' for v in d)}) | "
              f"{int((d > 0).sum())}/{len(d)} | {f1.mean():.3f} | {rec} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", type=Path, nargs="+",
                    help="k-fold sweep dirs (SWEEP/F/split.json, SWEEP/F/checkpoints/last.ckpt) on the same folds: "
                         "each fold's crop classifier is trained once and put on top of every sweep's network")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--size", type=int, default=128, help="crop side fed to the classifier (px)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0, help="the classifier of fold F uses seed + F")
    ap.add_argument("--train-margin", type=float, nargs=2, default=(1.2, 3.0),
                    help="training crop side = lesion box side x U(lo, hi)")
    ap.add_argument("--jitter", type=float, default=0.2, help="training crop centre shift, share of the side")
    ap.add_argument("--test-margins", type=float, nargs="+", default=[1.5, 2.0, 2.5],
                    help="held-out crops at these margins (each also mirrored), probabilities averaged")
    ap.add_argument("--out", type=Path, help="write per-image predictions (CSV, one row per sweep and image) here")
    args = ap.parse_args()
    root = root_from_env()
    splits: dict[int, dict] = {}
    for fold in args.folds:
        for sweep in args.sweeps:
            for need in ("split.json", "checkpoints/last.ckpt"):
                if not (sweep / str(fold) / need).is_file():
                    print(f"error: {sweep / str(fold) / need} not found", file=sys.stderr)
                    return 2
            split = json.loads((sweep / str(fold) / "split.json").read_text())
            first = splits.setdefault(fold, split)
            if (split["train"], split["val"]) != (first["train"], first["val"]):
                print(f"error: {sweep / str(fold) / 'split.json'} holds other images than "
                      f"{args.sweeps[0] / str(fold) / 'split.json'}: the sweeps must share their folds", file=sys.stderr)
                return 2
    torch.set_num_threads(os.cpu_count() or 1)
    records = {r.name: r for r in scan_busi(root)}
    t0 = time.time()
    decoded = {name: load_record(r) for name, r in records.items()}
    print(f"decoded {len(decoded)} images at their original size in {time.time() - t0:.0f} s", flush=True)
    per_fold = {sweep: {w: [] for w in WAYS} for sweep in args.sweeps}
    rows = []
    for fold in args.folds:
        train = [n for n in splits[fold]["train"] if records[n].label > 0]
        held = splits[fold]["val"]
        t0 = time.time()
        net = train_classifier([decoded[n][0] for n in train], [lesion_box(decoded[n][1]) for n in train],
                               [records[n].label - 1 for n in train], args, args.seed + fold)
        print(f"fold {fold}: crop classifier trained in {time.time() - t0:.0f} s on {len(train)} lesion images",
              flush=True)
        for sweep in args.sweeps:
            truth, preds, p2 = two_stage(net, sweep / str(fold), held, decoded, records, args)
            for w in WAYS:
                per_fold[sweep][w].append(scores(truth, preds[w]))
            print(f"  {sweep}: accuracy " + ", ".join(f"{w} {per_fold[sweep][w][-1]['accuracy']:.3f}" for w in WAYS),
                  flush=True)
            for i, n in enumerate(held):
                rows.append({"sweep": str(sweep), "fold": fold, "image": n, "true_class": NAMES[truth[i]],
                             **{w: NAMES[preds[w][i]] for w in WAYS},
                             "crop_prob_malignant": "" if np.isnan(p2[i, 1]) else f"{p2[i, 1]:.6f}"})
    for sweep in args.sweeps:
        print_table(sweep, per_fold[sweep])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"per-image predictions: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
