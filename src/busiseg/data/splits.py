"""Splits (config group ``split``): which records train, validate and test.

A split is a dict ``{"train": [...], "val": [...], "test": [...]}`` of record names
(``class/file.png``) plus a ``"meta"`` entry (how it was made: splitter, seed, fold, duplicate
groups, label-conflict policy and what it removed). It is saved as JSON in the run dir; pass
it back with ``split.file=<run>/split.json`` so that eval and later runs use exactly the same
images.

Both splitters are stratified by class and **grouped**: copies of one scan (the audit's
near-duplicate groups, ``busiseg.audit``) always land in the same part, so a copy of a test
image is never trained on. Groups whose members are filed under different classes (label
conflicts) follow ``label_conflicts``:

- ``drop`` (default): every member of the group is left out;
- ``keep``: all kept (one part), stratified under the group's majority class;
- ``majority``: members of the group's majority class are kept, the others left out; a tie
  drops the whole group.

``exclude`` (a list of names, e.g. ``exclude=busi_axilla``: the scans of the axilla, not the breast) leaves
images out of every part *after* the assignment: the other images keep the part (and fold) they have
without the list, so a run with it and one without pair image for image on the images both test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from busiseg.atomic import write_json_atomic
from busiseg.data.busi import Record
from busiseg.data.labels import CLASS_NAMES

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
CONFLICT_POLICIES = ("drop", "keep", "majority")


# --------------------------------------------------------------------------- groups


def resolve_label_conflicts(
    records: Sequence[Record], groups: Sequence[Sequence[str]], policy: str = "drop"
) -> tuple[list[Record], list[list[str]], dict[str, Any]]:
    """Apply the label-conflict policy.

    Returns the records kept, the groups restricted to them (2+ members), and a report
    ``{"policy", "groups": [[names]...], "removed": [names]}``.
    """
    if policy not in CONFLICT_POLICIES:
        raise ValueError(f"split.label_conflicts must be one of {', '.join(CONFLICT_POLICIES)}, got {policy!r}")
    label_of = {r.name: r.label for r in records}
    conflicts, removed = [], set()
    for group in groups:
        members = [m for m in group if m in label_of]
        counts = Counter(label_of[m] for m in members)
        if len(counts) < 2:
            continue
        conflicts.append(sorted(members))
        if policy == "drop":
            removed.update(members)
        elif policy == "majority":
            (top, n_top), (_, n_second) = counts.most_common(2)
            removed.update(m for m in members if n_top == n_second or label_of[m] != top)
    kept = [r for r in records if r.name not in removed]
    kept_groups = [[m for m in g if m in label_of and m not in removed] for g in groups]
    report = {"policy": policy, "groups": conflicts, "removed": sorted(removed)}
    log.info(
        "split: %d label-conflict group(s) (one scan under two classes), policy %r: %s",
        len(conflicts), policy,
        f"removed {len(removed)} image(s): {', '.join(sorted(removed))}" if removed else "nothing removed",
    )
    return kept, [g for g in kept_groups if len(g) > 1], report


def merge_groups(groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """Groups sharing a member merged into one (connected components over names)."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in groups:
        for member in group[1:]:
            a, b = root(group[0]), root(member)
            if a != b:
                parent[max(a, b)] = min(a, b)
        if group:
            root(group[0])
    merged: dict[str, list[str]] = {}
    for x in parent:
        merged.setdefault(root(x), []).append(x)
    return sorted((sorted(g) for g in merged.values() if len(g) > 1), key=lambda g: g[0])


def group_units(records: Sequence[Record], groups: Sequence[Sequence[str]]) -> list[tuple[int, list[str]]]:
    """Records as units ``(stratification label, [names])``: each group one unit, others alone.

    A unit's label is its majority label (ties: the higher label id, e.g. malignant over
    benign). Units are ordered by their first name, so the result depends only on the input.
    """
    label_of = {r.name: r.label for r in records}
    seen: set[str] = set()
    units: list[tuple[int, list[str]]] = []
    for group in groups:
        members = sorted(m for m in group if m in label_of and m not in seen)
        if not members:
            continue
        seen.update(members)
        counts = Counter(label_of[m] for m in members)
        label = max(counts, key=lambda c: (counts[c], c))
        units.append((label, members))
    units += [(r.label, [r.name]) for r in records if r.name not in seen]
    return sorted(units, key=lambda u: u[1][0])


