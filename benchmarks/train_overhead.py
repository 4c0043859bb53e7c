"""Training overhead: busiseg's Lightning path against a hand-written PyTorch loop.

Both paths train the same network (built from the same config), with the same loss,
optimizer, scheduler, batch size, image size, data and augmentation (the same
DataLoader object). The Lightning path runs exactly as configured by default: metrics
updated every step, logging, callbacks (checkpointing, LR monitor, progress bar, image
grid); validation is switched off in both so that only training steps are compared.

Each repeat runs both paths one after the other (alternating which goes first), each for
``--epochs`` epochs of ``--batches`` batches; the first epoch is warm-up and the rest
are timed. Prints images/s per repeat, medians with min-max, and the ratio
busiseg / plain.

    python benchmarks/train_overhead.py --size 128 --repeats 3
    python benchmarks/train_overhead.py --size 256 --repeats 3 --batches 6
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

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import open_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from busiseg.train import build  # noqa: E402


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.images: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()
        self._n = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._n += batch["image"].shape[0]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._t)
        self.images.append(self._n)


def compose_cfg(args, workdir: Path):
    GlobalHydra.instance().clear()
    overrides = [
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.num_workers}",
        "trainer=cpu",
        f"trainer.max_epochs={args.epochs}",
        f"+trainer.limit_train_batches={args.batches}",
        "+trainer.limit_val_batches=0",
        # no validation in a throughput run, so nothing for early stopping to watch
        "callbacks.early_stopping=null",
        "test=false",
    ] + args.override
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.output_dir = str(workdir)
        cfg.hydra.runtime.output_dir = str(workdir)
        cfg.hydra.job.num = 0
        if args.data_dir:
            cfg.paths.data_dir = args.data_dir
    HydraConfig().set_config(cfg)
    return cfg


def run_lightning(cfg) -> float:
    L.seed_everything(0, workers=True)
    datamodule, module, trainer = build(cfg)
    timer = EpochTimer()
    trainer.callbacks.append(timer)
    trainer.fit(module, datamodule=datamodule)
    return sum(timer.images[1:]) / sum(timer.times[1:])


def run_plain(cfg) -> float:
    L.seed_everything(0, workers=True)
    datamodule, module, _ = build(cfg)  # the same objects, trained by hand
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    net, criterion = module.net, module.loss
    params = list(net.parameters()) + list(criterion.parameters())
    optimizer = instantiate(cfg.optimizer)(params=params)
    total = cfg.trainer.max_epochs * min(len(loader), cfg.trainer.limit_train_batches)
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, total_steps=total)
    net.train()
    times, images = [], []
    for _ in range(cfg.trainer.max_epochs):
        t, n = time.perf_counter(), 0
        for i, batch in enumerate(loader):
            if i >= cfg.trainer.limit_train_batches:
                break
            mask_logits, class_logits = net(batch["image"])
            loss = criterion(mask_logits, class_logits, batch["mask"], batch["label"])["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            n += batch["image"].shape[0]
        times.append(time.perf_counter() - t)
        images.append(n)
    return sum(images[1:]) / sum(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8, help="batches per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-workers", default="0")
    parser.add_argument("--data-dir", default=None, help="where the phantom lives (default: data/)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides, e.g. data=busi data.root=...")
    args = parser.parse_args()

    results: dict[str, list[float]] = {"busiseg": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = ("busiseg", "plain") if r % 2 == 0 else ("plain", "busiseg")
            for path in order:
                cfg = compose_cfg(args, Path(tmp) / f"{path}{r}")
                ips = run_lightning(cfg) if path == "busiseg" else run_plain(cfg)
                results[path].append(ips)
                print(f"repeat {r} {path:8s} {ips:7.2f} images/s", flush=True)

    def summary(v: list[float]) -> str:
        return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"

    ratios = [a / b for a, b in zip(results["busiseg"], results["plain"])]
    print(f"\nsize {args.size} px, batch {args.batch_size}, {args.batches} batches x {args.epochs - 1} timed epochs,"
          f" torch threads {torch.get_num_threads()}")
    print(f"busiseg (Lightning)  images/s median (min-max): {summary(results['busiseg'])}")
    print(f"plain PyTorch loop   images/s median (min-max): {summary(results['plain'])}")
    print(f"ratio busiseg/plain  median (min-max): {summary(ratios)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **results, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
