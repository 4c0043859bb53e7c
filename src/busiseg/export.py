"""Export a checkpoint for deployment: ``python -m busiseg.export ckpt_path=CKPT format=onnx|torchscript|pt2``.

The exported model takes float32 images (B, C, H, W) in [0, 1] (normalisation is inside
the network) and returns ``mask_logits`` (B, 1, H, W) and ``class_logits`` (B, 3). The
batch axis is dynamic; so are H and W (multiples of 32 from 64 to 4096) unless
``dynamic_size=false`` fixes them at the training size (TorchScript traces are
shape-generic either way). The predictors resize every image to the training size
(``image_size`` in the sidecar), as training did.

Formats: ``onnx`` (onnxruntime, what ``busiseg.onnx_predictor`` runs), ``torchscript``
(``torch.jit.trace``; deprecated by PyTorch but still loadable from C++ and Python),
``pt2`` (``torch.export``, its successor; ``torch.export.load(path).module()``).

Before the artifact is moved into place it is loaded back (onnxruntime / torch) and
compared with the PyTorch network on random and real images; the largest absolute
difference of the logits is printed and must be <= ``tolerance`` x the largest |logit|
(at least 1). A JSON sidecar ``<model file>.json`` (image size, channels, class names, threshold, ...) is written
beside it, so ``busiseg.onnx_predictor`` needs nothing else. See docs/deployment.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import busiseg  # noqa: E402
from busiseg.checkpoint import CheckpointError, load_model, training_run_dir  # noqa: E402
from busiseg.cli import entry_point, fail, require  # noqa: E402
from busiseg.data.labels import CLASS_NAMES  # noqa: E402
from busiseg.inference import prepare_image  # noqa: E402
from busiseg.atomic import output_folder_problem  # noqa: E402
from busiseg.onnx_predictor import (IMAGE_SUFFIXES, InputError, find_images, read_image, sidecar_path,  # noqa: E402
                                    write_bytes_atomic)

log = logging.getLogger("busiseg.export")

CONFIG_DIR = os.environ.get("BUSISEG_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))
FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2"}
INPUT_NAME = "image"
OUTPUT_NAMES = ("mask_logits", "class_logits")
MIN_SIDE, MAX_SIDE = 64, 4096  # H/W range of dynamic-size exports (multiples of 32)


USAGE = "python -m busiseg.export ckpt_path=CKPT [format=onnx|torchscript|pt2] [output=PATH] [key=value ...]"


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


class ExportError(RuntimeError):
    """The exported model does not reproduce the PyTorch one."""


@dataclass
class ParityCheck:
    what: str
    shape: tuple[int, ...]
    mask_diff: float
    class_diff: float
    scale: float  # largest |logit| of the reference: float32 rounding grows with it

    @property
    def worst(self) -> float:
        return max(self.mask_diff, self.class_diff)

    @property
    def relative(self) -> float:
        """The worst difference per unit of the largest |logit| (at least 1): float32 rounding grows with it,
        and noise inputs drive an untrained network's logits far beyond a real image's."""
        return self.worst / max(1.0, self.scale)

    def line(self) -> str:
        shape = "x".join(map(str, self.shape))
        return (f"  {self.what:<20} {shape:<14} mask_logits {self.mask_diff:.2e}   class_logits {self.class_diff:.2e}"
                f"   (max |logit| {self.scale:.1f})")


Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------- the two formats
def _dynamic_shapes(dynamic_size: bool) -> dict[str, dict[int, Any]]:
    """Batch axis dynamic; H and W too (as multiples of 32, which the U-Net needs) when ``dynamic_size``."""
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic_size:  # torch.export specialises a side of 32 (1x1 deepest features), hence from 64
        dims[2] = 32 * torch.export.Dim("height_div32", min=MIN_SIDE // 32, max=MAX_SIDE // 32)
        dims[3] = 32 * torch.export.Dim("width_div32", min=MIN_SIDE // 32, max=MAX_SIDE // 32)
    return {"images": dims}  # MultiTaskUnet.forward(images)


def export_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, opset: int | None = None,
                dynamic_size: bool = True) -> None:
    """``torch.onnx.export`` (the torch.export-based exporter), named inputs and outputs."""
    # The exporter's passes log every rewrite at INFO, which Hydra's console would show.
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter; failures still raise
        torch.onnx.export(net, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_shapes=_dynamic_shapes(dynamic_size), opset_version=opset, dynamo=True, external_data=False,
                          verbose=False)


def onnx_runner(path: Path) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask, cls = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return mask, cls

    return run


def export_torchscript(net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """``torch.jit.trace``: the U-Net has no data-dependent control flow, so the trace is the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's FutureWarning (deprecated in favour of torch.export)
        with torch.no_grad():
            traced = torch.jit.trace(net, example)
        traced.save(str(path))