def assign_units(
    units: Sequence[tuple[int, list[str]]], fractions: Sequence[float], seed: int | Sequence[int]
) -> list[list[str]]:
    """Split units into ``len(fractions)`` parts, stratified by unit label, never splitting a unit.

    Per class, part p's target is its share of the class's images (largest-remainder
    rounding). Units go largest first (shuffled within one size), each to a part drawn with
    probability proportional to its remaining room among the parts it fits in; single images
    come last and fill every part to its exact target unless a large group overshot one.
    """
    fractions = np.asarray(fractions, dtype=float)
    parts: list[list[str]] = [[] for _ in fractions]
    seed_list = list(seed) if isinstance(seed, (list, tuple)) else [int(seed)]
    for label in sorted({u[0] for u in units}):
        mine = [u[1] for u in units if u[0] == label]
        rng = np.random.default_rng(seed_list + [int(label)])
        targets = _apportion(sum(len(m) for m in mine), fractions, rng)
        room = targets.astype(float)
        order = rng.permutation(len(mine))
        order = sorted(order, key=lambda k: -len(mine[k]))  # stable: random within a size
        for k in order:
            size = len(mine[k])
            fits = room >= size
            weights = np.where(fits, room, 0.0) if fits.any() else (room == room.max()).astype(float)
            p = int(rng.choice(len(parts), p=weights / weights.sum()))
            parts[p] += mine[k]
            room[p] -= size
    return [sorted(p) for p in parts]


