"""Probe: is the lesion the network's largest component, and should the refiner read the others too?
(docs/results.md, e61)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/probe_components.py SWEEP \
        [--folds 0 1 2 3 4] [--top 3] [--out per_image.csv]

SWEEP is a k-fold sweep of ``experiment=busi_cpu`` with its refine stage (SWEEP/F/split.json,
checkpoints/last.ckpt, mask_refiner.pt, predictions_refined.csv). The refine stage re-draws the mask only inside the
crops around the *largest* connected component of the network's mask (>= 0.5, at the scan's own size);
other components stay as the network drew them. Per fold, on the test part, this probe counts how often the
ground-truth lesion lies under the largest component, under another one only, or under none (a whole miss),
and scores, per lesion image, at the 128 px preprocessing size as the headline does (lesion-image Dice):

- ``network``: the network's mask;
- ``refined``: the refine stage as it is (checked against the run's own predictions_refined.csv);
- ``refined_largest``: the refine stage, then everything outside the largest component's crops erased (the
  network's other components, which the refine stage leaves as they are);
- ``refined_top``: the refiner also reads the crops around the next ``--top - 1`` components (each one's crops
  replace the map inside them, the largest last), so stray blobs can be erased and a second lesion re-drawn;
- ``pick_refiner``: keep one component only, the one whose crop the refiner is surest of (the mean refined
  probability over the pixels it draws >= 0.5 there), refined; everything else erased;
- ``oracle_pick``: the same with the component picked by the ground truth (an upper bound for any rule that
  keeps one component; it reads the test masks, so it is not a method).

Normal images of the test part: the share left with an empty mask under each way. Nothing here is fitted:
each way is a fixed rule, so no choice was made on a test fold; with several ways tried, a small gain of the
best one is still a selection and needs another run to confirm it."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from busiseg.atomic import write_csv_atomic  # noqa: E402
from busiseg.checkpoint import load_model  # noqa: E402
from busiseg.data.busi import load_record, root_from_env, scan_busi  # noqa: E402
from busiseg.data.crops import lesion_box  # noqa: E402
from busiseg.data.dataset import resize_pair  # noqa: E402
from busiseg.evaluation.metrics_table import score_mask  # noqa: E402
from busiseg.evaluation.runner import autocast_dtype, run_precision  # noqa: E402
from busiseg.inference import area_resize, predict_probs, restore_size  # noqa: E402
from busiseg.models.crop_classifier import to_grey  # noqa: E402
from busiseg.models.mask_refiner import load_mask_refiner  # noqa: E402

WAYS = ("network", "refined", "refined_largest", "refined_top", "pick_refiner", "oracle_pick")


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks, 1 when both are empty (the runner's score)."""
    return score_mask(truth, pred, with_hd95=False).dice


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a boolean mask, largest first."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    order = sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
    return [labels == i for i in order]


