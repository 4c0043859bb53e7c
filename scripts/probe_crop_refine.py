"""Probe: does a second U-Net on the lesion crop, at the scan's own resolution, sharpen the network's masks?
(docs/results.md, e54)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/probe_crop_refine.py SWEEP \
        [--folds 0 1 2 3 4] [--epochs 30] [--size 128] [--encoder resnet18] [--seed-offset 0] \
        [--out per_image.csv] [--figure examples.png]

SWEEP is a k-fold sweep of ``experiment=busi_cpu`` (SWEEP/F/split.json, checkpoints/last.ckpt, and for the
check predictions.csv). ``busi_cpu`` segments the whole scan at 128 px, where a small lesion is a few dozen
pixels; the anchor of issue 8 (MT-UNet++ "with prediction refining") refines its masks in a second pass. Here,
per fold, the mask refiner (``busiseg.models.mask_refiner`` with its default settings: smp U-Net, resnet18
encoder from scratch, decoder widths 128-16, one channel, 128 px crops, Dice+BCE, AdamW one-cycle, batch 16,
30 epochs, bf16 where the CPU has it; seed = the run's + fold + ``--seed-offset``) learns the lesion mask on
square crops around the ground-truth lesion boxes of the training part (side x U(1.2, 3.0), centre moved by up
to 15 % of the side, mirrored, brightness/contrast). On the held-out part it reads the crops around the
largest component of the network's own mask (margins 1.5, 2.0 and 2.5, each mirrored), and the averaged crop
probabilities are laid back over the scan (``MaskRefiner.refine``, its two blends):

- ``network``: the network's mask (its 128 px probabilities, as its test step scores them);
- ``refined``: inside the crops the refiner's probability, outside the network's;
- ``mean``: inside the crops the mean of the two, outside the network's.

Each is scored as the headline is: per-image Dice of the 128 px mask (the refined probabilities area-averaged
down to 128 px, > 0.5) against the 128 px ground truth, averaged over the lesion images
(``dice_per_image_lesion``); also at the scan's own size (``*_full``). Images where the network draws nothing
keep its empty mask. Test ground truth is read only for the scores."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from busiseg.atomic import write_csv_atomic  # noqa: E402
from busiseg.checkpoint import load_model  # noqa: E402
from busiseg.data.busi import load_record, root_from_env, scan_busi  # noqa: E402
from busiseg.data.dataset import resize_pair  # noqa: E402
from busiseg.data.crops import lesion_box, square_crop  # noqa: E402
from busiseg.evaluation.runner import autocast_dtype, run_precision  # noqa: E402
from busiseg.inference import predict_probs, prepare_image, restore_size  # noqa: E402
from busiseg.models.crop_classifier import to_grey  # noqa: E402
from busiseg.models.mask_refiner import RefinerSettings, train_mask_refiner  # noqa: E402
from busiseg.run_info import cpu_has_bf16  # noqa: E402

DTYPE = torch.bfloat16 if cpu_has_bf16() else None
WAYS = ("network", "refined", "mean")


def report(epoch: int, loss: float) -> None:
    if epoch % 10 == 9:
        print(f"  refiner epoch {epoch + 1}: loss {loss:.4f}", flush=True)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    s = pred.sum() + truth.sum()
    return 1.0 if s == 0 else float(2 * (pred & truth).sum() / s)


def down(prob: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(prob.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)


def views(image: np.ndarray, truth: np.ndarray, probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Crop-sized views around the ground-truth lesion (twice its side): the grey scan and each mask."""
    box = lesion_box(truth)
    out = {"scan": square_crop(to_grey(image), box, 2.0, 160),
           "truth": square_crop(truth.astype(np.float32), box, 2.0, 160)}
    out.update({w: square_crop(p.astype(np.float32), box, 2.0, 160) for w, p in probs.items()})
    return out


CONTOURS = (("truth", "#55a868", "-"), ("network", "#c44e52", "-"), ("refined", "#e6c229", "--"))


