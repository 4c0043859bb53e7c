"""Probe: does the refine stage gain from a second reading around its own mask? (docs/results.md, e77)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/probe_refine_twice.py SWEEP \
        [--folds 0 1 2 3 4] [--out per_image.csv]

SWEEP is a k-fold sweep of ``experiment=busi_cpu`` with its stage files (SWEEP/F/split.json,
checkpoints/last.ckpt, mask_refiner.pt, predictions_refined.csv). The refine stage crops around the largest
component of the network's mask, so a box drawn too small, too large or off-centre by the network is the box the
refiner reads. Here, per fold on the test part, the refine stage runs as it is (``refined``: checked against the
run's predictions_refined.csv), and then reads a second time around the largest component of its own refined
mask (>= 0.5):

- ``refined_twice``: the second reading replaces the first inside its crops (beyond them the first stands);
- ``refined_twice_mean``: the two readings averaged inside the second reading's crops.

Scored as the headline is (per-image Dice at the 128 px preprocessing size, mean over lesion images), with the
share of normal images left empty. Nothing is fitted; the class calls do not change."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from busiseg.atomic import write_csv_atomic
from busiseg.data.busi import root_from_env, scan_busi
from busiseg.data.crops import lesion_box
from busiseg.evaluation.runner import run_network
from busiseg.inference import InferenceOptions, postprocess_mask
from busiseg.models.crop_classifier import to_grey
from busiseg.models.mask_refiner import MaskRefiner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_fallback_mask import dice, fold_network  # noqa: E402  (e75's fold set-up and score)

WAYS = ("refined", "refined_twice", "refined_twice_mean")


class Twice:
    """Passed to run_network as its mask refiner: the refine stage, then (``way`` other than ``refined``) a
    second reading around the largest component of the first refined mask."""

    def __init__(self, refiner: MaskRefiner, way: str) -> None:
        self.refiner, self.way = refiner, way

    def refine(self, images, mask_probs, threshold=0.5, autocast=None):
        first = self.refiner.refine(images, mask_probs, threshold, autocast)
        if self.way == "refined":
            return first
        options = InferenceOptions(threshold=threshold, keep_largest=True)
        out = []
        for image, prob in zip(images, first):
            box = lesion_box(postprocess_mask(prob, None, options))
            if box is None:
                out.append(prob)
                continue
            again, cover = self.refiner.crop_probs(to_grey(image), box, autocast)
            if self.way == "refined_twice_mean":
                again = (again + prob) / 2
            out.append(cover * again + (1 - cover) * prob)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    root = root_from_env()
    torch.set_num_threads(os.cpu_count() or 1)
    records = {r.name: r for r in scan_busi(root)}
    table, rows = [], []
    for fold in args.folds:
        run = args.sweep / str(fold)
        held = [records[n] for n in json.loads((run / "split.json").read_text())["test"]]
        stored = {r["image"]: float(r["dice"]) for r in csv.DictReader(open(run / "predictions_refined.csv"))
                  if r["part"] == "test"}
        unet, refiner, common = fold_network(run)
        per_way, empty = {}, {}
        for way in WAYS:
            res = run_network(unet, held, mask_refiner=Twice(refiner, way), **common)
            per_way[way] = dice(res.scores[("raw", "preprocessed")])
            empty[way] = res.scores[("raw", "preprocessed")].pred_area == 0
        lesion = res.labels > 0
        check = max(abs(per_way["refined"][i] - stored[r.name]) for i, r in enumerate(held) if lesion[i])
        row = {"fold": fold, "check_max_diff": check}
        for way in WAYS:
            row[way] = float(per_way[way][lesion].mean())
            row[way + "_normal_empty"] = float(empty[way][~lesion].mean())
        table.append(row)
        print(json.dumps(row), flush=True)
        for i, r in enumerate(held):
            rows.append({"fold": fold, "image": r.name,
                         "true_class": ("normal", "benign", "malignant")[res.labels[i]],
                         **{w: round(float(per_way[w][i]), 6) for w in WAYS}})
    if args.out:
        write_csv_atomic(args.out, rows, list(rows[0]))
    sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    base = np.array([r["refined"] for r in table])
    print(f"refined: {base.mean():.4f} +- {sd(base):.4f}; normal images empty "
          f"{np.mean([r['refined_normal_empty'] for r in table]):.3f}")
    for way in WAYS[1:]:
        y = np.array([r[way] for r in table])
        d = y - base
        print(f"{way}: {y.mean():.4f} +- {sd(y):.4f}; paired {d.mean():+.4f} +- {sd(d):.4f} "
              f"({', '.join(f'{v:+.4f}' for v in d)}; {int((d > 0).sum())} better, {int((d < 0).sum())} worse); "
              f"normal images empty {np.mean([r[way + '_normal_empty'] for r in table]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