def fold_ways(refiner, image: np.ndarray, prob: np.ndarray, truth: np.ndarray | None, top: int,
              autocast: torch.dtype | None) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Each way's mask probability at the scan's own size, and facts about the components. The crops around
    each of the ``top`` largest components are read once; every way blends them in by ``refiner.lay_back``."""
    grey = to_grey(image)
    comps = components(prob >= 0.5)
    out = {"network": prob}
    info: dict[str, object] = {"components": len(comps)}
    if truth is not None:
        hits = [bool((c & truth).any()) for c in comps]
        info["lesion_under"] = ("none" if not any(hits) else "largest" if hits[0] else "other")
        info["truth_components"] = len(components(truth))
    if not comps:
        for way in WAYS[1:]:
            out[way] = prob
        return out, info
    views = []  # (refined map, coverage) around each of the top components, largest first
    for c in comps[:top]:
        views.append(refiner.crop_probs(grey, lesion_box(c), autocast))
    out["refined"] = refiner.lay_back(prob, *views[0], outside="keep")  # the refine stage as it is
    p = prob
    for view in reversed(views):  # the largest last: its crops win where they overlap
        p = refiner.lay_back(p, *view, outside="keep")
    out["refined_top"] = p
    picks = [refiner.lay_back(prob, *view, outside="erase") for view in views]
    out["refined_largest"] = picks[0]
    conf = [float(r[(r >= 0.5) & (c > 0)].mean()) if ((r >= 0.5) & (c > 0)).any() else 0.0 for r, c in views]
    out["pick_refiner"] = picks[int(np.argmax(conf))]  # picks[0] is refined_largest
    info["picked"] = int(np.argmax(conf))
    if truth is not None:
        out["oracle_pick"] = picks[int(np.argmax([dice(q >= 0.5, truth) for q in picks]))]
    else:
        out["oracle_pick"] = out["pick_refiner"]
    return out, info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="k-fold sweep of experiment=busi_cpu with the refine stage")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--top", type=int, default=3, help="components the refiner reads in refined_top / pick_*")
    ap.add_argument("--out", type=Path, help="per-image rows (CSV) here")
    args = ap.parse_args()
    root = root_from_env()
    for fold in args.folds:
        for need in ("split.json", "checkpoints/last.ckpt", "mask_refiner.pt", "predictions_refined.csv"):
            if not (args.sweep / str(fold) / need).is_file():
                print(f"error: {args.sweep / str(fold) / need} not found", file=sys.stderr)
                return 2
    torch.set_num_threads(os.cpu_count() or 1)
    records = {r.name: r for r in scan_busi(root)}
    per_fold: dict[str, list[float]] = {w: [] for w in WAYS}
    empty_normal: dict[str, list[float]] = {w: [] for w in WAYS}
    rows = []
    for fold in args.folds:
        run = args.sweep / str(fold)
        unet, cfg = load_model(run / "checkpoints" / "last.ckpt")
        refiner = load_mask_refiner(run / "mask_refiner.pt")
        held = json.loads((run / "split.json").read_text())["val"]
        size = int(cfg["data"]["image_size"])
        batch = int(cfg["data"].get("eval_batch_size") or cfg["data"].get("batch_size") or 16)
        dtype = autocast_dtype(run_precision(cfg))
        channels_last = bool(cfg.get("channels_last", False))
        net = unet.eval().to(memory_format=torch.channels_last) if channels_last else unet.eval()
        scores: dict[str, list[float]] = {w: [] for w in WAYS}
        empties: dict[str, list[bool]] = {w: [] for w in WAYS}
        for start in range(0, len(held), batch):  # the run's test batches, as busiseg.evaluation.runner
            names = held[start:start + batch]
            decoded = [load_record(records[n]) for n in names]
            small = [resize_pair(im, m, size) for im, m in decoded]
            x = torch.from_numpy(np.stack([s[0] for s in small])).float().div_(255.0)[:, None]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                mask_p, _ = predict_probs(net, x)
            for i, name in enumerate(names):
                image, truth = decoded[i]
                truth_s = small[i][1] > 0
                lesion = records[name].label > 0
                prob = restore_size(mask_p[i, 0].float().numpy(), truth.shape)
                ways, info = fold_ways(refiner, image, prob, truth if lesion else None, args.top, dtype)
                row = {"fold": fold, "image": name, **info}
                for w in WAYS:
                    pred_s = (mask_p[i, 0].float().numpy() if w == "network" else area_resize(ways[w], size)) > 0.5
                    if lesion:
                        scores[w].append(dice(pred_s, truth_s))
                        row[w] = f"{scores[w][-1]:.4f}"
                    else:
                        empties[w].append(not pred_s.any())
                        row[w] = "empty" if empties[w][-1] else "drawn"
                rows.append(row)
        for w in WAYS:
            per_fold[w].append(float(np.mean(scores[w])))
            empty_normal[w].append(float(np.mean(empties[w])))
        with open(run / "predictions_refined.csv", newline="") as f:
            own = [float(r["dice"]) for r in csv.DictReader(f) if r["part"] == "val" and r["true_class"] != "normal"]
        own_refined = f"{np.mean(own):.4f}"
        lesion_rows = [r for r in rows if r["fold"] == fold and "lesion_under" in r]
        under = {k: sum(r["lesion_under"] == k for r in lesion_rows) for k in ("largest", "other", "none")}
        print(f"fold {fold}: {len(lesion_rows)} lesion images, the lesion under the largest component "
              f"{under['largest']}, under another only {under['other']}, under none {under['none']}; "
              + ", ".join(f"{w} {per_fold[w][-1]:.4f}" for w in WAYS)
              + f"; the run's own test_refined {own_refined}", flush=True)
    sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    print(f"\n{args.sweep}: folds {args.folds}, lesion-image Dice (128 px) mean +- std; paired = minus refined")
    print("| way | lesion-image Dice | paired | per fold | folds better / worse | normal images left empty |")
    print("|---|---|---|---|---|---|")
    base = np.array(per_fold["refined"])
    for w in WAYS:
        a = np.array(per_fold[w])
        d = a - base
        print(f"| {w} | {a.mean():.4f} +- {sd(a):.4f} | {d.mean():+.4f} +- {sd(d):.4f} | "
              f"{', '.join(f'{v:+.3f}' for v in d)} | {int((d > 0).sum())} / {int((d < 0).sum())} | "
              f"{np.mean(empty_normal[w]):.3f} |")
    lesion_rows = [r for r in rows if "lesion_under" in r]
    under = {k: sum(r["lesion_under"] == k for r in lesion_rows) for k in ("largest", "other", "none")}
    print(f"\nout of fold, {len(lesion_rows)} lesion images: the lesion under the largest component {under['largest']}, "
          f"under another only {under['other']}, under none {under['none']}; components drawn per lesion image: "
          f"median {np.median([r['components'] for r in lesion_rows]):.0f}, "
          f"more than one on {sum(r['components'] > 1 for r in lesion_rows)}; ground-truth masks of more than one "
          f"component: {sum(r['truth_components'] > 1 for r in lesion_rows)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        write_csv_atomic(args.out, [{k: r.get(k, "") for k in keys} for r in rows], keys)
        print(f"per-image rows: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
