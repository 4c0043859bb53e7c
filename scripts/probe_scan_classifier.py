"""Probe: does a whole-scan classifier, trained beside the multi-task network, fix its normal-vs-lesion calls?
(docs/results.md, e67)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/probe_scan_classifier.py SWEEP OUT \
        [--folds 0 1 2 3 4] [--size 224] [--epochs 40]

SWEEP is a k-fold sweep of ``experiment=busi_cpu`` (SWEEP/F/split.json, predictions.csv and
predictions_two_stage.csv). Most of ``busi_cpu``'s errors are between normal and a lesion (79 of 137 out of
fold), and neither second stage touches P(normal): the crop stage only splits benign from malignant. Here, per
fold, a third network learns the three classes from the whole scan: the scan stage's classifier
(``busiseg.models.scan_classifier``, the crop stage's torchvision ResNet-18 from scratch, one channel, AdamW
one-cycle, flips and brightness/contrast) trained on the fold's training part with the scan's own square (the
longer side, the shorter padded with black) as its "crop", cut with a margin of U(0.85, 1.15) and moved by up
to 8 % (a zoom in or out), at ``--size`` px, seeded with the run's seed + fold (``scan_stage=default``'s
settings). At test it reads the held-out scans whole (and mirrored). Its probabilities are then joined with
the sweep's own:

- ``image``: the whole-scan classifier alone;
- ``network + image``: the mean of the network's (``predictions.csv``) and its probabilities;
- ``two-stage + image`` (the rule fixed before the run, ``scan_stage=default``'s): the mean of the two-stage call's
  (``predictions_two_stage.csv``) and its probabilities;
- ``two-stage, P(normal) averaged``: P(normal) the mean of the two-stage's and its; P(benign), P(malignant)
  the rest, split as the two-stage call splits them.

Each is paired fold by fold against the two-stage call. OUT/F/predictions.csv gets the whole-scan classifier's
test probabilities (the predictions CSV's columns, so ``scripts/ensemble_classes.py`` reads it) and
OUT/F/scan_classifier.pt its weights. Test ground truth is read only for the scores."""
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

from busiseg.atomic import write_csv_atomic
from busiseg.data.busi import load_record, root_from_env, scan_busi
from busiseg.data.labels import CLASS_NAMES
from busiseg.models.crop_classifier import save_crop_classifier
from busiseg.models.scan_classifier import ScanSettings, join_scan_probs, scan_probs, train_scan_classifier
from busiseg.run_info import cpu_has_bf16

DTYPE = torch.bfloat16 if cpu_has_bf16() else None
PROBS = tuple(f"prob_{c}" for c in CLASS_NAMES)
WAYS = ("two-stage", "network", "image", "network + image", "two-stage + image", "two-stage, P(normal) averaged")


def read_test(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        return {r["image"]: np.array([float(r[k]) for k in PROBS]) for r in csv.DictReader(f) if r["part"] == "test"}


def normal_averaged(two: np.ndarray, img: np.ndarray) -> np.ndarray:
    out = two.copy()
    normal = (two[:, 0] + img[:, 0]) / 2
    lesion = two[:, 1:].sum(1, keepdims=True)
    split = np.divide(two[:, 1:], lesion, out=np.full_like(two[:, 1:], 0.5), where=lesion > 0)
    out[:, 0] = normal
    out[:, 1:] = (1 - normal)[:, None] * split
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="k-fold sweep of experiment=busi_cpu (one run per fold)")
    ap.add_argument("out", type=Path, help="folder for each fold's classifier and test probabilities")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--size", type=int, default=224, help="input side (px)")
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()
    root = root_from_env()
    for fold in args.folds:
        for need in ("split.json", "config.yaml", "predictions.csv", "predictions_two_stage.csv"):
            if not (args.sweep / str(fold) / need).is_file():
                print(f"error: {args.sweep / str(fold) / need} not found", file=sys.stderr)
                return 2
    torch.set_num_threads(os.cpu_count() or 1)
    records = {r.name: r for r in scan_busi(root)}
    t0 = time.time()
    decoded = {name: load_record(r)[0] for name, r in records.items()}
    print(f"decoded {len(decoded)} images in {time.time() - t0:.0f} s", flush=True)
    acc: dict[str, list[float]] = {w: [] for w in WAYS}
    recall_normal: dict[str, list[float]] = {w: [] for w in WAYS}
    for fold in args.folds:
        run = args.sweep / str(fold)
        split = json.loads((run / "split.json").read_text())
        seed = int(next((line.split(":", 1)[1] for line in (run / "config.yaml").read_text().splitlines()
                         if line.startswith("seed:")), "42"))
        settings = ScanSettings(size=args.size, epochs=args.epochs, seed=seed + fold)
        train = split["train"]
        t0 = time.time()
        model, history = train_scan_classifier([decoded[n] for n in train], [records[n].label for n in train],
                                               settings, train, autocast=DTYPE)
        fit = time.time() - t0
        (args.out / str(fold)).mkdir(parents=True, exist_ok=True)
        save_crop_classifier(model, args.out / str(fold) / "scan_classifier.pt")
        net, two = read_test(run / "predictions.csv"), read_test(run / "predictions_two_stage.csv")
        held = sorted(net)
        if sorted(two) != held or not set(held) <= set(split["val"]) | set(split.get("test", [])):
            print(f"error: fold {fold}: the predictions CSVs do not test the split's held-out images", file=sys.stderr)
            return 2
        img = scan_probs(model, [decoded[n] for n in held], autocast=DTYPE)
        truth = np.array([records[n].label for n in held])
        p_net = np.stack([net[n] for n in held])
        p_two = np.stack([two[n] for n in held])
        probs = {"two-stage": p_two, "network": p_net, "image": img, "network + image": join_scan_probs(p_net, img),
                 "two-stage + image": join_scan_probs(p_two, img),
                 "two-stage, P(normal) averaged": normal_averaged(p_two, img)}
        for w in WAYS:
            pred = probs[w].argmax(1)
            acc[w].append(float((pred == truth).mean()))
            recall_normal[w].append(float((pred[truth == 0] == 0).mean()))
        rows = [{"part": "test", "image": n, "true_class": CLASS_NAMES[truth[i]], "pred_class": CLASS_NAMES[img[i].argmax()],
                 **{k: f"{img[i, j]:.6f}" for j, k in enumerate(PROBS)}} for i, n in enumerate(held)]
        write_csv_atomic(args.out / str(fold) / "predictions.csv", rows, list(rows[0]))
        print(f"fold {fold}: {len(train)} training scans, {fit:.0f} s (loss {history[0]:.3f} -> {history[-1]:.3f}); "
              + ", ".join(f"{w} {acc[w][-1]:.3f}" for w in WAYS), flush=True)
    base = np.array(acc["two-stage"])
    sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    print(f"\n{args.sweep}: {len(base)} folds, mean +- std; paired = minus the two-stage call, fold by fold")
    print("| way | accuracy | paired | folds better / worse | recall normal |")
    print("|---|---|---|---|---|")
    for w in WAYS:
        a = np.array(acc[w])
        d = a - base
        print(f"| {w} | {a.mean():.4f} +- {sd(a):.4f} | {d.mean():+.4f} +- {sd(d):.4f} "
              f"({', '.join(f'{v:+.3f}' for v in d)}) | {int((d > 0).sum())} / {int((d < 0).sum())} "
              f"| {np.mean(recall_normal[w]):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
