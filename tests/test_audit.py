"""The audit CLI (python -m busiseg.audit) on planted duplicates, and on the real BUSI folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from busiseg.audit import duplicate_groups, load_or_audit, render_markdown
from busiseg.data.busi import scan_busi
from busiseg.data.splits import PARTS, HoldoutSplitter, KFoldSplitter
from tests.data.test_duplicates import write_planted_dataset

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}


def _audit_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "busiseg.audit", f"paths.log_dir={tmp_path / 'logs'}",
           f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'out'}", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)


def test_cli_writes_json_markdown_and_group_pictures(tmp_path):
    root = tmp_path / "busi"
    planted = write_planted_dataset(root)
    proc = _audit_cli(tmp_path, f"data.root={root}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    audit = json.loads((out / "audit.json").read_text())
    assert len(audit["near_duplicate_groups"]) == len(planted)
    assert audit["root"] == str(root.resolve())
    md = (out / "audit.md").read_text()
    assert "## Label conflicts" in md and "malignant (104)" in md
    pictures = sorted((out / "groups").glob("group_*.png"))
    assert len(pictures) == len(planted) and all(f"groups/{p.name}" in md for p in pictures)
    assert list((tmp_path / "data" / ".audit_cache").glob("audit-*.json"))  # cached for training
    assert "s when first computed" not in md
    again = _audit_cli(tmp_path, f"data.root={root}")  # from the cache: the time is the first run's, and it says so
    assert again.returncode == 0, again.stderr[-3000:]
    assert "s when first computed (this report read the cache " in (out / "audit.md").read_text()


def test_cli_says_which_files_training_will_refuse(tmp_path):
    root = tmp_path / "busi"
    write_planted_dataset(root)
    broken = sorted((root / "benign").glob("benign (*).png"))[0]
    broken.write_bytes(b"")
    proc = _audit_cli(tmp_path, f"data.root={root}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 unreadable or inconsistent file(s), which training refuses: " in proc.stderr + proc.stdout
    assert broken.name in proc.stderr + proc.stdout



def test_cli_lists_every_bad_file_in_one_error(tmp_path):
    from tests.conftest import write_case

    root = tmp_path / "busi"
    for n in (1, 2, 3):
        for cls in ("benign", "malignant", "normal"):
            write_case(root, cls, n)
    (root / "benign" / "benign (1).png").write_bytes(b"")  # zero bytes
    data = (root / "benign" / "benign (2).png").read_bytes()
    (root / "benign" / "benign (2).png").write_bytes(data[: len(data) // 2])  # truncated
    (root / "malignant" / "malignant (1).png").write_text("not a png")
    write_case(root, "normal", 1, size=(20, 16))
    (root / "normal" / "normal (1).png").write_bytes((root / "normal" / "normal (2).png").read_bytes())  # 40x32
    (root / "malignant" / "malignant (2)_mask.png").unlink()  # image without a mask
    (root / "normal" / "normal (3).png").unlink()  # mask without an image
    proc = _audit_cli(tmp_path, f"data.root={root}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr[proc.stderr.index("busiseg: error:"):]
    assert "6 problem(s) in the dataset" in error and "Traceback" not in proc.stderr
    for name in ("benign/benign (1).png", "benign/benign (2).png", "malignant/malignant (1).png",
                 "normal/normal (1)_mask.png", "malignant/malignant (2).png", "normal/normal (3)_mask.png"):
        assert str(root / name) in error, name

def test_cli_without_root_is_one_clear_error(tmp_path):
    proc = _audit_cli(tmp_path, "data.root=null")
    assert proc.returncode == 2
    assert "busiseg: error:" in proc.stderr and "data.root" in proc.stderr and "Traceback" not in proc.stderr


BUSI_ROOT = os.environ.get("BUSI_ROOT")


@pytest.mark.slow
@pytest.mark.busi
@pytest.mark.skipif(not BUSI_ROOT, reason="needs the real BUSI folder (set BUSI_ROOT)")
def test_real_busi_duplicates_conflicts_and_leak_free_splits(tmp_path):
    records = scan_busi(BUSI_ROOT)
    audit = load_or_audit(records, cache_dir=tmp_path / "cache", progress=False)
    # the exact copy filed under two classes
    assert ["benign/benign (433).png", "malignant/malignant (145).png"] in audit["exact_duplicates"]
    conflicts = [sorted(m for ms in c["members"].values() for m in ms) for c in audit["label_conflicts"]]
    assert ["benign/benign (433).png", "malignant/malignant (145).png"] in conflicts
    # the other label conflicts listed in docs/data.md
    for pair in (("benign/benign (399).png", "malignant/malignant (93).png"),
                 ("normal/normal (34).png", "benign/benign (437).png"),
                 ("benign/benign (42).png", "malignant/malignant (51).png")):
        assert any(set(pair) <= set(c) for c in conflicts), pair
    groups = duplicate_groups(audit)
    assert 100 <= len(groups) <= 140 and max(len(g) for g in groups) <= 8
    assert "label conflict" in render_markdown(audit)
    for splitter in [HoldoutSplitter(seed=1)] + [KFoldSplitter(fold=f, seed=1) for f in range(5)]:
        split = splitter.split(records, groups=groups)
        where = {n: p for p in reversed(PARTS) for n in split[p]}  # k-fold: test is the val fold
        for g in groups:
            assert len({where[m] for m in g if m in where}) <= 1, g
