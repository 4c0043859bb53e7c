"""Probe: does the crop classifier tell benign from malignant better when it also sees the lesion's outline?
(docs/results.md, e74)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/probe_mask_channel.py SWEEP OUT \
        [--folds 0 1 2 3 4] [--seed 42] [--baseline stored|train]

SWEEP is a k-fold sweep of ``experiment=busi_cpu`` with its networks and stage files (SWEEP/F/split.json,
checkpoints/last.ckpt, mask_refiner.pt, crop_classifier.pt, scan_classifier.pt). Shape and margin (round and
smooth against irregular and spiculated) are what a radiologist reads first to call a lesion benign or
malignant; the crop stage's classifier sees only the grey crop. Here, per fold, a second crop classifier with
the crop stage's settings, network, training loop and seed reads two channels: the grey crop and the lesion
mask cut by the same square. It trains on the ground-truth masks, each crop's mask eroded or dilated at
random (3-9 px kernels, half the crops) so that it does not rely on a perfect outline; at test it reads the
mask the recipe draws (the refine stage's, largest component, threshold 0.5), as the crop stage does for its
box. Both classifiers are then joined exactly as the recipe joins them (two-stage: the crop stage's rule;
scan stage: its mean with the run's own scan classifier), and paired fold by fold.

``--baseline stored``: the one-channel classifier is the run's own crop_classifier.pt (trained with
``--seed``, which must be the run's crop-stage seed); ``train``: trained here with ``--seed`` (for a second
seed of both). OUT/F/ gets the two-channel classifier's weights and per-image probabilities."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from busiseg.atomic import write_csv_atomic
from busiseg.checkpoint import load_model
from busiseg.crop_stage import train_for_split, training_lesions
from busiseg.data.busi import load_record, root_from_env, scan_busi
from busiseg.data.crops import lesion_box, square_crop
from busiseg.data.labels import CLASS_NAMES
from busiseg.evaluation.runner import autocast_dtype, run_network, run_precision
from busiseg.inference import InferenceOptions, postprocess_mask
from busiseg.models.crop_classifier import (CropClassifier, CropSettings, combine_class_probs, load_crop_classifier,
                                            to_grey)
from busiseg.models.mask_refiner import load_mask_refiner
from busiseg.models.scan_classifier import join_scan_probs, load_scan_classifier, scan_probs
from busiseg.models.scheduler import one_cycle
from busiseg.models.stage_file import autocast_context
from busiseg.run_info import cpu_has_bf16

DTYPE = torch.bfloat16 if cpu_has_bf16() else None


def two_channel_batch(crops: list[np.ndarray], masks: list[np.ndarray]) -> torch.Tensor:
    """Grey crops in [0, 1] normalised as the crop stage's, masks in [0, 1] to [-1, 1]: (N, 2, S, S)."""
    x = (torch.from_numpy(np.stack(crops).astype(np.float32)) - 0.5) / 0.25
    m = torch.from_numpy(np.stack(masks).astype(np.float32)) * 2 - 1
    return torch.stack([x, m], 1)


class MaskChannelClassifier(CropClassifier):
    """The crop classifier's ResNet-18 with a second input channel, the lesion mask."""

    def __init__(self, settings: CropSettings) -> None:
        super().__init__(settings)
        self.net.conv1 = torch.nn.Conv2d(2, 64, 7, 2, 3, bias=False)

    @torch.inference_mode()
    def probs_with_masks(self, images, masks, boxes, autocast=None) -> np.ndarray:
        self.eval()
        total = 0
        for margin in self.settings.test_margins:
            crops = [square_crop(to_grey(im), b, margin, self.settings.size).astype(np.float32) / 255 for im, b in
                     zip(images, boxes)]
            ms = [square_crop(m.astype(np.uint8) * 255, b, margin, self.settings.size).astype(np.float32) / 255
                  for m, b in zip(masks, boxes)]
            x = two_channel_batch(crops, ms)
            with autocast_context(torch.device("cpu"), autocast):
                total = total + torch.softmax(self(x).float(), 1) + torch.softmax(self(torch.flip(x, [-1])).float(), 1)
        return (total / (2 * len(self.settings.test_margins))).numpy()

    def refine(self, images, mask_probs, class_probs, threshold=0.5, autocast=None):
        options = InferenceOptions(threshold=threshold, keep_largest=True)
        masks = [postprocess_mask(np.asarray(p), None, options) for p in mask_probs]
        boxes = [lesion_box(m) for m in masks]
        drawn = [i for i, b in enumerate(boxes) if b is not None]
        crop = np.full((len(images), 2), np.nan)
        if drawn:
            crop[drawn] = self.probs_with_masks([images[i] for i in drawn], [masks[i] for i in drawn],
                                                [boxes[i] for i in drawn], autocast)
        return combine_class_probs(class_probs, crop), crop


