"""Evaluation of a trained checkpoint (``python -m busiseg.eval``), one module per job:

- ``metrics_table``: the numbers (per-image mask statistics, HD95, classification
  scores, calibration, ROC) from plain numpy arrays; definitions in docs/evaluation.md;
- ``runner``: which images (checkpoint, data root, split part) and the network run over them;
- ``figures``: the PNG figures;
- ``html_report``: the self-contained ``report.html``.
"""
