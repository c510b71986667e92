"""Evaluation of a restoration model, or of bicubic up-sampling, on HR test sets: per-image metric rows.

Each HR image is modcropped to the scale and gets its LQ input in one of three ways:

- default: MATLAB bicubic down-sampling rounded to 8 bits, exactly as the official benchmark LR files were
  made, so results compare with the papers';
- ``lr``: a folder of LQ files matched by stem (``baby.png`` <-> ``babyx2.png``);
- ``degradation``: a preset of :data:`xswinir.config.DEGRADATION_PRESETS` applied by the training
  :class:`~xswinir.degradations.Degrader` on CPU, with a generator seeded by ``sample_seed(seed, file
  name)``. Every model sees exactly the same inputs for the same seed, whatever the file order or device,
  and the input is rounded to 8 bits as a saved PNG would be (``save_lq`` writes those PNGs).

Metrics (:mod:`xswinir.metrics`) are measured on 8-bit images with ``crop_border = scale``: PSNR and SSIM on
RGB and on BT.601 Y, MS-SSIM and the spatial correlation coefficient on Y, and LPIPS when its weights are
on disk. :func:`evaluate` is the core the CLI uses; :func:`evaluate_model` is the call for study runners.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xswinir.errors import UserError
from xswinir.metrics import EVAL_METRICS, LPIPS, MS_SSIM_BETAS, SSIM_WINDOW

if TYPE_CHECKING:
    from torch import nn

    from xswinir.config import Config
    from xswinir.data import ImageList
    from xswinir.degradations import Degrader

log = logging.getLogger(__name__)

AVERAGE = "average"  # the ``image`` of a mean row
ALL_SETS = "all"  # the ``set`` of the mean over every image of several sets


def image_seed(seed: int, name: str) -> int:
    """The degradation seed of one image: a stable hash of ``(seed, file name)``, independent of file order."""
    from xswinir.data import sample_seed

    name_key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return sample_seed(seed, name_key)


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Rounds ``[0, 1]`` values to the 8-bit grid, half up, as :func:`xswinir.images.to_uint8` (and a PNG) does."""
    return x.clamp(0, 1).mul(255.0).add(0.5).floor().div(255.0)


def build_lq_degrader(degradation: str, scale: int) -> Degrader:
    """The degrader of a named preset.

    Raises:
        UserError: the name is not a key of :data:`xswinir.config.DEGRADATION_PRESETS`.
    """
    from xswinir.config import DEGRADATION_PRESETS
    from xswinir.degradations import build_degrader

    if degradation not in DEGRADATION_PRESETS:
        raise UserError(f"unknown degradation '{degradation}'; choose from {', '.join(sorted(DEGRADATION_PRESETS))}")
    return build_degrader(DEGRADATION_PRESETS[degradation], scale)


@torch.no_grad()
def degrade(degrader: Degrader, gt: torch.Tensor, name: str, seed: int) -> torch.Tensor:
    """The LQ input of one HR image: degraded on CPU with its own seeded generator, rounded to 8 bits.

    Args:
        degrader: from :func:`build_lq_degrader`.
        gt: ``(C, H, W)`` in [0, 1], H and W multiples of the degrader's scale.
        name: the image's file name; with ``seed`` it fixes the random draw.
        seed: the evaluation seed.

    Returns:
        ``(C, H / scale, W / scale)`` float32 on CPU, on the 8-bit grid.
    """
    generator = torch.Generator(device="cpu").manual_seed(image_seed(seed, name))
    lq, _ = degrader(gt.detach().float().cpu().unsqueeze(0), generator)
    return to_8bit(lq[0])


def _open_source(hr: str | Path | Sequence[Path], channels: int) -> ImageList:
    from xswinir.data import FileImages, open_images

    if isinstance(hr, (str, Path)):
        return open_images(str(hr), channels)
    paths = [Path(p) for p in hr]
    if not paths:
        raise UserError("no HR images given")
    return FileImages(paths, channels)


