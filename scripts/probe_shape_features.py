"""Probe: do a radiologist's shape and echo descriptors of the drawn lesion add to the recipe's benign-or-malignant
call? (docs/results.md, e76)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/probe_shape_features.py SWEEP \
        [--folds 0 1 2 3 4] [--fit-on predicted|truth] [--out per_image.csv]

SWEEP is a k-fold sweep of ``experiment=busi_cpu`` with its stage files and per-image predictions
(SWEEP/F/split.json, checkpoints/last.ckpt, mask_refiner.pt, predictions_scan_stage.csv). Most of the recipe's
diagnostic errors out of fold are malignant lesions called benign (41 of 117). BI-RADS reads a lesion's shape
(oval or irregular), orientation (wider or taller than wide), margin, echo pattern and posterior features; the
CNN stages see the pixels but were never told these. Here, per fold, ten descriptors of the largest component of
a lesion mask (at the scan's own size): log area share, log height/width, solidity, circularity, extent,
perimeter against the convex hull's, log inside/rim mean grey, inside grey spread, log below/rim mean grey
(posterior shadowing or enhancement) and the boundary's grey gradient against the rim's. A logistic
regression (standardised, L2 with C = 1) of malignant against benign is fitted on the training part's lesion
images, from the masks the run's network and refine stage draw on them (``predicted``, as at test) or from the
ground truth (``truth``); nothing of the test part is read but its masks as the recipe draws them.

On the test part its log-odds are added to the recipe's (its scan-stage probabilities, the run's
predictions_scan_stage.csv), less the training prior's, where the recipe calls a lesion and draws a mask (a
naive-Bayes join, nothing tuned); P(normal) is kept and the rest split anew. Scored: 3-class accuracy (the
recipe's diagnosis against the joined one) and benign-or-malignant right on lesion images, with the
descriptors' own benign-or-malignant accuracy beside them."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.optimize import minimize

from busiseg.atomic import write_csv_atomic
from busiseg.checkpoint import load_model
from busiseg.data.busi import load_record, root_from_env, scan_busi
from busiseg.data.labels import CLASS_NAMES
from busiseg.evaluation.runner import autocast_dtype, run_network, run_precision
from busiseg.inference import InferenceOptions
from busiseg.models.crop_classifier import to_grey
from busiseg.models.mask_refiner import load_mask_refiner

FEATURES = ("log_area", "log_aspect", "solidity", "circularity", "extent", "hull_perimeter", "log_echo",
            "spread", "log_posterior", "edge")


def largest(mask: np.ndarray) -> np.ndarray | None:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n < 2:
        return None
    return lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def describe(grey: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    m = largest(mask)
    if m is None or m.sum() < 20:
        return None
    m8 = m.astype(np.uint8)
    contours, _ = cv2.findContours(m8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = max(contours, key=cv2.contourArea)
    area = float(m.sum())
    hull = cv2.convexHull(c)
    perimeter = cv2.arcLength(c, True) + 1e-6
    x, y, w, h = cv2.boundingRect(c)
    side = max(3, int(round(0.15 * np.sqrt(area))) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    rim = cv2.dilate(m8, kernel).astype(bool) & ~m
    g = grey.astype(np.float32) + 1.0
    inside, around = float(g[m].mean()), float(g[rim].mean()) if rim.any() else float(g.mean())
    below = g[y + h: min(g.shape[0], y + 2 * h), x: x + w]
    posterior = float(below.mean()) if below.size else around
    grad = cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3))
    edge = cv2.morphologyEx(m8, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    return np.array([
        np.log(area / m.size), np.log(h / w), area / max(cv2.contourArea(hull), 1.0),
        4 * np.pi * area / perimeter ** 2, area / (w * h), perimeter / (cv2.arcLength(hull, True) + 1e-6),
        np.log(inside / around), float(g[m].std()) / inside, np.log(posterior / around),
        float(grad[edge].mean()) / (float(grad[rim].mean()) + 1e-3) if rim.any() else 1.0], dtype=np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float = 1.0):
    mu, sd = x.mean(0), x.std(0) + 1e-9
    z = np.c_[np.ones(len(x)), (x - mu) / sd]

    def loss(w):
        s = z @ w
        nll = np.sum(np.logaddexp(0, s) - y * s)
        p = 1 / (1 + np.exp(-s))
        return nll + 0.5 / c * np.sum(w[1:] ** 2), z.T @ (p - y) + np.r_[0, w[1:] / c]

    w = minimize(loss, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B").x
    return lambda q: np.c_[np.ones(len(q)), (q - mu) / sd] @ w


def drawn_masks(run: Path, records, refiner) -> list[np.ndarray]:
    unet, cfg = load_model(run / "checkpoints" / "last.ckpt")
    data = cfg["data"]
    res = run_network(unet, records, int(data["image_size"]), int(data.get("in_channels", 1)),
                      int(data.get("eval_batch_size") or data.get("batch_size") or 16), InferenceOptions(),
                      progress=False, channels_last=bool(cfg.get("channels_last", False)),
                      autocast=autocast_dtype(run_precision(cfg)), mask_refiner=refiner)
    return [res.final_mask(i) for i in range(len(records))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--fit-on", choices=("predicted", "truth"), default="predicted")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    root = root_from_env()
    torch.set_num_threads(os.cpu_count() or 1)
    records = {r.name: r for r in scan_busi(root)}
    table, rows = [], []
    for fold in args.folds:
        run = args.sweep / str(fold)
        split = json.loads((run / "split.json").read_text())
        refiner = load_mask_refiner(run / "mask_refiner.pt")
        train = [records[n] for n in split["train"] if records[n].label > 0]
        test = [records[n] for n in split["test"]]
        grey_train = [to_grey(load_record(r)[0]) for r in train]
        if args.fit_on == "truth":
            masks_train = [load_record(r)[1] > 0 for r in train]
        else:
            masks_train = drawn_masks(run, train, refiner)
        feats = [describe(g, m) for g, m in zip(grey_train, masks_train)]
        keep = [i for i, f in enumerate(feats) if f is not None]
        x = np.stack([feats[i] for i in keep])
        y = np.array([train[i].label == 2 for i in keep], dtype=np.float64)
        score = fit_logistic(x, y)
        prior = np.log(y.mean() / (1 - y.mean()))

        scan = {r["image"]: np.array([float(r[f"prob_{c}"]) for c in CLASS_NAMES])
                for r in csv.DictReader(open(run / "predictions_scan_stage.csv")) if r["part"] == "test"}
        masks_test = drawn_masks(run, test, refiner)
        labels = np.array([r.label for r in test])
        base = np.stack([scan[r.name] for r in test])
        joined = base.copy()
        shape_call = np.full(len(test), np.nan)
        for i, r in enumerate(test):
            f = describe(to_grey(load_record(r)[0]), masks_test[i])
            if f is None:
                continue
            s = float(score(f[None])[0])
            shape_call[i] = s
            if base[i].argmax() == 0:
                continue
            pn, pb, pm = base[i]
            odds = np.log(pm + 1e-6) - np.log(pb + 1e-6) + s - prior
            pm_new = 1 / (1 + np.exp(-odds))
            joined[i] = [pn, (1 - pn) * (1 - pm_new), (1 - pn) * pm_new]
        lesion = labels > 0
        has = lesion & ~np.isnan(shape_call)
        row = {"fold": fold, "n_train": len(keep), "scan_stage": float((base.argmax(1) == labels).mean()),
               "joined": float((joined.argmax(1) == labels).mean()),
               "bm_scan": float((1 + base[lesion, 1:].argmax(1) == labels[lesion]).mean()),
               "bm_joined": float((1 + joined[lesion, 1:].argmax(1) == labels[lesion]).mean()),
               "bm_shape_alone": float(((shape_call[has] > prior) == (labels[has] == 2)).mean()),
               "bm_shape_alone_at_0": float(((shape_call[has] > 0) == (labels[has] == 2)).mean()),
               "n_changed": int((joined.argmax(1) != base.argmax(1)).sum())}
        table.append(row)
        print(json.dumps(row), flush=True)
        for i, r in enumerate(test):
            rows.append({"fold": fold, "image": r.name, "true_class": CLASS_NAMES[labels[i]],
                         "scan_stage": CLASS_NAMES[base[i].argmax()], "joined": CLASS_NAMES[joined[i].argmax()],
                         "shape_logit": "" if np.isnan(shape_call[i]) else round(float(shape_call[i]), 4)})
    if args.out:
        write_csv_atomic(args.out, rows, list(rows[0]))
    sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    for a, b in (("scan_stage", "joined"), ("bm_scan", "bm_joined")):
        x, y = np.array([r[a] for r in table]), np.array([r[b] for r in table])
        d = y - x
        print(f"{b}: {y.mean():.4f} +- {sd(y):.4f} against {a} {x.mean():.4f} +- {sd(x):.4f}; paired "
              f"{d.mean():+.4f} +- {sd(d):.4f} ({', '.join(f'{v:+.3f}' for v in d)}; {int((d > 0).sum())} better, "
              f"{int((d < 0).sum())} worse)")
    shape = np.array([r["bm_shape_alone"] for r in table])
    print(f"descriptors alone, benign-or-malignant on lesion images with a mask: {shape.mean():.4f} +- {sd(shape):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
