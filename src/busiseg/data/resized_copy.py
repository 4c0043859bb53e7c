"""A compact copy of a BUSI-layout folder, decoded and resized exactly as the training cache holds it.

    python -m busiseg.data.resized_copy SRC DST --size 256

writes, for every image of ``SRC``, ``DST/<class>/<name>.png`` (grey, ``size`` x ``size``,
what ``busiseg.data.dataset.resize_pair`` makes of it) and one merged 1-bit mask
``DST/<class>/<name>_mask.png``. Training on ``data.root=DST data.image_size=<size>
data.in_channels=1`` then gives bit-identical cache arrays (PIL's resize to the same size is
a copy), so runs and their metrics equal runs on ``SRC`` at that size, with the same
``split.file``, while the copy is a fraction of the original's bytes (BUSI: 113 MB -> 25 MB at
256 px). Use it to ship a dataset to a machine with a small upload limit or a slow disk.

Not for other sizes, 3 channels or duplicate detection (``split=kfold`` without
``split.file`` fingerprints the original pixels; pass the split saved by a run on ``SRC``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from busiseg.data.busi import DatasetError, scan_busi
from busiseg.data.dataset import check_image_size, decode_many


def write_resized_copy(src: str | Path, dst: str | Path, size: int, progress: bool = True) -> int:
    """Write the copy; returns the number of images. ``dst`` must not exist or be empty."""
    src, dst = Path(src), Path(dst)
    check_image_size(size)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: the destination is not empty; choose a new folder")
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the destination is the source")
    records = scan_busi(src)
    if not records:
        raise DatasetError(f"{src}: no images in the BUSI layout (benign/, malignant/, normal/)")

    def store(i: int, image, mask) -> None:
        out = dst / records[i].image.relative_to(src).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(out, optimize=True)
        Image.fromarray(mask).convert("1").save(out.with_name(out.stem + "_mask.png"), optimize=True)

    decode_many(records, range(len(records)), size, 1, store,
                description=f"Writing {len(records)} images at {size} px" if progress else None)
    return len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m busiseg.data.resized_copy", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a folder in the BUSI layout")
    parser.add_argument("dst", help="a new (or empty) folder for the copy")
    parser.add_argument("--size", type=int, required=True, help="the data.image_size the copy is for")
    args = parser.parse_args(argv)
    try:
        n = write_resized_copy(args.src, args.dst, args.size)
    except (DatasetError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{n} images -> {args.dst} (train with data.root={args.dst} data.image_size={args.size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
