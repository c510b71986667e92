"""One evaluation engine: per-image metric rows of a model (or of bicubic up-sampling) on ``(name, gt, lq)`` pairs.

:func:`evaluate_pairs` is the engine; everything else here makes pairs for it or reads its rows:

- test sets (:func:`evaluate`, the ``xswinir eval`` command; :func:`evaluate_model`, the study's call): each
  HR image is modcropped to the scale and gets its LQ input in one of three ways (:func:`read_pairs`):

  - default: MATLAB bicubic down-sampling rounded to 8 bits, exactly as the official benchmark LR files were
    made, so results compare with the papers';
  - ``lq``: a folder of LQ files matched by stem (``baby.png`` <-> ``babyx2.png``);
  - ``degradation``: a preset of :data:`xswinir.config.DEGRADATION_PRESETS` applied by the training
    :class:`~xswinir.degradations.Degrader` on CPU, with a generator seeded by ``image_seed(seed, file
    name)``. Every model sees exactly the same inputs for the same seed, whatever the file order or device,
    and the input is rounded to 8 bits as a saved PNG would be (``save_lq`` writes those PNGs);

- the trainer's validation (:func:`build_validation_set` once per run, :func:`validate` at every validation):
  the training degradation of a few images, Y-PSNR/SSIM of the model and of bicubic up-sampling.

Metrics (:mod:`xswinir.metrics`) are measured on 8-bit images with ``crop_border = scale``: PSNR and SSIM on
RGB and on BT.601 Y, MS-SSIM and the spatial correlation coefficient on Y, and LPIPS when its weights are
on disk. :func:`format_table` and :func:`write_results` print and save the rows.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from xswinir.atomic import atomic_write_text
from xswinir.config import DEFAULT_DEGRADATION, DEGRADATION_PRESETS, Config
from xswinir.data import FileImages, ImageList, load_val_images, open_images
from xswinir.degradations import Degrader, build_degrader
from xswinir.errors import UserError
from xswinir.images import ImageReadError, read_image, write_image
from xswinir.inference import bicubic_downscale, bicubic_upscale, restore
from xswinir.metrics import (
    EVAL_METRICS,
    LPIPS,
    LPIPS_MAX_PIXELS,
    LPIPS_MIN_SIZE,
    MS_SSIM_BETAS,
    MS_SSIM_Y,
    PSNR,
    PSNR_Y,
    SCC_Y,
    SSIM,
    SSIM_WINDOW,
    SSIM_Y,
    VAL_PSNR_BICUBIC_Y,
    VAL_PSNR_Y,
    VAL_SSIM_BICUBIC_Y,
    VAL_SSIM_Y,
    VIF_Y,
    load_lpips,
    lpips,
    ms_ssim,
    ms_ssim_scales,
    psnr,
    psnr_y,
    scc,
    ssim,
    ssim_y,
    vif,
)
from xswinir.paths import printable_path
from xswinir.resize import modcrop
from xswinir.seeds import image_seed, make_generator, validation_seed
from xswinir.sources import lq_candidates, resolve_image_files

log = logging.getLogger(__name__)

AVERAGE = "average"  # the ``image`` of a mean row
ALL_SETS = "all"  # the ``set`` of the mean over every image of several sets
SECONDS = "seconds"  # the restoration time of one image (model or bicubic), without decoding and metrics

# What a validation reports to Ray (and the demo prints): the model's and plain bicubic's Y-PSNR / Y-SSIM.
VALIDATION_METRICS = (VAL_PSNR_Y, VAL_SSIM_Y, VAL_PSNR_BICUBIC_Y, VAL_SSIM_BICUBIC_Y)

Pair = tuple[str, Tensor, Tensor]  # (name, gt (C, H, W), lq (C, H / scale, W / scale)), both in [0, 1]

# Every metric but LPIPS (which needs its network): sr, gt, crop_border -> (B,) values.
_METRICS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    PSNR: psnr,
    SSIM: ssim,
    PSNR_Y: psnr_y,
    SSIM_Y: ssim_y,
    MS_SSIM_Y: functools.partial(ms_ssim, y_channel=True),
    SCC_Y: functools.partial(scc, y_channel=True),
    VIF_Y: functools.partial(vif, y_channel=True),
}


def measure(sr: Tensor, gt: Tensor, crop_border: int, lpips_metric: nn.Module | None = None,
            metrics: Sequence[str] = EVAL_METRICS) -> dict[str, float | None]:
    """The asked :data:`xswinir.metrics.EVAL_METRICS` of one image pair.

    Args:
        sr: ``(1, C, H, W)`` in [0, 1].
        gt: ``(1, C, H, W)`` in [0, 1].
        crop_border: pixels cut from every side (the scale).
        lpips_metric: from :func:`xswinir.metrics.load_lpips`; None reports ``lpips`` as None.
        metrics: which metrics, in the order of the returned dict.

    Returns:
        Metric name -> float (one CPU sync per metric, once per image; not a hot path).
    """
    values: dict[str, float | None] = {}
    for name in metrics:
        if name == LPIPS:
            values[LPIPS] = _lpips(sr, gt, crop_border, lpips_metric)
        else:
            values[name] = float(_METRICS[name](sr, gt, crop_border)[0])
    return values


def _lpips(sr: Tensor, gt: Tensor, crop_border: int, metric: nn.Module | None) -> float | None:
    if metric is not None and sr.shape[-2] * sr.shape[-1] > LPIPS_MAX_PIXELS:
        log.info("lpips n/a for an image over %d pixels (AlexNet runs on the whole image)", LPIPS_MAX_PIXELS)
        return None
    return float(lpips(sr, gt, metric, crop_border)[0]) if metric is not None else None


@torch.no_grad()
def evaluate_pairs(
    pairs: Iterable[Pair],
    model: nn.Module | None = None,
    *,
    scale: int | None = None,
    metrics: Sequence[str] = EVAL_METRICS,
    tile: int | None = None,
    overlap: int = 32,
    self_ensemble: bool = False,
    device: str | torch.device | None = None,
    lpips_metric: nn.Module | None = None,
    set_name: str = "",
) -> list[dict[str, Any]]:
    """The metrics of a model, or of bicubic up-sampling when ``model`` is None, on each pair: the engine.

    Pairs are taken one at a time, so a generator that decodes each image when asked keeps one image in
    memory (with its LQ input, result and the metrics' tiles: about 50 bytes per HR pixel for RGB, measured by
    ``bench/bench_memory.py``; a model's own memory is bounded by ``tile``).

    Args:
        pairs: ``(name, gt, lq)``: the row's name, ``(C, H, W)`` ground truth and ``(C, H / s, W / s)`` input,
            both in [0, 1], where ``s`` is the scale.
        model: a restoration model on ``device`` (put in eval mode here; its mode is restored after);
            None: MATLAB bicubic up-sampling of the input (the input itself at scale 1).
        scale: the SR scale every pair must have; None: each pair's own, ``gt`` width / ``lq`` width.
        metrics: names of :data:`xswinir.metrics.EVAL_METRICS` to measure.
        tile: LQ tile size for :func:`xswinir.inference.restore`; None runs whole images.
        overlap: tile overlap in LQ pixels.
        self_ensemble: x8 flip/transpose ensemble.
        device: where the images go; None leaves them where they are.
        lpips_metric: from :func:`xswinir.metrics.load_lpips`; None reports ``lpips`` as None.
        set_name: the ``set`` of every row.

    Returns:
        One dict per pair, in order: ``image`` (the name), the ``metrics`` (float; PSNR in dB, inf for a perfect
        result; ``lpips`` None when not available, NaN under 31 px), ``set``, ``scale``, ``height``, ``width``,
        ``seconds`` (the restoration alone), and with ``ms_ssim_y`` its number of scales ``ms_ssim_scales``
        (5 from 176 px after cropping).

    Raises:
        ValueError: a pair whose ``gt`` is not its ``lq`` times the scale.
    """
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    rows = []
    try:
        for name, gt, lq in pairs:
            image_scale = _pair_scale(name, gt, lq, scale)
            if device is not None:
                gt, lq = gt.to(device), lq.to(device)
            gt = gt[None]
            sr, seconds = _upscale(model, lq[None], image_scale, tile, overlap, self_ensemble)
            h, w = gt.shape[-2:]
            row: dict[str, Any] = {"image": name, **measure(sr, gt, image_scale, lpips_metric, metrics),
                                   "set": set_name, "scale": image_scale, "height": h, "width": w, SECONDS: seconds}
            if MS_SSIM_Y in metrics:
                row["ms_ssim_scales"] = _log_small(row, h - 2 * image_scale, w - 2 * image_scale)
            rows.append(row)
            del gt, lq, sr  # the next image's decode should not sit beside this one's tensors
    finally:
        if model is not None:
            model.train(was_training)
    return rows


def _pair_scale(name: str, gt: Tensor, lq: Tensor, scale: int | None) -> int:
    """The pair's scale, checked: ``gt`` must be exactly ``lq`` times it."""
    pair_scale = scale if scale is not None else max(1, round(gt.shape[-1] / lq.shape[-1]))
    if tuple(gt.shape[-2:]) != (lq.shape[-2] * pair_scale, lq.shape[-1] * pair_scale):
        raise ValueError(f"{printable_path(name)}: gt {tuple(gt.shape[-2:])} is not lq {tuple(lq.shape[-2:])} "
                         f"x {pair_scale}")
    return pair_scale


def _upscale(model: nn.Module | None, lq: Tensor, scale: int, tile: int | None, overlap: int,
             self_ensemble: bool) -> tuple[Tensor, float]:
    """The result, clamped to [0, 1], ``(1, C, H, W)``, and the seconds it took."""
    start = time.perf_counter()
    if model is not None:
        sr = restore(model, lq, tile=tile, overlap=overlap, self_ensemble=self_ensemble)
    else:
        sr = bicubic_upscale(lq, scale) if scale > 1 else lq
    if lq.device.type == "cuda":
        torch.cuda.synchronize(lq.device)
    seconds = time.perf_counter() - start
    # Clamped here, so that the unclamped copy is freed before the metrics' working set is allocated.
    return sr.clamp(0, 1), seconds


def _log_small(row: dict[str, Any], h: int, w: int) -> int:
    """Says which metrics an image is too small for; returns its number of MS-SSIM scales."""
    name = printable_path(row["image"])
    scales = ms_ssim_scales(h, w)
    if scales < len(MS_SSIM_BETAS):
        log.info("ms_ssim_y of %s uses %d of %d scales (%dx%d after cropping; all need 176 px per side)",
                 name, scales, len(MS_SSIM_BETAS), w, h)
    if row.get(LPIPS) is not None and math.isnan(row[LPIPS]):
        log.warning("lpips of %s is NaN: %dx%d after cropping, AlexNet needs %d px per side", name, w, h,
                    LPIPS_MIN_SIZE)
    return scales


# Test sets: the pairs of an HR source, and the two callers.


def to_8bit(x: Tensor) -> Tensor:
    """Rounds ``[0, 1]`` values to the 8-bit grid, half up, as :func:`xswinir.images.to_uint8` (and a PNG) does."""
    return x.clamp(0, 1).mul(255.0).add(0.5).floor().div(255.0)


def build_lq_degrader(degradation: str, scale: int) -> Degrader:
    """The degrader of a named preset.

    Raises:
        UserError: the name is not a key of :data:`xswinir.config.DEGRADATION_PRESETS`.
    """
    if degradation not in DEGRADATION_PRESETS:
        raise UserError(f"unknown degradation '{degradation}'; choose from {', '.join(sorted(DEGRADATION_PRESETS))}")
    return build_degrader(DEGRADATION_PRESETS[degradation], scale)


@torch.no_grad()
def degrade(degrader: Degrader, gt: Tensor, name: str, seed: int) -> Tensor:
    """The LQ input of one HR image: degraded on CPU with its own seeded generator, rounded to 8 bits.

    Args:
        degrader: from :func:`build_lq_degrader`.
        gt: ``(C, H, W)`` in [0, 1], H and W multiples of the degrader's scale.
        name: the image's file name; with ``seed`` it fixes the random draw.
        seed: the evaluation seed.

    Returns:
        ``(C, H / scale, W / scale)`` float32 on CPU, on the 8-bit grid.
    """
    lq, _ = degrader(gt.detach().float().cpu().unsqueeze(0), make_generator(image_seed(seed, name)))
    return to_8bit(lq[0])


def read_pairs(
    gt: str | Path | Sequence[Path],
    scale: int | None,
    *,
    channels: int = 3,
    lq: str | Path | None = None,
    degrader: Degrader | None = None,
    seed: int = 0,
    save_lq: str | Path | None = None,
    skipped: list[str] | None = None,
) -> Iterator[Pair]:
    """The ``(stem, gt, lq)`` pairs of one test set, each image decoded when its pair is asked for.

    The source is opened (and the LQ folder listed) at the call, so that a bad one fails here.

    Args:
        gt: a folder or file of HR images, ``skimage:NAMES``, Parquet shards (as
            :func:`xswinir.data.open_images`), or a list of files.
        scale: SR scale; None (only with ``lq``): each image's HR size / LQ size.
        channels: 3 (RGB) or 1 (gray), as the model takes.
        lq: folder of LQ inputs matched by stem; None makes them, with ``degrader`` or MATLAB bicubic.
        degrader: from :func:`build_lq_degrader`, seeded per file name with ``seed``.
        seed: with ``degrader``, the seed that (with each file name) fixes the inputs.
        save_lq: folder to write the LQ inputs to, as ``{stem}.png``.
        skipped: a list that gets one ``"name: reason"`` line per image skipped (also logged as a warning):
            unreadable (corrupt, truncated, over :func:`xswinir.images.max_pixels`), or too small for an
            11 x 11 SSIM window once modcropped and cropped by the scale on every side (under
            ``11 + 2 * scale`` px per side, e.g. 15 px at x2).

    Raises:
        UserError: no images, an unmatched or misfitting LQ file, or (with ``save_lq``) a duplicate stem.
    """
    images = _open_source(gt, channels)
    lq_files = _lq_index(lq) if lq is not None else None
    save_dir = Path(save_lq) if save_lq is not None else None
    return _pairs(images, scale, channels, lq_files, degrader, seed, save_dir, skipped)


def _pairs(images: ImageList, scale: int | None, channels: int, lq_files: dict[str, Path] | None,
           degrader: Degrader | None, seed: int, save_dir: Path | None, skipped: list[str] | None) -> Iterator[Pair]:
    saved: set[str] = set()  # the stems written to save_dir
    for index, name in enumerate(images.names):
        pair = _read_pair(images, index, scale, channels, lq_files, skipped)
        if pair is None:
            continue
        stem, gt, lq, image_scale = pair
        del pair
        if degrader is not None:
            lq = degrade(degrader, gt, Path(name).name, seed)
        elif lq is None:
            lq = bicubic_downscale(gt, image_scale)  # as the official LR files: MATLAB imresize on uint8
        if save_dir is not None:
            if stem in saved:
                raise UserError(f"--save-lq: two images are named {stem}: both would be "
                                f"{printable_path(save_dir / stem)}.png")
            saved.add(stem)
            write_image(save_dir / f"{stem}.png", lq, overwrite=True)
        yield stem, gt, lq
        del gt, lq  # not held while the next image decodes


def _read_pair(images: ImageList, index: int, scale: int | None, channels: int, lq_files: dict[str, Path] | None,
               skipped: list[str] | None) -> tuple[str, Tensor, Tensor | None, int] | None:
    """``(stem, modcropped gt, lq read from the folder or None, scale)``, or None for an image skipped."""
    name = images.names[index]
    lq, lq_path = None, None
    try:
        gt = images.load(index)
        if lq_files is not None:
            lq_path = _match_lq(name, lq_files, scale)
            lq = read_image(lq_path, channels)
    except ImageReadError as err:
        _skip(str(err), skipped)
        return None
    image_scale = scale
    if image_scale is None:  # only with an LQ folder: its sizes imply the scale
        image_scale = max(1, round(gt.shape[-1] / lq.shape[-1]))
    gt = modcrop(gt, image_scale)
    h, w = gt.shape[-2:]
    if min(h, w) - 2 * image_scale < SSIM_WINDOW:
        _skip(f"{printable_path(name)}: too small to measure at x{image_scale}: {w}x{h} after modcrop, under "
              f"{SSIM_WINDOW + 2 * image_scale} px per side once {image_scale} px are cropped from each side "
              f"for the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window", skipped)
        return None
    if lq is not None and tuple(gt.shape[-2:]) != (lq.shape[-2] * image_scale, lq.shape[-1] * image_scale):
        raise UserError(f"{printable_path(lq_path.name)} is {lq.shape[-1]}x{lq.shape[-2]}, which is not "
                        f"{printable_path(Path(name).name)} ({w}x{h} after modcrop) / {image_scale}")
    return printable_path(Path(name).stem), gt, lq, image_scale


def _skip(reason: str, skipped: list[str] | None) -> None:
    log.warning("skipping %s", reason)
    if skipped is not None:
        skipped.append(reason)


def _open_source(gt: str | Path | Sequence[Path], channels: int) -> ImageList:
    if isinstance(gt, (str, Path)):
        return open_images(str(gt), channels)
    paths = [Path(p) for p in gt]
    if not paths:
        raise UserError("no HR images given")
    return FileImages(paths, channels)


def _lq_index(lq_dir: str | Path) -> dict[str, Path]:
    try:
        files = resolve_image_files(lq_dir)
    except FileNotFoundError as err:
        raise UserError(f"--lr: {err}") from err
    return {p.stem: p for p in files}


def _match_lq(gt_name: str, lq_files: dict[str, Path], scale: int | None) -> Path:
    """The LQ file of one HR image: ``{stem}x{s}``, ``{stem}_x{s}`` or ``{stem}``."""
    stem = Path(gt_name).stem
    if scale is not None:
        candidates = lq_candidates(gt_name, scale)
    else:
        candidates = [stem] + sorted(k for k in lq_files if re.fullmatch(re.escape(stem) + r"_?x\d+", k))
    for name in candidates:
        if name in lq_files:
            return lq_files[name]
    raise UserError(f"no LR image for {Path(gt_name).name} (looked for {', '.join(candidates[:3])} in the --lr folder)")


def _check_route(model: nn.Module | None, scale: int | None, lq: str | Path | None,
                 degradation: str | None) -> int | None:
    """The scale to evaluate at (None: implied by the LQ files), or a UserError for a route that cannot work."""
    if degradation is not None and lq is not None:
        raise UserError("--degradation and --lr are mutually exclusive: --lr reads the LQ inputs, --degradation "
                        "makes them from the HR images")
    if model is not None and hasattr(model, "upscale"):
        model_scale = int(model.upscale)
        if scale is not None and scale != model_scale:
            raise UserError(f"--scale {scale} does not match the model's upscale {model_scale}")
        scale = model_scale
    if scale is None and lq is None:
        raise UserError("give --scale (or --lr, whose image sizes imply it)")
    if scale == 1 and lq is None and degradation is None:
        if model is None:
            raise UserError("bicubic evaluation needs a scale above 1 (or a --degradation to compare against)")
        raise UserError("a model with upscale 1 restores degraded images: give --degradation, or their folder "
                        "with --lr")
    return scale


def evaluate(
    gt: str | Path | Sequence[Path],
    scale: int | None = None,
    model: nn.Module | None = None,
    lq: str | Path | None = None,
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
    """Every :data:`xswinir.metrics.EVAL_METRICS` of a model (or of bicubic up-sampling) on one HR test set.

    Args:
        gt: HR images, as :func:`read_pairs` takes them.
        scale: SR scale; None takes ``model.upscale``, or HR size / LQ size with an ``lq`` folder.
        model: a restoration model in eval mode on ``device``; None evaluates bicubic up-sampling of the
            LQ input (the input itself at scale 1).
        lq: folder of LQ inputs matched by stem; excludes ``degradation``.
        tile: LQ tile size for :func:`xswinir.inference.restore`; None runs whole images.
        overlap: tile overlap in LQ pixels.
        self_ensemble: x8 flip/transpose ensemble.
        device: where the model and the images go; degradations always run on CPU.
        degradation: a :data:`xswinir.config.DEGRADATION_PRESETS` name; None: MATLAB bicubic down-sampling.
        seed: with ``degradation``, the seed that (with each file name) fixes the inputs.
        save_lq: folder to write the LQ inputs to, as ``{stem}.png``.
        set_name: the ``set`` of every row; None: ``str(gt)`` (the common folder of a list of files).
        lpips: measure LPIPS if its weights are on disk (:func:`xswinir.metrics.load_lpips`).
        skipped: a list that gets one ``"name: reason"`` line per image skipped (see :func:`read_pairs`).

    Returns:
        The rows of :func:`evaluate_pairs`, ``image`` being the file stem, for the images not skipped.

    Raises:
        UserError: no images, an unmatched LQ file, sizes that do not fit the scale, an unknown
            degradation, ``lq`` with ``degradation``, or a duplicate stem with ``save_lq``.
    """
    scale = _check_route(model, scale, lq, degradation)
    if set_name is None:
        set_name = str(gt) if isinstance(gt, (str, Path)) else os.path.commonpath([str(Path(p).parent) for p in gt])
    channels = int(getattr(model, "in_chans", 3)) if model is not None else 3
    degrader = build_lq_degrader(degradation, scale) if degradation is not None else None
    pairs = read_pairs(gt, scale, channels=channels, lq=lq, degrader=degrader, seed=seed, save_lq=save_lq,
                       skipped=skipped)
    return evaluate_pairs(pairs, model, scale=scale, tile=tile, overlap=overlap, self_ensemble=self_ensemble,
                          device=torch.device(device), lpips_metric=load_lpips() if lpips else None,
                          set_name=set_name)


def evaluate_model(
    model: nn.Module | None,
    gt: str,
    scale: int,
    *,
    degradation: str | None = DEFAULT_DEGRADATION,
    seed: int = 0,
    tile: int | None = None,
    device: str | torch.device = "cpu",
    save_lq: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Per-image metrics of a model, or of the bicubic baseline, on seeded degradations of one HR source.

    The study runner's call: :func:`evaluate` with the model moved to ``device`` and the source as ``set``.

    Args:
        model: the restoration model, with ``upscale == scale`` if it has that attribute; None: bicubic
            up-sampling of the same inputs (the inputs themselves at scale 1).
        gt: HR images as :func:`xswinir.data.open_images` takes them (folder, file, ``skimage:val``).
        scale: SR scale; 1 for denoising models.
        degradation: a :data:`xswinir.config.DEGRADATION_PRESETS` name, seeded per file name; None: MATLAB
            bicubic down-sampling (needs ``scale > 1``).
        seed: the degradation seed: the same seed gives every model bit-identical inputs.
        tile: LQ tile size; None runs whole images.
        device: where the model runs.
        save_lq: folder to write the LQ inputs to as ``{stem}.png``.
    """
    if model is not None:
        model = model.to(device)
    return evaluate(gt, scale, model, tile=tile, device=device, degradation=degradation, seed=seed,
                    save_lq=save_lq, set_name=gt)


# The trainer's validation: the training degradation of a few images, Y-PSNR/SSIM against bicubic.


@dataclass
class ValidationSet:
    """Validation images and their fixed degraded inputs, made once per run."""

    names: list[str]
    gt: list[Tensor]  # (1, C, H, W), modcropped to the scale
    lq: list[Tensor]  # (1, C, H / scale, W / scale)
    source: str = ""  # the rows' ``set``: ``data.val``

    def pairs(self) -> Iterator[Pair]:
        """The ``(name, gt, lq)`` pairs of :func:`evaluate_pairs`, ``(C, H, W)`` views."""
        return ((name, gt[0], lq[0]) for name, gt, lq in zip(self.names, self.gt, self.lq, strict=True))


def build_validation_set(cfg: Config, degrader: nn.Module, device: torch.device) -> ValidationSet:
    """The training run's validation images, each degraded once on ``device`` with a fixed seed.

    Raises:
        DataError: no readable validation image.
    """
    val = ValidationSet([], [], [], source=cfg.data.val)
    for index, (name, gt) in enumerate(load_val_images(cfg)):
        gt = gt.unsqueeze(0).to(device)
        # The same degradation of each image in every validation, so that the curve compares like with like.
        with torch.no_grad():
            lq, _ = degrader(gt, make_generator(validation_seed(index), device))
        val.names.append(name)
        val.gt.append(gt)
        val.lq.append(lq)
    return val


def validation_rows(model: nn.Module, val: ValidationSet, scale: int, tile: int | None) -> list[dict[str, Any]]:
    """Per validation image: ``image``, ``set`` and the :data:`VALIDATION_METRICS` (model and bicubic)."""
    y_metrics = (PSNR_Y, SSIM_Y)
    ours = evaluate_pairs(val.pairs(), model, scale=scale, metrics=y_metrics, tile=tile, set_name=val.source)
    bicubic = evaluate_pairs(val.pairs(), scale=scale, metrics=y_metrics, set_name=val.source)
    return [{"image": m["image"], "set": m["set"], VAL_PSNR_Y: m[PSNR_Y], VAL_SSIM_Y: m[SSIM_Y],
             VAL_PSNR_BICUBIC_Y: b[PSNR_Y], VAL_SSIM_BICUBIC_Y: b[SSIM_Y]}
            for m, b in zip(ours, bicubic, strict=True)]


def validate(model: nn.Module, val: ValidationSet, scale: int, tile: int | None) -> dict[str, float]:
    """The means of :func:`validation_rows`: what the trainer reports at every validation."""
    return _means(validation_rows(model, val, scale, tile), VALIDATION_METRICS)


# Rows -> means, a printed table, CSV or JSON.


def _means(rows: list[dict[str, Any]], keys: Iterable[str]) -> dict[str, float | None]:
    """The mean of each key over ``rows``, ignoring NaN and None (None when nothing is left)."""
    means: dict[str, float | None] = {}
    for key in keys:
        finite = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
        means[key] = sum(finite) / len(finite) if finite else None
    return means


def average(rows: list[dict[str, Any]], keys: Sequence[str] = (*EVAL_METRICS, SECONDS)) -> dict[str, Any]:
    """The mean of each of ``keys`` over ``rows`` (ignoring NaN and None), as a row named ``average``.

    Its ``set`` is the rows' set, or ``all`` when they come from several.
    """
    sets = {r.get("set") for r in rows}
    return {"image": AVERAGE, **_means(rows, keys), "set": sets.pop() if len(sets) == 1 else ALL_SETS}


def split_sets(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows grouped by ``set``, in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get("set", ""), []).append(row)
    return groups


class Column(NamedTuple):
    """One column of :func:`format_table`: the row key, its header, its width and its number format."""

    key: str
    header: str
    width: int
    spec: str


EVAL_COLUMNS = (
    Column(PSNR, "PSNR", 8, ".3f"), Column(SSIM, "SSIM", 7, ".4f"), Column(PSNR_Y, "PSNR-Y", 8, ".3f"),
    Column(SSIM_Y, "SSIM-Y", 7, ".4f"), Column(MS_SSIM_Y, "MS-SSIM-Y", 9, ".4f"), Column(SCC_Y, "SCC-Y", 7, ".4f"),
    Column(VIF_Y, "VIF-Y", 7, ".4f"),
    Column(LPIPS, "LPIPS", 7, ".4f"), Column(SECONDS, "seconds", 8, ".3f"),
)
VALIDATION_COLUMNS = (
    Column(VAL_PSNR_Y, "Y-PSNR model", 13, ".3f"), Column(VAL_PSNR_BICUBIC_Y, "Y-PSNR bicubic", 15, ".3f"),
    Column(VAL_SSIM_Y, "Y-SSIM model", 13, ".4f"), Column(VAL_SSIM_BICUBIC_Y, "Y-SSIM bicubic", 15, ".4f"),
)


def _cell(value: Any, column: Column) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'n/a':>{column.width}}"
    return f"{value:{column.width}{column.spec}}"


def format_table(rows: list[dict[str, Any]], columns: Sequence[Column] = EVAL_COLUMNS) -> str:
    """The per-image rows and a mean row per set as aligned text; higher is better except LPIPS.

    Image names are printed whole: the first column is as wide as the longest.
    """
    keys = [column.key for column in columns]
    name_width = max(len(name) for name in ("image", AVERAGE, "all sets", *(str(r["image"]) for r in rows)))

    def line(name: str, row: dict[str, Any]) -> str:
        return f"{name:<{name_width}} " + " ".join(_cell(row.get(c.key), c) for c in columns)

    header = f"{'image':<{name_width}} " + " ".join(f"{c.header:>{c.width}}" for c in columns)
    rule = "-" * len(header)
    lines: list[str] = []
    groups = split_sets(rows)
    for set_name, group in groups.items():
        lines += [f"{set_name} ({len(group)} images)", header, rule]
        lines += [line(str(row["image"]), row) for row in group]
        lines += [rule, line(AVERAGE, average(group, keys)), ""]
    if len(groups) > 1:
        lines.append(line("all sets", average(rows, keys)))
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


def check_results_path(path: str | Path) -> Path:
    """``path`` if :func:`write_results` can write it (a ``.csv`` or ``.json`` name).

    Raises:
        UserError: any other suffix.
    """
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".json"):
        raise UserError(f"--out {path}: use a .csv or .json file name")
    return path


def write_results(path: str | Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    """Writes the rows as CSV or JSON, with a ``set`` column and a mean row per set.

    Written atomically (:mod:`xswinir.atomic`): complete or not there, a killed run leaves no half table.
    CSV: each set's rows then its ``average`` row, and with several sets a last ``average`` row of set
    ``all``; a missing value is ``n/a``. JSON: ``{**info, "images": rows, "sets": {set: mean row}, "average":
    mean over all images}`` with NaN as null and inf as ``"inf"``.

    Raises:
        UserError: a suffix other than ``.csv`` and ``.json``.
    """
    path = check_results_path(path)
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
    return atomic_write_text(path, handle.getvalue())
