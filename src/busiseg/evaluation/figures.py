"""The evaluation's figures, each rendered to an RGB array (matplotlib's Agg canvas, no pyplot).

Every function takes plain arrays and returns ``HxWx3 uint8``; write it with
``busiseg.models.reporting.save_png``. Colours of masks follow
``busiseg.models.reporting`` (green = true lesion, red/magenta = predicted lesion).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from busiseg.data.labels import CLASS_NAMES
from busiseg.evaluation.metrics_table import auroc, calibration_bins, roc_curve
from busiseg.models.reporting import PRED_COLOR, PRED_FILL_ALPHA, TRUE_COLOR, contour, overlay_mask

__all__ = ["confusion_matrix_figure", "dice_distribution_figure", "reliability_figure", "roc_figure",
           "sample_grid_figure"]

DPI = 100
CLASS_COLORS = {"normal": "#4c72b0", "benign": "#55a868", "malignant": "#c44e52"}
_RIGHT = "#1b7a2f"
_WRONG = "#c81e1e"
_STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "figure.titlesize": 14,
          "figure.titleweight": "bold", "legend.fontsize": 10}


def _color(name: str, k: int) -> str:
    return CLASS_COLORS.get(name, f"C{k}")


def _render(fig: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def _new(figsize: tuple[float, float]) -> Figure:
    return Figure(figsize=figsize, dpi=DPI, facecolor="white", layout="constrained")


# --------------------------------------------------------------------------- confusion matrix
def confusion_matrix_figure(cm: np.ndarray, class_names: Sequence[str] = CLASS_NAMES, subtitle: str = "") -> np.ndarray:
    """Two panels: counts, and row-normalised (each row sums to 1: recall per true class)."""
    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(rows > 0, cm / np.maximum(rows, 1), np.nan)
    k = len(class_names)
    with rc_context(_STYLE):
        fig = _new((5.2 * 2 + 0.8, 4.9))
        fig.get_layout_engine().set(w_pad=0.12, wspace=0.08)  # the right panel's label clear of the left colour bar
        axes = fig.subplots(1, 2)
        panels = ((cm.astype(np.float64), "Counts", lambda i, j: f"{cm[i, j]:d}", max(1, int(cm.max(initial=0)))),
                  (norm, "Row-normalised (fraction of each true class)",
                   lambda i, j: "–" if np.isnan(norm[i, j]) else f"{norm[i, j]:.2f}", 1.0))
        for ax, (values, title, text, vmax) in zip(axes, panels):
            im = ax.imshow(np.nan_to_num(values), cmap="Blues", vmin=0, vmax=vmax)
            for i in range(k):
                for j in range(k):
                    v = np.nan_to_num(values[i, j])
                    ax.text(j, i, text(i, j), ha="center", va="center", fontsize=13, fontweight="bold",
                            color="white" if v > 0.55 * vmax else "#111111")
            ax.set_xticks(range(k), class_names)
            ax.set_yticks(range(k), class_names)
            ax.set_xlabel("Predicted class")
            ax.set_ylabel("True class")
            ax.set_title(title)
            fig.colorbar(im, ax=ax, shrink=0.8)
        fig.suptitle("Confusion matrix" + (f"\n{subtitle}" if subtitle else ""))
        return _render(fig)


# --------------------------------------------------------------------------- ROC
def roc_figure(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str] = CLASS_NAMES,
               subtitle: str = "") -> np.ndarray:
    """One-vs-rest ROC curve per class, AUROC and the number of positives in the legend."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    with rc_context(_STYLE):
        fig = _new((6.4, 6.0))
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1], ls="--", color="#888888", lw=1.2, label="chance (AUROC 0.5)")
        for k, name in enumerate(class_names):
            positive = labels == k
            n_pos = int(positive.sum())
            if n_pos == 0 or n_pos == labels.size:
                ax.plot([], [], color=_color(name, k), lw=2.2,
                        label=f"{name}: n/a ({'no' if n_pos == 0 else 'only'} positives)")
                continue
            fpr, tpr, _ = roc_curve(positive, probs[:, k])
            ax.plot(fpr, tpr, color=_color(name, k), lw=2.2, drawstyle="default",
                    label=f"{name}: AUROC {auroc(positive, probs[:, k]):.3f} ({n_pos} pos / {labels.size - n_pos} neg)")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.set_xlabel("False positive rate (1 − specificity)")
        ax.set_ylabel("True positive rate (sensitivity)")
        ax.legend(loc="lower right", framealpha=0.95)
        fig.suptitle("ROC curves, one class vs the rest" + (f"\n{subtitle}" if subtitle else ""))
        return _render(fig)


