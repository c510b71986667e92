"""``xswinir eval``: PSNR/SSIM of a model, or of bicubic up-sampling, on an HR test set, as papers report them.

The LR inputs come from a folder (the benchmark files, ``baby.png`` <-> ``babyx2.png``) or are made on the
fly from the HR images exactly as the official ones were: MATLAB bicubic down-sampling of the modcropped
HR, rounded to 8 bits. Metrics are measured on 8-bit images with ``crop_border = scale``, on RGB and on the
BT.601 Y channel (:mod:`xswinir.metrics`). :func:`evaluate` is the importable core.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xswinir.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

HELP = "PSNR/SSIM (RGB and Y) of a checkpoint or of bicubic up-sampling on an HR test set"

METRIC_KEYS = ("psnr", "ssim", "psnr_y", "ssim_y")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hr", required=True, help="folder (or file) of ground-truth HR images")
    parser.add_argument("--lr", help="folder of LR inputs matched by file stem (baby.png <-> babyx2.png); "
                                     "default: MATLAB-bicubic down-sampling of the HR images")
    parser.add_argument("--scale", type=int, help="SR scale; default: the model's, or HR size / LR size")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="model to evaluate: .safetensors, training checkpoint folder, or .pth")
    what.add_argument("--bicubic", action="store_true", help="evaluate plain MATLAB-bicubic up-sampling")
    parser.add_argument("--preset", help="architecture of a published .pth checkpoint (e.g. swinir-s-x2)")
    parser.add_argument("--tile", type=int, help="LR tile size for bounded memory (default: whole images)")
    parser.add_argument("--overlap", type=int, default=32, help="LR pixels shared by neighbouring tiles (%(default)s)")
    parser.add_argument("--self-ensemble", action="store_true", help="average over 8 flips/transposes (x8 time)")
    parser.add_argument("--out", help="write the per-image results to this .csv or .json file")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")


def _lr_index(lr_dir: str | Path) -> dict[str, Path]:
    from xswinir.images import resolve_image_files

    try:
        files = resolve_image_files(lr_dir)
    except FileNotFoundError as err:
        raise UserError(f"--lr: {err}") from err
    return {p.stem: p for p in files}


def _match_lr(hr_path: Path, lr_files: dict[str, Path], scale: int | None) -> Path:
    """The LR file of one HR image: ``{stem}x{s}``, ``{stem}_x{s}`` or ``{stem}``."""
    stem = hr_path.stem
    if scale is not None:
        candidates = [f"{stem}x{scale}", f"{stem}_x{scale}", stem]
    else:
        candidates = [stem] + sorted(k for k in lr_files if re.fullmatch(re.escape(stem) + r"_?x\d+", k))
    for name in candidates:
        if name in lr_files:
            return lr_files[name]
    raise UserError(f"no LR image for {hr_path.name} (looked for {', '.join(candidates[:3])} in the --lr folder)")


def evaluate(
    hr: str | Path | Sequence[Path],
    scale: int | None = None,
    model: nn.Module | None = None,
    lr: str | Path | None = None,
    tile: int | None = None,
    overlap: int = 32,
    self_ensemble: bool = False,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """PSNR/SSIM of a model (or of bicubic up-sampling when ``model`` is None) on each HR image.

    Args:
        hr: a folder or file of HR images, or a list of files.
        scale: SR scale; None takes ``model.upscale``, or HR size / LR size with an ``lr`` folder.
        model: a restoration model in eval mode on ``device``; None evaluates bicubic up-sampling.
        lr: folder of LR inputs matched by stem; None makes them by MATLAB bicubic down-sampling.
        tile: LR tile size for :func:`xswinir.inference.restore`; None runs whole images.
        overlap: tile overlap in LR pixels.
        self_ensemble: x8 flip/transpose ensemble.
        device: where the model and the images go.

    Returns:
        One dict per image: ``image`` (file stem), ``psnr``, ``ssim``, ``psnr_y``, ``ssim_y`` (floats; PSNR
        in dB, Y on BT.601 luma, ``crop_border = scale``), ``height``, ``width`` (HR) and ``seconds`` (time
        of the restoration).

    Raises:
        UserError: no images, an unmatched or unreadable file, or sizes that do not fit the scale.
    """
    import time

    import torch

    from xswinir.images import read_image, resolve_image_files
    from xswinir.inference import bicubic_upscale, restore
    from xswinir.metrics import all_metrics
    from xswinir.resize import imresize, modcrop

    if isinstance(hr, (str, Path)):
        try:
            hr_files = resolve_image_files(hr)
        except FileNotFoundError as err:
            raise UserError(f"--hr: {err}") from err
    else:
        hr_files = [Path(p) for p in hr]
    if model is not None:
        model_scale = int(getattr(model, "upscale", scale or 1))
        if scale is not None and scale != model_scale:
            raise UserError(f"--scale {scale} does not match the model's upscale {model_scale}")
        scale = model_scale
    if scale is None and lr is None:
        raise UserError("give --scale (or --lr, whose image sizes imply it)")
    if model is None and scale == 1:
        raise UserError("bicubic evaluation needs a scale above 1")
    if model is not None and scale == 1 and lr is None:
        raise UserError("a model with upscale 1 restores degraded images: give their folder with --lr")
    channels = int(getattr(model, "in_chans", 3)) if model is not None else 3
    device = torch.device(device)
    lr_files = _lr_index(lr) if lr is not None else {}
    rows = []
    for hr_path in hr_files:
        gt = read_image(hr_path, channels)
        if lr is not None:
            lr_path = _match_lr(hr_path, lr_files, scale)
            lq = read_image(lr_path, channels)
            image_scale = scale or round(gt.shape[-1] / lq.shape[-1])
            gt = modcrop(gt, image_scale)
            if tuple(gt.shape[-2:]) != (lq.shape[-2] * image_scale, lq.shape[-1] * image_scale):
                raise UserError(f"{lr_path.name} is {lq.shape[-1]}x{lq.shape[-2]}, which is not "
                                f"{hr_path.name} ({gt.shape[-1]}x{gt.shape[-2]} after modcrop) / {image_scale}")
        else:
            image_scale = scale
            gt = modcrop(gt, image_scale)
            # The official LR files are MATLAB imresize on uint8: rounded after each pass.
            lq = imresize(gt, 1 / image_scale, round_intermediate=True)
        gt, lq = gt[None].to(device), lq[None].to(device)
        start = time.perf_counter()
        if model is None:
            sr = bicubic_upscale(lq, image_scale)
        else:
            sr = restore(model, lq, tile=tile, overlap=overlap, self_ensemble=self_ensemble)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        values = all_metrics(sr.clamp(0, 1), gt, crop_border=image_scale)
        row: dict[str, Any] = {"image": hr_path.stem}
        row.update({k: float(values[k][0]) for k in METRIC_KEYS})  # one sync per image, not in a hot path
        row.update({"scale": image_scale, "height": gt.shape[-2], "width": gt.shape[-1], "seconds": seconds})
        rows.append(row)
    return rows


def average(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each metric over ``rows``, as a row named ``average``."""
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in METRIC_KEYS}
    return {"image": "average", **mean, "seconds": sum(r["seconds"] for r in rows) / len(rows)}


