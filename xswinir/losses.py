"""The training loss: SwinIR's pixel loss plus the explainable texture term.

``L = pixel(sr, gt) + texture_weight * texture(sr, gt)``

**The search.** For every ``p x p`` tile of ``gt`` (``p`` is the texture classifier's patch size) a linear
texture classifier scores every ``p x p`` window of an HR search region against the tile (or against the same
place of the up-sampled low-quality input, ``texture.query = "lq"``, the seed's wording); the ``K`` best windows
that score at least ``min_score`` and do not overlap the tile's own position beyond ``max_iou`` (default 0: no
shared pixel) form the columns of ``X``. Each column and the tile are centred per channel, so the windows explain
the tile's *structure* around its own mean brightness: ``c* = argmin_c ||X~ c - y~||^2`` (ridge-regularised),
and ``X c* := mean(y) + X~ c*`` is the tile rebuilt from other places of the image with the same texture: what
the explanation pictures show.

**The term** (``loss.texture_form``):

* ``projection`` (default): ``mean |P_X (sr - gt)|`` with ``P_X = X~ (X~^T X~ + ridge)^-1 X~^T``, the part of
  the restoration error that lies in the span of the tile's texture exemplars, i.e. the error in the
  "texture directions" of that tile. It is 0 with a zero gradient at ``sr = gt`` (consistent), and its negative
  gradient never points away from gt (``<P e, e> >= 0``), so it can only sharpen the pixel loss where the
  texture is, never pull the output elsewhere.
* ``pull``: ``mean |sr - X c*|`` over explained tiles, the first form: it pulls the output towards the tile
  rebuilt from other windows. Its minimum is not at gt: with an L2 distance the optimum is
  ``(gt + lambda X c*) / (1 + lambda)``. Kept so that the study can compare it.

Both are averaged over *all* pixels of ``sr`` (tiles without a usable window contribute 0), so lambda means the
same whatever share of tiles the search explains. Measured on held-out BSD/Set5 crops (``python -m
bench.bench_selection``, README "texture term"): the bicubic-up-sampled degraded input is closer to gt than
``X c*`` on most tiles, so pulling towards ``X c*`` moves the output away from gt there, while a gradient step on
the projection term reduces ``|sr - gt|`` on every tile.

Everything is batched over images, tiles and candidates: one feature pass over the region, one broadcast
classifier call, one gather of the chosen windows and batched ``K x K`` solves. The search runs without
gradients; only ``sr`` receives them.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xswinir.config import Config, ConfigError, PixelLoss, TextureForm, TextureQuery

Dist = Literal["l1", "l2", "charbonnier"]
_PAIR_ELEMENTS = 2**26  # float32 elements of one broadcast pair-encoding chunk in texture_search


class _Features(Protocol):
    def window_features(self, images: Tensor, patch_size: int, stride: int) -> Tensor: ...


class TextureScorer(Protocol):
    """What the search needs of :class:`xswinir.texture.TextureClassifier` (and what a test double provides)."""

    patch_size: int
    features: _Features

    def pair_logits(self, fa: Tensor, fb: Tensor) -> Tensor: ...


@dataclass
class TextureMatch:
    """The result of :func:`texture_search` for a batch; ``T = th * tw`` tiles in row-major order.

    Attributes:
        target: (B, C, H, W) ``X c*``, each tile's own per-channel mean plus its structure rebuilt from the
            chosen windows; zero where ``mask`` is False.
        mask: (B, 1, H, W) bool, pixels whose tile has at least one chosen window (pixels beyond the last
            whole tile are False).
        boxes: (B, T, K, 4) long, chosen windows as top, left, bottom, right (exclusive) in region pixels.
        coefs: (B, T, K) float32 least-squares coefficients ``c*``; 0 for entries that are not ``valid``.
        scores: (B, T, K) classifier probability that the window shows the tile's texture.
        valid: (B, T, K) bool, the entry passed ``min_score`` (and was a candidate at all).
        tile_boxes: (B, T, 4) long, each tile's own box in region pixels.
        tiles: (th, tw), the tile grid of ``gt``.
        tile_r2: (B, T) in [0, 1], the share of each tile's structure (its deviation from its per-channel
            mean) that ``X c*`` explains; 0 for tiles without a valid window or without structure.
        windows: (B, T, C*p*p, K) the chosen windows centred per channel (channel-major), 0 where not valid.
        ridge: the relative ridge the coefficients were solved with.
    """

    target: Tensor
    mask: Tensor
    boxes: Tensor
    coefs: Tensor
    scores: Tensor
    valid: Tensor
    tile_boxes: Tensor
    tiles: tuple[int, int]
    tile_r2: Tensor
    windows: Tensor
    ridge: float


def _window_grid(size: int, patch_size: int, stride: int) -> int:
    return (size - patch_size) // stride + 1


def candidate_mask(
    tile_top_left: Tensor, region_hw: tuple[int, int], patch_size: int, stride: int, max_iou: float,
    region_valid: Tensor | None = None,
) -> Tensor:
    """Which region windows may stand in for which tile.

    Args:
        tile_top_left: (B, T, 2) long, each tile's top/left in region pixels.
        region_hw: the region's (height, width).
        patch_size: window and tile side ``p``.
        stride: step between windows.
        max_iou: windows whose IoU with the tile's own box exceeds this are excluded.
        region_valid: optional (B, 1, R, R') bool; windows touching a False pixel are excluded.

    Returns:
        (B, T, N) bool with ``N = nh * nw`` windows in row-major order.
    """
    nh = _window_grid(region_hw[0], patch_size, stride)
    nw = _window_grid(region_hw[1], patch_size, stride)
    device = tile_top_left.device
    tops = torch.arange(nh, device=device) * stride
    lefts = torch.arange(nw, device=device) * stride
    # Two p x p boxes overlap (p - |dy|)+ by (p - |dx|)+ pixels; separable, so (B, T, nh) x (B, T, nw).
    over_h = (patch_size - (tops - tile_top_left[..., :1]).abs()).clamp_min(0)
    over_w = (patch_size - (lefts - tile_top_left[..., 1:]).abs()).clamp_min(0)
    inter = (over_h[..., :, None] * over_w[..., None, :]).flatten(-2).float()  # (B, T, N)
    iou = inter / (2 * patch_size**2 - inter)
    allowed = iou <= max_iou
    if region_valid is not None:
        touches_invalid = F.max_pool2d((~region_valid).float(), patch_size, stride) > 0  # (B, 1, nh, nw)
        allowed = allowed & ~touches_invalid.flatten(1)[:, None, :]
    return allowed


def _tiles(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, T, C*p*p), whole tiles only, row-major."""
    B, C, H, W = x.shape
    th, tw = H // patch_size, W // patch_size
    x = x[:, :, : th * patch_size, : tw * patch_size].reshape(B, C, th, patch_size, tw, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, th * tw, C * patch_size * patch_size)


def _untile(tiles: Tensor, channels: int, patch_size: int, th: int, tw: int, size: tuple[int, int]) -> Tensor:
    """(B, T, C*p*p) -> (B, C, H, W), zero beyond the whole tiles."""
    B = tiles.shape[0]
    x = tiles.reshape(B, th, tw, channels, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    x = x.reshape(B, channels, th * patch_size, tw * patch_size)
    return F.pad(x, (0, size[1] - tw * patch_size, 0, size[0] - th * patch_size))



def _centre(tiles: Tensor, channels: int) -> Tensor:
    """Subtracts each tile's per-channel mean: (..., C*p*p) flattened channel-major -> same shape."""
    x = tiles.reshape(*tiles.shape[:-1], channels, tiles.shape[-1] // channels)
    return (x - x.mean(-1, keepdim=True)).reshape(tiles.shape)


def _centre_columns(X: Tensor, channels: int) -> Tensor:
    """:func:`_centre` for each column of (..., C*p*p, K)."""
    return _centre(X.transpose(-1, -2), channels).transpose(-1, -2)


def _channel_means(tiles: Tensor, channels: int) -> Tensor:
    """(..., C*p*p) -> (..., C*p*p), every element replaced by its tile-channel mean."""
    x = tiles.reshape(*tiles.shape[:-1], channels, tiles.shape[-1] // channels)
    return x.mean(-1, keepdim=True).expand_as(x).reshape(tiles.shape)


def solve_coefficients(X: Tensor, y: Tensor, valid: Tensor, ridge: float) -> Tensor:
    """Batched ridge least squares ``argmin_c ||X c - y||^2 + ridge * tr(X_v^T X_v) / K_v * ||c||^2``.

    Columns that are not valid are ignored (their coefficient is 0); ``K_v`` is the number of valid columns,
    so the ridge is relative to the mean energy of the columns actually used. The normal equations are
    ``K x K``, solved in float64 without forming an inverse; the ridge keeps flat or identical windows finite,
    and a tiny absolute term keeps all-zero windows solvable. Differentiable in ``y`` (the projection term
    back-propagates through it); ``X`` is a fixed measurement.

    Args:
        X: (..., D, K) the candidate windows as columns.
        y: (..., D) the targets.
        valid: (..., K) bool.
        ridge: relative Tikhonov weight; 0 gives the plain least-squares solution when X has full rank.

    Returns:
        (..., K) float32 coefficients.
    """
    Xd = X.detach().double() * valid[..., None, :]
    gram = Xd.transpose(-1, -2) @ Xd  # (..., K, K)
    rhs = (Xd.transpose(-1, -2) @ y.double()[..., None]).squeeze(-1)  # (..., K)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)  # (..., 1)
    num_valid = valid.sum(-1, keepdim=True).clamp_min(1).double()
    # An ignored column is all zero: a 1 on its diagonal gives it coefficient 0 without touching the rest.
    diag = ridge * trace / num_valid + 1e-10 + (~valid).double()
    gram = gram + torch.diag_embed(diag)
    # solve_ex does not check for singularity, so it never syncs with the host (linalg.solve does on CUDA);
    # the ridge and the absolute term keep the system positive definite.
    coefs, _ = torch.linalg.solve_ex(gram, rhs)
    return (coefs * valid).float()


@torch.no_grad()
def texture_search(
    classifier: TextureScorer,
    gt: Tensor,
    region: Tensor | None = None,
    gt_offset: Tensor | None = None,
    region_valid: Tensor | None = None,
    *,
    query: Tensor | None = None,
    stride: int = 4,
    top_k: int = 5,
    min_score: float = 0.5,
    max_iou: float = 0.0,
    ridge: float = 1e-3,
) -> TextureMatch:
    """Finds, for every tile of ``gt``, the K most similar windows of ``region`` and fits the tile with them.

    Args:
        classifier: the texture classifier; its ``patch_size`` is the tile size ``p``.
        gt: (B, C, H, W) targets in [0, 1]; only whole ``p x p`` tiles are explained.
        region: (B, C, R, R') search regions containing ``gt``; None: ``gt`` itself.
        gt_offset: (B, 2) long, top/left of ``gt`` inside ``region``; None: zeros.
        region_valid: (B, 1, R, R') bool, False on padding; windows touching it are not candidates.
        query: (B, C, H, W) aligned with ``gt`` whose tiles are compared with the windows instead of gt's
            (the degraded input up-sampled to gt's size: the seed's "sub-images of the low-quality input");
            ``c*`` still fits gt's tiles. None: gt's own tiles.
        stride: step between candidate windows, in region pixels.
        top_k: K, the most windows per tile.
        min_score: candidates with a classifier probability below this are not used.
        max_iou: candidates overlapping the tile's own box more than this are excluded (0: no shared pixel).
        ridge: relative Tikhonov weight of the least-squares solve.

    Returns:
        The :class:`TextureMatch`; no tensor in it requires grad.
    """
    p = classifier.patch_size
    search_gt = region is None
    if search_gt:
        region, gt_offset = gt, None
    B, C, H, W = gt.shape
    R, R2 = region.shape[-2:]
    if H < p or W < p or R < p or R2 < p:
        raise ValueError(f"gt {tuple(gt.shape)} and region {tuple(region.shape)} must be at least {p} px")
    if query is not None and query.shape != gt.shape:
        raise ValueError(f"query {tuple(query.shape)} must have gt's shape {tuple(gt.shape)}")
    if gt_offset is None:
        gt_offset = torch.zeros(B, 2, dtype=torch.long, device=gt.device)
    device_type = gt.device.type
    with torch.autocast(device_type, enabled=False):
        gt, region = gt.float(), region.float()
        th, tw = H // p, W // p
        T = th * tw

        # One feature pass each: the region's windows and the query's tiles (windows at stride p).
        region_feats = classifier.features.window_features(region, p, stride)  # (B, F, nh, nw)
        nw = region_feats.shape[-1]
        if search_gt and query is None and p % stride == 0:
            step = p // stride  # the tiles are among the region's windows: no second pass
            tile_feats = region_feats[:, :, ::step, ::step][:, :, :th, :tw]
        else:
            source = gt if query is None else query.float()
            tile_feats = classifier.features.window_features(source, p, p)[:, :, :th, :tw]
        region_feats = region_feats.flatten(2).transpose(1, 2)  # (B, N, F)
        tile_feats = tile_feats.flatten(2).transpose(1, 2)  # (B, T, F)
        # The broadcast pair encoding is (B, T, N, F): in chunks of tiles so that it stays under ~256 MB.
        B_N_F = region_feats.shape[0] * region_feats.shape[1] * region_feats.shape[2]
        chunk = max(1, _PAIR_ELEMENTS // max(B_N_F, 1))
        logits = torch.cat([
            classifier.pair_logits(tile_feats[:, i:i + chunk, None, :], region_feats[:, None, :, :])
            for i in range(0, T, chunk)  # one iteration at training sizes; more only for huge regions
        ], dim=1)  # (B, T, N)

        grid = torch.arange(T, device=gt.device)
        tile_tl = torch.stack((grid // tw, grid % tw), dim=-1) * p  # (T, 2)
        tile_tl = tile_tl[None] + gt_offset.to(gt.device, torch.long)[:, None, :]  # (B, T, 2) in region px
        if region_valid is not None:
            region_valid = region_valid.to(gt.device, torch.bool)
        allowed = candidate_mask(tile_tl, (R, R2), p, stride, max_iou, region_valid)
        logits = logits.float().masked_fill(~allowed, float("-inf"))

        # Thresholding on logits avoids a sigmoid over all B*T*N pairs; logit(min_score) is the same cut.
        N = logits.shape[-1]
        k = min(top_k, N)
        top_logits, top_idx = logits.topk(k, dim=-1)  # (B, T, k), sorted best first
        if k < top_k:
            top_logits = F.pad(top_logits, (0, top_k - k), value=float("-inf"))
            top_idx = F.pad(top_idx, (0, top_k - k))
        cut = -math.inf if min_score <= 0 else math.inf if min_score >= 1 else math.log(min_score / (1 - min_score))
        valid = torch.isfinite(top_logits) & (top_logits >= cut)
        scores = torch.sigmoid(top_logits)

        # Gather the chosen windows' pixels by flat index: (B, T, K, p, p) positions in the region.
        tops = (top_idx // nw) * stride
        lefts = (top_idx % nw) * stride
        offs = torch.arange(p, device=gt.device)
        flat = (tops[..., None, None] + offs[:, None]) * R2 + lefts[..., None, None] + offs
        pixels = region.flatten(2).gather(2, flat.reshape(B, 1, -1).expand(B, C, -1))
        X = pixels.reshape(B, C, T, top_k, p, p).permute(0, 2, 1, 4, 5, 3).reshape(B, T, C * p * p, top_k)
        windows = _centre_columns(X, C) * valid[..., None, :]  # (B, T, D, K) structure only; invalid columns 0

        y = _tiles(gt, p)  # (B, T, D)
        y_centred = _centre(y, C)
        coefs = solve_coefficients(windows, y_centred, valid, ridge)
        fit = (windows @ coefs[..., None]).squeeze(-1)  # (B, T, D), the explained structure
        target_tiles = _channel_means(y, C) + fit
        structure = y_centred.square().sum(-1)
        residual = (y_centred - fit).square().sum(-1)
        used = valid.any(-1)
        # Share of the tile's structure the windows explain; a flat tile (nothing to explain) counts as 0.
        tile_r2 = torch.where(used & (structure > 1e-12), 1 - residual / structure.clamp_min(1e-12),
                              torch.zeros_like(structure)).clamp(0, 1)
        target = _untile(target_tiles, C, p, th, tw, (H, W))
        tile_ok = used.float().reshape(B, 1, th, 1, tw, 1).expand(B, 1, th, p, tw, p)
        mask = F.pad(tile_ok.reshape(B, 1, th * p, tw * p), (0, W - tw * p, 0, H - th * p)) > 0

    boxes = torch.stack((tops, lefts, tops + p, lefts + p), dim=-1)
    tile_boxes = torch.cat((tile_tl, tile_tl + p), dim=-1)
    return TextureMatch(target, mask, boxes, coefs, scores, valid, tile_boxes, (th, tw), tile_r2, windows, ridge)


def project_onto_windows(match: TextureMatch, x: Tensor) -> Tensor:
    """``P_X x``: the part of each tile of ``x`` that the tile's chosen windows span, around the tile's mean.

    Linear in ``x`` and differentiable (the windows are fixed); 0 for tiles without a valid window.

    Args:
        match: the search whose windows span the texture of each tile.
        x: (B, C, H, W), e.g. the restoration error ``sr - gt``.

    Returns:
        (B, T, C*p*p) projected tiles.
    """
    C = x.shape[1]
    p = math.isqrt(match.windows.shape[-2] // C)
    centred = _centre(_tiles(x.float(), p), C)
    coefs = solve_coefficients(match.windows, centred, match.valid, match.ridge)
    return (match.windows @ coefs[..., None]).squeeze(-1)


def distance(x: Tensor, y: Tensor, kind: Dist, eps: float = 1e-3) -> Tensor:
    """Element-wise distance, not reduced: ``|x - y|``, ``(x - y)^2`` or ``sqrt((x - y)^2 + eps^2)``."""
    diff = x - y
    if kind == "l1":
        return diff.abs()
    if kind == "l2":
        return diff.square()
    if kind == "charbonnier":
        return (diff.square() + eps * eps).sqrt()
    raise ValueError(f"unknown distance {kind!r}; choose l1, l2 or charbonnier")


def upsample_query(lq: Tensor, size: tuple[int, int]) -> Tensor:
    """The degraded input brought to the HR grid (bicubic, clamped): the query and the diagnostics' baseline."""
    if tuple(lq.shape[-2:]) == tuple(size):
        return lq
    return F.interpolate(lq.float(), size=size, mode="bicubic", align_corners=False).clamp(0, 1)


class CombinedLoss(nn.Module):
    """``pixel(sr, gt) + texture_weight * texture(sr, gt)`` with the diagnostics of the search.

    The defaults are those of ``LossConfig`` and ``TextureConfig`` (``tests/test_losses.py`` compares them);
    :func:`build_loss` passes every one from the config.

    Args:
        classifier: the frozen texture classifier; may be None when ``texture_weight`` is 0.
        pixel: the pixel loss (SwinIR: l1), a mean over all elements.
        texture_weight: lambda; 0 skips the search and gives exactly the pixel loss.
        texture_form: ``projection`` (consistent: 0 at sr = gt) or ``pull`` (towards ``X c*``); see the module.
        texture_dist: the element-wise distance of the term, averaged over all pixels.
        query: whose tiles the classifier compares with the windows: ``gt`` or the up-sampled ``lq``.
        charbonnier_eps: epsilon of the Charbonnier distance.
        stride, top_k, min_score, max_iou, ridge: see :func:`texture_search`.
    """

    def __init__(
        self,
        classifier: nn.Module | None,
        pixel: PixelLoss = "l1",
        texture_weight: float = 0.0,
        texture_form: TextureForm = "projection",
        texture_dist: PixelLoss = "l1",
        query: TextureQuery = "gt",
        charbonnier_eps: float = 1e-3,
        stride: int = 4,
        top_k: int = 5,
        min_score: float = 0.5,
        max_iou: float = 0.0,
        ridge: float = 1e-3,
    ) -> None:
        super().__init__()
        if texture_weight > 0 and classifier is None:
            raise ConfigError("loss.texture_weight > 0 needs a texture classifier")
        if texture_form not in typing.get_args(TextureForm):
            raise ConfigError(f"unknown loss.texture_form {texture_form!r}; choose one of "
                              f"{list(typing.get_args(TextureForm))}")
        self.classifier = classifier
        if classifier is not None:
            # Frozen: the search is a fixed measurement, never something the optimiser may bend.
            classifier.requires_grad_(False).eval()
        self.pixel = pixel
        self.texture_weight = texture_weight
        self.texture_form = texture_form
        self.texture_dist = texture_dist
        self.query = query
        self.charbonnier_eps = charbonnier_eps
        self.stride, self.top_k, self.min_score, self.max_iou, self.ridge = stride, top_k, min_score, max_iou, ridge

    def train(self, mode: bool = True) -> CombinedLoss:
        super().train(mode)
        if self.classifier is not None:
            self.classifier.eval()  # the classifier stays in eval mode whatever the trainer does
        return self

    def search(self, gt: Tensor, region: Tensor | None = None, gt_offset: Tensor | None = None,
               region_valid: Tensor | None = None, query: Tensor | None = None) -> TextureMatch:
        """:func:`texture_search` with this loss's settings."""
        if self.classifier is None:
            raise ConfigError("the texture search needs a texture classifier")
        return texture_search(
            self.classifier, gt, region, gt_offset, region_valid, query=query, stride=self.stride,
            top_k=self.top_k, min_score=self.min_score, max_iou=self.max_iou, ridge=self.ridge,
        )

    def texture_term(self, sr: Tensor, gt: Tensor, match: TextureMatch) -> Tensor:
        """The 0-dim texture term of ``sr`` for a search made on ``gt``, averaged over all pixels of ``sr``."""
        if self.texture_form == "projection":
            projected = project_onto_windows(match, sr - gt)
            d = distance(projected, torch.zeros_like(projected), self.texture_dist, self.charbonnier_eps)
            if self.texture_dist == "charbonnier":
                d = d - self.charbonnier_eps  # exactly 0 at sr = gt
        else:
            d = distance(sr, match.target, self.texture_dist, self.charbonnier_eps) * match.mask.to(sr.dtype)
        return d.sum() / sr.numel()

    def forward(self, sr: Tensor, gt: Tensor, region: Tensor | None = None, gt_offset: Tensor | None = None,
                region_valid: Tensor | None = None, lq: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Computes the loss.

        Args:
            sr: (B, C, H, W) the model's output.
            gt: (B, C, H, W) ground truth in [0, 1].
            region: (B, C, R, R') the HR search region containing ``gt``; None: ``gt`` itself.
            gt_offset: (B, 2) long, top/left of ``gt`` inside ``region``.
            region_valid: (B, 1, R, R') bool, False on padded pixels.
            lq: (B, C, h, w) the degraded input: the query when ``query == "lq"``, and the bicubic baseline
                of the diagnostics.

        Returns:
            ``(total, parts)``: the 0-dim loss, and 0-dim detached tensors (no host sync) ``pixel``,
            ``texture``, ``texture_score`` (mean probability of the used windows), ``texture_underfilled``
            (share of tiles with fewer than K windows above ``min_score``), ``texture_tiles_used`` (share of
            tiles with at least one), ``texture_r2`` (mean share of a used tile's structure that ``X c*``
            explains), ``texture_fit_error`` (mean ``|X c* - gt|`` on used tiles) and, with ``lq``,
            ``texture_bicubic_error`` (mean ``|bicubic(lq) - gt|`` on the same pixels), ``coef_mean``,
            ``coef_abs_max``.
        """
        pixel = distance(sr, gt, self.pixel, self.charbonnier_eps).mean()
        zero = pixel.detach().new_zeros(())
        if self.texture_weight == 0:
            keys = ("texture", "texture_score", "texture_underfilled", "texture_tiles_used", "texture_r2",
                    "texture_fit_error", "coef_mean", "coef_abs_max")
            return pixel, {"pixel": pixel.detach(), **dict.fromkeys(keys, zero)}
        lq_up = upsample_query(lq, gt.shape[-2:]) if lq is not None else None
        if self.query == "lq" and lq_up is None:
            raise ConfigError("texture.query='lq' needs the degraded input; pass lq to the loss")
        match = self.search(gt, region, gt_offset, region_valid, query=lq_up if self.query == "lq" else None)
        texture = self.texture_term(sr, gt, match)
        total = pixel + self.texture_weight * texture

        used = match.valid.float()
        n_used = used.sum().clamp_min(1)
        tile_used = match.valid.any(-1).float()
        mask = match.mask.to(gt.dtype)
        n_pixels = (mask.sum() * gt.shape[1]).clamp_min(1)
        parts = {
            "pixel": pixel.detach(),
            "texture": texture.detach(),
            "texture_score": (match.scores * used).sum() / n_used,
            "texture_underfilled": (match.valid.sum(-1) < self.top_k).float().mean(),
            "texture_tiles_used": tile_used.mean(),
            "texture_r2": (match.tile_r2 * tile_used).sum() / tile_used.sum().clamp_min(1),
            "texture_fit_error": ((match.target - gt).abs() * mask).sum() / n_pixels,
            "coef_mean": (match.coefs * used).sum() / n_used,
            "coef_abs_max": match.coefs.abs().amax(),
        }
        if lq_up is not None:
            parts["texture_bicubic_error"] = ((lq_up - gt).abs() * mask).sum() / n_pixels
        return total, parts


def build_loss(cfg: Config, classifier: nn.Module | None) -> CombinedLoss:
    """The loss of a run: ``cfg.loss`` and ``cfg.texture``; ``classifier`` may be None when lambda is 0."""
    if classifier is not None and cfg.texture_enabled:
        p = getattr(classifier, "patch_size", None)
        if p != cfg.texture.patch_size:
            raise ConfigError(
                f"the texture classifier was trained on {p} px patches but texture.patch_size is "
                f"{cfg.texture.patch_size}; retrain it or set texture.patch_size={p}"
            )
    t = cfg.texture
    return CombinedLoss(
        classifier, pixel=cfg.loss.pixel, texture_weight=cfg.loss.texture_weight,
        texture_form=cfg.loss.texture_form, texture_dist=cfg.loss.texture_dist, query=t.query,
        charbonnier_eps=cfg.loss.charbonnier_eps, stride=t.stride, top_k=t.top_k, min_score=t.min_score,
        max_iou=t.max_iou, ridge=t.ridge,
    )
