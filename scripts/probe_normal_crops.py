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
the scans. With ``--normal-source network`` (e57) the first box is instead the network's own most suspicious
spot on the normal training image: the bounding box of the component around its peak mask probability, at
half the peak (the region ``class_gating`` keeps), so that "none" is learnt on what the network would draw.
On the held-out part it reads the crop around the network's own predicted mask (largest component, the crop
stage's test margins, mirrored) and the two are joined, on every image with a drawn mask:

- ``network``: the network alone (``test/*``);
- ``bm_only``: the crop stage's rule with this classifier's benign-vs-malignant part (its P(benign),
  P(malignant) renormalised): P(normal) the network's;
- ``mean3``: P(normal) the mean of the network's and the crop's P(none), and the rest split as ``bm_only``.

With ``--refined`` the two rules are also scored on the crops around the run's refined masks
(``RUN/mask_refiner.pt``, the refine stage: ``*_refined``), as the headline's crop stage reads them.

``two_stage`` is the sweep's own crop stage (``test_two_stage/accuracy`` of its metrics.json, a different
classifier with the same seed). Test ground truth is read only for the scores."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from busiseg.atomic import write_csv_atomic
from busiseg.checkpoint import load_model
from busiseg.data.busi import load_record, root_from_env, scan_busi
from busiseg.data.crops import lesion_box, normal_boxes, peak_box
from busiseg.data.labels import CLASS_NAMES
from busiseg.evaluation.metrics_table import classification_summary
from busiseg.evaluation.runner import autocast_dtype, run_precision
from busiseg.inference import InferenceOptions, postprocess_mask, predict_probs, prepare_image, restore_size
from busiseg.models.crop_classifier import (CropSettings, combine_class_probs, combine_none_probs, to_grey,
                                            train_crop_classifier)
from busiseg.models.mask_refiner import load_mask_refiner
from busiseg.run_info import cpu_has_bf16

CROP_DTYPE = torch.bfloat16 if cpu_has_bf16() else None
CLASSES3 = ("none", "benign", "malignant")  # the crop classifier's outputs; labels 1, 2 are the network's too
WAYS = ("network", "bm_only", "mean3")


def network_probs(unet, cfg, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's mask and class probabilities, at its run's precision (as its own test step ran)."""
    x = torch.stack([prepare_image(image, cfg["data"]["image_size"]) for image in images])
    dtype = autocast_dtype(run_precision(cfg))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        return predict_probs(unet, x)


def crop_probs(crop_net, images: list[np.ndarray], mask_probs: list[np.ndarray]) -> np.ndarray:
    """The 3-class crop classifier on the crop around each mask's largest component (NaN: nothing drawn)."""
    largest = InferenceOptions(keep_largest=True)
    boxes = [lesion_box(postprocess_mask(p, None, largest)) for p in mask_probs]
    drawn = [i for i, b in enumerate(boxes) if b is not None]
    p3 = np.full((len(images), 3), np.nan)
    if drawn:
        p3[drawn] = crop_net.lesion_probs([images[i] for i in drawn], [boxes[i] for i in drawn], autocast=CROP_DTYPE)
    return p3


def join(net_p: np.ndarray, p3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``bm_only`` and ``mean3`` (the module docstring) from the network's and the crop's probabilities."""
    bm = p3[:, 1:] / p3[:, 1:].sum(1, keepdims=True)
    return combine_class_probs(net_p, bm), combine_none_probs(net_p, p3)


def scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    summary = classification_summary(np.eye(len(CLASS_NAMES))[pred], truth, CLASS_NAMES)
    return {"accuracy": summary["accuracy"], "f1_macro": summary["macro"]["f1"],
            **{f"recall_{c}": summary["per_class"][c]["recall"] for c in CLASS_NAMES}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="k-fold sweep of experiment=busi_cpu (one run per fold)")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--normal-boxes", type=int, default=3, help="training boxes per normal image")
    ap.add_argument("--normal-source", choices=("random", "network"), default="random",
                    help="the first box of a normal image: a random centre (e53) or the network's peak region (e57)")
    ap.add_argument("--refined", action="store_true",
                    help="also read the crops around the run's refined masks (RUN/mask_refiner.pt), as the "
                         "headline's crop stage does")
    ap.add_argument("--out", type=Path, help="per-image predictions (CSV) here")
    args = ap.parse_args()
    root = root_from_env()
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
    ways = WAYS + (("bm_only_refined", "mean3_refined") if args.refined else ())
    per_fold: dict[str, list[dict[str, float]]] = {w: [] for w in (*ways, "two_stage")}
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
        hot = {}
        if args.normal_source == "network":
            normals = [n for n in train if records[n].label == 0]
            train_p, _ = network_probs(unet, cfg, [decoded[n][0] for n in normals])
            peaks = []
            for i, n in enumerate(normals):
                prob = restore_size(train_p[i, 0].float().numpy(), decoded[n][1].shape)
                hot[n] = peak_box(prob)
                peaks.append(float(prob.max()))
            print(f"fold {fold}: the network's peak mask probability on its {len(normals)} normal training "
                  f"images: median {np.median(peaks):.3f}, >= 0.5 on {int((np.array(peaks) >= 0.5).sum())}",
                  flush=True)
        images, tboxes, labels = [], [], []
        for n in train:
            image = decoded[n][0]
            label = records[n].label
            these = [boxes[n]] if label > 0 else normal_boxes(to_grey(image), args.normal_boxes, sides, g)
            if n in hot and hot[n] is not None:
                these[0] = hot[n]
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
        mask_p, class_p = network_probs(unet, cfg, [decoded[n][0] for n in held])
        net_p = class_p.double().numpy()
        full = [restore_size(mask_p[i, 0].float().numpy(), decoded[n][1].shape) for i, n in enumerate(held)]
        preds = {"network": net_p.argmax(1)}
        p3 = crop_probs(crop_net, [decoded[n][0] for n in held], full)
        preds["bm_only"], preds["mean3"] = (v.argmax(1) for v in join(net_p, p3))
        if args.refined:
            refiner = load_mask_refiner(run / "mask_refiner.pt")
            refined = refiner.refine([decoded[n][0] for n in held], full, autocast=CROP_DTYPE)
            p3r = crop_probs(crop_net, [decoded[n][0] for n in held], refined)
            preds["bm_only_refined"], preds["mean3_refined"] = (v.argmax(1) for v in join(net_p, p3r))
        for w in ways:
            per_fold[w].append(scores(truth, preds[w]))
        m = json.loads((run / "metrics.json").read_text())["metrics"] if (run / "metrics.json").is_file() else {}
        per_fold["two_stage"].append({"accuracy": m.get("test_two_stage/accuracy", float("nan"))})
        print(f"fold {fold}: crop classifier ({len(labels)} crops: {labels.count(0)} none) trained in {fit:.0f} s; "
              + ", ".join(f"{w} {per_fold[w][-1]['accuracy']:.3f}" for w in (*ways, "two_stage"))
              + f" (the run's own test/accuracy {m.get('test/accuracy', float('nan')):.3f})", flush=True)
        for i, n in enumerate(held):
            rows.append({"fold": fold, "image": n, "true_class": CLASS_NAMES[truth[i]],
                         **{w: CLASS_NAMES[preds[w][i]] for w in ways},
                         "crop_p_none": "" if np.isnan(p3[i, 0]) else f"{p3[i, 0]:.6f}",
                         "net_p_normal": f"{net_p[i, 0]:.6f}"})
    base = np.array([s["accuracy"] for s in per_fold["network"]])
    print(f"\n{args.sweep}: {len(base)} folds, mean +- std; paired = minus the network, fold by fold")
    print("| way | accuracy | paired | folds better / worse | macro F1 | recall normal / benign / malignant |")
    print("|---|---|---|---|---|---|")
    for w in (*ways, "two_stage"):
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
