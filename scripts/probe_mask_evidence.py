"""Probe: can the drawn mask's size fix the normal-vs-lesion calls of ``busi_cpu``? (docs/results.md, e59)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/probe_mask_evidence.py \
        RUNS_OF_FOLD_0 RUNS_OF_FOLD_1 ... --crop DIR_OR_FILE ... [--out per_image.csv]

Each RUN is one fold's run of ``experiment=busi_cpu`` (RUN/split.json, checkpoints/last.ckpt, mask_refiner.pt);
``--crop`` gives, in the same order, the crop classifier to score it with (a file, or a folder holding
crop_classifier.pt; default: RUN/crop_classifier.pt). Most of the recipe's diagnostic errors are between normal
and lesion (docs/results.md, headline: 79 of 137 out of fold), and P(normal) is the network's alone. Here each
run's test part is scored exactly as the run's own two-stage test (``busiseg.evaluation.runner.run_network``
with its refine and crop stages: ``two_stage``), and three rules then re-decide normal against lesion from
P(normal) and the area of the largest component of the (refined) predicted mask; a lesion call keeps the
two-stage argmax of benign against malignant:

- ``threshold``: normal iff P(normal) >= t;
- ``area``: normal iff P(normal) >= t, or the largest component covers less than a share ``a`` of the scan;
- ``logistic``: a logistic regression of normal-vs-lesion on logit P(normal) and log(largest share + 1e-4).

Leave one fold out: each fold's rule is fitted on the test parts of the other folds only (other networks'
held-out predictions), then applied to this fold; the test fold's labels are read only for its score. This is
how a rule would be chosen from a finished cross-validation (as nnU-Net picks its post-processing) and then
applied to new scans."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from busiseg.atomic import write_csv_atomic
from busiseg.checkpoint import load_model
from busiseg.data.busi import root_from_env, scan_busi
from busiseg.data.labels import CLASS_NAMES
from busiseg.evaluation.runner import autocast_dtype, run_network, run_precision
from busiseg.inference import InferenceOptions
from busiseg.models.crop_classifier import load_crop_classifier
from busiseg.models.mask_refiner import load_mask_refiner

RULES = ("two_stage", "threshold", "area", "logistic")
T_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
A_GRID = np.array([0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02])


def largest_share(mask: np.ndarray) -> float:
    """The share of the scan covered by the largest connected component of a boolean mask (0 when empty)."""
    if not mask.any():
        return 0.0
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return float(stats[1:n, cv2.CC_STAT_AREA].max()) / mask.size


def score_run(run: Path, crop: Path, records: dict) -> dict[str, np.ndarray]:
    """The run's test part as its own two-stage test scores it: labels, (N, 3) probabilities, largest shares."""
    unet, cfg = load_model(run / "checkpoints" / "last.ckpt")
    split = json.loads((run / "split.json").read_text())
    held = [records[n] for n in split["val"]]
    data = cfg["data"]
    batch = int(data.get("eval_batch_size") or data.get("batch_size") or 16)
    res = run_network(unet, held, int(data["image_size"]), int(data.get("in_channels", 1)), batch,
                      InferenceOptions(), progress=False, channels_last=bool(cfg.get("channels_last", False)),
                      autocast=autocast_dtype(run_precision(cfg)), crop_classifier=load_crop_classifier(crop),
                      mask_refiner=load_mask_refiner(run / "mask_refiner.pt"))
    return {"names": np.array(res.names), "labels": np.asarray(res.labels), "probs": res.probs[res.final],
            "share": np.array([largest_share(res.final_mask(i)) for i in range(len(res.names))])}


def lesion_type(probs: np.ndarray) -> np.ndarray:
    return 1 + probs[:, 1:].argmax(1)


def decide(probs: np.ndarray, share: np.ndarray, rule: str, params: tuple) -> np.ndarray:
    """Classes 0/1/2 from the two-stage probabilities under ``rule`` with ``params``."""
    if rule == "two_stage":
        return probs.argmax(1)
    if rule == "threshold":
        normal = probs[:, 0] >= params[0]
    elif rule == "area":
        normal = (probs[:, 0] >= params[0]) | (share < params[1])
    else:
        normal = features(probs, share) @ params[0] > 0
    return np.where(normal, 0, lesion_type(probs))


