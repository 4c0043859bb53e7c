"""Probe: does the scan classifier read better at several zooms at test time? (docs/results.md, x11)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/probe_scan_tta.py SWEEP SCAN \
        [--zooms 0.9,1.0,1.1 0.85,1.0,1.15 ...] [--folds 0 1 2 3 4]

SWEEP is a k-fold sweep of ``experiment=busi_cpu`` (SWEEP/F/split.json, predictions_two_stage.csv); SCAN a
folder of its scan classifiers (SCAN/F/scan_classifier.pt: the scan stage's or ``scripts/probe_scan_classifier.py``'s,
trained on the same folds' training parts). The scan stage reads each held-out scan once, whole (its square at
zoom 1.0, and mirrored); the classifier was trained on squares zoomed by U(0.85, 1.15). Here the same
classifiers read each scan at every zoom of a set (each also mirrored; probabilities averaged), and the recipe's
diagnosis, the mean of that and the two-stage probabilities, is paired fold by fold against the stage's one
zoom. Nothing is trained; the test part's classes are read only for the scores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from busiseg.data.busi import load_record, root_from_env, scan_busi
from busiseg.models.scan_classifier import join_scan_probs, load_scan_classifier, scan_probs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_scan_classifier import DTYPE, read_test  # noqa: E402


def zoom_set(text: str) -> tuple[float, ...]:
    """'0.9,1.0,1.1' -> (0.9, 1.0, 1.1); each zoom within (0, 3]."""
    try:
        zooms = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: zooms are numbers separated by commas, e.g. 0.9,1.0,1.1")
    if not zooms or any(not 0 < z <= 3 for z in zooms):
        raise argparse.ArgumentTypeError(f"{text!r}: each zoom must be in (0, 3]")
    return zooms


def paired_table(acc: dict[str, list[float]], base: str) -> list[str]:
    """Markdown rows: each way's accuracy (mean +- std over folds) and its fold-by-fold difference to ``base``."""
    sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    ref = np.array(acc[base])
    rows = ["| zooms | accuracy | paired | folds better / worse |", "|---|---|---|---|"]
    for way, values in acc.items():
        a = np.array(values)
        d = a - ref
        rows.append(f"| {way} | {a.mean():.4f} +- {sd(a):.4f} | {d.mean():+.4f} +- {sd(d):.4f} "
                    f"({', '.join(f'{v:+.3f}' for v in d)}) | {int((d > 0).sum())} / {int((d < 0).sum())} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="k-fold sweep of experiment=busi_cpu (one run per fold)")
    ap.add_argument("scan", type=Path, help="folder of the same folds' scan classifiers (F/scan_classifier.pt)")
    ap.add_argument("--zooms", type=zoom_set, nargs="+", default=[(0.9, 1.0, 1.1), (0.85, 1.0, 1.15)],
                    help="zoom sets to try, each comma-separated (the stage's own, 1.0, is always the reference)")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    root = root_from_env()
    for fold in args.folds:
        for need in (args.sweep / str(fold) / "split.json", args.sweep / str(fold) / "predictions_two_stage.csv",
                     args.scan / str(fold) / "scan_classifier.pt"):
            if not need.is_file():
                print(f"error: {need} not found", file=sys.stderr)
                return 2
    torch.set_num_threads(os.cpu_count() or 1)
    records = {r.name: r for r in scan_busi(root)}
    sets = [(1.0,)] + [z for z in args.zooms if z != (1.0,)]
    ways = [",".join(f"{z:g}" for z in s) for s in sets]
    acc: dict[str, list[float]] = {w: [] for w in ways}
    for fold in args.folds:
        run = args.sweep / str(fold)
        split = json.loads((run / "split.json").read_text())
        held_out = set(split["val"]) | set(split.get("test", []))
        two = read_test(run / "predictions_two_stage.csv")
        names = sorted(two)
        if not set(names) <= held_out:
            print(f"error: {run / 'predictions_two_stage.csv'} tests images outside the split's held-out part",
                  file=sys.stderr)
            return 2
        model = load_scan_classifier(args.scan / str(fold) / "scan_classifier.pt")
        unseen = set(names) - set(model.trained_on)
        if unseen != set(names):
            print(f"error: fold {fold}: the scan classifier was trained on {len(names) - len(unseen)} of the test "
                  "images (another fold's?)", file=sys.stderr)
            return 2
        images = [load_record(records[n])[0] for n in names]
        truth = np.array([records[n].label for n in names])
        p_two = np.stack([two[n] for n in names])
        line = []
        for way, zooms in zip(ways, sets):
            model.settings.test_margins = zooms
            probs = join_scan_probs(p_two, scan_probs(model, images, autocast=DTYPE))
            acc[way].append(float((probs.argmax(1) == truth).mean()))
            line.append(f"{way}: {acc[way][-1]:.3f}")
        print(f"fold {fold} ({len(names)} test scans): " + "; ".join(line), flush=True)
    print(f"\n{args.sweep} with {args.scan}: the recipe's diagnosis (two-stage + scan) / 2, the scan classifier "
          f"reading each scan at the zooms given; paired = minus zoom 1 (the stage's), fold by fold")
    print("\n".join(paired_table(acc, ways[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