# --------------------------------------------------------------------------- calibration
def reliability_figure(probs: np.ndarray, labels: np.ndarray, n_bins: int, ece: float | None,
                       subtitle: str = "") -> np.ndarray:
    """Accuracy against mean confidence of the predicted class per bin, with the count per bin below."""
    bins = calibration_bins(probs, labels, n_bins)
    edges = bins["edges"]
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    used = bins["count"] > 0
    with rc_context(_STYLE):
        fig = _new((6.6, 7.2))
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        top.plot([0, 1], [0, 1], ls="--", color="#888888", lw=1.2, label="perfect calibration")
        top.bar(centers[used], bins["accuracy"][used], width=width * 0.95, color="#4c72b0", alpha=0.85,
                edgecolor="#2a4a7f", label="accuracy in bin")
        gap_lo = np.minimum(bins["accuracy"], bins["confidence"])[used]
        gap_hi = np.maximum(bins["accuracy"], bins["confidence"])[used]
        top.bar(centers[used], gap_hi - gap_lo, bottom=gap_lo, width=width * 0.95, color="none",
                edgecolor="#c44e52", hatch="//", lw=1.0, label="gap to mean confidence")
        top.scatter(bins["confidence"][used], bins["accuracy"][used], color="#c44e52", zorder=3, s=22,
                    label="(mean confidence, accuracy)")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1.02)
        top.set_ylabel("Accuracy")
        top.grid(alpha=0.3)
        top.legend(loc="upper left", framealpha=0.95)
        bottom.bar(centers, bins["count"], width=width * 0.95, color="#8c8c8c")
        bottom.set_ylabel("Images")
        bottom.set_xlabel("Confidence (probability of the predicted class)")
        bottom.grid(alpha=0.3, axis="y")
        ece_text = "n/a" if ece is None else f"{ece:.3f}"
        fig.suptitle(f"Reliability diagram — ECE {ece_text} ({n_bins} bins)" + (f"\n{subtitle}" if subtitle else ""))
        return _render(fig)


# --------------------------------------------------------------------------- Dice
def dice_distribution_figure(dice: np.ndarray, labels: np.ndarray, class_names: Sequence[str] = CLASS_NAMES,
                             subtitle: str = "", seed: int = 0) -> np.ndarray:
    """Per-image Dice by true class: box plot, every image as a dot, the mean as a diamond."""
    dice = np.asarray(dice, dtype=np.float64)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    with rc_context(_STYLE):
        fig = _new((7.4, 5.4))
        ax = fig.subplots()
        groups = [dice[labels == k] for k in range(len(class_names))]
        positions = np.arange(1, len(class_names) + 1)
        ax.boxplot([g if g.size else [np.nan] for g in groups], positions=positions, widths=0.5,
                   showfliers=False, medianprops={"color": "#222222", "lw": 1.8})
        ticks = []
        for pos, g, (k, name) in zip(positions, groups, enumerate(class_names)):
            if not g.size:
                ticks.append(f"{name}\nno images")
                continue
            jitter = rng.uniform(-0.16, 0.16, size=g.size)
            ax.scatter(pos + jitter, g, s=18, alpha=0.65, color=_color(name, k), edgecolor="none", zorder=3)
            ax.scatter([pos], [g.mean()], marker="D", s=70, color="white", edgecolor="#111111", zorder=4)
            ticks.append(f"{name}\nn={g.size}\nmean {g.mean():.3f}")  # one item a line: no run-together labels
        ax.set_xticks(positions, ticks)
        ax.set_xlim(0.4, len(class_names) + 0.6)
        ax.set_ylim(-0.04, 1.04)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel("Dice per image")
        ax.set_xlabel("True class\n(normal images have no lesion: Dice 1 if the predicted mask is empty, else 0)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(handles=[Line2D([], [], marker="D", ls="none", markerfacecolor="white", markeredgecolor="#111111",
                                  label="mean"),
                           Line2D([], [], color="#222222", lw=1.8, label="median\n(box: quartiles)")],
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.95)
        fig.suptitle("Dice per image by true class" + (f"\n{subtitle}" if subtitle else ""))
        return _render(fig)


