"""``report.html``: one self-contained page (inline CSS, figures as base64 PNG) with the
run's settings, the headline table, per-class tables and every figure."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from busiseg.data.labels import CLASS_NAMES

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1180px; color: #1d1d1f; line-height: 1.45; padding: 0 16px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 34px;
     border-bottom: 2px solid #e3e3e3; padding-bottom: 4px; } h3 { font-size: 16px; margin-top: 20px; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 10px 0 6px; font-size: 14px; }
th, td { border: 1px solid #d6d6d6; padding: 5px 10px; text-align: right; }
th { background: #f1f3f6; } td.k, th.k { text-align: left; }
tr.section td { background: #fafafa; font-weight: 600; text-align: left; }
table.facts td { text-align: left; } td.span { text-align: center; }
.note { color: #555; font-size: 13px; max-width: 1000px; }
.ok { color: #1b7a2f; font-weight: 600; } .bad { color: #c81e1e; font-weight: 600; }
figure { margin: 18px 0; } figure img { max-width: 100%; border: 1px solid #e3e3e3; }
figcaption { color: #555; font-size: 13px; }
pre { background: #f7f7f9; border: 1px solid #e3e3e3; padding: 10px; font-size: 13px; overflow-x: auto; }
details summary { cursor: pointer; font-weight: 600; margin: 8px 0; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; align-items: start; }
"""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return _esc(v)


@dataclass(frozen=True)
class Span:
    """A table cell spanning ``columns`` columns."""

    value: Any
    columns: int


