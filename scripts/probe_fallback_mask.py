"""Probe: when the network draws nothing on a scan the recipe calls a lesion, should the refine stage look
where the network was least unsure? (docs/results.md, e75)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/probe_fallback_mask.py SWEEP \
        [--folds 0 1 2 3 4] [--relative 0.5] [--out per_image.csv]

SWEEP is a k-fold sweep of ``experiment=busi_cpu`` with its stage files and per-image predictions
(SWEEP/F/split.json, checkpoints/last.ckpt, mask_refiner.pt, predictions_scan_stage.csv). Of the recipe's 500
out-of-fold lesion images about 50 are whole misses (Dice < 0.1), each costing the lesion-image Dice a whole
point. Some are scans where no pixel of the network's mask probability reaches 0.5, so the refine stage, which
reads the crops around the largest component >= 0.5, has nothing to read (on e72's runs 8 of 49; the rest are
drawn in the wrong place). Here, per fold on the test part,
the refine stage runs as it is (``refined``: checked against the run's predictions_refined.csv), and then with a
fallback for scans whose whole map stays below 0.5: the refiner reads the crops around the largest component of
the map >= ``--relative`` x its maximum instead, and draws there (its probability replaces the network's inside
the crops, as always):

- ``fallback_lesion_call``: only on scans the recipe's diagnosis (the run's scan stage) calls benign or
  malignant, so a scan called normal stays empty;
- ``fallback_all``: on every scan with an empty mask.

Scored as the headline is (per-image Dice at the 128 px preprocessing size, mean over lesion images), with the
share of normal images left empty. Nothing is fitted; the class calls are the run's and do not change."""
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
from busiseg.checkpoint import load_model
from busiseg.data.busi import root_from_env, scan_busi
from busiseg.evaluation.runner import autocast_dtype, run_network, run_precision
from busiseg.inference import InferenceOptions
from busiseg.models.mask_refiner import MaskRefiner, load_mask_refiner


class Fallback:
    """Passed to run_network as its mask refiner: the refine stage, with the fallback on the scans ``allow``
    marks (in the order run_network reads them) whose map stays below the threshold."""

    def __init__(self, refiner: MaskRefiner, allow: list[bool], relative: float) -> None:
        self.refiner, self.allow, self.relative = refiner, allow, relative
        self.seen = 0
        self.used: list[bool] = []

    def refine(self, images, mask_probs, threshold=0.5, autocast=None):
        out = []
        for image, prob in zip(images, mask_probs):
            prob = np.asarray(prob, dtype=np.float32)
            top = float(prob.max())
            use = self.allow[self.seen] and top < threshold and top > 0
            self.seen += 1
            self.used.append(use)
            out.append(self.refiner.refine([image], [prob], self.relative * top if use else threshold, autocast)[0])
        return out


def fold_network(run: Path) -> tuple[torch.nn.Module, MaskRefiner, dict]:
    """RUN's network and refiner, and run_network's settings for them (the run's size, channels, batch, precision)."""
    unet, cfg = load_model(run / "checkpoints" / "last.ckpt")
    data = cfg["data"]
    common = dict(image_size=int(data["image_size"]), in_channels=int(data.get("in_channels", 1)),
                  batch_size=int(data.get("eval_batch_size") or data.get("batch_size") or 16),
                  options=InferenceOptions(), progress=False, channels_last=bool(cfg.get("channels_last", False)),
                  autocast=autocast_dtype(run_precision(cfg)))
    return unet, load_mask_refiner(run / "mask_refiner.pt"), common


def dice(scores) -> np.ndarray:
    denom = 2 * scores.tp + scores.fp + scores.fn
    return np.divide(2 * scores.tp, denom, out=np.ones(denom.shape, np.float64), where=denom > 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--relative", type=float, default=0.5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    root = root_from_env()
    torch.set_num_threads(os.cpu_count() or 1)
    records = {r.name: r for r in scan_busi(root)}
    table, rows = [], []
    for fold in args.folds:
        run = args.sweep / str(fold)
        held = [records[n] for n in json.loads((run / "split.json").read_text())["test"]]
        calls = {r["image"]: r["pred_class"] for r in csv.DictReader(open(run / "predictions_scan_stage.csv"))
                 if r["part"] == "test"}
        stored = {r["image"]: float(r["dice"]) for r in csv.DictReader(open(run / "predictions_refined.csv"))
                  if r["part"] == "test"}
        unet, refiner, common = fold_network(run)
        ways = {"refined": [False] * len(held),
                "fallback_lesion_call": [calls[r.name] != "normal" for r in held],
                "fallback_all": [True] * len(held)}
        per_way, used = {}, {}
        for way, allow in ways.items():
            fb = Fallback(refiner, allow, args.relative)
            res = run_network(unet, held, mask_refiner=fb, **common)
            per_way[way] = dice(res.scores[("raw", "preprocessed")])
            empty = res.scores[("raw", "preprocessed")].pred_area == 0
            used[way] = np.array(fb.used)
            per_way[way + "_empty"] = empty
        labels = res.labels
        lesion = labels > 0
        check = max(abs(per_way["refined"][i] - stored[r.name]) for i, r in enumerate(held) if lesion[i])
        row = {"fold": fold, "check_max_diff": check}
        for way in ways:
            row[way] = float(per_way[way][lesion].mean())
            row[way + "_normal_empty"] = float(per_way[way + "_empty"][~lesion].mean())
            row[way + "_n_fallback_lesion"] = int(used[way][lesion].sum())
            row[way + "_n_fallback_normal"] = int(used[way][~lesion].sum())
        table.append(row)
        print(json.dumps(row), flush=True)
        for i, r in enumerate(held):
            rows.append({"fold": fold, "image": r.name, "true_class": ("normal", "benign", "malignant")[labels[i]],
                         "scan_call": calls[r.name], "fallback_used": int(used["fallback_all"][i]),
                         **{w: round(float(per_way[w][i]), 6) for w in ways}})
    if args.out:
        write_csv_atomic(args.out, rows, list(rows[0]))
    sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    base = np.array([r["refined"] for r in table])
    print(f"refined: {base.mean():.4f} +- {sd(base):.4f}; normal images empty "
          f"{np.mean([r['refined_normal_empty'] for r in table]):.3f}")
    for way in ("fallback_lesion_call", "fallback_all"):
        y = np.array([r[way] for r in table])
        d = y - base
        print(f"{way}: {y.mean():.4f} +- {sd(y):.4f}; paired {d.mean():+.4f} +- {sd(d):.4f} "
              f"({', '.join(f'{v:+.4f}' for v in d)}; {int((d > 0).sum())} better, {int((d < 0).sum())} worse); "
              f"fallbacks on {sum(r[way + '_n_fallback_lesion'] for r in table)} lesion and "
              f"{sum(r[way + '_n_fallback_normal'] for r in table)} normal images; normal images empty "
              f"{np.mean([r[way + '_normal_empty'] for r in table]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