def features(probs: np.ndarray, share: np.ndarray) -> np.ndarray:
    p = np.clip(probs[:, 0], 1e-6, 1 - 1e-6)
    return np.stack([np.ones(len(p)), np.log(p / (1 - p)), np.log(share + 1e-4)], 1)


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3, steps: int = 50) -> np.ndarray:
    """Newton's method for a (lightly ridge-penalised) logistic regression; y is 1 for normal."""
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + ridge * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def fit(rule: str, probs: np.ndarray, share: np.ndarray, labels: np.ndarray) -> tuple:
    """The rule's parameters that give the best accuracy on these (other folds') images; ties: the first."""
    if rule == "two_stage":
        return ()
    if rule == "logistic":
        return (fit_logistic(features(probs, share), (labels == 0).astype(float)),)
    grid = [(t,) for t in T_GRID] if rule == "threshold" else [(t, a) for t in T_GRID for a in A_GRID]
    accs = [(decide(probs, share, rule, g) == labels).mean() for g in grid]
    return grid[int(np.argmax(accs))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="one busi_cpu run per fold")
    ap.add_argument("--crop", type=Path, nargs="+", help="crop classifier per run (file or folder), same order")
    ap.add_argument("--out", type=Path, help="per-image features and decisions (CSV) here")
    args = ap.parse_args()
    root = root_from_env()
    crops = args.crop or [run / "crop_classifier.pt" for run in args.runs]
    crops = [c / "crop_classifier.pt" if c.is_dir() else c for c in crops]
    if len(crops) != len(args.runs):
        print(f"error: {len(args.runs)} runs but {len(crops)} crop classifiers", file=sys.stderr)
        return 2
    for run, crop in zip(args.runs, crops):
        for need in (run / "split.json", run / "checkpoints" / "last.ckpt", run / "mask_refiner.pt", crop):
            if not need.is_file():
                print(f"error: {need} not found", file=sys.stderr)
                return 2
    torch.set_num_threads(os.cpu_count() or 1)
    records = {r.name: r for r in scan_busi(root)}
    folds = []
    for run, crop in zip(args.runs, crops):
        folds.append(score_run(run, crop, records))
        f = folds[-1]
        print(f"{run}: {len(f['names'])} test images, two-stage accuracy "
              f"{(f['probs'].argmax(1) == f['labels']).mean():.4f}", flush=True)
    acc = {r: [] for r in RULES}
    rows = []
    for k, f in enumerate(folds):
        others = [g for j, g in enumerate(folds) if j != k]
        cat = {key: np.concatenate([g[key] for g in others]) for key in ("probs", "share", "labels")}
        pred = {}
        for rule in RULES:
            params = fit(rule, cat["probs"], cat["share"], cat["labels"])
            pred[rule] = decide(f["probs"], f["share"], rule, params)
            acc[rule].append(float((pred[rule] == f["labels"]).mean()))
            shown = ", ".join(f"{v:.4g}" for v in np.ravel(params[0])) if rule == "logistic" else \
                ", ".join(f"{v:g}" for v in params)
            print(f"fold {k} ({args.runs[k]}): {rule} ({shown}) accuracy {acc[rule][-1]:.4f}", flush=True)
        for i, name in enumerate(f["names"]):
            rows.append({"fold": k, "image": name, "true_class": CLASS_NAMES[f["labels"][i]],
                         "prob_normal": f"{f['probs'][i, 0]:.6f}", "largest_share": f"{f['share'][i]:.6f}",
                         **{rule: CLASS_NAMES[pred[rule][i]] for rule in RULES}})
    base = np.array(acc["two_stage"])
    sd = (lambda v: v.std(ddof=1) if len(v) > 1 else 0.0)
    print(f"\n{len(folds)} folds, accuracy mean +- std; paired = minus two_stage, fold by fold")
    print("| rule | accuracy | paired | folds better / worse | recall normal / benign / malignant (out of fold) |")
    print("|---|---|---|---|---|")
    labels = np.concatenate([f["labels"] for f in folds])
    for rule in RULES:
        a = np.array(acc[rule])
        d = a - base
        oof = np.array([CLASS_NAMES.index(r[rule]) for r in rows])
        rec = " / ".join(f"{(oof[labels == c] == c).mean():.3f}" for c in range(len(CLASS_NAMES)))
        print(f"| {rule} | {a.mean():.4f} +- {sd(a):.4f} | {d.mean():+.4f} +- {sd(d):.4f} "
              f"({', '.join(f'{v:+.3f}' for v in d)}) | {int((d > 0).sum())} / {int((d < 0).sum())} | {rec} |")
    if args.out:
        write_csv_atomic(args.out, rows, list(rows[0]))
        print(f"per-image rows: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