def torchscript_runner(path: Path) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            mask, cls = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return mask.numpy(), cls.numpy()

    return run


def export_pt2(net: torch.nn.Module, example: torch.Tensor, path: Path, dynamic_size: bool = True) -> None:
    """``torch.export`` (the successor of TorchScript): an ExportedProgram saved with ``torch.export.save``."""
    program = torch.export.export(net, (example,), dynamic_shapes=_dynamic_shapes(dynamic_size))
    torch.export.save(program, str(path))


def pt2_runner(path: Path) -> Runner:
    module = torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            mask, cls = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return mask.numpy(), cls.numpy()

    return run


# --------------------------------------------------------------------------- parity
def real_images(source: str | Path | None, image_size: int, in_channels: int, limit: int) -> tuple[np.ndarray | None, str]:
    """Up to ``limit`` images under ``source``, spread over the folder, preprocessed as predict does.

    Returns ``(batch or None, a note saying where they came from or why there are none)``.
    """
    if limit < 1:
        return None, f"no real images: check_images={limit}"
    if source is None or not Path(source).exists():
        return None, f"no real images: {source or 'check_input not set'} not found"
    try:
        found, _ = find_images(source, "auto")
    except InputError as exc:
        return None, f"no real images: {exc}"
    if not found:
        return None, f"no real images: no images under {source} ({', '.join(IMAGE_SUFFIXES)})"
    n = min(limit, len(found))
    picked = [found[i] for i in sorted({int(round(k)) for k in np.linspace(0, len(found) - 1, num=n)})]
    batch, used, unreadable = [], [], []
    for item in picked:
        try:
            batch.append(prepare_image(read_image(item.path, in_channels), image_size).numpy())
            used.append(item.name.as_posix())
        except InputError as exc:
            log.warning("parity check: %s", exc)
            unreadable.append(exc)
    if not batch:
        return None, f"no readable images: {unreadable[0]}" + (f" (and {len(unreadable) - 1} more)"
                                                               if len(unreadable) > 1 else "")
    return np.stack(batch), f"real images from {source}: " + ", ".join(used)


def check_parity(net: torch.nn.Module, run: Runner, inputs: list[tuple[str, np.ndarray]]) -> list[ParityCheck]:
    checks = []
    for what, x in inputs:
        with torch.no_grad():
            ref_mask, ref_cls = (t.numpy() for t in net(torch.from_numpy(x)))
        mask, cls = run(x)
        if mask.shape != ref_mask.shape or cls.shape != ref_cls.shape:
            raise ExportError(f"{what}: output shapes {mask.shape}, {cls.shape} differ from PyTorch's "
                              f"{ref_mask.shape}, {ref_cls.shape}")
        checks.append(ParityCheck(what, x.shape, float(np.abs(mask - ref_mask).max()),
                                  float(np.abs(cls - ref_cls).max()),
                                  float(max(np.abs(ref_mask).max(), np.abs(ref_cls).max()))))
    return checks


# --------------------------------------------------------------------------- the command
def _number(value: Any) -> float:
    """A config value as a float; nan for anything else, which the key's own range check then refuses by name."""
    try:
        return float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        return math.nan


