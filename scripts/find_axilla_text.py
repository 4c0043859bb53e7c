"""Find the BUSI scans labelled as axilla scans on the image: the candidates behind conf/exclude/busi_axilla.yaml.
(docs/data.md, docs/results.md e63)

    BUSI_ROOT=/path/to/Dataset_BUSI_with_GT python scripts/find_axilla_text.py \
        [--out candidates.csv] [--figure candidates.png]

BUSI holds scans of the axilla (the armpit; many show a lymph node), not of the breast, filed under benign and
malignant (Pawłowska et al., Data in Brief 48, 2023). The scanner burned a label into many of them ("RT AXILLA",
"LT AXILLA", "rt axilla", "LT AX"). Two templates of that label are cut at run time from two scans of the folder
(nothing of the dataset is stored in the repository): the capitals "AXILLA" from benign (223).png, the lower-case
"axilla" from benign (243).png. Each image's score is the best normalised cross-correlation of a template with
the image over 0.5-1.6x its size (scans were rescaled). Candidates are the images at or above a template's
threshold; on the development set every other image scores below 0.50 (capitals) and 0.64 (lower case), the
candidates 0.59-1.0. A candidate is a place to look, not a verdict: check each by eye (--figure) before listing
it. The scans that carry no label are not found; nor is a label in another font.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from busiseg.atomic import write_csv_atomic
from busiseg.data.busi import root_from_env, scan_busi

# (name, image, rows, cols, threshold): the label's box in that image, in its own pixels
TEMPLATES = (
    ("AXILLA", "benign/benign (223).png", (426, 449), (126, 216), 0.55),
    ("axilla", "benign/benign (243).png", (297, 318), (115, 168), 0.70),
)
SCALES = tuple(np.round(np.linspace(0.5, 1.6, 23), 2))  # steps of 0.05


def read_grey(path: Path) -> np.ndarray:
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise OSError(f"{path}: cannot be read as an image")
    return grey


def label_score(grey: np.ndarray, template: np.ndarray, scales=SCALES) -> float:
    """The best normalised cross-correlation (TM_CCOEFF_NORMED) of ``template``, resized by each scale, with
    ``grey``; 0 when no scale fits inside the image."""
    best = 0.0
    for s in scales:
        t = cv2.resize(template, None, fx=float(s), fy=float(s), interpolation=cv2.INTER_AREA)
        if t.shape[0] < 6 or t.shape[0] >= grey.shape[0] or t.shape[1] >= grey.shape[1]:
            continue
        best = max(best, float(cv2.matchTemplate(grey, t, cv2.TM_CCOEFF_NORMED).max()))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="every image's scores (CSV) here")
    ap.add_argument("--figure", type=Path, help="a PNG of the candidates, to check by eye")
    args = ap.parse_args()
    root = root_from_env()
    records = scan_busi(root)
    templates = []
    for label, image, (r0, r1), (c0, c1), threshold in TEMPLATES:
        path = Path(root) / image
        if not path.is_file():
            print(f"error: {path} not found: the templates are cut from it", file=sys.stderr)
            return 2
        templates.append((label, read_grey(path)[r0:r1, c0:c1], threshold))
    rows, candidates = [], []
    for i, record in enumerate(records, 1):
        grey = read_grey(record.image)
        scores = {label: label_score(grey, t) for label, t, _ in templates}
        hit = [label for label, _, threshold in templates if scores[label] >= threshold]
        rows.append({"image": record.name, **{k: f"{v:.3f}" for k, v in scores.items()}, "candidate": int(bool(hit))})
        if hit:
            candidates.append(record)
        if i % 100 == 0 or i == len(records):
            print(f"{i}/{len(records)} images, {len(candidates)} candidate(s)", flush=True)
    for record in candidates:
        print(record.name)
    if args.out:
        write_csv_atomic(args.out, rows, list(rows[0]))
        print(f"scores: {args.out}")
    if args.figure and candidates:
        from matplotlib.figure import Figure

        cols = 6
        fig = Figure(figsize=(3 * cols, 2.6 * -(-len(candidates) // cols)))
        for k, record in enumerate(candidates):
            ax = fig.add_subplot(-(-len(candidates) // cols), cols, k + 1)
            ax.imshow(read_grey(record.image), cmap="gray")
            ax.set_title(record.name, fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure, dpi=70)
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
