"""Probe: can the crop classifier also say "no lesion here", and so fix the network's normal-vs-lesion errors?
(docs/results.md, e53)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/probe_normal_crops.py SWEEP \
        [--folds 0 1 2 3 4] [--normal-boxes 3] [--out per_image.csv]

SWEEP is a k-fold sweep of ``experiment=busi_cpu`` (SWEEP/F/split.json, checkpoints/last.ckpt and, for the
reference, metrics.json with ``test_two_stage/*``). The crop stage (docs/two_stage.md) decides only benign
against malignant: P(normal) stays the network's, and the largest error of ``busi_cpu`` is between normal and
benign. Here, per fold, the crop classifier (``busiseg.models.crop_classifier``, the crop stage's settings
and seed) learns three classes on the training part: ``none`` (crops of the normal training images), benign
and malignant (crops around the ground-truth lesion boxes, as the crop stage). A normal image has no lesion
box, so it gives ``--normal-boxes`` boxes, fixed per image: one centred at random in the middle 80 % of the
scan, the others on the darkest spot of the blurred scan inside a random window (the network's false
lesions are dark blobs); each box's side is a training lesion's side drawn at random, scaled by the width of
the scans. On the held-out part it reads the crop around the network's own predicted mask (largest
component, the crop stage's test margins, mirrored) and the two are joined, on every image with a drawn mask:

- ``network``: the network alone (``test/*``);
- ``bm_only``: the crop stage's rule with this classifier's benign-vs-malignant part (its P(benign),
  P(malignant) renormalised): P(normal) the network's;
- ``mean3``: P(normal) the mean of the network's and the crop's P(none), and the rest split as ``bm_only``.

``two_stage`` is the sweep's own crop stage (``test_two_stage/accuracy`` of its metrics.json, a different
classifier with the same seed). Test ground truth is read only for the scores."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from busiseg.atomic import write_csv_atomic
from busiseg.checkpoint import load_model
from busiseg.data.busi import load_record, scan_busi
from busiseg.data.crops import lesion_box
from busiseg.data.labels import CLASS_NAMES
from busiseg.evaluation.metrics_table import classification_summary
from busiseg.evaluation.runner import autocast_dtype, run_precision
from busiseg.inference import InferenceOptions, postprocess_mask, predict_probs, prepare_image, restore_size
from busiseg.models.crop_classifier import CropSettings, combine_class_probs, to_grey, train_crop_classifier
from busiseg.run_info import cpu_has_bf16

CROP_DTYPE = torch.bfloat16 if cpu_has_bf16() else None
CLASSES3 = ("none", "benign", "malignant")  # the crop classifier's outputs; labels 1, 2 are the network's too
WAYS = ("network", "bm_only", "mean3")


def normal_boxes(grey: np.ndarray, n: int, sides: np.ndarray, g: np.random.Generator):
    """``n`` boxes ``(cy, cx, side)`` on a normal scan: the first at a random centre, the others on the darkest
    spot of the blurred scan inside a random window; sides are training lesions' sides (share of the width)."""
    h, w = grey.shape
    blurred = cv2.GaussianBlur(grey.astype(np.float32), (0, 0), max(2.0, w / 40))
    boxes = []
    for k in range(n):
        side = float(np.clip(g.choice(sides) * w, 8, min(h, w)))
        if k == 0:
            cy, cx = g.uniform(0.1 * h, 0.9 * h), g.uniform(0.1 * w, 0.9 * w)
        else:
            y0, x0 = int(g.uniform(0, 0.5 * h)), int(g.uniform(0, 0.5 * w))
            window = blurred[y0:y0 + h // 2, x0:x0 + w // 2]
            dy, dx = np.unravel_index(int(window.argmin()), window.shape)
            cy, cx = float(y0 + dy), float(x0 + dx)
        boxes.append((cy, cx, side))
    return boxes


def scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    summary = classification_summary(np.eye(len(CLASS_NAMES))[pred], truth, CLASS_NAMES)
    return {"accuracy": summary["accuracy"], "f1_macro": summary["macro"]["f1"],
            **{f"recall_{c}": summary["per_class"][c]["recall"] for c in CLASS_NAMES}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="k-fold sweep of experiment=busi_cpu (one run per fold)")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--normal-boxes", type=int, default=3, help="training boxes per normal image")
    ap.add_argument("--out", type=Path, help="per-image predictions (CSV) here")
    args = ap.parse_args()
    root = os.environ.get("BUSI_ROOT")
    if not root:
        print("error: set BUSI_ROOT to the Dataset_BUSI_with_GT folder", file=sys.stderr)
        return 2
    for fold in args.folds:
        for need in ("split.json", "checkpoints/last.ckpt", "config.yaml"):
            if not (args.sweep / str(fold) / need).is_file():
                print(f"error: {args.sweep / str(fold) / need} not found", file=sys.stderr)
                return 2
    torch.set_num_threads(os.cpu_count() or 1)
    records = {r.name: r for r in scan_busi(root)}
    t0 = time.time()
    decoded = {name: load_record(r) for name, r in records.items()}
    print(f"decoded {len(decoded)} images in {time.time() - t0:.0f} s", flush=True)
    per_fold: dict[str, list[dict[str, float]]] = {w: [] for w in (*WAYS, "two_stage")}
    rows = []
    for fold in args.folds:
        run = args.sweep / str(fold)
        split = json.loads((run / "split.json").read_text())
        unet, cfg = load_model(run / "checkpoints" / "last.ckpt")
        seed = int(cfg.get("seed", 42))
        settings = CropSettings(**{k: v for k, v in dict(cfg.get("crop_stage") or {}).items()
                                   if k in CropSettings.__dataclass_fields__} | {"seed": seed})
        g = np.random.default_rng(seed)
        train = split["train"]
        lesions = [n for n in train if records[n].label > 0]
        boxes = {n: lesion_box(decoded[n][1]) for n in lesions}
        sides = np.array([boxes[n][2] / decoded[n][1].shape[1] for n in lesions])
        images, tboxes, labels = [], [], []
        for n in train:
            image = decoded[n][0]
            label = records[n].label
            these = [boxes[n]] if label > 0 else normal_boxes(to_grey(image), args.normal_boxes, sides, g)
            images += [image] * len(these)
            tboxes += these
            labels += [label] * len(these)
        t0 = time.time()
        crop_net, _ = train_crop_classifier(images, tboxes, labels, settings, train, autocast=CROP_DTYPE,
                                            classes=CLASSES3)
        fit = time.time() - t0
        # the network on the held-out part, at its run's precision (as its own test step ran)
        held = split["val"]
        truth = np.array([records[n].label for n in held])
        x = torch.stack([prepare_image(decoded[n][0], cfg["data"]["image_size"]) for n in held])
        dtype = autocast_dtype(run_precision(cfg))
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            mask_p, class_p = predict_probs(unet, x)
        net_p = class_p.double().numpy()
        largest = InferenceOptions(keep_largest=True)
        pboxes = [lesion_box(postprocess_mask(restore_size(mask_p[i, 0].numpy(), decoded[n][1].shape), None, largest))
                  for i, n in enumerate(held)]
        drawn = [i for i, b in enumerate(pboxes) if b is not None]
        p3 = np.full((len(held), 3), np.nan)
        if drawn:
            p3[drawn] = crop_net.lesion_probs([decoded[held[i]][0] for i in drawn], [pboxes[i] for i in drawn],
                                              autocast=CROP_DTYPE)
        bm = p3[:, 1:] / p3[:, 1:].sum(1, keepdims=True)
        bm_only = combine_class_probs(net_p, bm)
        mean3 = bm_only.copy()
        rows_d = ~np.isnan(p3).any(1)
        p_normal = (net_p[rows_d, 0] + p3[rows_d, 0]) / 2
        mean3[rows_d, 0] = p_normal
        mean3[rows_d, 1:] = (1 - p_normal)[:, None] * bm_only[rows_d, 1:] / bm_only[rows_d, 1:].sum(1, keepdims=True)
        preds = {"network": net_p.argmax(1), "bm_only": bm_only.argmax(1), "mean3": mean3.argmax(1)}
        for w in WAYS:
            per_fold[w].append(scores(truth, preds[w]))
        m = json.loads((run / "metrics.json").read_text())["metrics"] if (run / "metrics.json").is_file() else {}
        per_fold["two_stage"].append({"accuracy": m.get("test_two_stage/accuracy", float("nan"))})
        print(f"fold {fold}: crop classifier ({len(labels)} crops: {labels.count(0)} none) trained in {fit:.0f} s; "
              + ", ".join(f"{w} {per_fold[w][-1]['accuracy']:.3f}" for w in (*WAYS, "two_stage"))
              + f" (the run's own test/accuracy {m.get('test/accuracy', float('nan')):.3f})", flush=True)
        for i, n in enumerate(held):
            rows.append({"fold": fold, "image": n, "true_class": CLASS_NAMES[truth[i]],
                         **{w: CLASS_NAMES[preds[w][i]] for w in WAYS},
                         "crop_p_none": "" if np.isnan(p3[i, 0]) else f"{p3[i, 0]:.6f}",
                         "net_p_normal": f"{net_p[i, 0]:.6f}"})
    base = np.array([s["accuracy"] for s in per_fold["network"]])
    print(f"\n{args.sweep}: {len(base)} folds, mean +- std; paired = minus the network, fold by fold")
    print("| way | accuracy | paired | folds better / worse | macro F1 | recall normal / benign / malignant |")
    print("|---|---|---|---|---|---|")
    for w in (*WAYS, "two_stage"):
        acc = np.array([s["accuracy"] for s in per_fold[w]])
        d = acc - base
        sd = (lambda v: v.std(ddof=1) if len(v) > 1 else 0.0)
        extra = " | | "
        if w != "two_stage":
            rec = " / ".join(f"{np.mean([s[f'recall_{c}'] for s in per_fold[w]]):.3f}" for c in CLASS_NAMES)
            extra = f" | {np.mean([s['f1_macro'] for s in per_fold[w]]):.3f} | {rec}"
        print(f"| {w} | {acc.mean():.4f} +- {sd(acc):.4f} | {d.mean():+.4f} +- {sd(d):.4f} "
              f"({', '.join(f'{v:+.3f}' for v in d)}) | {int((d > 0).sum())} / {int((d < 0).sum())}{extra} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(args.out, rows, list(rows[0]))
        print(f"per-image predictions: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