def table(header: Sequence[str] | None, rows: Sequence[Sequence[Any] | str], first_col_left: bool = True,
          digits: int = 4, css_class: str = "") -> str:
    """An HTML table (no header row when ``header`` is None); a row that is a single
    string is a section heading spanning the table; a :class:`Span` cell spans columns."""
    out = [f'<table class="{css_class}">' if css_class else "<table>"]
    if header is not None:
        out.append("<thead><tr>")
        out += [f'<th class="{"k" if i == 0 and first_col_left else ""}">{_esc(h)}</th>' for i, h in enumerate(header)]
        out.append("</tr></thead>")
    out.append("<tbody>")
    width = len(header) if header is not None else max((len(r) for r in rows if not isinstance(r, str)), default=1)
    for row in rows:
        if isinstance(row, str):
            out.append(f'<tr class="section"><td colspan="{width}">{_esc(row)}</td></tr>')
            continue
        cells = []
        for i, v in enumerate(row):
            if isinstance(v, Span):
                cells.append(f'<td class="span" colspan="{v.columns}">{_num(v.value, digits)}</td>')
            else:
                cells.append(f'<td class="{"k" if i == 0 and first_col_left else ""}">'
                             f'{_num(v, digits) if i else _esc(v)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def folded(summary: str, text: str) -> str:
    """Preformatted text behind a click."""
    return f"<details><summary>{_esc(summary)}</summary><pre>{_esc(text)}</pre></details>"


def embed_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_report(*, title: str, facts: Sequence[tuple[str, Any]], headline: str, sections: Sequence[tuple[str, str]],
                  figures: Sequence[tuple[str, Path, str]], configs: Sequence[tuple[str, str]],
                  notes: str = "") -> str:
    """Assemble the page. ``sections``: (heading, HTML); ``figures``: (heading, PNG path,
    caption); ``configs``: (summary, YAML text), shown folded."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        table(None, facts, css_class="facts"),
        "<h2>Headline</h2>",
        headline,
    ]
    if notes:
        parts.append(f'<p class="note">{notes}</p>')
    for heading, body in sections:
        parts += [f"<h2>{_esc(heading)}</h2>", body]
    parts.append("<h2>Figures</h2>")
    for heading, path, caption in figures:
        parts += [f"<figure><h3>{_esc(heading)}</h3>",
                  f'<img src="{embed_png(path)}" alt="{_esc(heading)}">',
                  f"<figcaption>{_esc(caption)}</figcaption></figure>"]
    parts.append("<h2>Configuration</h2>")
    parts += [folded(summary, text) for summary, text in configs]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def per_class_rows(seg: dict, class_names: Sequence[str] = CLASS_NAMES) -> list[list[Any]]:
    """Rows of the per-class segmentation table from one view's segmentation summary."""
    rows = []
    for group in ("overall", *class_names):
        g = seg[group]
        rows.append([group, g["images"], g["dice_per_image"], g["dice"], g["iou_per_image"], g["iou"],
                     g["sensitivity"], g["specificity"], g["precision"], g["hd95"], g["hd95_median"],
                     g["empty_predictions_on_lesion_images"]])
    return rows


PER_CLASS_HEADER = ("class", "images", "Dice / image", "Dice (pixels)", "IoU / image", "IoU (pixels)",
                    "sensitivity", "specificity", "precision", "HD95 mean (px)", "HD95 median (px)",
                    "missed lesions")


# --------------------------------------------------------------------------- the page from metrics.json
SEG_ROWS = (
    ("Dice, mean per image", "dice_per_image"),
    ("Dice, pixels pooled", "dice"),
    ("IoU, mean per image", "iou_per_image"),
    ("IoU, pixels pooled", "iou"),
    ("Sensitivity, pixels pooled", "sensitivity"),
    ("Specificity, pixels pooled", "specificity"),
    ("Precision, pixels pooled", "precision"),
    ("HD95 (px), lesion images, mean", "hd95"),
    ("Missed lesions (empty prediction)", "empty_predictions_on_lesion_images"),
)
CLS_ROWS = (
    ("Accuracy", ("accuracy",)),
    ("Precision, macro", ("macro", "precision")),
    ("Recall (sensitivity), macro", ("macro", "recall")),
    ("F1, macro", ("macro", "f1")),
    ("Specificity, macro", ("macro", "specificity")),
    ("AUROC, macro", ("macro", "auroc")),
    ("F1, weighted", ("weighted", "f1")),
    ("Expected calibration error", ("ece",)),
    ("Brier score", ("brier",)),
)


def _dig(d: dict, keys: Sequence[str]) -> Any:
    for k in keys:
        d = d[k]
    return d


def view_label(pipeline: str, size: str, image_size: int) -> str:
    where = f"{image_size}×{image_size}" if size == "preprocessed" else "original size"
    extra = " (as training)" if (pipeline, size) == ("raw", "preprocessed") else ""
    return f"{pipeline}, {where}{extra}"


def headline_table(metrics: dict, sizes: Sequence[str] = ("preprocessed", "original")) -> str:
    """Metrics down, views (pipeline × size) across."""
    views = [(p, s) for p in metrics["pipelines"] for s in sizes]
    header = ["metric", *(view_label(p, s, metrics["image_size"]) for p, s in views)]
    rows: list[Any] = ["Segmentation (overall)"]
    for label, key in SEG_ROWS:
        rows.append([label, *(metrics[p]["segmentation"][s]["overall"][key] for p, s in views)])
    rows.append("Classification (does not depend on the size)")
    for label, keys in CLS_ROWS:
        rows.append([label, *(Span(_dig(metrics[p]["classification"], keys), len(sizes))
                              for p in metrics["pipelines"])])
    return table(header, rows)


def classification_rows(summary: dict, class_names: Sequence[str] = CLASS_NAMES) -> list[list[Any]]:
    rows = []
    for c in class_names:
        pc = summary["per_class"][c]
        rows.append([c, pc["precision"], pc["recall"], pc["f1"], pc["specificity"], pc["auroc"], pc["support"],
                     pc["predicted"]])
    for avg in ("macro", "weighted"):
        a = summary[avg]
        rows.append([f"{avg} avg", a["precision"], a["recall"], a["f1"], a["specificity"], a.get("auroc"),
                     summary["images"], None])
    return rows


CLASSIFICATION_HEADER = ("class", "precision", "recall", "F1", "specificity", "AUROC", "support", "predicted")


def training_check_table(check: dict, tolerance: float) -> str:
    rows = []
    for key, v in check["metrics"].items():
        rows.append([key, v["eval"], v["training"], f'{v["abs_diff"]:.1e}'])
    status = ("ok" if check["max_abs_diff"] <= tolerance else "bad")
    verdict = (f'<p class="{status}">largest difference {check["max_abs_diff"]:.2e} '
               f'({"within" if status == "ok" else "above"} {tolerance:g})</p>')
    return verdict + table(("metric (training definition)", "this evaluation", "training run's test step", "|diff|"),
                           rows, digits=6)