# --------------------------------------------------------------------------- sample grids
def _fill(image: np.ndarray, mask: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Grey image with the mask filled translucent in ``color`` and outlined."""
    rgb = overlay_mask(image, None, None).astype(np.float32)
    if mask.any():
        rgb[mask] = (1 - PRED_FILL_ALPHA) * rgb[mask] + PRED_FILL_ALPHA * color
        rgb[contour(mask, max(1, round(max(mask.shape) / 150)))] = color
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def sample_grid_figure(images: Sequence[np.ndarray], true_masks: Sequence[np.ndarray],
                       pred_masks: Sequence[np.ndarray], true_labels: Sequence[int], pred_labels: Sequence[int],
                       probs: np.ndarray, names: Sequence[str], dice: Sequence[float], title: str,
                       class_names: Sequence[str] = CLASS_NAMES, per_row: int = 2) -> np.ndarray:
    """Per sample three panels, image | true mask | predicted mask, ``per_row`` samples a row.

    The image panel's title names the file and both classes (green: class right, red:
    wrong); the mask panels give the lesion area in pixels and the Dice.
    """
    n = len(images)
    if n == 0:
        raise ValueError("sample_grid_figure needs at least one image")
    probs = np.asarray(probs, dtype=np.float64)
    per_row = max(1, min(per_row, n))
    nrows = -(-n // per_row)
    panel, gap = 2.5, 0.35
    ncols = 3 * per_row + per_row - 1  # a narrow empty column between samples
    ratios = ([1, 1, 1, gap / panel] * per_row)[:ncols]
    with rc_context({**_STYLE, "axes.titlesize": 9.5}):
        fig = _new((per_row * 3 * panel + (per_row - 1) * gap, nrows * (panel + 0.7) + 0.9))
        axes = fig.subplots(nrows, ncols, squeeze=False, width_ratios=ratios)
        for ax in axes.flat:
            ax.set_axis_off()
        titles = []
        for idx in range(n):
            r, c = divmod(idx, per_row)
            a0, a1, a2 = axes[r, 4 * c : 4 * c + 3]
            image, true, pred = images[idx], np.asarray(true_masks[idx], bool), np.asarray(pred_masks[idx], bool)
            t, p = int(true_labels[idx]), int(pred_labels[idx])
            a0.imshow(overlay_mask(image, None, None))
            name = names[idx].rsplit("/", 1)[-1]  # the class folder is in the next line anyway
            titles.append(a0.set_title(f"{name}\ntrue {class_names[t]} | pred {class_names[p]} {probs[idx, p]:.2f}",
                                       color=_RIGHT if t == p else _WRONG, fontweight="bold"))
            a1.imshow(_fill(image, true, TRUE_COLOR))
            a1.set_title(f"true mask\n{int(true.sum())} px")
            a2.imshow(overlay_mask(image, true, pred))
            a2.set_title(f"predicted mask\n{int(pred.sum())} px, Dice {dice[idx]:.3f}")
        handles = [
            Patch(facecolor=(*(TRUE_COLOR / 255), PRED_FILL_ALPHA), edgecolor=TRUE_COLOR / 255, lw=2,
                  label="true lesion (green; outline on the prediction panel)"),
            Patch(facecolor=(*(PRED_COLOR / 255), PRED_FILL_ALPHA), edgecolor=PRED_COLOR / 255, lw=2,
                  label="predicted lesion (red)"),
            Line2D([], [], ls="none", label="file title: green = class right, red = wrong"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False)
        fig.suptitle(title)
        _shrink_to_fit(fig, titles)
        return _render(fig)


def _shrink_to_fit(fig: Figure, titles: list, min_size: float = 6.5) -> None:
    """Shrink axes titles wider than their axes (long file names) until they fit."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # lays the axes out
    renderer = canvas.get_renderer()
    for text in titles:
        size = text.get_fontsize()
        width = text.axes.get_window_extent(renderer).width
        while size > min_size and text.get_window_extent(renderer).width > width:
            size -= 0.5
            text.set_fontsize(size)
    if titles:  # one size for all, so the grid reads evenly
        smallest = min(t.get_fontsize() for t in titles)
        for text in titles:
            text.set_fontsize(smallest)
