"""Probe: does a second U-Net on the lesion crop, at the scan's own resolution, sharpen the network's masks?
(docs/results.md, e54)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/probe_crop_refine.py SWEEP \
        [--folds 0 1 2 3 4] [--epochs 30] [--out per_image.csv]

SWEEP is a k-fold sweep of ``experiment=busi_cpu`` (SWEEP/F/split.json, checkpoints/last.ckpt, and for the
check predictions.csv). ``busi_cpu`` segments the whole scan at 128 px, where a small lesion is a few dozen
pixels; the anchor of issue 8 (MT-UNet++ "with prediction refining") refines its masks in a second pass. Here,
per fold, a refiner (smp U-Net, resnet18 encoder from scratch, decoder widths 128-16, one channel, 128 px
crops, Dice+BCE, AdamW one-cycle, batch 16, 30 epochs, bf16 where the CPU has it) learns the lesion mask on
square crops around the ground-truth lesion boxes of the training part (``busiseg.data.crops``; side x U(1.2,
3.0), centre moved by up to 15 % of the side, mirrored, brightness/contrast). On the held-out part it reads
the crops around the largest component of the network's own mask (margins 1.5, 2.0 and 2.5, each mirrored),
and the averaged crop probabilities are laid back over the scan (``paste_crop``):

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
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from busiseg.atomic import write_csv_atomic  # noqa: E402
from busiseg.checkpoint import load_model  # noqa: E402
from busiseg.data.busi import load_record, scan_busi  # noqa: E402
from busiseg.data.crops import lesion_box, paste_crop, square_crop  # noqa: E402
from busiseg.data.dataset import resize_pair  # noqa: E402
from busiseg.evaluation.runner import autocast_dtype, run_precision  # noqa: E402
from busiseg.inference import InferenceOptions, postprocess_mask, predict_probs, prepare_image, restore_size  # noqa: E402
from busiseg.models.crop_classifier import to_grey  # noqa: E402
from busiseg.run_info import cpu_has_bf16  # noqa: E402

DTYPE = torch.bfloat16 if cpu_has_bf16() else None
WAYS = ("network", "refined", "mean")
SIZE = 128
TRAIN_MARGIN = (1.2, 3.0)
JITTER = 0.15
TEST_MARGINS = (1.5, 2.0, 2.5)
DECODER = (128, 64, 32, 16, 16)  # half the default widths: 2.3x faster a step on 2 cores


def make_refiner() -> torch.nn.Module:
    return smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=1, decoder_channels=DECODER)


def _batch(crops) -> torch.Tensor:
    return (torch.from_numpy(np.stack(crops).astype(np.float32))[:, None] - 0.5) / 0.25


def _autocast():
    return torch.autocast("cpu", dtype=DTYPE, enabled=DTYPE is not None)


def train_refiner(greys, masks, boxes, epochs: int, seed: int, batch_size: int = 16, lr: float = 1e-3):
    g = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = make_refiner().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(greys) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    masks_f = [m.astype(np.float32) for m in masks]
    net.train()
    for epoch in range(epochs):
        order = g.permutation(len(greys))
        total = 0.0
        for i in range(0, len(order), batch_size):
            xs, ys = [], []
            for j in order[i:i + batch_size]:
                margin = g.uniform(*TRAIN_MARGIN)
                shift = (g.uniform(-JITTER, JITTER), g.uniform(-JITTER, JITTER))
                x = square_crop(greys[j], boxes[j], margin, SIZE, shift).astype(np.float32) / 255.0
                y = (square_crop(masks_f[j], boxes[j], margin, SIZE, shift) >= 0.5).astype(np.float32)
                if g.random() < 0.5:
                    x, y = x[:, ::-1], y[:, ::-1]
                if g.random() < 0.8:
                    x = np.clip((x - x.mean()) * g.uniform(0.7, 1.3) + x.mean() + g.uniform(-0.2, 0.2), 0, 1)
                xs.append(np.ascontiguousarray(x))
                ys.append(np.ascontiguousarray(y))
            xb = _batch(xs).contiguous(memory_format=torch.channels_last)
            yb = torch.from_numpy(np.stack(ys))[:, None]
            with _autocast():
                logits = net(xb)
            logits = logits.float()
            p = torch.sigmoid(logits)
            inter = (p * yb).sum((1, 2, 3))
            dice = 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + yb.sum((1, 2, 3)) + 1)
            loss = F.binary_cross_entropy_with_logits(logits, yb) + dice.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(xs)
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"  refiner epoch {epoch + 1}/{epochs}: loss {total / len(greys):.4f}", flush=True)
    return net.to(memory_format=torch.contiguous_format).eval()


@torch.inference_mode()
def refine(net, grey: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
    """The refiner's probability laid back over the scan (averaged over margins and mirrors) and its coverage."""
    crops = [square_crop(grey, box, m, SIZE).astype(np.float32) / 255.0 for m in TEST_MARGINS]
    x = _batch(crops)
    with _autocast():
        p = torch.sigmoid(net(x).float()) + torch.flip(torch.sigmoid(net(torch.flip(x, [-1])).float()), [-1])
    p = (p / 2)[:, 0].numpy()
    total = np.zeros(grey.shape, np.float32)
    cover = np.zeros(grey.shape, np.float32)
    for k, m in enumerate(TEST_MARGINS):
        v, c = paste_crop(p[k], box, m, grey.shape)
        total += v
        cover += c
    return np.divide(total, cover, out=np.zeros_like(total), where=cover > 0), np.minimum(cover, 1.0)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    s = pred.sum() + truth.sum()
    return 1.0 if s == 0 else float(2 * (pred & truth).sum() / s)


