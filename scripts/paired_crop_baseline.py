"""The paired baseline of e57 (docs/results.md): per fold of a k-fold sweep trained with ``crop_stage.normal_boxes``
> 0, the crop stage as busiseg.train runs it (``busiseg.crop_stage.for_training_run``: default settings, seed 42 as
``seed: ${seed}`` gives, the run's precision and its refined masks, RUN/mask_refiner.pt) but with normal_boxes 0,
scored on the test part. One JSON line per fold (also OUT/F/baseline.json): the network's accuracy and the crop
stage's with "none" (from RUN/metrics.json) beside the baseline's, with normal recall and training seconds.

    BUSI_ROOT=... python scripts/paired_crop_baseline.py SWEEP OUT FOLD [FOLD ...]
"""
import json
import sys
from pathlib import Path
from busiseg.checkpoint import load_model
from busiseg.crop_stage import for_training_run
from busiseg.data.busi import root_from_env, scan_busi
from busiseg.data.splits import load_split
from busiseg.models.crop_classifier import CropSettings
from busiseg.models.mask_refiner import load_mask_refiner

sweep, out = Path(sys.argv[1]), Path(sys.argv[2])
root = Path(root_from_env())
by_name = {r.name: r for r in scan_busi(root)}
for fold in [int(f) for f in sys.argv[3:]]:
    run = sweep / str(fold)
    m = json.load(open(run / "metrics.json"))
    tested = m["tested_checkpoint"]
    net, cfg = load_model(run / "checkpoints" / ("last.ckpt" if tested == "last" else Path(tested).name))
    test = [by_name[n] for n in load_split(run / "split.json")["test"]]
    info, res = for_training_run(CropSettings(seed=42), root, run / "split.json", net, {"test": test},
                                 int(cfg["data"]["image_size"]), int(cfg["data"]["in_channels"]), 32,
                                 precision=str(cfg["trainer"]["precision"]), channels_last=False, device="cpu",
                                 out=out / str(fold) / "crop_classifier.pt", progress=False,
                                 mask_refiner=load_mask_refiner(run / "mask_refiner.pt"))
    t = res["test"].as_training
    row = dict(fold=fold, network=m["metrics"]["test/accuracy"], none=m["metrics"]["test_two_stage/accuracy"],
               bm=t["accuracy"], none_recall_normal=m["metrics"]["test_two_stage/recall_normal"],
               bm_recall_normal=t["recall_normal"], network_recall_normal=m["metrics"]["test/recall_normal"],
               bm_fit_seconds=info["fit_seconds"], none_fit_seconds=m["crop_stage"]["fit_seconds"])
    print(json.dumps(row), flush=True)
    (out / str(fold) / "baseline.json").write_text(json.dumps(row, indent=1))
