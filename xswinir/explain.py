"""Explanation pictures: what the texture search sees in a restored image, and why.

:func:`explain` restores a low-quality image and, for a few patches (where the texture is strongest, or given),
runs the same :class:`~xswinir.texture.TextureSearch` the loss uses: the K windows the texture classifier found
most similar (boxed, with their least-squares coefficients and classifier scores), the patch and ``X c*``, the
patch's structure rebuilt only from those other windows.

* Without an HR image (a real photograph) it searches the restored output, with the input up-sampled to the
  output grid as the query: the windows of the output that share the texture of the input at that place, and how
  much of the output patch's structure they explain (``tile_r2``, the patch's *texture consistency*).
* With the HR image (:func:`degrade_hr` makes the input from it, as training does) the rows show the search on
  the HR image as the loss runs it, beside the consistency of the restored patch.

Both draw the texture consistency of every patch of the restored output as a heat-map (:func:`consistency_map`;
its mean in the title), the classifier's similarity heat-map of the first patch and its weights by feature name;
given a trust model (:mod:`xswinir.trust`), also the expected error of every patch beside the consistency.
One PNG (matplotlib, no GUI backend). The explorable HTML page of every patch is :mod:`xswinir.explain_page`.

Naming: a *patch* is one ``p x p`` square of the texture grid (``p`` is the classifier's patch size); ``tile``
is the tile size of the model's tiled inference. The :class:`Explanation`'s fields and table keys keep their
first names (``tiles``, ``tile_summary``, ``"tile"``), which mean patches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xswinir.atomic import atomic_path
from xswinir.config import DegradationConfig
from xswinir.degradations import build_degrader, describe_params
from xswinir.errors import UserError
from xswinir.inference import restore
from xswinir.paths import printable_path
from xswinir.texture import plot_classifier_weights
from xswinir.texture.search import TextureMatch, TextureSearch, upsample_query

if TYPE_CHECKING:  # annotations only: xswinir.trust builds on this module's consistency map
    from xswinir.trust import TrustMap

log = logging.getLogger(__name__)

_BOX_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
# Consistency map: region pixels per search call when every patch block has its own region (~64 regions of
# 128 px; the feature pass keeps a few dozen maps of this size), and classifier pairs per call when all patches
# share the whole image as their region.
_MAP_REGION_PIXELS = 2**20
_MAP_PAIRS = 2**24


class ExplainError(UserError, ValueError):
    """An image or a setting that an explanation cannot be made for."""


@dataclass
class Explanation:
    """What :func:`explain` produced.

    Attributes:
        figure: the matplotlib Figure (Agg); draw or save it again as you like.
        png: where the PNG was written, or None (the explorable page is :mod:`xswinir.explain_page`).
        rows: one dict per chosen window: ``patch``, ``rank``, ``tile`` (the patch) and ``window`` boxes
            (top, left, bottom, right in pixels of the searched image: the HR image when one was given, the
            restored output otherwise), ``coef``, ``score``.
        description: what the degradation did to the input (or that the input is a given LQ image).
        lq: (C, h, w) the input; sr: (C, H, W) the restored image; hr: (C, H, W) the HR image, or None.
        tiles: (n, 2) top/left of the explained patches in output (= HR) pixels.
        query: (C, H, W) the input up-sampled to the output grid (the input itself for scale 1).
        consistency: (th, tw) texture consistency (``tile_r2`` in [0, 1]) of every whole patch of ``sr``: see
            :func:`consistency_map`.
        consistency_mean: the mean of ``consistency``.
        tile_summary: one dict per explained patch: ``patch``, ``tile`` box, ``windows`` (how many were used),
            ``r2`` (of the search drawn in its row) and ``consistency`` (of the restored patch).
        trust: the trust map of ``sr`` (expected error and bound of every whole patch), or None without a trust
            model.
    """

    figure: Any
    png: Path | None
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
    trust: TrustMap | None = None


class Degraded(NamedTuple):
    """An HR image and the input made from it by :func:`degrade_hr`."""

    hr: Tensor  # (C, H, W) cropped to a multiple of the scale
    lq: Tensor  # (C, H/s, W/s) on the CPU
    description: str  # what the degradation did, e.g. "blur sigma 1.2 | down x2 | noise sigma 5.0"


def texture_strength(image: Tensor, patch_size: int) -> Tensor:
    """Mean gradient magnitude of the luma of each ``patch_size`` patch.

    Args:
        image: (C, H, W) in [0, 1].
        patch_size: patch side p.

    Returns:
        (H // p, W // p) strengths.
    """
    luma = image.mean(0, keepdim=True)[None]  # (1, 1, H, W)
    gy = (luma[..., 1:, :] - luma[..., :-1, :]).abs()
    gx = (luma[..., :, 1:] - luma[..., :, :-1]).abs()
    grad = F.pad(gy, (0, 0, 0, 1)) + F.pad(gx, (0, 1, 0, 0))
    return F.avg_pool2d(grad, patch_size, patch_size)[0, 0]


def pick_patches(image: Tensor, patch_size: int, count: int) -> Tensor:
    """The ``count`` patches (on the p grid) with the strongest texture, spread apart where the image allows.

    Returns:
        (n, 2) long top/left in pixels, n <= count, strongest first.
    """
    strength = texture_strength(image, patch_size)
    th, tw = strength.shape
    order = strength.flatten().argsort(descending=True).tolist()  # a few hundred patches, once per picture
    chosen: list[tuple[int, int]] = []
    # Spread the patches over the picture; if that leaves too few, accept ones not touching another, then any.
    for gap in sorted({max(1, min(th, tw) // 6), 1, 0}, reverse=True):
        for flat in order:
            ty, tx = divmod(flat, tw)
            if len(chosen) < count and all(abs(ty - y) > gap or abs(tx - x) > gap for y, x in chosen):
                chosen.append((ty, tx))
    return torch.tensor(chosen, dtype=torch.long).reshape(-1, 2) * patch_size


def _region_hw(H: int, W: int, patch_size: int, region_size: int | None) -> tuple[int, int]:
    """The search region's size: ``region_size`` (at least a patch), at most the image; None: the image."""
    if region_size is None:
        return H, W
    side = max(region_size, patch_size)
    return min(side, H), min(side, W)


def _block_patches(H: int, W: int, patch_size: int, region_size: int | None, stride: int) -> tuple[int, int]:
    """Patches per block (rows, columns): the patches of a block share one search region.

    Half a region along an axis the region does not cover, so that every patch keeps at least a quarter of a
    region of context on each side (as a training crop inside its region does); the whole axis where it does. When
    the region is the whole image, blocks are bands of patch rows, as many as keep the classifier pairs bounded.
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
    """First patch (along one axis) of the block that patch ``index`` belongs to; the last block ends at the last."""
    last = count - size
    return last if index >= last else index // size * size


def _region_top_left(shape: tuple[int, int], search: TextureSearch, top_left: Tensor) -> Tensor:
    """Top/left (n, 2) of the search region of each patch: the region around its block, clamped inside the image.

    A patch on the ``p`` grid gets exactly the region that :func:`consistency_map` searched it in; a patch off the
    grid gets the region of the block under its top-left pixel, moved if needed so that it contains the patch.
    """
    H, W = shape
    p = search.patch_size
    rh, rw = _region_hw(H, W, p, search.region_size)
    bth, btw = _block_patches(H, W, p, search.region_size, search.stride)
    out = []
    for y, x in top_left.tolist():
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
    search: TextureSearch, image: Tensor, query: Tensor | None, top_left: Tensor, size: tuple[int, int],
    device: torch.device,
) -> tuple[TextureMatch, Tensor, Tensor]:
    """The search for (n, 2) crops of ``size`` of ``image``, each in its own search region.

    Args:
        search: the texture search; its classifier must be on ``device``.
        image: (C, H, W) whose patches are fitted and whose windows are the candidates.
        query: (C, H, W) aligned with ``image`` whose patches are compared with the windows; None: ``image``'s.
        top_left: (n, 2) long, top/left of the crops; their patches are explained.
        size: (height, width) of the crops.

    Returns:
        The match (batch n), the (n, C, R, R') regions and their (n, 2) top/left in the image.
    """
    region_tl = _region_top_left(tuple(image.shape[-2:]), search, top_left)
    rh, rw = _region_hw(image.shape[-2], image.shape[-1], search.patch_size, search.region_size)
    regions = _crops(image, region_tl, rh, rw)
    queries = None if query is None else _crops(query, top_left, *size).to(device)
    match = search(_crops(image, top_left, *size).to(device), regions.to(device), (top_left - region_tl).to(device),
                   query=queries)
    return match, regions, region_tl


def _on_device(search: TextureSearch, device: str | torch.device) -> torch.device:
    """Moves the search's classifier (in place) to ``device`` in eval mode; returns the device."""
    device = torch.device(device)
    search.classifier.to(device).eval()
    return device


def search_blocks(
    search: TextureSearch, image: Tensor, query: Tensor | None = None, *, device: str | torch.device = "cpu",
) -> Iterator[tuple[TextureMatch, Tensor]]:
    """The search for every whole patch of an image, block by block, as :func:`consistency_map` runs it.

    The patches are searched in blocks of half a search region (``search.region_size``), each block in the region
    around it (a quarter of a region of context on each side, clamped inside the image), a chunk of blocks per
    call so that memory stays bounded; when the region is the whole image, in bands of patch rows. Blocks at the
    right and bottom edges end at the last patch, so they may overlap the one before.

    Args:
        search: the texture search.
        image: (C, H, W) in [0, 1], e.g. the restored output; at least ``p x p``.
        query: (C, H, W) aligned with ``image`` whose patches are compared with the windows; None: its own.
        device: where the search runs.

    Yields:
        ``(match, region_top_left)``: a match with one batch entry per block (its ``tile_boxes`` in region
        pixels) and the (n, 2) long top/left of the blocks' regions in image pixels, on the CPU.

    Raises:
        ExplainError: the image is smaller than a patch, or the query does not have its shape.
    """
    device = _on_device(search, device)
    p = search.patch_size
    _, H, W = image.shape
    th, tw = H // p, W // p
    if th == 0 or tw == 0:
        raise ExplainError(f"the image ({W}x{H}) is smaller than one {p} px texture tile")
    if query is not None and query.shape != image.shape:
        raise ExplainError(f"the query {tuple(query.shape)} must have the image's shape {tuple(image.shape)}")
    bth, btw = _block_patches(H, W, p, search.region_size, search.stride)
    starts = [(y, x) for y in sorted({_block_start(i, bth, th) for i in range(th)})
              for x in sorted({_block_start(j, btw, tw) for j in range(tw)})]  # in patches
    blocks = torch.tensor(starts, dtype=torch.long) * p
    rh, rw = _region_hw(H, W, p, search.region_size)
    chunk = max(1, _MAP_REGION_PIXELS // (rh * rw))
    for i in range(0, len(blocks), chunk):
        match, _, region_tl = _search(search, image, query, blocks[i:i + chunk], (bth * p, btw * p), device)
        yield match, region_tl


def consistency_map(
    search: TextureSearch,
    image: Tensor,
    query: Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Texture consistency of every whole ``p x p`` patch of an image: the search's ``tile_r2`` for each.

    **What the consistency r² is.** For a patch ``y`` of ``image`` the search picks up to K windows of the
    image near it (in the block's region, :func:`search_blocks`) that the classifier scores as the texture of the
    query at the patch's place, with probability at least ``min_score`` and no overlap with the patch beyond
    ``max_iou``. With the patch and the windows centred per channel (``y~``, ``X~``) and ``c*`` the ridge
    least-squares coefficients, ``r² = 1 - ||y~ - X~ c*||² / ||y~||²``, clipped to [0, 1]: the share of the
    patch's structure (its variation around its own per-channel mean) that a linear combination of those other
    places of the *same image* reproduces. The rows of the explanation picture search a patch in exactly its
    block's region, so their ``r²`` is the map's value.

    **What it is not.** It is no measure of correctness: nothing in it compares the image with the truth, and
    an output that invents one texture consistently everywhere scores high. As an error signal it points the
    wrong way: on 20 held-out photographs restored from x2 ``blur-noise`` inputs, the rank correlation between
    ``1 - r²`` and the patch's actual error was -0.39 (textured patches have both high r² and high error, flat
    ones r² near 0 and small error). 0 means "nothing to explain, or no partner", not "inconsistent": a flat
    patch has no structure, and a patch without a window above ``min_score`` (often stochastic texture such as
    fur or grass, whose windows do not correlate pixel by pixel) has none. Nor is it chance-corrected: K free
    coefficients explain about ``K / (C (p² - 1))`` of a patch of pure noise, more when the windows were chosen
    to resemble it. And it depends on the classifier and on ``min_score``, ``top_k``, ``stride``, ``ridge`` and
    ``region_size``.

    Args:
        search: the texture search; its ``patch_size`` is ``p``.
        image: (C, H, W) in [0, 1], e.g. the restored output; at least ``p x p``.
        query: (C, H, W) aligned with ``image`` whose patches are compared with the windows (the input
            up-sampled to the output grid); None: ``image``'s own patches.
        device: where the search runs.

    Returns:
        (H // p, W // p) float32 on the CPU, in [0, 1]; 0 for patches without a window above ``min_score``.
    """
    p = search.patch_size
    out = torch.zeros(image.shape[-2] // p, image.shape[-1] // p)
    for match, region_tl in search_blocks(search, image, query, device=device):
        bth, btw = match.tiles
        block_tl = (match.tile_boxes[:, 0, :2].cpu() + region_tl) // p  # (n, 2) in patches
        r2 = match.tile_r2.float().cpu().reshape(-1, bth, btw)
        for (y, x), values in zip(block_tl.tolist(), r2, strict=True):  # later blocks win the overlap
            out[y:y + bth, x:x + btw] = values
    return out


def upsample_input(lq: Tensor, scale: int) -> Tensor:
    """The input (C, h, w) or (B, C, h, w) on the output grid, exactly as the loss makes its ``lq`` query."""
    size = (lq.shape[-2] * scale, lq.shape[-1] * scale)
    return upsample_query(lq[None], size)[0] if lq.ndim == 3 else upsample_query(lq, size)


def degrade_hr(
    hr: Tensor, degradation: DegradationConfig, scale: int, patch_size: int, *, seed: int = 0,
    device: str | torch.device = "cpu",
) -> Degraded:
    """The input of an HR image, made as training and evaluation make it (the config's seeded degradations).

    Args:
        hr: (C, H, W) HR image in [0, 1]; cropped to a multiple of the scale.
        degradation: the degradations (``cfg.degradation``).
        scale: the model's scale ``s``.
        patch_size: the texture patch side; the image must hold one.
        seed: seed of the degradation.
        device: where the degradation runs.

    Returns:
        The cropped HR image, the (C, H/s, W/s) input on the CPU and what the degradation did.

    Raises:
        ExplainError: not one image, or smaller than a patch.
    """
    device = torch.device(device)
    if hr.ndim != 3:
        raise ExplainError(f"expected one (C, H, W) image, got shape {tuple(hr.shape)}")
    H, W = (hr.shape[-2] // scale) * scale, (hr.shape[-1] // scale) * scale
    hr = hr[:, :H, :W].float()
    if min(H, W) < max(patch_size, 2 * scale):
        raise ExplainError(f"the image ({hr.shape[-1]}x{hr.shape[-2]}) is smaller than one {patch_size} px "
                           "texture tile")
    generator = torch.Generator(device=device.type).manual_seed(seed)
    degrader = build_degrader(degradation, scale).to(device)
    with torch.no_grad():
        lq, params = degrader(hr[None].to(device), generator)
    return Degraded(hr, lq[0].cpu(), describe_params(params, 0))


def explain(
    model: nn.Module,
    search: TextureSearch,
    lq: Tensor,
    *,
    hr: Tensor | None = None,
    description: str | None = None,
    patches: int = 3,
    positions: Tensor | None = None,
    out: str | Path | None = None,
    tile: int | None = None,
    trust: Callable[[Tensor, Tensor], TrustMap] | None = None,
    device: str | torch.device = "cpu",
) -> Explanation:
    """Restores ``lq`` and draws what the texture search sees in a few patches, with or without the HR image.

    For each explained patch: the windows the classifier finds to share its texture, their coefficients ``c*``
    and scores, the patch, ``X c*`` (the patch's mean plus its structure rebuilt from those windows) and ``r²``,
    the share of its structure they explain. Without ``hr`` the search runs on the restored output with the
    input up-sampled to the output grid as the query; with ``hr`` it runs on the HR image as the loss runs it
    (with that query only when ``search.query`` is ``lq``), beside the consistency of the restored patch. Above
    the rows, the texture consistency of every patch of the output (:func:`consistency_map`) as a heat-map and,
    given a trust model, beside it the expected error of every patch (:func:`xswinir.trust.estimate_trust`).

    Args:
        model: the restoration model, ``(B, C, h, w) -> (B, C, h*s, w*s)``; ``s`` is read from its output.
        search: the texture search (:meth:`TextureSearch.from_config`); its classifier must be a
            :class:`xswinir.texture.TextureClassifier` (the picture shows its weights).
        lq: (C, h, w) the low-quality input in [0, 1], used as it is (no degradation; see :func:`degrade_hr`).
        hr: (C, h*s, w*s) the HR image in [0, 1]; None: a real input without one.
        description: what the input is, for the picture; None: its size and whether an HR image was given.
        patches: how many patches to explain when ``positions`` is None (the strongest-textured ones of the
            searched image: the HR image when given, the output otherwise).
        positions: (n, 2) top/left of the patches to explain in output pixels; None: picked by texture strength.
        out: where to write the PNG; None: write nothing.
        tile: LR tile size for the model's inference; None: the whole image at once.
        trust: makes the trust map of ``(lq, sr)``, e.g. ``functools.partial(xswinir.trust.estimate_trust,
            trust_model, trust_model.load_search(), model=model)``; None: no trust panel.
        device: where the model and the search run.

    Returns:
        The :class:`Explanation`.

    Raises:
        ExplainError: the output would be smaller than a patch, ``hr`` does not match it, or a given position
            lies outside it.
        TrustError: from ``trust``: its model was fitted at another scale.
    """
    device = _on_device(search, device)
    if lq.ndim != 3:
        raise ExplainError(f"expected one (C, h, w) image, got shape {tuple(lq.shape)}")
    lq = lq.float().cpu()
    sr, scale = _restore(model, lq, search.patch_size, tile, device)
    if hr is not None and hr.shape != sr.shape:
        raise ExplainError(f"the HR image {tuple(hr.shape)} does not have the restored image's shape "
                           f"{tuple(sr.shape)}")
    if description is None:
        h, w = lq.shape[-2:]
        description = (f"given low-quality input, {w}x{h}, restored x{scale} (no HR image)" if hr is None
                       else f"{w}x{h} input with its HR image, restored x{scale}")
    scene = _scene(search, lq, sr, None if hr is None else hr.float().cpu(), positions, patches, description,
                   scale, device)
    if trust is not None:
        scene.trust = trust(lq, sr)
        scene.trust_scale, scene.trust_coverage = scene.trust.display_max, scene.trust.coverage
    fig = _draw(search.classifier, scene)
    rows, summary = _tables(scene)
    mean = float(scene.consistency.mean())
    png = _save(fig, out)
    return Explanation(fig, png, rows, description, lq, sr, scene.hr, scene.positions, scene.query,
                       scene.consistency, mean, summary, scene.trust)


def _restore(model: nn.Module, lq: Tensor, patch_size: int, tile: int | None,
             device: torch.device) -> tuple[Tensor, int]:
    """The restored (C, H, W) image on the CPU and the scale; checks that it holds one patch."""
    p = patch_size
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
    return sr, scale


def _check_positions(positions: Tensor | None, image: Tensor, p: int, count: int) -> Tensor:
    """The (n, 2) long patch positions to explain: the given ones, checked, or the ``count`` most textured."""
    _, H, W = image.shape
    if positions is None:
        positions = pick_patches(image, p, count)
    positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1, 2)
    if len(positions) == 0 or ((positions < 0) | (positions + p > torch.tensor([H, W]))).any():
        raise ExplainError(f"tiles {positions.tolist()} must lie inside the {W}x{H} image (top, left; {p} px each)")
    return positions


@dataclass
class _Scene:
    """What the picture shows, on the CPU; ``reference`` is the image the rows searched (HR, or the output)."""

    lq: Tensor  # (C, h, w)
    sr: Tensor  # (C, H, W)
    hr: Tensor | None  # (C, H, W)
    query: Tensor  # (C, H, W) the input on the output grid
    reference: Tensor  # (C, H, W)
    searched: Tensor  # (n, C, p, p) the patches the classifier compared with the windows (query or reference)
    queried: bool  # whether ``searched`` came from the query
    positions: Tensor  # (n, 2) top/left of the explained patches
    match: TextureMatch  # the rows' search, one crop (one patch) per explained patch
    regions: Tensor  # (n, C, R, R') their search regions
    region_tl: Tensor  # (n, 2) the regions' top/left
    restored_r2: Tensor  # (n,) consistency of the restored patches
    consistency: Tensor  # (th, tw) of every patch of sr
    heat: Tensor  # (nh, nw) P(same texture) of the first patch and every window of reference
    description: str
    scale: int
    patch_size: int
    stride: int
    trust: TrustMap | None = None  # of sr, when a trust model was given
    trust_scale: float = 1.0  # the expected error at the top of its colour scale
    trust_coverage: float = 0.9  # the share of patches its bound is for

    @property
    def lq_mode(self) -> bool:
        """Whether the rows search the restored output (no HR image)."""
        return self.hr is None

    def boxes(self) -> list[list[list[int]]]:
        """(n, K, 4) the chosen windows in image pixels."""
        return (self.match.boxes[:, 0].cpu() + self.region_tl.repeat(1, 2)[:, None, :]).tolist()


def _scene(
    search: TextureSearch, lq: Tensor, sr: Tensor, hr: Tensor | None, positions: Tensor | None, count: int,
    description: str, scale: int, device: torch.device,
) -> _Scene:
    """Runs the searches the picture shows: the rows (on ``hr``, or on ``sr`` without it) and the map of ``sr``."""
    p = search.patch_size
    query = upsample_input(lq, scale)
    reference = sr if hr is None else hr  # the image the rows search
    positions = _check_positions(positions, reference, p, count)
    row_query = query if hr is None else search.select_query(query)
    match, regions, region_tl = _search(search, reference, row_query, positions, (p, p), device)
    restored = match if hr is None else _search(search, sr, query, positions, (p, p), device)[0]
    searched = _crops(reference if row_query is None else row_query, positions, p, p)
    with torch.no_grad():  # the classifier's similarity of the first patch with every window of the image
        heat = search.classifier.similarity_map(searched[0].to(device), reference.to(device), search.stride).cpu()
    return _Scene(
        lq=lq, sr=sr, hr=hr, query=query, reference=reference, searched=searched, queried=row_query is not None,
        positions=positions, match=match, regions=regions, region_tl=region_tl,
        restored_r2=restored.tile_r2[:, 0].cpu(), consistency=consistency_map(search, sr, query, device=device),
        heat=heat, description=description, scale=scale, patch_size=p, stride=search.stride,
    )


def _tables(scene: _Scene) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows (one per chosen window) and the summary (one per patch) of :class:`Explanation`."""
    p, m = scene.patch_size, scene.match
    boxes = scene.boxes()
    coefs, scores, valid = m.coefs[:, 0].cpu(), m.scores[:, 0].cpu(), m.valid[:, 0].cpu()
    r2 = m.tile_r2[:, 0].cpu()
    rows, summary = [], []
    for i, (y, x) in enumerate(scene.positions.tolist()):
        box = [y, x, y + p, x + p]
        summary.append({"patch": i + 1, "tile": box, "windows": int(valid[i].sum()), "r2": float(r2[i]),
                        "consistency": float(scene.restored_r2[i])})
        for k in range(valid.shape[1]):
            if valid[i, k]:
                rows.append({"patch": i + 1, "rank": k + 1, "tile": box, "window": boxes[i][k],
                             "coef": float(coefs[i, k]), "score": float(scores[i, k])})
    return rows, summary


def _draw(classifier: nn.Module, scene: _Scene) -> Any:
    """The picture: an overview row (input, output, consistency, [trust,] similarity, weights), a row per patch."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    n, K = len(scene.positions), scene.match.valid.shape[-1]
    cols = 4 + K  # search region, two patches, X c*, the K windows
    trust = scene.trust is not None
    width = max(1.75 * cols, 19.0) + (4.0 if trust else 0.0)  # the trust panel keeps the others' size
    fig = Figure(figsize=(width, 4.2 + 2.0 * n), layout="constrained")
    # Two sub-figures, so that the long feature names of the weight chart do not widen the patch columns.
    top_fig, rows_fig = fig.subfigures(2, 1, height_ratios=[4.2, 2.0 * n])
    ratios = [1.0, 1.0, 1.25] + ([1.25] if trust else []) + [1.25, 1.35]
    overview = top_fig.subplots(1, len(ratios), width_ratios=ratios)
    lq, sr, scale = scene.lq, scene.sr, scene.scale
    if scene.lq_mode:
        _show(overview[0], lq, f"input (low quality, {lq.shape[-1]}x{lq.shape[-2]})", fontsize=8)
    else:
        _show(overview[0], lq, f"input (x{scale} down)\n{scene.description}", fontsize=7)
    _show(overview[1], sr, f"restored (x{scale}, {sr.shape[-1]}x{sr.shape[-2]})")
    panels = list(overview[2:])  # consistency, [trust,] similarity, weights
    _draw_consistency(top_fig, panels.pop(0), scene)
    if trust:
        _draw_trust(top_fig, panels.pop(0), scene)
    _draw_similarity(top_fig, panels[0], scene)
    _draw_weights(panels[1], classifier)
    grid = rows_fig.subplots(n, cols, squeeze=False)
    boxes = scene.boxes()
    for i in range(n):
        _draw_patch_row(grid[i], i, boxes[i], scene)
    return fig


def _draw_consistency(fig: Any, ax: Any, scene: _Scene) -> None:
    """The consistency map over the restored image (in gray, so that the colours are the map's alone)."""
    p, sr, consistency = scene.patch_size, scene.sr, scene.consistency
    H, W = sr.shape[-2:]
    _show(ax, sr.mean(0, keepdim=True), f"texture consistency of the restored image\nmean r² "
          f"{float(consistency.mean()):.3f} over {consistency.numel()} tiles of {p} px", fontsize=8)
    th, tw = consistency.shape
    im = ax.imshow(consistency.numpy(), cmap="viridis", alpha=0.6, vmin=0, vmax=1, interpolation="nearest",
                   extent=(-0.5, tw * p - 0.5, th * p - 0.5, -0.5))
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    _number_patches(ax, scene)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="r² (structure explained)")


def _draw_trust(fig: Any, ax: Any, scene: _Scene) -> None:
    """The trust map's expected error of every patch over the restored image (in gray), its unit in the title."""
    p, sr, trust = scene.patch_size, scene.sr, scene.trust
    H, W = sr.shape[-2:]
    expected, bound = trust.expected, trust.bound
    _show(ax, sr.mean(0, keepdim=True), f"trust: expected error per tile, mean |Y error| (Y 0-255)\nmean "
          f"{float(expected.mean()):.1f} ({scene.trust_coverage:.0%} bound: mean {float(bound.mean()):.1f})",
          fontsize=8)
    th, tw = expected.shape
    im = ax.imshow(expected.numpy(), cmap="magma", alpha=0.7, vmin=0, vmax=scene.trust_scale,
                   interpolation="nearest", extent=(-0.5, tw * p - 0.5, th * p - 0.5, -0.5))
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    _number_patches(ax, scene)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="expected mean |Y error| (0-255)")


def _draw_similarity(fig: Any, ax: Any, scene: _Scene) -> None:
    """The classifier's P(same texture) of the first patch and every window of the searched image."""
    p, stride, heat, reference = scene.patch_size, scene.stride, scene.heat, scene.reference
    _show(ax, reference, f"{'restored' if scene.lq_mode else 'HR'}, tile 1 similarity (stride {stride})",
          fontsize=8)
    # Heat-map cells sit on the window centres.
    extent = (-0.5 + p / 2, -0.5 + p / 2 + heat.shape[1] * stride, -0.5 + p / 2 + heat.shape[0] * stride,
              -0.5 + p / 2)
    im = ax.imshow(heat.numpy(), cmap="magma", alpha=0.6, vmin=0, vmax=1, extent=extent, interpolation="nearest")
    ax.set_xlim(-0.5, reference.shape[-1] - 0.5)
    ax.set_ylim(reference.shape[-2] - 0.5, -0.5)
    _number_patches(ax, scene)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="P(same texture)")


def _number_patches(ax: Any, scene: _Scene) -> None:
    """Boxes and numbers the explained patches."""
    p = scene.patch_size
    for i, (y, x) in enumerate(scene.positions.tolist()):
        _box(ax, [y, x, y + p, x + p], "white", 1.5)
        ax.text(x, y - 2, str(i + 1), color="white", fontsize=8, va="bottom")


def _draw_weights(ax: Any, classifier: nn.Module) -> None:
    """The classifier's largest weights by feature name, in small type."""
    plot_classifier_weights(classifier, ax, top=10)
    ax.tick_params(labelsize=6)
    ax.title.set_fontsize(8)
    ax.xaxis.label.set_fontsize(7)
    legend = ax.get_legend()
    if legend is not None:
        for text in legend.get_texts():
            text.set_fontsize(6)


def _draw_patch_row(axes: Any, i: int, boxes: list[list[int]], scene: _Scene) -> None:
    """Row ``i``: the search region, the patch (and the query or the restored patch), ``X c*``, the windows."""
    p, m, lq_mode = scene.patch_size, scene.match, scene.lq_mode
    y, x = scene.positions[i].tolist()
    r_top, r_left = scene.region_tl[i].tolist()
    valid, coefs, scores = m.valid[i, 0].cpu(), m.coefs[i, 0].cpu(), m.scores[i, 0].cpu()
    _show(axes[0], scene.regions[i], f"tile {i + 1}: search region\n({'restored' if lq_mode else 'HR'})", fontsize=7)
    _box(axes[0], [y - r_top, x - r_left, y - r_top + p, x - r_left + p], "white", 2.0, "--")
    for k, b in enumerate(boxes):
        if valid[k]:
            _box(axes[0], [b[0] - r_top, b[1] - r_left, b[2] - r_top, b[3] - r_left], _BOX_COLORS[k % 8])
    used = int(valid.sum())
    fit_title = "no window above min_score:\nthe tile's mean only"
    if used:
        fit_title = (f"X c* ({used} window{'s' if used != 1 else ''})\n"
                     f"{'consistency' if lq_mode else 'fit'} r² {float(m.tile_r2[i, 0]):.2f}")
    patch, target = scene.reference[:, y:y + p, x:x + p], m.target[i].cpu()
    if lq_mode:
        _show(axes[1], patch, f"restored tile ({y}, {x})", fontsize=7)
        _show(axes[2], scene.searched[i], f"input tile (x{scene.scale} bicubic)\nthe query" if scene.scale > 1
              else "input tile\nthe query", fontsize=7)
        _show(axes[3], target, fit_title, fontsize=7)
    else:
        _show(axes[1], patch, f"HR tile ({y}, {x})" + ("\nquery: input tile" if scene.queried else ""), fontsize=7)
        _show(axes[2], target, fit_title, fontsize=7)
        _show(axes[3], scene.sr[:, y:y + p, x:x + p], f"restored tile\nconsistency r² {scene.restored_r2[i]:.2f}",
              fontsize=7)
    for k, b in enumerate(boxes):
        ax = axes[4 + k]
        if not valid[k]:
            ax.axis("off")
            continue
        _show(ax, scene.reference[:, b[0]:b[2], b[1]:b[3]], f"c={coefs[k]:+.2f} s={scores[k]:.2f}", fontsize=7)
        for spine in ax.spines.values():
            spine.set_edgecolor(_BOX_COLORS[k % 8])
            spine.set_linewidth(2.0)


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


def _save(fig: Any, out: str | Path | None) -> Path | None:
    """Writes the PNG when ``out`` is given; returns its path or None."""
    if out is None:
        return None
    png = Path(out)
    with atomic_path(png) as tmp:  # complete or absent: never half a picture under the final name
        fig.savefig(tmp, dpi=110, format=png.suffix.lstrip(".").lower() or "png")
    log.info("explanation written to %s", printable_path(png))
    return png