def _lr_index(lr_dir: str | Path) -> dict[str, Path]:
    from xswinir.images import resolve_image_files

    try:
        files = resolve_image_files(lr_dir)
    except FileNotFoundError as err:
        raise UserError(f"--lr: {err}") from err
    return {p.stem: p for p in files}


def _match_lr(hr_name: str, lr_files: dict[str, Path], scale: int | None) -> Path:
    """The LR file of one HR image: ``{stem}x{s}``, ``{stem}_x{s}`` or ``{stem}``."""
    from xswinir.images import lq_candidates

    stem = Path(hr_name).stem
    if scale is not None:
        candidates = lq_candidates(hr_name, scale)
    else:
        candidates = [stem] + sorted(k for k in lr_files if re.fullmatch(re.escape(stem) + r"_?x\d+", k))
    for name in candidates:
        if name in lr_files:
            return lr_files[name]
    raise UserError(f"no LR image for {Path(hr_name).name} (looked for {', '.join(candidates[:3])} in the --lr folder)")


def _check_route(model: nn.Module | None, scale: int | None, lr: str | Path | None,
                 degradation: str | None) -> int | None:
    """The scale to evaluate at (None: implied by the LR files), or a UserError for a route that cannot work."""
    if degradation is not None and lr is not None:
        raise UserError("--degradation and --lr are mutually exclusive: --lr reads the LQ inputs, --degradation "
                        "makes them from the HR images")
    if model is not None and hasattr(model, "upscale"):
        model_scale = int(model.upscale)
        if scale is not None and scale != model_scale:
            raise UserError(f"--scale {scale} does not match the model's upscale {model_scale}")
        scale = model_scale
    if scale is None and lr is None:
        raise UserError("give --scale (or --lr, whose image sizes imply it)")
    if scale == 1 and lr is None and degradation is None:
        if model is None:
            raise UserError("bicubic evaluation needs a scale above 1 (or a --degradation to compare against)")
        raise UserError("a model with upscale 1 restores degraded images: give --degradation, or their folder "
                        "with --lr")
    return scale