class Both:
    """Passed to run_network as its crop classifier: the one-channel classifier's two-stage call goes on (and
    is scored by run_network), the two-channel one's is kept beside it."""

    def __init__(self, one: CropClassifier, two: MaskChannelClassifier) -> None:
        self.one, self.two, self.kept = one, two, []

    def refine(self, images, mask_probs, class_probs, threshold=0.5, autocast=None):
        self.kept.append(self.two.refine(images, mask_probs, class_probs, threshold, autocast))
        return self.one.refine(images, mask_probs, class_probs, threshold, autocast)


def perturb(mask: np.ndarray, g: np.random.Generator) -> np.ndarray:
    if g.random() < 0.5:
        k = int(g.choice([3, 5, 7, 9]))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = (cv2.erode if g.random() < 0.5 else cv2.dilate)(mask, kernel)
    return mask


def train_two_channel(images, masks, labels, settings: CropSettings, names) -> tuple[MaskChannelClassifier, list]:
    """train_crop_classifier's loop (same sampling, schedule and augmentation) with the mask as channel two."""
    s = settings
    g = np.random.default_rng(s.seed)
    torch.manual_seed(s.seed)
    model = MaskChannelClassifier(s).to(memory_format=torch.channels_last)
    model.trained_on = list(names)
    greys = [to_grey(im) for im in images]
    masks8 = [m.astype(np.uint8) * 255 for m in masks]
    boxes = [lesion_box(m) for m in masks]
    labels = np.asarray(labels, dtype=np.int64)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = one_cycle(opt, s.epochs * math.ceil(len(greys) / s.batch_size), pct_start=0.2)
    history = []
    model.train()
    for _ in range(s.epochs):
        order = g.permutation(len(greys))
        total = 0.0
        for i in range(0, len(order), s.batch_size):
            idx = order[i:i + s.batch_size]
            crops, ms = [], []
            for j in idx:
                shift = (g.uniform(-s.jitter, s.jitter), g.uniform(-s.jitter, s.jitter))
                margin = g.uniform(*s.train_margin)
                x = square_crop(greys[j], boxes[j], margin, s.size, shift).astype(np.float32) / 255.0
                m = perturb(square_crop(masks8[j], boxes[j], margin, s.size, shift), g).astype(np.float32) / 255.0
                if g.random() < 0.5:
                    x, m = x[:, ::-1], m[:, ::-1]
                if g.random() < 0.8:
                    x = np.clip((x - x.mean()) * g.uniform(0.7, 1.3) + x.mean() + g.uniform(-0.2, 0.2), 0, 1)
                crops.append(x)
                ms.append(m)
            xb = two_channel_batch(crops, ms).contiguous(memory_format=torch.channels_last)
            with autocast_context(torch.device("cpu"), DTYPE):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), torch.from_numpy(labels[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(greys))
    return model.to(memory_format=torch.contiguous_format).eval(), history


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--baseline", choices=("stored", "train"), default="stored")
    ap.add_argument("--epochs", type=int, default=40, help="the two-channel classifier's (a quick check: 1)")
    args = ap.parse_args()
    root = root_from_env()
    torch.set_num_threads(os.cpu_count() or 1)
    records = {r.name: r for r in scan_busi(root)}
    table = []
    for fold in args.folds:
        run = args.sweep / str(fold)
        split_file = run / "split.json"
        settings = CropSettings(seed=args.seed)
        two_settings = CropSettings(seed=args.seed, epochs=args.epochs)
        started = time.perf_counter()
        if args.baseline == "stored":
            one = load_crop_classifier(run / "crop_classifier.pt")
            if one.settings.seed != args.seed:
                print(f"error: {run}/crop_classifier.pt has seed {one.settings.seed}, not --seed {args.seed}",
                      file=sys.stderr)
                return 2
        else:
            one, _, _ = train_for_split(root, split_file, settings, "cpu", progress=False)
        lesions = training_lesions(root, split_file)
        decoded = [load_record(r) for r in lesions]
        two, history = train_two_channel([d[0] for d in decoded], [d[1] for d in decoded],
                                         [r.label - 1 for r in lesions], two_settings, [r.name for r in lesions])
        trained = time.perf_counter() - started
        (args.out / str(fold)).mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": two.net.state_dict(), "loss_per_epoch": history}, args.out / str(fold) / "two_channel.pt")
        unet, cfg = load_model(run / "checkpoints" / "last.ckpt")
        held = [records[n] for n in json.loads(split_file.read_text())["val"]]
        data = cfg["data"]
        autocast = autocast_dtype(run_precision(cfg))
        both = Both(one, two)
        res = run_network(unet, held, int(data["image_size"]), int(data.get("in_channels", 1)),
                          int(data.get("eval_batch_size") or data.get("batch_size") or 16), InferenceOptions(),
                          progress=False, channels_last=bool(cfg.get("channels_last", False)), autocast=autocast,
                          crop_classifier=both, mask_refiner=load_mask_refiner(run / "mask_refiner.pt"))
        labels = res.labels
        one_two = res.probs["raw"]
        two_two = np.concatenate([k[0] for k in both.kept])
        scan = scan_probs(load_scan_classifier(run / "scan_classifier.pt"), [load_record(r)[0] for r in held], autocast)
        lesion = labels > 0
        row = {"fold": fold, "seconds_training": round(trained),
               "two_stage_1ch": accuracy(one_two, labels), "two_stage_2ch": accuracy(two_two, labels),
               "scan_stage_1ch": accuracy(join_scan_probs(one_two, scan), labels),
               "scan_stage_2ch": accuracy(join_scan_probs(two_two, scan), labels),
               "bm_1ch": float((1 + one_two[lesion, 1:].argmax(1) == labels[lesion]).mean()),
               "bm_2ch": float((1 + two_two[lesion, 1:].argmax(1) == labels[lesion]).mean())}
        stored = json.loads((run / "metrics.json").read_text())["metrics"]
        row["run_two_stage"] = stored.get("test_two_stage/accuracy")
        row["run_scan_stage"] = stored.get("test_scan_stage/accuracy")
        table.append(row)
        rows = [{"image": n, "true_class": CLASS_NAMES[labels[i]],
                 **{f"two_stage_1ch_{c}": round(float(one_two[i, k]), 6) for k, c in enumerate(CLASS_NAMES)},
                 **{f"two_stage_2ch_{c}": round(float(two_two[i, k]), 6) for k, c in enumerate(CLASS_NAMES)},
                 **{f"scan_{c}": round(float(scan[i, k]), 6) for k, c in enumerate(CLASS_NAMES)}}
                for i, n in enumerate(res.names)]
        write_csv_atomic(args.out / str(fold) / "probs.csv", rows, list(rows[0]))
        print(json.dumps(row), flush=True)
    print("\n| fold | " + " | ".join(k for k in table[0] if k != "fold") + " |")
    for r in table:
        print(f"| {r['fold']} | " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v)
                                             for k, v in r.items() if k != "fold") + " |")
    sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    for a, b in (("two_stage_1ch", "two_stage_2ch"), ("scan_stage_1ch", "scan_stage_2ch"), ("bm_1ch", "bm_2ch")):
        x, y = np.array([r[a] for r in table]), np.array([r[b] for r in table])
        d = y - x
        print(f"{b}: {y.mean():.4f} +- {sd(y):.4f} against {x.mean():.4f} +- {sd(x):.4f}; paired {d.mean():+.4f} "
              f"+- {sd(d):.4f} ({', '.join(f'{v:+.3f}' for v in d)}; {int((d > 0).sum())} better, "
              f"{int((d < 0).sum())} worse)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
