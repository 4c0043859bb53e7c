"""The rules of scripts/probe_mask_evidence.py (docs/results.md, e59) on small hand-made cases."""
from __future__ import annotations

import numpy as np

from tests.conftest import load_script

probe = load_script("probe_mask_evidence")


def test_largest_share_counts_only_the_biggest_component():
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:2] = True       # 4 px
    mask[5:8, 5:8] = True       # 9 px
    assert probe.largest_share(mask) == 0.09
    assert probe.largest_share(np.zeros((4, 4), bool)) == 0.0


def test_decide_keeps_the_lesion_type_and_only_moves_the_normal_call():
    probs = np.array([[0.6, 0.1, 0.3], [0.4, 0.5, 0.1], [0.2, 0.1, 0.7]])
    share = np.array([0.05, 0.0, 0.02])
    assert probe.decide(probs, share, "two_stage", ()).tolist() == [0, 1, 2]
    assert probe.decide(probs, share, "threshold", (0.7,)).tolist() == [2, 1, 2]
    # the area rule also calls normal where the largest component is under the share
    assert probe.decide(probs, share, "area", (0.7, 0.01)).tolist() == [2, 0, 2]


def test_fit_picks_the_threshold_with_the_best_accuracy_on_the_given_images():
    probs = np.array([[0.9, 0.05, 0.05], [0.35, 0.6, 0.05], [0.3, 0.1, 0.6], [0.2, 0.7, 0.1]])
    labels = np.array([0, 0, 2, 1])  # the second image is normal at P(normal) 0.35: t must be <= 0.35
    (t,) = probe.fit("threshold", probs, np.zeros(4), labels)
    assert 0.3 < t <= 0.35
    assert (probe.decide(probs, np.zeros(4), "threshold", (t,)) == labels).all()


def test_logistic_fit_separates_normal_from_lesion_by_its_features():
    g = np.random.default_rng(0)
    p_normal = np.concatenate([g.uniform(0.6, 0.99, 50), g.uniform(0.01, 0.4, 50)])
    probs = np.stack([p_normal, (1 - p_normal) * 0.7, (1 - p_normal) * 0.3], 1)
    labels = np.array([0] * 50 + [1] * 50)
    (w,) = probe.fit("logistic", probs, np.full(100, 0.01), labels)
    assert w[1] > 0  # higher P(normal), more likely normal
    assert (probe.decide(probs, np.full(100, 0.01), "logistic", (w,)) == labels).mean() == 1.0