def format_table(rows: list[dict[str, Any]]) -> str:
    """The per-image rows and their average as an aligned text table."""
    header = f"{'image':<16} {'PSNR':>8} {'SSIM':>7} {'PSNR-Y':>8} {'SSIM-Y':>7} {'seconds':>8}"
    lines = [header, "-" * len(header)]
    for row in [*rows, average(rows)]:
        if row["image"] == "average":
            lines.append("-" * len(header))
        lines.append(f"{row['image'][:16]:<16} {row['psnr']:8.3f} {row['ssim']:7.4f} {row['psnr_y']:8.3f} "
                     f"{row['ssim_y']:7.4f} {row['seconds']:8.3f}")
    return "\n".join(lines)


def write_results(path: str | Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    """Writes the rows (plus an ``average`` row) as CSV, or as JSON ``{**info, images, average}``."""
    import csv
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({**info, "images": rows, "average": average(rows)}, indent=2))
    elif path.suffix.lower() == ".csv":
        columns = list(rows[0])
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            writer.writerow(average(rows))
    else:
        raise UserError(f"--out {path}: use a .csv or .json file name")
    return path


def run(args: argparse.Namespace) -> int:
    from xswinir.inference import resolve_device

    if args.out and Path(args.out).suffix.lower() not in (".csv", ".json"):
        raise UserError(f"--out {args.out}: use a .csv or .json file name")
    if args.bicubic and (args.self_ensemble or args.preset):
        raise UserError("--self-ensemble and --preset need a --checkpoint")
    device = resolve_device(args.device)
    model = None
    info: dict[str, Any] = {"hr": args.hr, "lr": args.lr, "method": "bicubic"}
    if args.checkpoint:
        from xswinir.model import load_model

        model, cfg = load_model(args.checkpoint, preset=args.preset)
        model = model.to(device).eval()
        info.update(method="model", checkpoint=args.checkpoint, preset=cfg.preset, tile=args.tile,
                    overlap=args.overlap, self_ensemble=args.self_ensemble)
    rows = evaluate(args.hr, scale=args.scale, model=model, lr=args.lr, tile=args.tile, overlap=args.overlap,
                    self_ensemble=args.self_ensemble, device=device)
    info["scale"] = rows[0]["scale"]
    what = f"checkpoint {args.checkpoint}" if args.checkpoint else "bicubic"
    print(f"{what}, x{info['scale']}, {len(rows)} images, crop_border={info['scale']}, device {device}")
    print(format_table(rows))
    if args.out:
        print(f"wrote {write_results(args.out, rows, info)}")
    return 0
