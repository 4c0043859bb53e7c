"""Grouped, stratified holdout and k-fold splits (records and groups made up: no pixels needed)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from busiseg.data.busi import Record
from busiseg.data.labels import CLASS_NAMES, LABEL_OF
from busiseg.data.splits import (
    PARTS,
    HoldoutSplitter,
    KFoldSplitter,
    assign_units,
    group_units,
    load_split,
    resolve_label_conflicts,
    save_split,
)
from tests.conftest import REPO

COUNTS = {"normal": 40, "benign": 90, "malignant": 50}


def make_records(counts=COUNTS) -> list[Record]:
    return [
        Record(image=Path(f"/data/{c}/{c} ({n}).png"), masks=(), label=LABEL_OF[c])
        for c in CLASS_NAMES
        for n in range(1, counts[c] + 1)
    ]


def name(c: str, n: int) -> str:
    return f"{c}/{c} ({n}).png"


# duplicate groups of 2-5 images within a class, like BUSI's, and two label conflicts
GROUPS = (
    [[name("benign", n + k) for k in range(size)] for n, size in ((1, 2), (10, 3), (20, 4), (30, 2), (40, 5), (50, 2))]
    + [[name("malignant", n + k) for k in range(size)] for n, size in ((1, 2), (5, 3), (12, 2))]
    + [[name("normal", n + k) for k in range(size)] for n, size in ((1, 4), (8, 2), (15, 3))]
    + [[name("benign", 80), name("malignant", 40)], [name("benign", 85), name("benign", 86), name("malignant", 45)]]
)


def part_of(split) -> dict[str, str]:
    out = {}
    for p in PARTS:
        for n in split[p]:
            out.setdefault(n, p)  # k-fold without a test set: test is the validation fold
    return out


def assert_no_group_straddles(split, groups) -> None:
    where = part_of(split)
    for g in groups:
        parts = {where[m] for m in g if m in where}
        assert len(parts) <= 1, (g, parts)


def class_counts(names) -> Counter:
    return Counter(n.split("/")[0] for n in names)


def test_holdout_grouped_stratified_deterministic():
    records = make_records()
    splitter = HoldoutSplitter(0.15, 0.15, seed=7)
    split = splitter.split(records, groups=GROUPS)
    assert_no_group_straddles(split, GROUPS)
    # label conflicts dropped by default, everything else used exactly once
    dropped = {name("benign", 80), name("malignant", 40), name("benign", 85), name("benign", 86), name("malignant", 45)}
    used = [n for p in PARTS for n in split[p]]
    assert len(used) == len(set(used)) == len(records) - len(dropped)
    assert not dropped & set(used)
    assert split["meta"]["label_conflicts"]["removed"] == sorted(dropped)
    # class proportions within one image per class per part
    kept = Counter(r.class_name for r in records if r.name not in dropped)
    for p, frac in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        got = class_counts(split[p])
        for c in CLASS_NAMES:
            assert abs(got[c] - frac * kept[c]) <= 1, (p, c, got[c], frac * kept[c])
    assert HoldoutSplitter(0.15, 0.15, seed=7).split(records, groups=GROUPS) == split
    other = HoldoutSplitter(0.15, 0.15, seed=8).split(records, groups=GROUPS)
    assert other["test"] != split["test"]


@pytest.mark.parametrize("test_fraction", [0.0, 0.2])
def test_kfold_folds_cover_everything_once_and_respect_groups(test_fraction):
    records = make_records()
    k = 5
    splits = [KFoldSplitter(k=k, fold=f, test_fraction=test_fraction, seed=3).split(records, groups=GROUPS)
              for f in range(k)]
    vals = [set(s["val"]) for s in splits]
    used = {n for p in PARTS for n in splits[0][p]}
    test = set(splits[0]["test"]) if test_fraction else set()
    assert all(set(s["test"]) == test for s in splits) or not test_fraction  # one fixed test set
    assert set().union(*vals) == used - test  # every non-test image validated once ...
    assert sum(len(v) for v in vals) == len(used - test)  # ... and only once
    assert len({s["meta"]["assignment"] for s in splits}) == 1  # the sweep shares one assignment
    for f, s in enumerate(splits):
        assert_no_group_straddles({"train": s["train"], "val": s["val"], "test": list(test)}, GROUPS)
        assert not set(s["train"]) & (vals[f] | test)
        if not test_fraction:
            assert s["test"] == s["val"] and s["meta"]["test_is_val"]
    # fold sizes per class within one image of n/k
    kept = class_counts(used - test)
    for v in vals:
        got = class_counts(v)
        for c in CLASS_NAMES:
            assert abs(got[c] - kept[c] / k) <= 1, (c, got[c], kept[c] / k)
    if test_fraction:
        got = class_counts(test)
        for c in CLASS_NAMES:
            total = sum(1 for n in used if n.startswith(c + "/"))
            assert abs(got[c] - test_fraction * total) <= 1
    again = KFoldSplitter(k=k, fold=2, test_fraction=test_fraction, seed=3).split(records, groups=GROUPS)
    assert again == splits[2]
    other_seed = KFoldSplitter(k=k, fold=2, test_fraction=test_fraction, seed=4).split(records, groups=GROUPS)
    assert other_seed["val"] != again["val"]


def test_kfold_fold_out_of_range_names_the_key():
    with pytest.raises(ValueError, match=r"split.fold must be in 0..4"):
        KFoldSplitter(k=5, fold=5)
    with pytest.raises(ValueError, match="split.k"):
        KFoldSplitter(k=1, fold=0)


def test_label_conflict_policies():
    records = make_records()
    _, _, drop = resolve_label_conflicts(records, GROUPS, "drop")
    assert len(drop["groups"]) == 2 and len(drop["removed"]) == 5
    kept, groups, keep = resolve_label_conflicts(records, GROUPS, "keep")
    assert keep["removed"] == [] and len(kept) == len(records)
    assert [name("benign", 80), name("malignant", 40)] in groups  # kept together
    _, _, majority = resolve_label_conflicts(records, GROUPS, "majority")
    # 1 benign vs 1 malignant: a tie, both go; 2 benign vs 1 malignant: the malignant copy goes
    assert majority["removed"] == sorted([name("benign", 80), name("malignant", 40), name("malignant", 45)])
    with pytest.raises(ValueError, match="split.label_conflicts"):
        HoldoutSplitter(label_conflicts="vote")
    split = HoldoutSplitter(seed=1, label_conflicts="keep").split(records, groups=GROUPS)
    assert_no_group_straddles(split, GROUPS)
    assert sum(len(split[p]) for p in PARTS) == len(records)


def test_ungrouped_split_ignores_groups_and_units_are_groups():
    records = make_records({"normal": 3, "benign": 4, "malignant": 2})
    units = group_units(records, [[name("benign", 1), name("benign", 2)], [name("normal", 1), name("benign", 3)]])
    assert (LABEL_OF["benign"], [name("benign", 1), name("benign", 2)]) in units
    # mixed unit: majority label, a tie goes to the higher label id
    assert (LABEL_OF["benign"], [name("benign", 3), name("normal", 1)]) in units
    assert sum(len(u[1]) for u in units) == len(records)
    parts = assign_units(units, [0.5, 0.5], seed=0)
    assert sorted(parts[0] + parts[1]) == sorted(r.name for r in records)
    plain = HoldoutSplitter(seed=0, group_duplicates=False).split(records)
    assert plain["meta"]["groups"] == [] and sum(len(plain[p]) for p in PARTS) == len(records)


def test_split_file_roundtrip_and_unknown_names(tmp_path):
    records = make_records()
    split = HoldoutSplitter(seed=5).split(records, groups=GROUPS)
    path = save_split(split, tmp_path / "split.json")
    assert load_split(path)["test"] == split["test"]
    reused = KFoldSplitter(k=5, fold=1, file=str(path)).split(records)  # split.file wins over the splitter
    assert all(reused[p] == split[p] for p in PARTS)
    with pytest.raises(ValueError, match="not in the dataset"):
        HoldoutSplitter(file=str(path)).split(make_records({"normal": 2, "benign": 2, "malignant": 2}))
    (tmp_path / "bad.json").write_text(json.dumps({"train": []}))
    with pytest.raises(ValueError, match="bad.json"):
        HoldoutSplitter(file=str(tmp_path / "bad.json")).split(records)


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", return_hydra_config=True,
                       overrides=["paths.data_dir=/tmp/unused", "paths.root_dir=/tmp"] + overrides)


def test_split_configs_instantiate():
    holdout = instantiate(_compose([]).split)
    assert isinstance(holdout, HoldoutSplitter) and holdout.group_duplicates and holdout.label_conflicts == "drop"
    assert holdout.cache_dir == "/tmp/unused/.audit_cache"
    cfg = _compose(["split=kfold", "split.fold=3", "split.label_conflicts=majority", "split.file=/x/split.json"])
    kfold = instantiate(cfg.split)
    assert isinstance(kfold, KFoldSplitter) and (kfold.k, kfold.fold) == (5, 3)
    assert kfold.label_conflicts == "majority" and kfold.file == "/x/split.json"
    assert cfg.hydra.callbacks.cv_summary._target_ == "busiseg.cv_summary.CVSummaryCallback"


def test_detector_settings_agree_between_audit_and_split_configs():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    found = []
    for name_, overrides in (("audit", ["data.root=/x"]), ("train", ["split=holdout"]), ("train", ["split=kfold"])):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name=name_, overrides=overrides)
        found.append(dict(cfg.duplicates if name_ == "audit" else cfg.split.duplicates))
    # one definition (conf/duplicates/default.yaml), else training would not reuse the audit CLI's cache
    assert found[0] == found[1] == found[2] and found[0]["threshold"] > 0


def test_extra_groups_merge_with_the_audit_groups():
    records = make_records()
    extra = [[name("benign", 2), name("benign", 60)], [name("normal", 30), name("normal", 31)]]
    splitter = HoldoutSplitter(seed=2, extra_groups=extra)
    split = splitter.split(records, groups=GROUPS)
    merged = [name("benign", 1), name("benign", 2), name("benign", 60)]  # benign 1-2 was a group already
    assert merged in split["meta"]["groups"]
    assert_no_group_straddles(split, GROUPS + extra)
    with pytest.raises(ValueError, match="split.extra_groups"):
        HoldoutSplitter(extra_groups=[["benign/benign (999).png", name("benign", 1)]]).split(records, groups=[])


@pytest.mark.parametrize("splitter", [HoldoutSplitter(seed=3), KFoldSplitter(k=4, fold=1, seed=3)])
def test_exclude_leaves_images_out_after_the_assignment(splitter):
    records = make_records()
    full = splitter.split(records, groups=GROUPS)
    # one image of each part, and one of a duplicate group (its partner stays where it was)
    dropped = sorted({full[p][0] for p in PARTS if full[p]} | {name("benign", 1)})
    kwargs = {"seed": 3} if isinstance(splitter, HoldoutSplitter) else {"k": 4, "fold": 1, "seed": 3}
    cut = type(splitter)(exclude=dropped, **kwargs).split(records, groups=GROUPS)
    assert cut["meta"]["excluded"] == dropped and full["meta"]["excluded"] == []
    for p in PARTS:  # every other image keeps its part
        assert cut[p] == [n for n in full[p] if n not in dropped]
    if "fold_of" in full["meta"]:
        assert cut["meta"]["assignment"] == full["meta"]["assignment"]  # the same folds: runs pair
        assert set(cut["meta"]["fold_of"]) == set(full["meta"]["fold_of"]) - set(dropped)


def test_exclude_refuses_unknown_names_and_a_string():
    with pytest.raises(ValueError, match=r"split.exclude names 1 image\(s\) not in the dataset, e.g. benign/benign \(999\)"):
        HoldoutSplitter(exclude=["benign/benign (999).png"]).split(make_records(), groups=[])
    with pytest.raises(ValueError, match="split.exclude must be a list"):
        HoldoutSplitter(exclude="benign/benign (1).png")


@pytest.mark.parametrize("split", ["holdout", "kfold"])
def test_exclude_busi_axilla_config_sets_split_exclude(split):
    cfg = _compose([f"split={split}", "exclude=busi_axilla"])
    names = list(cfg.split.exclude)
    assert len(names) == 22 and len(set(names)) == 22
    assert Counter(n.split("/")[0] for n in names) == {"benign": 16, "malignant": 6}
    assert instantiate(cfg.split).exclude == sorted(names)
    assert list(_compose([f"split={split}"]).split.exclude) == []


def test_exclude_busi_axilla_names_exist_in_the_development_set():
    root = os.environ.get("BUSI_ROOT")
    if not root or not Path(root).is_dir():
        pytest.skip("BUSI_ROOT not set")
    names = yaml.safe_load((REPO / "conf" / "exclude" / "busi_axilla.yaml").read_text())["exclude"]
    missing = [n for n in names if not (Path(root) / n).is_file()]
    assert not missing, missing
