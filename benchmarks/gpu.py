"""GPU training throughput of busiseg's network, for an H100/H200 (runs on CPU too, tiny).

For each combination of image size, precision (32 / bf16-mixed), channels_last and
torch.compile, and each batch size, trains the multi-task U-Net (the model/loss from
conf/, the real busiseg DataLoader with its augmentation) for a few steps and reports:
images/s, achieved TFLOP/s (FLOPs of one training step counted once with
torch.utils.flop_counter) against the card's bf16 dense peak, peak GPU memory, and the
share of each step spent waiting for the data loader.

    python benchmarks/gpu.py                                  # the full grid on cuda
    python benchmarks/gpu.py --device cpu --sizes 64 --batch-sizes 2 --steps 2 --no-compile-grid \
        model.encoder_name=resnet18                           # the CPU smoke test
    python benchmarks/gpu.py --device cpu --sizes 128 256 --batch-sizes 16 --no-compile-grid \
        --num-workers 0 --steps 6 --warmup 2                  # bf16/channels_last on a CPU (docs/performance.md 4b)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_overhead import compose_cfg  # noqa: E402

from busiseg.train import build  # noqa: E402

# dense bf16 tensor-core peaks (no sparsity), TFLOP/s
PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def card_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return name, peak
    return name, None


def train_step_flops(net, criterion, batch, device) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        mask_logits, class_logits = net(batch["image"].to(device))
        loss = criterion(mask_logits, class_logits, batch["mask"].to(device), batch["label"].to(device))["loss"]
        loss.backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_one(args, size: int, batch_size: int, precision: str, channels_last: bool, compiled: bool,
              device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ns = argparse.Namespace(size=size, batch_size=batch_size, num_workers=args.num_workers, epochs=1,
                                batches=args.steps + args.warmup, data_dir=args.data_dir, override=args.override)
        cfg = compose_cfg(ns, Path(tmp))
        datamodule, module, _ = build(cfg)
    datamodule.setup("fit")
    net, criterion = module.net.to(device), module.loss.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(list(net.parameters()) + list(criterion.parameters()), lr=1e-3)
    loader = datamodule.train_dataloader()
    first = next(iter(loader))
    flops = train_step_flops(net, criterion, first, device)
    if compiled:
        net.compile()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    waits, steps, n_images = [], [], 0
    it = iter(loader)
    step = 0
    while step < args.warmup + args.steps:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        images = batch["image"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        masks, labels = batch["mask"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        t1 = time.perf_counter()
        with autocast:
            mask_logits, class_logits = net(images)
            loss = criterion(mask_logits.float(), class_logits.float(), masks, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        if step >= args.warmup:
            waits.append(t1 - t0)
            steps.append(t2 - t0)
            n_images += images.shape[0]
        step += 1
    total = sum(steps)
    _, peak = card_peak(device)
    achieved = flops * len(steps) / total / 1e12
    return {
        "size": size, "batch_size": batch_size, "precision": precision, "channels_last": channels_last,
        "compile": compiled, "images_per_s": n_images / total, "tflops": achieved,
        "peak_fraction": achieved / peak if peak else None,
        "gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "data_wait_share": sum(waits) / total, "median_step_s": statistics.median(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16-mixed"],
                        choices=["32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"],
                        help="Lightning precisions (Hydra overrides go before the options: --precisions takes every word after it)")
    parser.add_argument("--no-compile-grid", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--num-workers", default="auto")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("override", nargs="*", help="Hydra overrides, e.g. data=busi data.root=...")
    args = parser.parse_args()

    device = torch.device(args.device)
    name, peak = card_peak(device)
    print(f"device: {name}; bf16 dense peak: {peak or 'n/a'} TFLOP/s; torch {torch.__version__}")
    torch.backends.cudnn.benchmark = True
    rows = []
    compile_opts = [False] if args.no_compile_grid else [False, True]
    for size, precision, cl, comp, bs in itertools.product(args.sizes, args.precisions, [False, True],
                                                           compile_opts, args.batch_sizes):
        try:
            row = bench_one(args, size, bs, precision, cl, comp, device)
        except torch.OutOfMemoryError:
            row = {"size": size, "batch_size": bs, "precision": precision, "channels_last": cl, "compile": comp,
                   "error": "out of memory"}
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| size | batch | precision | channels_last | compile | images/s | TFLOP/s | % of peak | GPU mem GiB |"
          " data wait |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | {r['batch_size']} | {r['precision']} | {r['channels_last']} | {r['compile']} |"
                  f" {r['error']} | | | | |")
            continue
        pct = f"{100 * r['peak_fraction']:.1f}" if r["peak_fraction"] else "n/a"
        mem = f"{r['gpu_mem_gib']:.1f}" if r["gpu_mem_gib"] is not None else "n/a"
        print(f"| {r['size']} | {r['batch_size']} | {r['precision']} | {r['channels_last']} | {r['compile']} |"
              f" {r['images_per_s']:.1f} | {r['tflops']:.2f} | {pct} | {mem} | {100 * r['data_wait_share']:.0f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