def evaluate(
    hr: str | Path | Sequence[Path],
    scale: int | None = None,
    model: nn.Module | None = None,
    lr: str | Path | None = None,
    tile: int | None = None,
    overlap: int = 32,
    self_ensemble: bool = False,
    device: str | torch.device = "cpu",
    degradation: str | None = None,
    seed: int = 0,
    save_lq: str | Path | None = None,
    set_name: str | None = None,
    lpips: bool = True,
    skipped: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The metrics of a model (or of bicubic up-sampling when ``model`` is None) on each HR image of one set.

    Args:
        hr: a folder or file of HR images, ``skimage:NAMES``, Parquet shards (as
            :func:`xswinir.data.open_images`), or a list of files.
        scale: SR scale; None takes ``model.upscale``, or HR size / LR size with an ``lr`` folder.
        model: a restoration model in eval mode on ``device``; None evaluates bicubic up-sampling of the
            LQ input (the input itself at scale 1).
        lr: folder of LQ inputs matched by stem; excludes ``degradation``.
        tile: LQ tile size for :func:`xswinir.inference.restore`; None runs whole images.
        overlap: tile overlap in LQ pixels.
        self_ensemble: x8 flip/transpose ensemble.
        device: where the model and the images go; degradations always run on CPU.
        degradation: a :data:`xswinir.config.DEGRADATION_PRESETS` name; None: MATLAB bicubic down-sampling.
        seed: with ``degradation``, the seed that (with each file name) fixes the inputs.
        save_lq: folder to write the LQ inputs to, as ``{stem}.png``.
        set_name: the ``set`` of every row; None: ``str(hr)`` (the common folder of a list of files).
        lpips: measure LPIPS if its weights are on disk (:func:`xswinir.metrics.load_lpips`).
        skipped: a list that gets one ``"name: reason"`` line per image skipped (also logged as a warning).

    Returns:
        One dict per measured image, in source order: ``image`` (file stem), the
        :data:`xswinir.metrics.EVAL_METRICS` (float; PSNR in dB, inf for a perfect result; ``lpips`` None
        when not available), ``set``, ``scale``, ``height``, ``width`` (HR after modcrop), ``seconds`` (the
        restoration) and ``ms_ssim_scales`` (5 from 176 px after cropping). Images that cannot be read
        (corrupt, truncated, over :func:`xswinir.images.max_pixels`) and images too small for an 11 x 11
        SSIM window once modcropped and cropped by ``scale`` on every side (under ``11 + 2 * scale`` px per
        side, e.g. 15 px at x2) are skipped with the reason, see ``skipped``.

        Memory stays bounded for large images: the bicubic resizes and the metrics run in tiles, so the peak
        grows with the HR image and the result held as float32 (about 50 bytes per HR pixel in all for RGB,
        measured by ``bench/bench_memory.py``: 1.5 GB RSS at 4000 x 4000); a model's own memory is bounded by
        ``tile``.

    Raises:
        UserError: no images, an unmatched LR file, sizes that do not fit the scale, an unknown
            degradation, ``lr`` with ``degradation``, or a duplicate stem with ``save_lq``.
    """
    from xswinir.images import ImageReadError, printable_path, read_image, write_image
    from xswinir.inference import bicubic_downscale, bicubic_upscale, restore
    from xswinir.metrics import load_lpips
    from xswinir.resize import modcrop

    def skip(reason: str) -> None:
        log.warning("skipping %s", reason)
        if skipped is not None:
            skipped.append(reason)

    scale = _check_route(model, scale, lr, degradation)
    channels = int(getattr(model, "in_chans", 3)) if model is not None else 3
    images = _open_source(hr, channels)
    if set_name is None:
        set_name = str(hr) if isinstance(hr, (str, Path)) else os.path.commonpath([str(Path(p).parent) for p in hr])
    device = torch.device(device)
    degrader = build_lq_degrader(degradation, scale) if degradation is not None else None
    lr_files = _lr_index(lr) if lr is not None else {}
    lpips_metric = load_lpips() if lpips else None
    save_dir = Path(save_lq) if save_lq is not None else None
    saved: set[str] = set()
    rows = []
    for index, name in enumerate(images.names):
        shown = printable_path(name)
        stem = printable_path(Path(name).stem)
        try:
            gt = images.load(index)
        except ImageReadError as err:
            skip(str(err))
            continue
        if lr is not None:
            lr_path = _match_lr(name, lr_files, scale)
            try:
                lq = read_image(lr_path, channels)
            except ImageReadError as err:
                skip(str(err))
                continue
            image_scale = scale or max(1, round(gt.shape[-1] / lq.shape[-1]))
        else:
            image_scale = scale
        gt = modcrop(gt, image_scale)
        h, w = gt.shape[-2:]
        if min(h, w) - 2 * image_scale < SSIM_WINDOW:
            skip(f"{shown}: too small to measure at x{image_scale}: {w}x{h} after modcrop, under "
                 f"{SSIM_WINDOW + 2 * image_scale} px per side once {image_scale} px are cropped from each side "
                 f"for the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window")
            continue
        if lr is not None and tuple(gt.shape[-2:]) != (lq.shape[-2] * image_scale, lq.shape[-1] * image_scale):
            raise UserError(f"{printable_path(lr_path.name)} is {lq.shape[-1]}x{lq.shape[-2]}, which is not "
                            f"{printable_path(Path(name).name)} ({w}x{h} after modcrop) / {image_scale}")
        if degrader is not None:
            lq = degrade(degrader, gt, Path(name).name, seed)
        elif lr is None:
            # The official LR files are MATLAB imresize on uint8: rounded after each pass.
            lq = bicubic_downscale(gt, image_scale)
        if save_dir is not None:
            if stem in saved:
                raise UserError(f"--save-lq: two images of {printable_path(set_name)} are named {stem}")
            saved.add(stem)
            write_image(save_dir / f"{stem}.png", lq, overwrite=True)
        gt, lq = gt[None].to(device), lq[None].to(device)
        start = time.perf_counter()
        if model is not None:
            sr = restore(model, lq, tile=tile, overlap=overlap, self_ensemble=self_ensemble)
        else:
            sr = bicubic_upscale(lq, image_scale) if image_scale > 1 else lq
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        sr = sr.clamp(0, 1)  # rebound: the unclamped copy is freed before the metrics' working set is allocated
        row: dict[str, Any] = {"image": stem, **measure(sr, gt, image_scale, lpips_metric)}
        row.update({"set": set_name, "scale": image_scale, "height": h, "width": w, "seconds": seconds,
                    "ms_ssim_scales": _log_small(shown, row, h - 2 * image_scale, w - 2 * image_scale)})
        rows.append(row)
        del gt, lq, sr  # the next image's decode should not sit beside this one's tensors
    return rows


def _log_small(name: str, row: dict[str, Any], h: int, w: int) -> int:
    """Says which metrics an image is too small for; returns its number of MS-SSIM scales."""
    from xswinir.metrics import LPIPS_MIN_SIZE, ms_ssim_scales

    scales = ms_ssim_scales(h, w)
    if scales < len(MS_SSIM_BETAS):
        log.info("ms_ssim_y of %s uses %d of %d scales (%dx%d after cropping; all need 176 px per side)",
                 name, scales, len(MS_SSIM_BETAS), w, h)
    if row[LPIPS] is not None and math.isnan(row[LPIPS]):
        log.warning("lpips of %s is NaN: %dx%d after cropping, AlexNet needs %d px per side", name, w, h,
                    LPIPS_MIN_SIZE)
    return scales


def measure(sr: torch.Tensor, gt: torch.Tensor, crop_border: int, lpips_metric: nn.Module | None = None,
            ) -> dict[str, float | None]:
    """Every :data:`xswinir.metrics.EVAL_METRICS` of one image pair.

    Args:
        sr: ``(1, C, H, W)`` in [0, 1].
        gt: ``(1, C, H, W)`` in [0, 1].
        crop_border: pixels cut from every side (the scale).
        lpips_metric: from :func:`xswinir.metrics.load_lpips`; None reports ``lpips`` as None.

    Returns:
        Metric name -> float (one CPU sync per metric, once per image; not a hot path).
    """
    from xswinir.metrics import LPIPS_MAX_PIXELS, MS_SSIM_Y, SCC_Y, all_metrics, lpips, ms_ssim, scc

    values = {k: float(v[0]) for k, v in all_metrics(sr, gt, crop_border).items()}
    values[MS_SSIM_Y] = float(ms_ssim(sr, gt, crop_border, y_channel=True)[0])
    values[SCC_Y] = float(scc(sr, gt, crop_border, y_channel=True)[0])
    if lpips_metric is not None and sr.shape[-2] * sr.shape[-1] > LPIPS_MAX_PIXELS:
        log.info("lpips n/a for an image over %d pixels (AlexNet runs on the whole image)", LPIPS_MAX_PIXELS)
        lpips_metric = None
    values[LPIPS] = float(lpips(sr, gt, lpips_metric, crop_border)[0]) if lpips_metric is not None else None
    return {k: values[k] for k in EVAL_METRICS}


def evaluate_model(
    model: torch.nn.Module | None,
    hr_source: str,
    scale: int,
    *,
    degradation: str | None = "blur-noise",
    seed: int = 0,
    tile: int | None = None,
    device: str | torch.device = "cpu",
    save_lq: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Per-image metrics of a model, or of the bicubic baseline, on one HR source: the study runner's call.

    Args:
        model: the restoration model (moved to ``device`` and run in eval mode; its training flag is
            restored after), with ``upscale == scale`` if it has that attribute; None: bicubic up-sampling
            of the same inputs (the inputs themselves at scale 1).
        hr_source: HR images as :func:`xswinir.data.open_images` takes them (folder, file, ``skimage:val``).
        scale: SR scale; 1 for denoising models.
        degradation: a :data:`xswinir.config.DEGRADATION_PRESETS` name, seeded per file name; None: MATLAB
            bicubic down-sampling (needs ``scale > 1``).
        seed: the degradation seed: the same seed gives every model bit-identical inputs.
        tile: LQ tile size; None runs whole images.
        device: where the model runs.
        save_lq: folder to write the LQ inputs to as ``{stem}.png``.

    Returns:
        One dict per image: ``image``, ``set`` (``hr_source``) and the :data:`xswinir.metrics.EVAL_METRICS`
        (NaN or None where not computable), plus ``scale``, ``height``, ``width``, ``seconds`` and
        ``ms_ssim_scales``; see :func:`evaluate`.
    """
    if model is None:
        return evaluate(hr_source, scale=scale, degradation=degradation, seed=seed, device=device, save_lq=save_lq,
                        set_name=hr_source)
    was_training = model.training
    model = model.to(device).eval()
    try:
        return evaluate(hr_source, scale=scale, model=model, tile=tile, device=device, degradation=degradation,
                        seed=seed, save_lq=save_lq, set_name=hr_source)
    finally:
        model.train(was_training)


def _mean(values: list[Any]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def average(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each metric over ``rows`` (ignoring NaN and None), as a row named ``average``.

    Its ``set`` is the rows' set, or ``all`` when they come from several.
    """
    sets = {r.get("set") for r in rows}
    mean = {k: _mean([r.get(k) for r in rows]) for k in EVAL_METRICS}
    return {"image": AVERAGE, **mean, "set": sets.pop() if len(sets) == 1 else ALL_SETS,
            "seconds": sum(r["seconds"] for r in rows) / len(rows)}


def split_sets(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows grouped by ``set``, in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get("set", ""), []).append(row)
    return groups


_COLUMNS = (  # (key, header, width, format) of the printed table
    ("psnr", "PSNR", 8, ".3f"), ("ssim", "SSIM", 7, ".4f"), ("psnr_y", "PSNR-Y", 8, ".3f"),
    ("ssim_y", "SSIM-Y", 7, ".4f"), ("ms_ssim_y", "MS-SSIM-Y", 9, ".4f"), ("scc_y", "SCC-Y", 7, ".4f"),
    ("lpips", "LPIPS", 7, ".4f"), ("seconds", "seconds", 8, ".3f"),
)


def _cell(value: Any, width: int, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'n/a':>{width}}"
    return f"{value:{width}{spec}}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The per-image rows and a mean row per set as aligned text; higher is better except LPIPS."""
    header = f"{'image':<16} " + " ".join(f"{title:>{width}}" for _, title, width, _ in _COLUMNS)
    lines: list[str] = []
    groups = split_sets(rows)
    for set_name, group in groups.items():
        lines += [f"{set_name} ({len(group)} images)", header, "-" * len(header)]
        for row in [*group, None, average(group)]:
            if row is None:
                lines.append("-" * len(header))
                continue
            cells = " ".join(_cell(row.get(key), width, spec) for key, _, width, spec in _COLUMNS)
            lines.append(f"{row['image'][:16]:<16} {cells}")
        lines.append("")
    if len(groups) > 1:
        cells = " ".join(_cell(average(rows).get(key), width, spec) for key, _, width, spec in _COLUMNS)
        lines.append(f"{'all sets':<16} {cells}")
    return "\n".join(lines).rstrip("\n")


def _json_safe(value: Any) -> Any:
    """NaN and inf are not JSON: NaN becomes null, inf a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_results(path: str | Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    """Writes the rows as CSV or JSON, with a ``set`` column and a mean row per set.

    Written atomically (:mod:`xswinir.atomic`). CSV: each set's rows then its ``average`` row, and with
    several sets a last ``average`` row of set ``all``; a missing value is ``n/a``. JSON: ``{**info,
    "images": rows, "sets": {set: mean row}, "average": mean over all images}`` with NaN as null and inf as
    ``"inf"``.
    """
    import csv
    import io
    import json

    from xswinir.atomic import atomic_write_text

    path = Path(path)
    if path.suffix.lower() not in (".csv", ".json"):
        raise UserError(f"--out {path}: use a .csv or .json file name")
    groups = split_sets(rows)
    if path.suffix.lower() == ".json":
        data = {**info, "images": rows, "sets": {name: average(group) for name, group in groups.items()},
                "average": average(rows)}
        return atomic_write_text(path, json.dumps(_json_safe(data), indent=2))
    table = [r for group in groups.values() for r in (*group, average(group))]
    if len(groups) > 1:
        table.append(average(rows))
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]), extrasaction="ignore")
    writer.writeheader()
    for row in table:
        writer.writerow({k: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                         for k, v in row.items()})
    return atomic_write_text(path, handle.getvalue())  # complete or not there: a killed run leaves no half table


# The trainer's validation: the training degradation of a few images, Y-PSNR/SSIM against bicubic.


@dataclass
class ValidationSet:
    """Validation images and their fixed degraded inputs, made once per run."""

    names: list[str]
    gt: list[torch.Tensor]  # (1, C, H, W), modcropped to the scale
    lq: list[torch.Tensor]  # (1, C, H / scale, W / scale)


def build_validation_set(cfg: Config, degrader: nn.Module, device: torch.device) -> ValidationSet:
    """The training run's validation images, each degraded once with a fixed seed."""
    from xswinir.data import load_val_images

    names, gts, lqs = [], [], []
    for index, (name, gt) in enumerate(load_val_images(cfg)):
        gt = gt.unsqueeze(0).to(device)
        # The same degradation of each image in every validation, so that the curve compares like with like.
        generator = torch.Generator(device=device).manual_seed(10_000 + index)
        with torch.no_grad():
            lq, _ = degrader(gt, generator)
        names.append(name)
        gts.append(gt)
        lqs.append(lq)
    if not names:
        raise UserError(f"no validation images in '{cfg.data.val}'")
    return ValidationSet(names, gts, lqs)


@torch.no_grad()
def evaluate_images(model: nn.Module, val: ValidationSet, scale: int, tile: int | None) -> list[dict[str, Any]]:
    """Y-PSNR / Y-SSIM of the model and of plain bicubic up-sampling, per validation image."""
    from xswinir.inference import bicubic_upscale, restore
    from xswinir.metrics import VAL_PSNR_BICUBIC_Y, VAL_PSNR_Y, VAL_SSIM_BICUBIC_Y, VAL_SSIM_Y, psnr, ssim

    was_training = model.training
    model.eval()
    rows = []
    for name, gt, lq in zip(val.names, val.gt, val.lq, strict=True):
        sr = restore(model, lq, tile=tile).clamp(0, 1)
        baseline = bicubic_upscale(lq, scale).clamp(0, 1) if scale > 1 else lq
        rows.append({
            "image": name,
            VAL_PSNR_Y: psnr(sr, gt, crop_border=scale, y_channel=True).item(),
            VAL_SSIM_Y: ssim(sr, gt, crop_border=scale, y_channel=True).item(),
            VAL_PSNR_BICUBIC_Y: psnr(baseline, gt, crop_border=scale, y_channel=True).item(),
            VAL_SSIM_BICUBIC_Y: ssim(baseline, gt, crop_border=scale, y_channel=True).item(),
        })
    model.train(was_training)
    return rows


def validate(model: nn.Module, val: ValidationSet, scale: int, tile: int | None) -> dict[str, float]:
    """The means over the validation set of :func:`evaluate_images`."""
    rows = evaluate_images(model, val, scale, tile)
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0] if key != "image"}