def _apportion(n: int, fractions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integers summing to n, proportional to fractions (largest remainder, ties at random)."""
    share = n * fractions / fractions.sum()
    out = np.floor(share).astype(int)
    rest = n - out.sum()
    if rest:
        remainder = share - out + rng.random(len(share)) * 1e-9
        out[np.argsort(-remainder)[:rest]] += 1
    return out


# --------------------------------------------------------------------------- splitters


class _GroupedSplitter:
    """Shared machinery: duplicate groups from the (cached) audit, label conflicts, split.file."""

    kind = "base"

    def __init__(self, seed: int, group_duplicates: bool, label_conflicts: str,
                 duplicates: Mapping[str, Any] | None, cache_dir: str | None, file: str | None,
                 extra_groups: Sequence[Sequence[str]] | None = None, exclude: Sequence[str] | None = None):
        if label_conflicts not in CONFLICT_POLICIES:
            raise ValueError(
                f"split.label_conflicts must be one of {', '.join(CONFLICT_POLICIES)}, got {label_conflicts!r}"
            )
        self.seed = int(seed)
        self.group_duplicates = bool(group_duplicates)
        self.label_conflicts = label_conflicts
        self.duplicates = dict(duplicates or {})
        self.cache_dir = cache_dir
        self.file = file
        self.extra_groups = [list(g) for g in (extra_groups or [])]
        if isinstance(exclude, str):
            raise ValueError(f"split.exclude must be a list of image names, got the string {exclude!r}")
        self.exclude = sorted(set(exclude or []))
        if self.group_duplicates:
            from busiseg.audit import duplicate_params

            duplicate_params(self.duplicates)  # bad settings fail now, naming the key

    def duplicate_groups(self, records: Sequence[Record]) -> list[list[str]]:
        """Near-duplicate groups of these records from the audit (cached under ``cache_dir``)."""
        from busiseg.audit import duplicate_groups, load_or_audit

        return duplicate_groups(load_or_audit(records, self.duplicates, self.cache_dir))

    def split(self, records: Sequence[Record], groups: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
        """The split of these records; ``groups`` (lists of names) overrides the audit's."""
        if self.file:
            return self._from_file(records)
        if groups is None:
            groups = self.duplicate_groups(records) if self.group_duplicates else []
        names = {r.name for r in records}
        for key, listed in (("split.extra_groups", {m for g in self.extra_groups for m in g}),
                            ("split.exclude", set(self.exclude))):
            unknown = sorted(listed - names)
            if unknown:
                raise ValueError(f"{key} names {len(unknown)} image(s) not in the dataset, e.g. {unknown[0]}")
        if self.extra_groups:
            groups = merge_groups(list(groups) + self.extra_groups)
        kept, groups, conflicts = resolve_label_conflicts(records, groups, self.label_conflicts)
        parts, meta = self._split_units(group_units(kept, groups))
        excluded = self._exclude(parts, meta)
        meta.update(
            {
                "splitter": self.kind,
                "seed": self.seed,
                "grouped": self.group_duplicates,
                "extra_groups": self.extra_groups,
                "groups": [sorted(g) for g in groups],
                "label_conflicts": conflicts,
                "excluded": excluded,
                "images": len(records),
            }
        )
        split: dict[str, Any] = {p: sorted(parts[p]) for p in PARTS}
        split["meta"] = meta
        _log_parts(split, kept)
        return split

    def _exclude(self, parts: dict[str, list[str]], meta: dict[str, Any]) -> list[str]:
        """Take ``self.exclude`` out of every part and of ``meta["fold_of"]`` (in place), after the assignment
        (whose hash, ``meta["assignment"]``, stays the one without the list: the runs pair); the names taken out."""
        if not self.exclude:
            return []
        drop = set(self.exclude)
        excluded = sorted({n for p in PARTS for n in parts[p] if n in drop})
        for p in PARTS:
            parts[p] = [n for n in parts[p] if n not in drop]
        if "fold_of" in meta:
            meta["fold_of"] = {n: f for n, f in meta["fold_of"].items() if n not in drop}
        log.info("split: split.exclude left out %d image(s) after the assignment (the others keep their parts): %s",
                 len(excluded), ", ".join(excluded))
        return excluded

    def _split_units(self, units):  # pragma: no cover - abstract
        raise NotImplementedError

    def _from_file(self, records: Sequence[Record]) -> dict[str, Any]:
        split = load_split(self.file)
        names = {r.name for r in records}
        unknown = [n for p in PARTS for n in split[p] if n not in names]
        if unknown:
            raise ValueError(
                f"{self.file}: the split names {len(unknown)} image(s) not in the dataset, e.g. {unknown[0]} "
                "(was it made for another data.root?)"
            )
        log.info("split: reusing %s (split settings other than split.file are ignored)", self.file)
        split.setdefault("meta", {})["file"] = str(self.file)
        return split


class HoldoutSplitter(_GroupedSplitter):
    """Stratified, grouped train/val/test split, deterministic for a seed.

    Args:
        val_fraction, test_fraction: shares of each class (train takes the rest).
        seed: the same seed gives the same split of the same records.
        group_duplicates: keep the audit's near-duplicate groups in one part (false: every image alone).
        label_conflicts: ``drop`` | ``keep`` | ``majority`` (see the module doc).
        duplicates: detector settings (``busiseg.data.duplicates.DuplicateParams`` fields).
        cache_dir: where the audit is cached (None: recomputed every time).
        file: reuse this saved split instead of computing one.
        extra_groups: more groups (lists of record names) to keep together, e.g. neighbouring
            frames confirmed by eye from the audit's review list; merged with the audit's.
        exclude: record names left out of every part after the assignment (see the module doc).
    """

    kind = "holdout"

    def __init__(self, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 42,
                 group_duplicates: bool = True, label_conflicts: str = "drop",
                 duplicates: Mapping[str, Any] | None = None, cache_dir: str | None = None,
                 file: str | None = None, extra_groups: Sequence[Sequence[str]] | None = None,
                 exclude: Sequence[str] | None = None):
        for key, value in (("split.val_fraction", val_fraction), ("split.test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {value}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"split.val_fraction + split.test_fraction must be < 1 (leaving images to train on), "
                f"got {val_fraction} + {test_fraction}"
            )
        super().__init__(seed, group_duplicates, label_conflicts, duplicates, cache_dir, file, extra_groups, exclude)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)

    def _split_units(self, units):
        train_fraction = 1.0 - self.val_fraction - self.test_fraction
        train, val, test = assign_units(units, [train_fraction, self.val_fraction, self.test_fraction], self.seed)
        meta = {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction}
        return {"train": train, "val": val, "test": test}, meta


class KFoldSplitter(_GroupedSplitter):
    """Stratified, grouped k-fold cross-validation; ``fold`` is the validation fold.

    The fold assignment depends on the records, groups, ``k``, ``test_fraction`` and ``seed``
    only, never on ``fold``: a sweep ``split.fold=0,1,2,3,4`` with one seed uses disjoint
    validation folds that together cover every image outside the test set once.

    Args:
        k: number of folds (>= 2).
        fold: the validation fold, 0..k-1.
        test_fraction: share of each class held out as a fixed test set outside the folds
            (same for every fold). 0: no separate test set; the validation fold is also
            the test part, so the run's test metrics and predictions are out-of-fold.
        seed, group_duplicates, label_conflicts, duplicates, cache_dir, file, extra_groups, exclude: as
            HoldoutSplitter.
    """

    kind = "kfold"

    def __init__(self, k: int = 5, fold: int = 0, test_fraction: float = 0.0, seed: int = 42,
                 group_duplicates: bool = True, label_conflicts: str = "drop",
                 duplicates: Mapping[str, Any] | None = None, cache_dir: str | None = None,
                 file: str | None = None, extra_groups: Sequence[Sequence[str]] | None = None,
                 exclude: Sequence[str] | None = None):
        if int(k) < 2:
            raise ValueError(f"split.k must be >= 2, got {k}")
        if not 0 <= int(fold) < int(k):
            raise ValueError(f"split.fold must be in 0..{int(k) - 1} (split.k={k}), got {fold}")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"split.test_fraction must be in [0, 1), got {test_fraction}")
        super().__init__(seed, group_duplicates, label_conflicts, duplicates, cache_dir, file, extra_groups, exclude)
        self.k, self.fold, self.test_fraction = int(k), int(fold), float(test_fraction)

    def folds(self, units) -> tuple[list[str], list[list[str]]]:
        """(fixed test set, the k folds) for these units."""
        test: list[str] = []
        if self.test_fraction > 0:
            rest, test = assign_units(units, [1.0 - self.test_fraction, self.test_fraction], [self.seed, 1])
            held = set(test)
            units = [u for u in units if u[1][0] not in held]
        folds = assign_units(units, [1.0] * self.k, [self.seed, 2])
        return test, folds

    def _split_units(self, units):
        test, folds = self.folds(units)
        val = folds[self.fold]
        train = sorted(n for f, names in enumerate(folds) if f != self.fold for n in names)
        fold_of = {n: f for f, names in enumerate(folds) for n in names}
        meta = {
            "k": self.k,
            "fold": self.fold,
            "test_fraction": self.test_fraction,
            "test_is_val": not test,
            "fold_of": fold_of,
            "assignment": hashlib.sha256(json.dumps([test, folds]).encode()).hexdigest()[:16],
        }
        return {"train": train, "val": val, "test": test or list(val)}, meta


def _log_parts(split: Mapping[str, Any], records: Sequence[Record]) -> None:
    label_of = {r.name: r.label for r in records}
    for p in PARTS:
        counts = Counter(CLASS_NAMES[label_of[n]] for n in split[p])
        log.info("split %s: %d images (%s)", p, len(split[p]), ", ".join(f"{c} {counts[c]}" for c in CLASS_NAMES))


# --------------------------------------------------------------------------- files


def save_split(split: Mapping[str, Any], path: str | Path) -> Path:
    """Write the split as JSON atomically (temp file + rename)."""
    path = Path(path)
    write_json_atomic(path, split, indent=1)
    return path


def load_split(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    try:
        split = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the split file ({exc})") from exc
    if not isinstance(split, dict) or not all(isinstance(split.get(p), list) for p in PARTS):
        raise ValueError(f"{path}: a split file must hold lists 'train', 'val' and 'test'")
    return split


