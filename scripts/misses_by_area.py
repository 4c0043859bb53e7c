"""Whole misses (lesion-image Dice < 0.05) by quarter of lesion area, from k-fold sweeps' out-of-fold predictions.

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/misses_by_area.py logs/recipe/e16_one_cycle [...]

Each argument is a sweep dir with oof_predictions.csv (python -m busiseg.cv_summary SWEEP writes it).
Lesion area = share of the mask at the sweep's training size (the cache's resize), from data.image_size
of its first fold's config.yaml.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import yaml

from busiseg.data.busi import root_from_env, scan_busi
from busiseg.data.dataset import DecodedCache


def main(sweeps: list[str]) -> int:
    root = root_from_env()
    records = scan_busi(root)
    for sweep in map(Path, sweeps):
        oof = sweep / "oof_predictions.csv"
        if not oof.is_file():
            print(f"error: {oof} not found (run python -m busiseg.cv_summary {sweep})", file=sys.stderr)
            return 2
        config = next(sweep.glob("*/config.yaml"))
        size = int(yaml.safe_load(config.read_text())["data"]["image_size"])
        cache = DecodedCache(records, size, progress=False)
        area = {r.name: float(cache.masks[i].mean()) for i, r in enumerate(records)}
        rows = [r for r in csv.DictReader(open(oof)) if r["true_class"] != "normal"]
        a = np.array([area[r["image"]] for r in rows])
        d = np.array([float(r["dice"]) for r in rows])
        q = np.quantile(a, [0, 0.25, 0.5, 0.75, 1])
        print(f"{sweep} ({size} px): {len(rows)} lesion images, {(d < 0.05).sum()} whole misses")
        for k, (lo, hi) in enumerate(zip(q[:-1], q[1:])):
            m = (a >= lo) & (a <= hi) if k == 3 else (a >= lo) & (a < hi)
            print(f"  area {100 * lo:5.2f}-{100 * hi:5.2f} %: {m.sum():3d} images, mean Dice {d[m].mean():.3f}, "
                  f"misses {(d[m] < 0.05).sum():3d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
