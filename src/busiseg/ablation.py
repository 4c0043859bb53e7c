"""Ablation table: several k-fold sweeps of one recipe that differ in one choice, compared fold by fold.

    python -m busiseg.ablation seg_only=logs/ablation/seg_only mse=logs/ablation/mse \\
        ce=logs/ablation/ce uncertainty=logs/ablation/uncertainty cls_only=logs/ablation/cls_only \\
        --reference seg_only --out docs/ablation

Each ``NAME=DIR`` is a sweep dir that ``busiseg.cv_summary`` can read (its fold runs). The arms
must share one fold assignment (same data, seed and k), so that fold f of every arm held out the
same images; the comparison is then paired: for each fold, an arm's lesion-image Dice minus the
reference arm's. Writes ``ablation.md`` and ``ablation.json`` into ``--out`` and prints the table.
Arms whose segmentation is not trained (``cls_only``) show only the classification metrics,
arms whose class head is not trained (``seg_only``) only the segmentation metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from busiseg.atomic import write_json_atomic, write_text_atomic
from busiseg.cv_summary import CVSummaryError, _mean_std, summarize

log = logging.getLogger("busiseg.ablation")

SEG_METRICS = ("test/dice_per_image_lesion", "test/dice_per_image_benign", "test/dice_per_image_malignant",
               "test/dice", "test/iou")
CLS_METRICS = ("test/accuracy", "test/recall_normal", "test/recall_benign", "test/recall_malignant",
               "test/f1_macro", "test/auroc_macro")
PAIRED = "test/dice_per_image_lesion"
PAIRED_CLS = "test/accuracy"
# arms that train no segmentation (their mask metrics are not shown) / no classification
# (their class head keeps its zero initialisation: uniform probabilities, argmax "normal")
CLS_ONLY_ARMS = ("cls_only",)
SEG_ONLY_ARMS = ("seg_only",)


class AblationError(ValueError):
    """The arms cannot be compared; the message names the arm at fault."""


def compare(arms: Mapping[str, str | Path], reference: str) -> dict[str, Any]:
    """Summaries of every arm and the per-fold paired differences against ``reference``."""
    if reference not in arms:
        raise AblationError(f"--reference {reference!r} is not one of the arms {', '.join(arms)}")
    summaries: dict[str, dict[str, Any]] = {}
    for name, directory in arms.items():
        try:
            summaries[name] = summarize(directory, write=False)  # the arms' folders are only read
        except CVSummaryError as exc:
            raise AblationError(f"arm {name}: {exc}") from exc
    assignments = {name: _assignment(s) for name, s in summaries.items()}
    if len(set(assignments.values())) > 1:
        raise AblationError("the arms use different fold assignments, so their folds are not paired: "
                            + ", ".join(f"{n} {a}" for n, a in assignments.items()))
    ref = summaries[reference]
    out: dict[str, Any] = {"reference": reference, "arms": {}}
    for name, s in summaries.items():
        folds = sorted(set(s["folds"]) & set(ref["folds"]))
        arm: dict[str, Any] = {
            "directory": str(arms[name]),
            "folds": s["folds"],
            "missing_folds": s["missing_folds"],
            "fit_minutes_per_fold": _fit_minutes(s),
            "mean": {m: s["mean"].get(m) for m in SEG_METRICS + CLS_METRICS},
            "std": {m: s["std"].get(m) for m in SEG_METRICS + CLS_METRICS},
        }
        for metric, key in ((PAIRED, "paired_dice"), (PAIRED_CLS, "paired_accuracy")):
            diffs = {f: _diff(s["per_fold"][f].get(metric), ref["per_fold"][f].get(metric)) for f in folds}
            mean, std = _mean_std(list(diffs.values()))
            arm[key] = {"metric": metric, "per_fold": diffs, "mean": mean, "std": std,
                        "folds_better": sum(1 for d in diffs.values() if d is not None and d > 0)}
        out["arms"][name] = arm
    return out


def _assignment(summary: Mapping[str, Any]) -> str | None:
    run = next(iter(summary["runs"].values()))
    return json.loads((Path(run) / "split.json").read_text())["meta"].get("assignment")


def _fit_minutes(summary: Mapping[str, Any]) -> float | None:
    minutes = []
    for run in summary["runs"].values():
        try:
            minutes.append(json.loads((Path(run) / "metrics.json").read_text())["fit_seconds"] / 60.0)
        except (OSError, KeyError, ValueError):
            return None
    return sum(minutes) / len(minutes) if minutes else None


def _diff(a: Any, b: Any) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return float(a) - float(b)


def _pm(mean: Any, std: Any, signed: bool = False) -> str:
    """``mean +- std`` to 3 decimals; ``signed`` writes the sign of a difference (+0.020, like the folds')."""
    if mean is None or not math.isfinite(mean):
        return "-"
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return f"{text} +- {std:.3f}" if std is not None and math.isfinite(std) else text


def render_markdown(result: Mapping[str, Any]) -> str:
    ref = result["reference"]
    arms = result["arms"]
    lines = ["| arm | folds | " + " | ".join(m.removeprefix("test/") for m in SEG_METRICS + CLS_METRICS)
             + " | min/fold |", "|---|---|" + "---|" * (len(SEG_METRICS) + len(CLS_METRICS) + 1)]
    for name, a in arms.items():
        seg = ["n/a"] * len(SEG_METRICS) if name in CLS_ONLY_ARMS else [_pm(a["mean"][m], a["std"][m]) for m in SEG_METRICS]
        cls = ["n/a"] * len(CLS_METRICS) if name in SEG_ONLY_ARMS else [_pm(a["mean"][m], a["std"][m]) for m in CLS_METRICS]
        minutes = f"{a['fit_minutes_per_fold']:.1f}" if a["fit_minutes_per_fold"] is not None else "-"
        lines.append(f"| {name} | {len(a['folds'])} | " + " | ".join(seg + cls) + f" | {minutes} |")
    folds = sorted({f for a in arms.values() for f in a["paired_dice"]["per_fold"]})
    lines += ["", f"Paired per-fold difference against `{ref}` (arm minus {ref}; same folds, same images):", "",
              "| arm | metric | " + " | ".join(f"fold {f}" for f in folds) + " | mean +- std | folds better |",
              "|---|---|" + "---|" * (len(folds) + 2)]
    for name, a in arms.items():
        if name == ref:
            continue
        for key in ("paired_dice", "paired_accuracy"):
            p = a[key]
            if key == "paired_dice" and (name in CLS_ONLY_ARMS or ref in CLS_ONLY_ARMS):
                continue  # a classifier-only arm's decoder is untrained: no meaningful Dice difference
            if key == "paired_accuracy" and ref in SEG_ONLY_ARMS:
                continue  # the reference's class head is untrained: no meaningful accuracy difference
            cells = [f"{p['per_fold'][f]:+.3f}" if p["per_fold"].get(f) is not None else "-" for f in folds]
            n = sum(1 for v in p["per_fold"].values() if v is not None)
            lines.append(f"| {name} | {p['metric'].removeprefix('test/')} | " + " | ".join(cells)
                         + f" | {_pm(p['mean'], p['std'], signed=True)} | {p['folds_better']}/{n} |")
    return "\n".join(lines) + "\n"


def _parse_arm(text: str) -> tuple[str, Path]:
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SWEEP_DIR")
    return name, Path(directory)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m busiseg.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("arms", nargs="+", type=_parse_arm, help="NAME=SWEEP_DIR, one per arm")
    parser.add_argument("--reference", default="seg_only", help="the arm the others are paired against")
    parser.add_argument("--out", type=Path, default=None, help="write ablation.md / ablation.json here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    arms = dict(args.arms)
    try:
        result = compare(arms, args.reference)
    except AblationError as exc:
        print(f"busiseg: error: {exc}", file=sys.stderr)
        return 2
    text = render_markdown(result)
    print(text, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out / "ablation.md", text)
        write_json_atomic(args.out / "ablation.json", result, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
