"""Explanation pictures: what the texture term asks of a restored image, and why.

Two entry points, one picture:

* :func:`explain` takes an HR image, degrades it with the config's degradations, restores it and, for a few
  tiles (where the texture is strongest, or given), runs the same :func:`~xswinir.losses.texture_search` the
  loss uses on the HR image: the K windows the texture classifier found most similar (boxed, with their
  least-squares coefficients and classifier scores), the target tile and ``X c*``, the tile's structure rebuilt
  only from those other windows.
* :func:`explain_lq` takes a real low-quality image and no HR image at all. It restores it and runs the search
  on the restored output, with the input up-sampled to the output grid as the query: the windows of the output
  that share the texture of the input at that place, and how much of the output tile's structure they explain
  (``tile_r2``, the tile's *texture consistency*).

Both draw the texture consistency of every tile of the restored output as a heat-map (its mean in the title),
the classifier's similarity heat-map of the first tile and its weights by feature name. One PNG (matplotlib, no
GUI backend), optionally a small self-contained HTML page with the PNG inline and tables of the tiles and the
chosen windows.
"""

from __future__ import annotations

import base64
import html as html_lib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xswinir.config import Config, TextureConfig
from xswinir.errors import UserError
from xswinir.images import printable_path
from xswinir.losses import TextureMatch, texture_search

log = logging.getLogger(__name__)

_BOX_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
# Consistency map: region pixels per texture_search call when every tile has its own region (~64 regions of
# 128 px; the feature pass keeps a few dozen maps of this size), and classifier pairs per call when all tiles
# share the whole image as their region.
_MAP_REGION_PIXELS = 2**20
_MAP_PAIRS = 2**24


class ExplainError(UserError, ValueError):
    """An image or a setting that an explanation cannot be made for."""


@dataclass
class Explanation:
    """What :func:`explain` or :func:`explain_lq` produced.

    Attributes:
        figure: the matplotlib Figure (Agg); draw or save it again as you like.
        png: where the PNG was written, or None.
        html: where the HTML page was written, or None.
        rows: one dict per chosen window: ``patch``, ``rank``, ``tile`` and ``window`` boxes
            (top, left, bottom, right in pixels of the searched image: HR for :func:`explain`, the restored
            output for :func:`explain_lq`), ``coef``, ``score``.
        description: what the degradation did to the input (or that the input is a given LQ image).
        lq: (C, h, w) the input; sr: (C, H, W) the restored image; hr: (C, H, W) the cropped HR image, or None.
        tiles: (n, 2) top/left of the explained tiles in output (= HR) pixels.
        query: (C, H, W) the input up-sampled to the output grid (the input itself for scale 1).
        consistency: (th, tw) texture consistency (``tile_r2`` in [0, 1]) of every whole tile of ``sr``: the share
            of the tile's structure explained by the windows of ``sr`` that share the texture of ``query`` there.
        consistency_mean: the mean of ``consistency``.
        tile_summary: one dict per explained tile: ``patch``, ``tile`` box, ``windows`` (how many were used),
            ``r2`` (of the search drawn in its row) and ``consistency`` (of the restored tile).
    """

    figure: Any
    png: Path | None
    html: Path | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    lq: Tensor | None = None
    sr: Tensor | None = None
    hr: Tensor | None = None
    tiles: Tensor | None = None
    query: Tensor | None = None
    consistency: Tensor | None = None
    consistency_mean: float | None = None
    tile_summary: list[dict[str, Any]] = field(default_factory=list)


def texture_strength(image: Tensor, patch_size: int) -> Tensor:
    """Mean gradient magnitude of the luma of each ``patch_size`` tile.

    Args:
        image: (C, H, W) in [0, 1].
        patch_size: tile side p.

    Returns:
        (H // p, W // p) strengths.
    """
    luma = image.mean(0, keepdim=True)[None]  # (1, 1, H, W)
    gy = (luma[..., 1:, :] - luma[..., :-1, :]).abs()
    gx = (luma[..., :, 1:] - luma[..., :, :-1]).abs()
    grad = F.pad(gy, (0, 0, 0, 1)) + F.pad(gx, (0, 1, 0, 0))
    return F.avg_pool2d(grad, patch_size, patch_size)[0, 0]


