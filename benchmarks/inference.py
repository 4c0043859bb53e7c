"""Inference latency and throughput on CPU: PyTorch eager, PyTorch inference_mode +
channels_last, and ONNX Runtime, at batch 1 and 16.

The network is the default model config (resnet34 U-Net + class head), randomly
initialised unless --ckpt is given (speed does not depend on the weights). Every path
runs the same input; outputs are compared against eager (max abs difference of logits)
so that a faster path is only reported as usable when it changes nothing.

    python benchmarks/inference.py --size 256 --batches 1 16 --repeats 10
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from busiseg.export import export_onnx, onnx_runner  # noqa: E402
from busiseg.models.net import MultiTaskUnet  # noqa: E402


def timed(fn, x, repeats: int) -> list[float]:
    fn(x)  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--ckpt", default=None, help="a busiseg checkpoint (default: random weights)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    if args.ckpt:
        from busiseg.checkpoint import load_model

        net, _ = load_model(args.ckpt)
    else:
        torch.manual_seed(0)
        net = MultiTaskUnet(encoder_name=args.encoder).eval()
    in_ch = net.in_channels

    def eager(x):
        with torch.no_grad():
            return net(torch.from_numpy(x))

    net_cl = MultiTaskUnet(encoder_name=args.encoder, in_channels=in_ch).eval()
    net_cl.load_state_dict(net.state_dict())
    net_cl = net_cl.to(memory_format=torch.channels_last)

    def inference_cl(x):
        with torch.inference_mode():
            return net_cl(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(net, torch.rand(1, in_ch, args.size, args.size), onnx_path)
        ort_run = onnx_runner(onnx_path)
        paths = {"eager": eager, "inference_mode+channels_last": inference_cl, "onnxruntime": ort_run}
        for batch in args.batches:
            x = np.random.default_rng(0).random((batch, in_ch, args.size, args.size), dtype=np.float32)
            ref = [t.numpy() for t in eager(x)]
            for name, fn in paths.items():
                out = fn(x)
                out = [o.numpy() if torch.is_tensor(o) else o for o in out]
                diff = max(float(np.abs(a - b).max()) for a, b in zip(ref, out))
                times = timed(fn, x, args.repeats)
                row = {"path": name, "batch": batch, "latency_ms_median": 1000 * statistics.median(times),
                       "latency_ms_min": 1000 * min(times), "latency_ms_max": 1000 * max(times),
                       "images_per_s": batch / statistics.median(times), "max_abs_diff_vs_eager": diff}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{args.size} px, {args.encoder}, torch threads {torch.get_num_threads()}, repeats {args.repeats}")
    print("| path | batch | latency ms median (min-max) | images/s | max abs diff vs eager |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['batch']} | {r['latency_ms_median']:.1f} ({r['latency_ms_min']:.1f}-"
              f"{r['latency_ms_max']:.1f}) | {r['images_per_s']:.1f} | {r['max_abs_diff_vs_eager']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
