"""Data pipeline cost: decode + augment + collate alone, against what training consumes.

Prints
- cold start: scanning the folder and decoding every image once into the cache
  (what the first epoch pays on top of a later one);
- samples/s of the training DataLoader alone (augmentation + collate) with 0, 1 and 2
  workers, per epoch over several epochs;
- samples/s of the training step alone (forward + backward + optimizer step) on
  pre-loaded batches;
- the pipeline's per-sample cost as a share of the training step's, and the first
  training epoch (decode + epoch) against a later one.

    python benchmarks/data_pipeline.py --size 128
    python benchmarks/data_pipeline.py --size 256 data=busi data.root=$BUSI_ROOT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_overhead import compose_cfg  # noqa: E402

from busiseg.train import build  # noqa: E402


def loader_epochs(datamodule, workers: int, epochs: int) -> list[float]:
    datamodule.num_workers = workers
    datamodule.persistent_workers = workers > 0
    loader = datamodule.train_dataloader()
    rates = []
    for _ in range(epochs):
        t, n = time.perf_counter(), 0
        for batch in loader:
            n += batch["image"].shape[0]
        rates.append(n / (time.perf_counter() - t))
    return rates


def train_step_rate(module, batches: list[dict], repeats: int) -> float:
    net, criterion = module.net.train(), module.loss
    optimizer = torch.optim.AdamW(list(net.parameters()) + list(criterion.parameters()), lr=1e-3)

    def step(batch):
        mask_logits, class_logits = net(batch["image"])
        loss = criterion(mask_logits, class_logits, batch["mask"], batch["label"])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(batches[0])  # warm-up
    t, n = time.perf_counter(), 0
    for _ in range(repeats):
        for batch in batches:
            step(batch)
            n += batch["image"].shape[0]
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-batches", type=int, default=4, help="batches timed for the training step")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("override", nargs="*")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ns = argparse.Namespace(size=args.size, batch_size=args.batch_size, num_workers=0, epochs=1, batches=1,
                                data_dir=args.data_dir, override=args.override)
        cfg = compose_cfg(ns, Path(tmp))
        datamodule, module, _ = build(cfg)
        datamodule.prepare_data()
        t = time.perf_counter()
        datamodule.setup("fit")
        cold = time.perf_counter() - t
    n_train = len(datamodule.train_dataset)
    n_all = len(datamodule.records)
    print(f"{n_all} images, {n_train} in train, {args.size} px, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"cold start (scan + decode all {n_all} images): {cold:.2f} s = {n_all / cold:.0f} images/s")

    results: dict = {"cold_s": cold, "n_images": n_all, "n_train": n_train, "loader": {}}
    for w in args.workers:
        rates = loader_epochs(datamodule, w, args.epochs)
        results["loader"][w] = rates
        print(f"loader alone, {w} worker(s): samples/s per epoch " + ", ".join(f"{r:.0f}" for r in rates))

    loader = datamodule.train_dataloader()
    batches = [b for _, b in zip(range(args.train_batches), loader)]
    step_rate = train_step_rate(module, batches, repeats=1)
    results["train_step_samples_per_s"] = step_rate
    print(f"training step alone: {step_rate:.1f} samples/s")

    best_loader = max(statistics.median(r[1:] or r) for r in results["loader"].values())
    share = step_rate / best_loader
    epoch_s = n_train / step_rate + n_train / best_loader
    first_vs_later = (cold + epoch_s) / epoch_s
    results.update(pipeline_share=share, first_epoch_vs_later=first_vs_later)
    print(f"pipeline per-sample cost / training step's: {100 * share:.1f}% (with the fastest worker setting)")
    print(f"first epoch (decode + epoch) / later epoch, estimated: {first_vs_later:.2f}x "
          f"(decode {cold:.1f} s, epoch {epoch_s:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
