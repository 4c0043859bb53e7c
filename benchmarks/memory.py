"""Peak memory (RSS) of training runs, with the in-memory and the on-disk decoded cache.

Each case is one `python -m busiseg.train` child process running a short training
(`--batches` training batches, one epoch, no test); its peak RSS comes from the
kernel's accounting of that child (wait4 rusage, ru_maxrss). Cases:

- `busi-256`: the real BUSI folder at 256 px (needs --busi-root or BUSI_ROOT);
- `phantom-N-memory` / `phantom-N-disk`: a synthetic phantom of N images at 256 px
  (generated once under --data-dir, which takes a while for N = 20,000), with the
  memory cache and with the disk cache (the first disk run builds the cache, the
  second reuses it: both are reported).

    python benchmarks/memory.py --sizes 210 20000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_case(name: str, overrides: list[str], workdir: Path) -> dict:
    cmd = [sys.executable, "-m", "busiseg.train", f"paths.log_dir={workdir}", "test=false", "trainer=cpu",
           "callbacks.progress_bar=null", "callbacks.image_logger=null", "callbacks.early_stopping=null",
           "trainer.enable_progress_bar=false", "trainer.max_epochs=1", "+trainer.limit_val_batches=0",
           *overrides]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    stderr = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed:\n{stderr[-3000:]}")
    row = {"case": name, "peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[210, 20000], help="phantom image counts")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--busi-root", default=os.environ.get("BUSI_ROOT"))
    parser.add_argument("--data-dir", default=str(REPO / "data" / "bench"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    common = [f"data.image_size={args.image_size}", f"+trainer.limit_train_batches={args.batches}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.busi_root:
            rows.append(run_case(f"busi-{args.image_size}-memory", ["data=busi", f"data.root={args.busi_root}", *common],
                                 work))
        for n in args.sizes:
            n_norm = n // 5
            n_les = (n - n_norm) // 2
            # the duplicate audit is not what this measures (and costs minutes at 20,000 images)
            phantom = ["split.group_duplicates=false", f"paths.data_dir={args.data_dir}", f"data.root={args.data_dir}/phantom-{n}",
                       f"data.synthetic.n_per_class.benign={n_les}", f"data.synthetic.n_per_class.malignant={n - n_norm - n_les}",
                       f"data.synthetic.n_per_class.normal={n_norm}", *common]
            rows.append(run_case(f"phantom-{n}-memory", phantom, work))
            cache = [f"data.cache=disk", f"data.cache_dir={work}/cache-{n}"]
            rows.append(run_case(f"phantom-{n}-disk-build", phantom + cache, work))
            rows.append(run_case(f"phantom-{n}-disk-reuse", phantom + cache, work))
    print("\n| case | peak RSS MiB | wall s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