def write_figure(path: Path, examples: list[tuple[float, str, dict[str, np.ndarray]]], per_side: int = 5) -> None:
    """The ``per_side`` images the refiner helped most and the ``per_side`` it hurt most (Dice at the scan's
    size): each scan around its lesion, ground truth green, the network's mask red, the refined one yellow."""
    from matplotlib.figure import Figure

    from busiseg.evaluation.figures import _render
    from busiseg.models.reporting import save_png

    examples = sorted(examples, key=lambda e: e[0])
    picks = examples[::-1][:per_side] + examples[:per_side]
    fig = Figure(figsize=(2.0 * per_side, 4.6), dpi=100, facecolor="white", layout="constrained")
    for k, (delta, name, v) in enumerate(picks):
        ax = fig.add_subplot(2, per_side, k + 1)
        ax.imshow(v["scan"], cmap="gray", vmin=0, vmax=255)
        for key, colour, style in CONTOURS:
            if (v[key] > 0.5).any():
                ax.contour(v[key], levels=[0.5], colors=colour, linewidths=1.2, linestyles=style)
        ax.set_title(f"{name.split('/')[-1]}\nDice {delta:+.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle("mask refiner (e54): most helped (top), most hurt (bottom); truth green, network red, "
                 "refined dashed yellow", fontsize=9)
    save_png(_render(fig), path)
    print(f"figure: {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="k-fold sweep of experiment=busi_cpu (one run per fold)")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=RefinerSettings.epochs)
    ap.add_argument("--size", type=int, default=RefinerSettings.size, help="crop side fed to the refiner (px; e79)")
    ap.add_argument("--encoder", default=RefinerSettings.encoder, help="the refiner's smp encoder (e79)")
    ap.add_argument("--seed-offset", type=int, default=0, help="added to each refiner's seed (the run's + fold)")
    ap.add_argument("--out", type=Path, help="per-image Dice (CSV) here")
    ap.add_argument("--figure", type=Path, help="a PNG of the images the refiner helped and hurt most")
    args = ap.parse_args()
    root = root_from_env()
    for fold in args.folds:
        for need in ("split.json", "checkpoints/last.ckpt", "predictions.csv"):
            if not (args.sweep / str(fold) / need).is_file():
                print(f"error: {args.sweep / str(fold) / need} not found", file=sys.stderr)
                return 2
    torch.set_num_threads(os.cpu_count() or 1)
    records = {r.name: r for r in scan_busi(root)}
    t0 = time.time()
    decoded = {name: load_record(r) for name, r in records.items()}
    print(f"decoded {len(decoded)} images in {time.time() - t0:.0f} s", flush=True)
    per_fold: dict[str, list[float]] = {f"{w}{s}": [] for w in WAYS for s in ("", "_full")}
    rows, examples = [], []
    for fold in args.folds:
        run = args.sweep / str(fold)
        split = json.loads((run / "split.json").read_text())
        unet, cfg = load_model(run / "checkpoints" / "last.ckpt")
        seed = int(cfg.get("seed", 42)) + fold + args.seed_offset
        size = int(cfg["data"]["image_size"])
        train = [n for n in split["train"] if records[n].label > 0]
        t0 = time.time()
        refiner, _ = train_mask_refiner([decoded[n][0] for n in train], [decoded[n][1] for n in train],
                                        RefinerSettings(epochs=args.epochs, size=args.size,
                                                        encoder=args.encoder, seed=seed), train, autocast=DTYPE,
                                        on_epoch=report)
        fit = time.time() - t0
        held = split["val"]
        x = torch.stack([prepare_image(decoded[n][0], size) for n in held])
        dtype = autocast_dtype(run_precision(cfg))
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            mask_p, _ = predict_probs(unet, x)
        scores: dict[str, list[float]] = {k: [] for k in per_fold}
        t0 = time.time()
        for i, n in enumerate(held):
            if records[n].label == 0:
                continue
            image, truth_full = decoded[n]
            truth_s = resize_pair(image, truth_full, size)[1]
            net_s = mask_p[i, 0].float().numpy()
            probs = {"network": restore_size(net_s, truth_full.shape)}
            for way, blend in (("refined", "replace"), ("mean", "mean")):
                refiner.settings.blend = blend
                probs[way] = refiner.refine([image], [probs["network"]], autocast=DTYPE)[0]
            row = {"fold": fold, "image": n, "drawn": bool((probs["network"] >= 0.5).any())}
            for w in WAYS:
                small = net_s if w == "network" else down(probs[w], size)
                d, d_full = dice(small > 0.5, truth_s), dice(probs[w] > 0.5, truth_full)
                scores[w].append(d)
                scores[f"{w}_full"].append(d_full)
                row[w], row[f"{w}_full"] = f"{d:.4f}", f"{d_full:.4f}"
            rows.append(row)
            if args.figure and truth_full.any():
                delta = float(row["refined_full"]) - float(row["network_full"])
                examples.append((delta, n, views(image, truth_full, {w: probs[w] for w in ("network", "refined")})))
        for k in per_fold:
            per_fold[k].append(float(np.mean(scores[k])))
        with open(run / "predictions.csv", newline="") as f:
            own = [float(r["dice"]) for r in csv.DictReader(f) if r["part"] == "val" and r["true_class"] != "normal"]
        print(f"fold {fold}: refiner ({len(train)} lesion images) trained in {fit:.0f} s, applied in "
              f"{time.time() - t0:.0f} s; lesion-image Dice " + ", ".join(
                  f"{w} {per_fold[w][-1]:.4f} (full size {per_fold[w + '_full'][-1]:.4f})" for w in WAYS)
              + f"; the run's own (its predictions.csv) {np.mean(own):.4f}",
              flush=True)
    sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    print(f"\n{args.sweep}: folds {args.folds}, mean +- std; paired = minus the network, fold by fold")
    print("| way | lesion-image Dice (128 px) | paired | folds better / worse | at the scan's size | paired |")
    print("|---|---|---|---|---|---|")
    for w in WAYS:
        a, b = np.array(per_fold[w]), np.array(per_fold[w + "_full"])
        d, e = a - np.array(per_fold["network"]), b - np.array(per_fold["network_full"])
        print(f"| {w} | {a.mean():.4f} +- {sd(a):.4f} | {d.mean():+.4f} +- {sd(d):.4f} | {int((d > 0).sum())} / "
              f"{int((d < 0).sum())} | {b.mean():.4f} +- {sd(b):.4f} | {e.mean():+.4f} +- {sd(e):.4f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(args.out, rows, list(rows[0]))
        print(f"per-image Dice: {args.out}")
    if args.figure:
        write_figure(args.figure, examples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