def pick_tiles(image: Tensor, patch_size: int, count: int) -> Tensor:
    """The ``count`` tiles (on the p grid) with the strongest texture, spread apart where the image allows.

    Returns:
        (n, 2) long top/left in pixels, n <= count, strongest first.
    """
    strength = texture_strength(image, patch_size)
    th, tw = strength.shape
    order = strength.flatten().argsort(descending=True).tolist()  # a few hundred tiles, once per picture
    chosen: list[tuple[int, int]] = []
    # Spread the tiles over the picture; if that leaves too few, accept tiles not touching another, then any.
    for gap in sorted({max(1, min(th, tw) // 6), 1, 0}, reverse=True):
        for flat in order:
            ty, tx = divmod(flat, tw)
            if len(chosen) < count and all(abs(ty - y) > gap or abs(tx - x) > gap for y, x in chosen):
                chosen.append((ty, tx))
    return torch.tensor(chosen, dtype=torch.long).reshape(-1, 2) * patch_size


def _region_hw(H: int, W: int, patch_size: int, region_size: int | None) -> tuple[int, int]:
    """The search region's size: ``region_size`` (at least a tile), at most the image; None: the image."""
    if region_size is None:
        return H, W
    side = max(region_size, patch_size)
    return min(side, H), min(side, W)


def _block_tiles(H: int, W: int, patch_size: int, region_size: int | None, stride: int) -> tuple[int, int]:
    """Tiles per block (rows, columns): the tiles of a block share one search region.

    Half a region along an axis the region does not cover, so that every tile keeps at least a quarter of a region
    of context on each side (as a training crop inside its region does); the whole axis where it does. When the
    region is the whole image, blocks are bands of tile rows, as many as keep the classifier pairs bounded.
    """
    p = patch_size
    th, tw = H // p, W // p
    rh, rw = _region_hw(H, W, p, region_size)
    rows = th if rh == H else max(1, min(th, rh // 2 // p))
    cols = tw if rw == W else max(1, min(tw, rw // 2 // p))
    if (rh, rw) == (H, W):
        windows = ((H - p) // stride + 1) * ((W - p) // stride + 1)
        rows = max(1, min(th, _MAP_PAIRS // (tw * windows)))
    return rows, cols


def _block_start(index: int, size: int, count: int) -> int:
    """First tile (along one axis) of the block that tile ``index`` belongs to; the last block ends at the last tile."""
    last = count - size
    return last if index >= last else index // size * size


def _region_top_left(shape: tuple[int, int], patch_size: int, texture: TextureConfig, tiles: Tensor) -> Tensor:
    """Top/left (n, 2) of the search region of each tile: the region around its block, clamped inside the image.

    A tile on the ``p`` grid gets exactly the region that :func:`consistency_map` searched it in; a tile off the
    grid gets the region of the block under its top-left pixel, moved if needed so that it contains the tile.
    """
    H, W = shape
    p = patch_size
    rh, rw = _region_hw(H, W, p, texture.region_size)
    bth, btw = _block_tiles(H, W, p, texture.region_size, texture.stride)
    out = []
    for y, x in tiles.tolist():
        by = _block_start(y // p, bth, H // p) * p
        bx = _block_start(x // p, btw, W // p) * p
        top = min(max(by + bth * p // 2 - rh // 2, y + p - rh), y)
        left = min(max(bx + btw * p // 2 - rw // 2, x + p - rw), x)
        out.append((min(max(top, 0), H - rh), min(max(left, 0), W - rw)))
    return torch.tensor(out, dtype=torch.long).reshape(-1, 2)


def _crops(image: Tensor, top_left: Tensor, height: int, width: int) -> Tensor:
    """(n, C, height, width) crops of a (C, H, W) image at the (n, 2) top/left positions."""
    return torch.stack([image[:, y:y + height, x:x + width] for y, x in top_left.tolist()])


def _search(
    classifier: nn.Module, image: Tensor, query: Tensor | None, top_left: Tensor, size: tuple[int, int],
    texture: TextureConfig, device: torch.device,
) -> tuple[TextureMatch, Tensor, Tensor]:
    """The loss's texture search for (n, 2) crops of ``size`` of ``image``, each in its own search region.

    Args:
        image: (C, H, W) whose tiles are fitted and whose windows are the candidates.
        query: (C, H, W) aligned with ``image`` whose tiles are compared with the windows; None: ``image``'s.
        top_left: (n, 2) long, top/left of the crops; their tiles are explained.

    Returns:
        The match (batch n), the (n, C, R, R') regions and their (n, 2) top/left in the image.
    """
    p = int(classifier.patch_size)
    region_tl = _region_top_left(tuple(image.shape[-2:]), p, texture, top_left)
    rh, rw = _region_hw(image.shape[-2], image.shape[-1], p, texture.region_size)
    regions = _crops(image, region_tl, rh, rw)
    queries = None if query is None else _crops(query, top_left, *size).to(device)
    match = texture_search(
        classifier, _crops(image, top_left, *size).to(device), regions.to(device),
        (top_left - region_tl).to(device), query=queries, stride=texture.stride, top_k=texture.top_k,
        min_score=texture.min_score, max_iou=texture.max_iou, ridge=texture.ridge,
    )
    return match, regions, region_tl


def consistency_map(
    classifier: nn.Module,
    image: Tensor,
    query: Tensor | None = None,
    texture: TextureConfig | None = None,
    *,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Texture consistency of every whole ``p x p`` tile of an image: the search's ``tile_r2`` for each.

    The tiles are searched in blocks of half a search region (``texture.region_size``), each block in the region
    around it (a quarter of a region of context on each side, clamped inside the image), a chunk of blocks per
    search so that memory stays bounded; when the region is the whole image, in bands of tile rows. The rows of
    the explanation picture search a tile in exactly its block's region, so their ``r²`` is the map's value.

    Args:
        classifier: the texture classifier; its ``patch_size`` is the tile size ``p``.
        image: (C, H, W) in [0, 1], e.g. the restored output; at least ``p x p``.
        query: (C, H, W) aligned with ``image`` whose tiles are compared with the windows (the input up-sampled
            to the output grid); None: ``image``'s own tiles.
        texture: the search settings; None: the defaults.
        device: where the search runs.

    Returns:
        (H // p, W // p) float32 on the CPU, in [0, 1]; 0 for tiles without a window above ``min_score``.
    """
    t = texture or TextureConfig()
    device = torch.device(device)
    classifier = classifier.to(device).eval()
    p = int(classifier.patch_size)
    _, H, W = image.shape
    th, tw = H // p, W // p
    if th == 0 or tw == 0:
        raise ExplainError(f"the image ({W}x{H}) is smaller than one {p} px texture tile")
    if query is not None and query.shape != image.shape:
        raise ExplainError(f"the query {tuple(query.shape)} must have the image's shape {tuple(image.shape)}")
    bth, btw = _block_tiles(H, W, p, t.region_size, t.stride)
    starts = [(y, x) for y in sorted({_block_start(i, bth, th) for i in range(th)})
              for x in sorted({_block_start(j, btw, tw) for j in range(tw)})]  # in tiles; the last ones overlap
    blocks = torch.tensor(starts, dtype=torch.long) * p
    rh, rw = _region_hw(H, W, p, t.region_size)
    chunk = max(1, _MAP_REGION_PIXELS // (rh * rw))
    out = torch.zeros(th, tw)
    for i in range(0, len(blocks), chunk):
        match, _, _ = _search(classifier, image, query, blocks[i:i + chunk], (bth * p, btw * p), t, device)
        r2 = match.tile_r2.float().cpu().reshape(-1, bth, btw)
        for (y, x), values in zip(starts[i:i + chunk], r2, strict=True):  # later blocks win the overlap
            out[y:y + bth, x:x + btw] = values
    return out


def upsample_input(lq: Tensor, scale: int) -> Tensor:
    """The input on the output grid, exactly as the loss makes its low-quality query (``upsample_query``)."""
    from xswinir.losses import upsample_query

    size = (lq.shape[-2] * scale, lq.shape[-1] * scale)
    return upsample_query(lq[None], size)[0] if lq.ndim == 3 else upsample_query(lq, size)


def _show(ax: Any, image: Tensor, title: str = "", fontsize: int = 8) -> None:
    array = image.detach().float().clamp(0, 1).cpu()
    if array.shape[0] == 1:
        ax.imshow(array[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(array.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def _box(ax: Any, box: list[int], color: str, width: float = 1.5, style: str = "-") -> None:
    from matplotlib.patches import Rectangle

    top, left, bottom, right = box
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, edgecolor=color,
                           linewidth=width, linestyle=style))


def _check_tiles(tiles: Tensor | None, image: Tensor, p: int, count: int) -> Tensor:
    _, H, W = image.shape
    if tiles is None:
        tiles = pick_tiles(image, p, count)
    tiles = torch.as_tensor(tiles, dtype=torch.long).reshape(-1, 2)
    if len(tiles) == 0 or ((tiles < 0) | (tiles + p > torch.tensor([H, W]))).any():
        raise ExplainError(f"tiles {tiles.tolist()} must lie inside the {W}x{H} image (top, left; {p} px each)")
    return tiles


def explain(
    model: nn.Module,
    classifier: nn.Module,
    hr: Tensor,
    cfg: Config,
    *,
    seed: int = 0,
    patches: int = 3,
    tiles: Tensor | None = None,
    out: str | Path | None = None,
    html: bool = False,
    tile: int | None = None,
    device: str | torch.device = "cpu",
) -> Explanation:
    """Degrades ``hr``, restores it and draws what the texture term does for a few tiles.

    The rows show the search on the HR image, as the loss runs it (with the up-sampled input as the query when
    ``cfg.texture.query == "lq"``); the consistency map is that of the restored output, as :func:`explain_lq`
    draws it for a real low-quality image.

    Args:
        model: the restoration model (any ``(B, C, h, w) -> (B, C, h*s, w*s)`` module), ``s = cfg.scale``.
        classifier: the texture classifier (:class:`xswinir.texture.TextureClassifier`).
        hr: (C, H, W) HR image in [0, 1]; cropped to a multiple of the scale.
        cfg: the degradations (``cfg.degradation``), scale and texture search settings (``cfg.texture``).
        seed: seed of the degradation.
        patches: how many tiles to explain when ``tiles`` is None (the strongest-textured ones).
        tiles: (n, 2) top/left of the tiles to explain in HR pixels; None: picked by texture strength.
        out: where to write the PNG (and ``.html`` beside it); None: write nothing.
        html: also write the HTML page (needs ``out``).
        tile: LR tile size for the model's inference; None: the whole image at once.
        device: where the model, degradation and search run.

    Returns:
        The :class:`Explanation`.

    Raises:
        ExplainError: the image is smaller than a tile, or a given tile lies outside it.
    """
    from xswinir.degradations import build_degrader, describe_params
    from xswinir.inference import restore

    if html and out is None:
        raise ExplainError("an HTML page needs an output path for the PNG")
    device = torch.device(device)
    scale, p = cfg.scale, int(classifier.patch_size)
    if hr.ndim != 3:
        raise ExplainError(f"expected one (C, H, W) image, got shape {tuple(hr.shape)}")
    H, W = (hr.shape[-2] // scale) * scale, (hr.shape[-1] // scale) * scale
    hr = hr[:, :H, :W].float()
    if min(H, W) < max(p, 2 * scale):
        raise ExplainError(f"the image ({hr.shape[-1]}x{hr.shape[-2]}) is smaller than one {p} px texture tile")
    tiles = _check_tiles(tiles, hr, p, patches)

    # Degrade and restore, as in training and evaluation.
    generator = torch.Generator(device=device.type).manual_seed(seed)
    degrader = build_degrader(cfg.degradation, scale).to(device)
    with torch.no_grad():
        lq, params = degrader(hr[None].to(device), generator)
    description = describe_params(params, 0)
    model = model.to(device).eval()
    sr = restore(model, lq, tile=tile)[0].clamp(0, 1).cpu()
    lq = lq[0].cpu()
    query = upsample_input(lq, scale)

    # The rows: the loss's own search on the HR image; beside it, the consistency of the restored tiles.
    t = cfg.texture
    row_query = query if getattr(t, "query", "gt") == "lq" else None
    classifier = classifier.to(device).eval()
    match, regions, region_tl = _search(classifier, hr, row_query, tiles, (p, p), t, device)
    restored_match, _, _ = _search(classifier, sr, query, tiles, (p, p), t, device)
    return _draw(
        classifier, t, lq=lq, sr=sr, hr=hr, query=query, reference=hr, row_query=row_query, tiles=tiles,
        match=match, regions=regions, region_tl=region_tl, restored_r2=restored_match.tile_r2[:, 0].cpu(),
        description=description, scale=scale, out=out, html=html, device=device,
    )


def explain_lq(
    model: nn.Module,
    classifier: nn.Module,
    lq: Tensor,
    texture: TextureConfig | Config | None = None,
    *,
    patches: int = 3,
    tiles: Tensor | None = None,
    out: str | Path | None = None,
    html: bool = False,
    tile: int | None = None,
    device: str | torch.device = "cpu",
) -> Explanation:
    """Restores a real low-quality image (no HR image anywhere) and explains the output's texture.

    For each explained tile of the restored output: the windows of the output that the classifier finds to
    share the texture of the input at that place (the input up-sampled to the output grid is the query), their
    coefficients ``c*`` and scores, the output tile, ``X c*`` (the tile's mean plus its structure rebuilt from
    those windows) and the tile's texture consistency ``r²``, the share of its structure they explain. Above
    them the consistency of every tile of the output as a heat-map.

    Args:
        model: the restoration model, ``(B, C, h, w) -> (B, C, h*s, w*s)``; ``s`` is read from its output.
        classifier: the texture classifier (:class:`xswinir.texture.TextureClassifier`).
        lq: (C, h, w) the low-quality input in [0, 1], used as it is (no degradation).
        texture: the texture search settings (a :class:`~xswinir.config.TextureConfig`, or a Config's
            ``texture``); None: the defaults.
        patches: how many tiles to explain when ``tiles`` is None (the strongest-textured ones of the output).
        tiles: (n, 2) top/left of the tiles to explain in output pixels; None: picked by texture strength.
        out: where to write the PNG (and ``.html`` beside it); None: write nothing.
        html: also write the HTML page (needs ``out``).
        tile: LR tile size for the model's inference; None: the whole image at once.
        device: where the model and the search run.

    Returns:
        The :class:`Explanation` (``hr`` is None).

    Raises:
        ExplainError: the output would be smaller than a tile, or a given tile lies outside it.
    """
    from xswinir.inference import restore

    if html and out is None:
        raise ExplainError("an HTML page needs an output path for the PNG")
    t = texture.texture if isinstance(texture, Config) else texture or TextureConfig()
    device = torch.device(device)
    p = int(classifier.patch_size)
    if lq.ndim != 3:
        raise ExplainError(f"expected one (C, h, w) image, got shape {tuple(lq.shape)}")
    lq = lq.float().cpu()
    model = model.to(device).eval()
    scale = int(getattr(model, "upscale", 1) or 1)
    if min(lq.shape[-2:]) * scale < p:
        raise ExplainError(f"the input ({lq.shape[-1]}x{lq.shape[-2]}) gives a {lq.shape[-1] * scale}x"
                           f"{lq.shape[-2] * scale} output, smaller than one {p} px texture tile")

    sr = restore(model, lq[None].to(device), tile=tile)[0].clamp(0, 1).float().cpu()
    scale = sr.shape[-1] // lq.shape[-1]
    if tuple(sr.shape[-2:]) != (lq.shape[-2] * scale, lq.shape[-1] * scale):
        raise ExplainError(f"the model turned a {tuple(lq.shape[-2:])} input into {tuple(sr.shape[-2:])}, "
                           "not a whole multiple of it")
    if min(sr.shape[-2:]) < p:
        raise ExplainError(f"the restored image ({sr.shape[-1]}x{sr.shape[-2]}) is smaller than one {p} px "
                           "texture tile")
    query = upsample_input(lq, scale)
    tiles = _check_tiles(tiles, sr, p, patches)
    classifier = classifier.to(device).eval()
    match, regions, region_tl = _search(classifier, sr, query, tiles, (p, p), t, device)
    h, w = lq.shape[-2:]
    description = f"given low-quality input, {w}x{h}, restored x{scale} (no HR image)"
    return _draw(
        classifier, t, lq=lq, sr=sr, hr=None, query=query, reference=sr, row_query=query, tiles=tiles,
        match=match, regions=regions, region_tl=region_tl, restored_r2=match.tile_r2[:, 0].cpu(),
        description=description, scale=scale, out=out, html=html, device=device,
    )


def _draw(
    classifier: nn.Module, t: TextureConfig, *, lq: Tensor, sr: Tensor, hr: Tensor | None, query: Tensor,
    reference: Tensor, row_query: Tensor | None, tiles: Tensor, match: TextureMatch, regions: Tensor,
    region_tl: Tensor, restored_r2: Tensor, description: str, scale: int, out: str | Path | None, html: bool,
    device: torch.device,
) -> Explanation:
    """The consistency map, the tables and the picture; ``reference`` is the image the rows searched."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    from xswinir.texture import plot_classifier_weights

    p, n, K = int(classifier.patch_size), len(tiles), t.top_k
    lq_mode = hr is None
    consistency = consistency_map(classifier, sr, query, t, device=device)
    mean = float(consistency.mean())
    boxes = (match.boxes[:, 0].cpu() + region_tl.repeat(1, 2)[:, None, :]).tolist()  # (n, K, 4) image pixels
    coefs, scores, valid = match.coefs[:, 0].cpu(), match.scores[:, 0].cpu(), match.valid[:, 0].cpu()
    r2 = match.tile_r2[:, 0].cpu()
    targets = match.target.cpu()
    fitted = _crops(reference, tiles, p, p)
    searched = fitted if row_query is None else _crops(row_query, tiles, p, p)
    with torch.no_grad():
        heat = classifier.similarity_map(searched[0].to(device), reference.to(device), t.stride).cpu()

    rows, summary = [], []
    for i, (y, x) in enumerate(tiles.tolist()):
        box = [y, x, y + p, x + p]
        summary.append({"patch": i + 1, "tile": box, "windows": int(valid[i].sum()), "r2": float(r2[i]),
                        "consistency": float(restored_r2[i])})
        for k in range(K):
            if valid[i, k]:
                rows.append({"patch": i + 1, "rank": k + 1, "tile": box, "window": boxes[i][k],
                             "coef": float(coefs[i, k]), "score": float(scores[i, k])})

    # Layout: an overview row, then one row per tile: search region, two tiles, X c*, the K windows.
    # Two sub-figures, so that the long feature names of the weight chart do not widen the tile columns.
    cols = 4 + K
    fig = Figure(figsize=(max(1.75 * cols, 19.0), 4.2 + 2.0 * n), layout="constrained")
    top_fig, rows_fig = fig.subfigures(2, 1, height_ratios=[4.2, 2.0 * n])
    overview = top_fig.subplots(1, 5, width_ratios=[1.0, 1.0, 1.25, 1.25, 1.35])
    H, W = sr.shape[-2:]
    if lq_mode:
        _show(overview[0], lq, f"input (low quality, {lq.shape[-1]}x{lq.shape[-2]})", fontsize=8)
    else:
        _show(overview[0], lq, f"input (x{scale} down)\n{description}", fontsize=7)
    _show(overview[1], sr, f"restored (x{scale}, {W}x{H})")

    ax = overview[2]
    # The map over the restored image in gray, so that the colours are the map's alone.
    _show(ax, sr.mean(0, keepdim=True), f"texture consistency of the restored image\nmean r² {mean:.3f} over "
          f"{consistency.numel()} tiles of {p} px", fontsize=8)
    th, tw = consistency.shape
    im = ax.imshow(consistency.numpy(), cmap="viridis", alpha=0.6, vmin=0, vmax=1, interpolation="nearest",
                   extent=(-0.5, tw * p - 0.5, th * p - 0.5, -0.5))
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    for i, (y, x) in enumerate(tiles.tolist()):
        _box(ax, [y, x, y + p, x + p], "white", 1.5)
        ax.text(x, y - 2, str(i + 1), color="white", fontsize=8, va="bottom")
    top_fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="r² (structure explained)")

    ax = overview[3]
    _show(ax, reference, f"{'restored' if lq_mode else 'HR'}, tile 1 similarity (stride {t.stride})", fontsize=8)
    # Heat-map cells sit on the window centres.
    extent = (-0.5 + p / 2, -0.5 + p / 2 + heat.shape[1] * t.stride, -0.5 + p / 2 + heat.shape[0] * t.stride,
              -0.5 + p / 2)
    im = ax.imshow(heat.numpy(), cmap="magma", alpha=0.6, vmin=0, vmax=1, extent=extent, interpolation="nearest")
    ax.set_xlim(-0.5, reference.shape[-1] - 0.5)
    ax.set_ylim(reference.shape[-2] - 0.5, -0.5)
    for i, (y, x) in enumerate(tiles.tolist()):
        _box(ax, [y, x, y + p, x + p], "white", 1.5)
        ax.text(x, y - 2, str(i + 1), color="white", fontsize=8, va="bottom")
    top_fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="P(same texture)")
    ax = overview[4]
    plot_classifier_weights(classifier, ax, top=10)
    ax.tick_params(labelsize=6)
    ax.title.set_fontsize(8)
    ax.xaxis.label.set_fontsize(7)
    legend = ax.get_legend()
    if legend is not None:
        for text in legend.get_texts():
            text.set_fontsize(6)
    grid = rows_fig.subplots(n, cols, squeeze=False)

    for i, (y, x) in enumerate(tiles.tolist()):
        r_top, r_left = region_tl[i].tolist()
        ax = grid[i, 0]
        _show(ax, regions[i], f"tile {i + 1}: search region\n({'restored' if lq_mode else 'HR'})", fontsize=7)
        _box(ax, [y - r_top, x - r_left, y - r_top + p, x - r_left + p], "white", 2.0, "--")
        for k in range(K):
            if valid[i, k]:
                b = boxes[i][k]
                _box(ax, [b[0] - r_top, b[1] - r_left, b[2] - r_top, b[3] - r_left], _BOX_COLORS[k % 8])
        used = int(valid[i].sum())
        fit_title = "no window above min_score:\nthe tile's mean only"
        if used:
            fit_title = (f"X c* ({used} window{'s' if used != 1 else ''})\n"
                         f"{'consistency' if lq_mode else 'fit'} r² {r2[i]:.2f}")
        if lq_mode:
            _show(grid[i, 1], fitted[i], f"restored tile ({y}, {x})", fontsize=7)
            _show(grid[i, 2], searched[i], f"input tile (x{scale} bicubic)\nthe query" if scale > 1
                  else "input tile\nthe query", fontsize=7)
            _show(grid[i, 3], targets[i], fit_title, fontsize=7)
        else:
            _show(grid[i, 1], fitted[i], f"HR tile ({y}, {x})" + ("\nquery: input tile" if row_query is not None
                                                                   else ""), fontsize=7)
            _show(grid[i, 2], targets[i], fit_title, fontsize=7)
            _show(grid[i, 3], sr[:, y:y + p, x:x + p], f"restored tile\nconsistency r² {restored_r2[i]:.2f}",
                  fontsize=7)
        for k in range(K):
            ax = grid[i, 4 + k]
            b = boxes[i][k]
            if valid[i, k]:
                _show(ax, reference[:, b[0]:b[2], b[1]:b[3]], f"c={coefs[i, k]:+.2f} s={scores[i, k]:.2f}",
                      fontsize=7)
                for spine in ax.spines.values():
                    spine.set_edgecolor(_BOX_COLORS[k % 8])
                    spine.set_linewidth(2.0)
            else:
                ax.axis("off")

    png = html_path = None
    if out is not None:
        from xswinir.atomic import atomic_path, atomic_write_text

        png = Path(out)
        with atomic_path(png) as tmp:  # complete or absent: never half a picture under the final name
            fig.savefig(tmp, dpi=110, format=png.suffix.lstrip(".").lower() or "png")
        log.info("explanation written to %s", printable_path(png))
        if html:
            html_path = png.with_suffix(".html")
            atomic_write_text(html_path, render_html(png.read_bytes(), rows, description, p, summary, mean, lq_mode))
            log.info("explanation page written to %s", printable_path(html_path))
    return Explanation(fig, png, html_path, rows, description, lq, sr, hr, tiles, query, consistency, mean, summary)


def render_html(
    png: bytes, rows: list[dict[str, Any]], description: str, patch_size: int,
    tile_summary: list[dict[str, Any]] | None = None, consistency_mean: float | None = None, lq_mode: bool = False,
) -> str:
    """A self-contained page: the PNG inline (base64), a table of the explained tiles and one of the windows."""
    data = base64.b64encode(png).decode("ascii")
    esc = html_lib.escape
    image = "restored image" if lq_mode else "HR image"
    body = "\n".join(
        f"<tr><td>{r['patch']}</td><td>{r['rank']}</td><td>{esc(str(r['tile']))}</td>"
        f"<td>{esc(str(r['window']))}</td><td>{r['coef']:+.3f}</td><td>{r['score']:.3f}</td></tr>"
        for r in rows
    )
    tiles = "\n".join(
        f"<tr><td>{s['patch']}</td><td>{esc(str(s['tile']))}</td><td>{s['windows']}</td><td>{s['r2']:.3f}</td>"
        + ("" if lq_mode else f"<td>{s['consistency']:.3f}</td>") + "</tr>"
        for s in tile_summary or []
    )
    r2_head = "consistency r&sup2;" if lq_mode else "HR fit r&sup2;</th><th>restored consistency r&sup2;"
    mean = "" if consistency_mean is None else (
        f"<p>Mean texture consistency of the restored image: <b>{consistency_mean:.3f}</b> (the share of each "
        f"{patch_size}&times;{patch_size} tile's structure, around its mean, that windows elsewhere in the "
        "output with the texture of the input at that place explain; 1 is fully consistent).</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>XSwinIR explanation</title>
<style>body{{font-family:sans-serif;margin:1.5em}} img{{max-width:100%}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style>
</head><body>
<h1>XSwinIR explanation</h1>
<p>Input: {esc(description)}</p>
{mean}
<img alt="explanation" src="data:image/png;base64,{data}">
<h2>Explained tiles</h2>
<table><thead><tr><th>tile #</th><th>tile box</th><th>windows</th><th>{r2_head}</th></tr></thead><tbody>
{tiles}
</tbody></table>
<h2>Chosen windows</h2>
<p>For each {patch_size}&times;{patch_size} tile, the windows of the {image} the texture classifier scored most
similar (boxes as top, left, bottom, right in pixels), their least-squares coefficient c* and the classifier's
P(same texture).</p>
<table><thead><tr><th>tile #</th><th>rank</th><th>tile box</th><th>window box</th><th>c*</th><th>score</th></tr>
</thead><tbody>
{body}
</tbody></table>
</body></html>
"""