def down(prob: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(prob.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="k-fold sweep of experiment=busi_cpu (one run per fold)")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, help="per-image Dice (CSV) here")
    args = ap.parse_args()
    root = os.environ.get("BUSI_ROOT")
    if not root:
        print("error: set BUSI_ROOT to the Dataset_BUSI_with_GT folder", file=sys.stderr)
        return 2
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
    rows = []
    for fold in args.folds:
        run = args.sweep / str(fold)
        split = json.loads((run / "split.json").read_text())
        unet, cfg = load_model(run / "checkpoints" / "last.ckpt")
        seed = int(cfg.get("seed", 42)) + fold
        size = int(cfg["data"]["image_size"])
        train = [n for n in split["train"] if records[n].label > 0]
        greys = [to_grey(decoded[n][0]) for n in train]
        masks = [decoded[n][1] for n in train]
        t0 = time.time()
        refiner = train_refiner(greys, masks, [lesion_box(m) for m in masks], args.epochs, seed)
        fit = time.time() - t0
        held = split["val"]
        x = torch.stack([prepare_image(decoded[n][0], size) for n in held])
        dtype = autocast_dtype(run_precision(cfg))
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            mask_p, _ = predict_probs(unet, x)
        scores: dict[str, list[float]] = {k: [] for k in per_fold}
        t0 = time.time()
        largest = InferenceOptions(keep_largest=True)
        for i, n in enumerate(held):
            if records[n].label == 0:
                continue
            image, truth_full = decoded[n]
            truth_s = resize_pair(image, truth_full, size)[1]
            net_s = mask_p[i, 0].float().numpy()
            net_full = restore_size(net_s, truth_full.shape)
            box = lesion_box(postprocess_mask(net_full, None, largest))
            probs = {"network": net_full}
            if box is None:
                probs["refined"] = probs["mean"] = net_full
            else:
                r, cover = refine(refiner, to_grey(image), box)
                probs["refined"] = cover * r + (1 - cover) * net_full
                probs["mean"] = cover * (r + net_full) / 2 + (1 - cover) * net_full
            row = {"fold": fold, "image": n, "drawn": box is not None}
            for w in WAYS:
                small = net_s if w == "network" else down(probs[w], size)
                d, d_full = dice(small > 0.5, truth_s), dice(probs[w] > 0.5, truth_full)
                scores[w].append(d)
                scores[f"{w}_full"].append(d_full)
                row[w], row[f"{w}_full"] = f"{d:.4f}", f"{d_full:.4f}"
            rows.append(row)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