def default_output(ckpt_path: str | Path, fmt: str) -> Path:
    """Beside the checkpoint: ``last.ckpt`` -> ``last.onnx`` / ``last.torchscript.pt``."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(ckpt_path.stem + FORMATS[fmt])


def second_stages(ckpt_path: Path) -> list[str]:
    """The second-stage files of the checkpoint's run (``<run>/checkpoints/x.ckpt`` -> ``<run>/*.pt``), which an
    export of the network leaves out."""
    from busiseg import crop_stage, refine_stage, scan_stage

    names = (refine_stage.FILE_NAME, crop_stage.FILE_NAME, scan_stage.FILE_NAME)
    return [name for name in names if (training_run_dir(ckpt_path) / name).is_file()]


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export, check against PyTorch, move into place, write the sidecar; return the sidecar's content."""
    ckpt_path = Path(require(cfg, ("ckpt_path",), USAGE, ConfigError)[0])
    fmt = str(cfg.get("format", "onnx"))
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt} is not one of {', '.join(FORMATS)}")
    tolerance = _number(cfg.get("tolerance", 1e-5))
    if not tolerance > 0:  # nan too: nothing would ever fail the parity check
        raise ConfigError(f"tolerance must be a number > 0, got {cfg.get('tolerance')!r}")
    threshold = _number(cfg.inference.threshold)
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"inference.threshold must be a number in (0, 1), got {cfg.inference.threshold!r}")
    opset = cfg.get("opset")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)):
        raise ConfigError(f"opset must be an integer (an ONNX opset version) or null, got {opset!r}")
    check_images = cfg.get("check_images", 4)
    if isinstance(check_images, bool) or not isinstance(check_images, int) or check_images < 0:
        raise ConfigError(f"check_images must be an integer >= 0 (0: random inputs only), got {check_images!r}")
    check_input = cfg.get("check_input")  # null: the checkpoint's data.root, when it exists
    if check_input not in (None, "") and not Path(str(check_input)).expanduser().exists():
        raise ConfigError(f"check_input={check_input} does not exist (a file or folder of images; null: the "
                          f"checkpoint's data.root)")
    dynamic_size = bool(cfg.get("dynamic_size", True))
    out = Path(cfg.output).expanduser() if cfg.get("output") else default_output(ckpt_path, fmt)
    if out.is_dir() or str(cfg.get("output") or "").endswith(("/", os.sep)):  # a folder: the default name in it
        out = out / default_output(ckpt_path, fmt).name
    problem = output_folder_problem(out.parent)  # before any work, not after the export
    if problem is not None:
        given = f"output={cfg.output}" if cfg.get("output") else f"output (default {out})"
        raise ConfigError(f"{given}: {problem}")

    net, config = load_model(ckpt_path)
    try:
        image_size, in_channels = int(config["data"]["image_size"]), int(config["data"]["in_channels"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{ckpt_path}: the stored config has no usable data.image_size / data.in_channels") from None
    if dynamic_size and image_size < MIN_SIDE:
        log.warning("data.image_size=%d < %d: exporting with H and W fixed at %d", image_size, MIN_SIDE, image_size)
        dynamic_size = False
    out.parent.mkdir(parents=True, exist_ok=True)
    stages = second_stages(ckpt_path)
    if stages:
        log.warning("%s: only the network is exported; the run's %s %s not (predict applies them: "
                    "docs/deployment.md)", ckpt_path, ", ".join(stages), "is" if len(stages) == 1 else "are")
    tmp = out.with_name(f".{out.name}.partial{FORMATS[fmt]}")
    # the real images for the parity check, read before the export: a check_input the user set must give some
    source = check_input or (config.get("data") or {}).get("root")
    real, real_note = real_images(source, image_size, in_channels, check_images)
    if real is None and check_input not in (None, "") and check_images > 0:
        raise ConfigError(f"check_input={check_input}: {real_note}")

    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, in_channels, image_size, image_size, generator=generator)
    log.info("exporting %s (image size %d, %d channel(s)) to %s", ckpt_path, image_size, in_channels, out)
    try:
        try:
            if fmt == "onnx":
                export_onnx(net, example, tmp, opset, dynamic_size)
                run = onnx_runner(tmp)
            elif fmt == "pt2":
                export_pt2(net, example, tmp, dynamic_size)
                run = pt2_runner(tmp)
            else:
                export_torchscript(net, example, tmp)
                run = torchscript_runner(tmp)
        except Exception as exc:  # the exporters raise many types; the first line says what went wrong
            shapes = dynamic_size and fmt != "torchscript" and not isinstance(exc, OSError)  # not a file's fault
            hint = "; try dynamic_size=false" if shapes else ""
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ExportError(f"{ckpt_path}: {fmt} export failed ({exc.__class__.__name__}: {first}){hint}") from exc

        inputs = [(f"random, batch {example.shape[0]}", example.numpy()),
                  ("random, batch 3", torch.rand(3, in_channels, image_size, image_size, generator=generator).numpy())]
        if dynamic_size or fmt == "torchscript":
            other = (image_size + 64, max(MIN_SIDE, image_size - 32))
            inputs.append(("random, other size", torch.rand(1, in_channels, *other, generator=generator).numpy()))
        if real is not None:
            inputs.append((f"real, {len(real)} images", real))
        checks = check_parity(net, run, inputs)
        worst = max(c.worst for c in checks)
        relative = max(c.relative for c in checks)
        report = "\n".join([f"parity {fmt} vs PyTorch, max |difference| of logits (CPU, tolerance {tolerance:.0e} "
                            f"x max |logit|, at least 1):"]
                           + [c.line() for c in checks]
                           + [f"  ({real_note})" if real is not None else f"  ({real_note}; random inputs only)"
                              if check_images == 0 else
                              f"  ({real_note}; random inputs only: set check_input=FOLDER to add real ones)"]
                           + [f"  worst {worst:.2e}, {relative:.1e} of max |logit|: "
                              f"{'OK' if relative <= tolerance else 'FAILED'}"])
        print(report)  # stdout, not the log: Hydra would print it twice
        if relative > tolerance:
            raise ExportError(f"{out}: the exported model differs from PyTorch by {relative:.1e} of the largest "
                              f"|logit| > tolerance {tolerance:.0e}; nothing written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)

    options = OmegaConf.to_container(cfg.inference, resolve=True)
    ignored = [k for k in ("tta_scales", "min_component_px", "fill_holes", "keep_largest", "class_gating")
               if options.get(k)]
    if ignored and fmt == "onnx":
        log.warning("the ONNX predictor applies only the threshold and flip TTA; ignored: inference.%s",
                    ", inference.".join(ignored))
    sidecar = {
        "format": fmt,
        "model_file": out.name,
        "image_size": image_size,
        "in_channels": in_channels,
        "class_names": list(CLASS_NAMES),
        "threshold": threshold,
        "tta_flip": bool(options.get("tta_flip", False)),
        "input_name": INPUT_NAME,
        "output_names": list(OUTPUT_NAMES),
        "input": (f"float32 (batch, {in_channels}, H, W) in [0, 1]; the predictors use H = W = image_size "
                  f"(Pillow bilinear resize of the uint8 image)"),
        "dynamic_axes": {"batch": True,
                         "height_width": "multiples of 32 (the trace is shape-generic)" if fmt == "torchscript"
                         else f"multiples of 32, {MIN_SIDE}..{MAX_SIDE}" if dynamic_size
                         else f"fixed at {image_size}x{image_size}"},
        "outputs": "mask_logits (batch, 1, H, W): sigmoid >= threshold is lesion; class_logits (batch, 3): "
                   "softmax over class_names",
        "parity": {"tolerance": tolerance, "max_abs_diff": worst, "max_relative_diff": relative,
                   "checks": [{"input": c.what, "shape": list(c.shape), "mask_logits": c.mask_diff,
                               "class_logits": c.class_diff, "max_abs_logit": c.scale} for c in checks]},
        "source_checkpoint": str(ckpt_path),
        "second_stages_not_exported": stages,
        "busiseg_version": busiseg.__version__,
        "torch_version": torch.__version__,
    }
    if fmt == "onnx":
        import onnx

        sidecar["opset"] = next((o.version for o in onnx.load(str(out), load_external_data=False).opset_import
                                 if o.domain in ("", "ai.onnx")), None)
    write_bytes_atomic(sidecar_path(out), (json.dumps(sidecar, indent=2) + "\n").encode())
    log.info("wrote %s and %s", out, sidecar_path(out).name)
    print(f"wrote {out}\n      {sidecar_path(out)}")
    return sidecar


@entry_point("busiseg.export", CONFIG_DIR, "export")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except (ConfigError, CheckpointError) as exc:
        fail(log, exc, 2, prog="busiseg.export")
    except ExportError as exc:
        fail(log, exc, 1, prog="busiseg.export")


if __name__ == "__main__":
    main()
