"""Probe: does the scan classifier diagnose better when it starts from the multi-task network's encoder?
(docs/results.md, e78)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/probe_scan_from_encoder.py SWEEP NETS OUT \
        [--folds 0 1 2 3 4] [--size 224] [--epochs 15] [--seed 42] [--scratch]

SWEEP: a k-fold sweep of ``experiment=busi_cpu`` with its light files (SWEEP/F/split.json,
predictions_two_stage.csv and predictions_scan_stage.csv; ``docs/runs/busi_cpu`` holds e72's). NETS/F: a run of
the same fold's network (NETS/F/checkpoints/last.ckpt and split.json, the same split as SWEEP/F), e.g.
``python -m busiseg.train experiment=busi_cpu split=kfold split.fold=F split.seed=42 refine_stage=none
crop_stage=none scan_stage=none``.

The scan stage's classifier is a torchvision ResNet-18 trained from scratch on the whole scans (40 epochs). The
multi-task network's ResNet-34 encoder has learnt where lesions are from every training pixel of the same
fold: here the scan classifier is that encoder (a torchvision ResNet-34, one channel, its weights copied from
NETS/F's checkpoint, a new 3-class layer) fine-tuned on the whole scans by the scan stage's loop and settings
(224 px, zoom U(0.85, 1.15), shift up to 8 %, flips, brightness/contrast, AdamW one-cycle, seeded ``--seed`` + fold), for
``--epochs`` (15: a ResNet-34 step costs about twice a ResNet-18's, so about the stage's time). Its held-out
probabilities are joined with SWEEP's two-stage ones by the stage's mean, and paired fold by fold against
SWEEP's scan stage (the recipe's diagnosis). ``--scratch`` trains the same ResNet-34 from scratch instead (the
control). OUT/F/predictions.csv gets the classifier's test probabilities. Test ground truth is read only for the
scores."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import busiseg.models.crop_classifier as crop_classifier
from busiseg.atomic import write_csv_atomic
from busiseg.checkpoint import load_model
from busiseg.data.busi import load_record, root_from_env, scan_busi
from busiseg.data.labels import CLASS_NAMES
from busiseg.models.crop_classifier import make_net, network_encoder, start_from_encoder
from busiseg.models.scan_classifier import ScanSettings, join_scan_probs, scan_probs, train_scan_classifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_scan_classifier import DTYPE, PROBS, read_test  # noqa: E402  (e67's reader of a fold's test rows)


def resnet34_from(ckpt: Path | None) -> torch.nn.Module:
    """ResNet-34, one input channel, 3 outputs; the encoder's weights from ``ckpt`` (None: scratch). Built before
    the fine-tune seeds the RNG, as e78 ran (so its new layer's start is not the one ``init=`` would give)."""
    net = make_net(len(CLASS_NAMES), "resnet34")
    if ckpt is not None:
        start_from_encoder(net, network_encoder(load_model(ckpt)[0]), "resnet34")
    return net


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="k-fold sweep of experiment=busi_cpu (its light files)")
    ap.add_argument("nets", type=Path, help="folder of each fold's network run (NETS/F/checkpoints/last.ckpt)")
    ap.add_argument("out", type=Path, help="folder for each fold's test probabilities")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--size", type=int, default=224, help="input side (px)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--scratch", action="store_true", help="the same ResNet-34 from scratch (the control)")
    ap.add_argument("--seed", type=int, default=42, help="the fine-tune of fold F is seeded SEED + F")
    args = ap.parse_args()
    root = root_from_env()
    for fold in args.folds:
        needs = [args.sweep / str(fold) / n for n in ("split.json", "predictions_two_stage.csv",
                                                        "predictions_scan_stage.csv")]
        needs += [args.nets / str(fold) / "split.json"] + ([] if args.scratch else
                                                            [args.nets / str(fold) / "checkpoints" / "last.ckpt"])
        for need in needs:
            if not need.is_file():
                print(f"error: {need} not found", file=sys.stderr)
                return 2
    torch.set_num_threads(os.cpu_count() or 1)
    records = {r.name: r for r in scan_busi(root)}
    decoded = {name: load_record(r)[0] for name, r in records.items()}
    acc: dict[str, list[float]] = {"scan stage": [], "image": [], "two-stage + image": []}
    for fold in args.folds:
        split = json.loads((args.sweep / str(fold) / "split.json").read_text())
        if json.loads((args.nets / str(fold) / "split.json").read_text())["train"] != split["train"]:
            print(f"error: fold {fold}: {args.nets / str(fold)} was trained on another split", file=sys.stderr)
            return 2
        net = resnet34_from(None if args.scratch else args.nets / str(fold) / "checkpoints" / "last.ckpt")
        crop_classifier.make_net = lambda num_classes=3, arch="resnet18", _net=net: _net  # the loop builds its network here
        settings = ScanSettings(size=args.size, epochs=args.epochs, seed=args.seed + fold)
        train = split["train"]
        t0 = time.time()
        model, history = train_scan_classifier([decoded[n] for n in train], [records[n].label for n in train],
                                               settings, train, autocast=DTYPE)
        fit = time.time() - t0
        two = read_test(args.sweep / str(fold) / "predictions_two_stage.csv")
        stage = read_test(args.sweep / str(fold) / "predictions_scan_stage.csv")
        held = sorted(two)
        if sorted(stage) != held or not set(held) <= set(split["val"]) | set(split.get("test", [])):
            print(f"error: fold {fold}: the predictions CSVs do not test the split's held-out images", file=sys.stderr)
            return 2
        img = scan_probs(model, [decoded[n] for n in held], autocast=DTYPE)
        truth = np.array([records[n].label for n in held])
        probs = {"scan stage": np.stack([stage[n] for n in held]), "image": img,
                 "two-stage + image": join_scan_probs(np.stack([two[n] for n in held]), img)}
        for w, p in probs.items():
            acc[w].append(float((p.argmax(1) == truth).mean()))
        (args.out / str(fold)).mkdir(parents=True, exist_ok=True)
        rows = [{"part": "test", "image": n, "true_class": CLASS_NAMES[truth[i]],
                 "pred_class": CLASS_NAMES[img[i].argmax()], **{k: f"{img[i, j]:.6f}" for j, k in enumerate(PROBS)}}
                for i, n in enumerate(held)]
        write_csv_atomic(args.out / str(fold) / "predictions.csv", rows, list(rows[0]))
        print(f"fold {fold}: {len(train)} training scans, {fit:.0f} s (loss {history[0]:.3f} -> {history[-1]:.3f}); "
              + ", ".join(f"{w} {acc[w][-1]:.3f}" for w in acc), flush=True)
    base = np.array(acc["scan stage"])
    sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    print(f"\n{len(base)} folds, mean +- std; paired = minus SWEEP's scan stage, fold by fold")
    print("| way | accuracy | paired | folds better / worse |")
    print("|---|---|---|---|")
    for w, a in acc.items():
        a = np.array(a)
        d = a - base
        print(f"| {w} | {a.mean():.4f} +- {sd(a):.4f} | {d.mean():+.4f} +- {sd(d):.4f} "
              f"({', '.join(f'{v:+.3f}' for v in d)}) | {int((d > 0).sum())} / {int((d < 0).sum())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
