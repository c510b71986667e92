"""The texture search: for every ``p x p`` patch of an image, the windows elsewhere that show the same texture.

For every patch of ``gt`` (``p`` is the texture classifier's patch size) the classifier scores every ``p x p``
window of a search region against the patch (or against the same place of a *query* image, e.g. the degraded
input up-sampled to gt's grid); the ``K`` best windows that score at least ``min_score`` and do not overlap the
patch's own position beyond ``max_iou`` form the columns of ``X``. Each column and the patch are centred per
channel, so the windows explain the patch's *structure* around its own mean brightness:
``c* = argmin_c ||X~ c - y~||^2`` (ridge-regularised), and ``X c* := mean(y) + X~ c*`` is the patch rebuilt from
other places of the image with the same texture.

:class:`TextureSearch` holds the classifier and the settings (built from ``TextureConfig``, where every default is
written); calling it runs the search in three steps: score the candidates, choose the windows, fit the patch.
Everything is batched over images, patches and candidates (one feature pass over the region, one broadcast
classifier call, one gather of the chosen windows, batched ``K x K`` solves) and runs without gradients.

With ``query: gt`` the search depends on the training batch alone, so training can run it where the batch is
made, in the DataLoader's worker processes (``texture.search_in``): :meth:`TextureSearch.attach_match` puts the
match into the collated batch in place of the region, :meth:`TextureSearch.match_from_batch` reads it back in
the training step, which then only computes the term. On the study's CPU model (one thread) the search costs
about 1.5x a whole λ = 0 step in CPU (``python -m bench.bench_texture --profile study_cpu``): the pair features'
batched matrix product of every patch at 25 small shifts with every window (about a third, at the core's
arithmetic peak), centring and scaling the windows' pixels for it (about a tenth), and the feature pass over the
region (about a quarter); in the workers it runs beside the training thread, on a core of its own where one is
free. A worker keeps the memory the search frees for the next batch (:func:`keep_freed_memory`).

Naming: a *patch* is one square of the ``p`` grid of the searched image; a *window* is any ``p x p`` square of
the region at the search stride. (A *tile* elsewhere in the project is a piece of an image in tiled inference.)
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from xswinir.config import ConfigError, TextureConfig, TextureQuery

_PAIR_ELEMENTS = 2**26  # float32 elements of one broadcast pair-encoding chunk (~256 MB)
# A match travelling in a training batch: its tensors under these keys (the rest comes from the search).
MATCH_PREFIX = "texture_match."
_MATCH_TENSORS = ("target", "mask", "boxes", "coefs", "scores", "valid", "tile_boxes", "tile_r2", "windows")
# What the search reads from a collated batch; attach_match replaces them by the match.
_REGION_KEYS = ("region", "region_valid", "gt_offset")
# glibc's mallopt parameters (malloc.h) and the values a loader worker gets (see keep_freed_memory).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT_HEAP = 512 * 2**20  # freed heap a worker keeps before returning memory to the system
_HEAP_BLOCKS_UP_TO = 32 * 2**20  # blocks up to this size come from the heap (glibc's own dynamic maximum)
_memory_kept_in: int | None = None  # the process id keep_freed_memory last applied in


def keep_freed_memory() -> bool:
    """Lets this process reuse the memory it frees instead of returning it to the system (glibc's malloc only).

    A search allocates and frees about 100 MB of temporaries per batch, in blocks of up to ~22 MB. glibc maps
    blocks that large afresh and trims its heap when they are freed, so every batch faults all those pages in
    again: about a fifth of the search's CPU time on the study's profile (kernel time, which ``process_time``
    counts). Fixed thresholds keep the blocks on the heap and the heap from shrinking. Changes no number, only
    where memory comes from; applied once per process (:meth:`TextureSearch.attach_match` calls it in
    DataLoader worker processes, which only make batches).

    Returns:
        Whether it applied (False off Linux or without glibc).
    """
    global _memory_kept_in
    if _memory_kept_in == os.getpid():
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS_UP_TO)
                       and libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_HEAP))
    except (OSError, AttributeError):  # another C library (musl): its own allocator, nothing to set
        return False
    if applied:
        _memory_kept_in = os.getpid()
    return applied


class _Features(Protocol):
    def window_features(self, images: Tensor, patch_size: int, stride: int) -> Tensor: ...


class TextureScorer(Protocol):
    """What the search needs of :class:`xswinir.texture.TextureClassifier` (and what a test double provides)."""

    patch_size: int
    features: _Features

    def pair_logits(self, fa: Tensor, fb: Tensor) -> Tensor: ...


@dataclass
class TextureMatch:
    """The result of a :class:`TextureSearch` for a batch; ``T = th * tw`` patches in row-major order.

    The field names keep their first spelling (``tile_*``, ``tiles``): each "tile" here is one patch of the
    ``p`` grid.

    Attributes:
        target: (B, C, H, W) ``X c*``, each patch's own per-channel mean plus its structure rebuilt from the
            chosen windows; zero where ``mask`` is False.
        mask: (B, 1, H, W) bool, pixels whose patch has at least one chosen window (pixels beyond the last
            whole patch are False).
        boxes: (B, T, K, 4) long, chosen windows as top, left, bottom, right (exclusive) in region pixels.
        coefs: (B, T, K) float32 least-squares coefficients ``c*``; 0 for entries that are not ``valid``.
        scores: (B, T, K) classifier probability that the window shows the patch's texture.
        valid: (B, T, K) bool, the entry passed ``min_score`` (and was a candidate at all).
        tile_boxes: (B, T, 4) long, each patch's own box in region pixels.
        tiles: (th, tw), the patch grid of ``gt``.
        tile_r2: (B, T) in [0, 1], the share of each patch's structure (its deviation from its per-channel
            mean) that ``X c*`` explains; 0 for patches without a valid window or without structure.
        windows: (B, T, C*p*p, K) the chosen windows centred per channel (channel-major), 0 where not valid.
        ridge: the relative ridge the coefficients were solved with.
        patch_size: the side ``p`` of the patches and windows.
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
    patch_size: int

    def to_batch(self) -> dict[str, Tensor]:
        """The match's tensors as batch entries, ``texture_match.<field>``; read back by
        :meth:`TextureSearch.match_from_batch`, which adds ``tiles``, ``ridge`` and ``patch_size``."""
        return {MATCH_PREFIX + name: getattr(self, name) for name in _MATCH_TENSORS}


def window_grid(size: int, patch_size: int, stride: int) -> int:
    """How many windows of side ``patch_size`` fit along an axis of ``size`` pixels at ``stride``."""
    return (size - patch_size) // stride + 1


def candidate_mask(
    patch_top_left: Tensor, region_hw: tuple[int, int], patch_size: int, stride: int, max_iou: float,
    region_valid: Tensor | None = None,
) -> Tensor:
    """Which region windows may stand in for which patch.

    Args:
        patch_top_left: (B, T, 2) long, each patch's top/left in region pixels.
        region_hw: the region's (height, width).
        patch_size: window and patch side ``p``.
        stride: step between windows.
        max_iou: windows whose IoU with the patch's own box exceeds this are excluded.
        region_valid: optional (B, 1, R, R') bool; windows touching a False pixel are excluded.

    Returns:
        (B, T, N) bool with ``N = nh * nw`` windows in row-major order.
    """
    nh = window_grid(region_hw[0], patch_size, stride)
    nw = window_grid(region_hw[1], patch_size, stride)
    device = patch_top_left.device
    tops = torch.arange(nh, device=device) * stride
    lefts = torch.arange(nw, device=device) * stride
    # Two p x p boxes overlap (p - |dy|)+ by (p - |dx|)+ pixels; separable, so (B, T, nh) x (B, T, nw).
    over_h = (patch_size - (tops - patch_top_left[..., :1]).abs()).clamp_min(0)
    over_w = (patch_size - (lefts - patch_top_left[..., 1:]).abs()).clamp_min(0)
    inter = (over_h[..., :, None] * over_w[..., None, :]).flatten(-2).float()  # (B, T, N)
    iou = inter / (2 * patch_size**2 - inter)
    allowed = iou <= max_iou
    if region_valid is not None:
        touches_invalid = F.max_pool2d((~region_valid).float(), patch_size, stride) > 0  # (B, 1, nh, nw)
        allowed = allowed & ~touches_invalid.flatten(1)[:, None, :]
    return allowed


def to_patches(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, T, C*p*p): the whole ``p x p`` patches, row-major, each flattened channel-major."""
    B, C, H, W = x.shape
    th, tw = H // patch_size, W // patch_size
    x = x[:, :, : th * patch_size, : tw * patch_size].reshape(B, C, th, patch_size, tw, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, th * tw, C * patch_size * patch_size)


def from_patches(patches: Tensor, channels: int, patch_size: int, grid: tuple[int, int],
                 size: tuple[int, int]) -> Tensor:
    """(B, T, C*p*p) -> (B, C, H, W), the inverse of :func:`to_patches`; zero beyond the whole patches.

    Args:
        patches: (B, th*tw, C*p*p) in the layout of :func:`to_patches`.
        channels: C.
        patch_size: p.
        grid: (th, tw), the patch grid.
        size: (H, W) of the image, at least ``(th*p, tw*p)``.
    """
    B = patches.shape[0]
    th, tw = grid
    x = patches.reshape(B, th, tw, channels, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    x = x.reshape(B, channels, th * patch_size, tw * patch_size)
    return F.pad(x, (0, size[1] - tw * patch_size, 0, size[0] - th * patch_size))


def centre_patches(patches: Tensor, channels: int) -> Tensor:
    """Subtracts each patch's per-channel mean: (..., C*p*p) flattened channel-major -> same shape."""
    x = patches.reshape(*patches.shape[:-1], channels, patches.shape[-1] // channels)
    return (x - x.mean(-1, keepdim=True)).reshape(patches.shape)


def _centre_columns(X: Tensor, channels: int) -> Tensor:
    """:func:`centre_patches` for each column of (..., C*p*p, K)."""
    return centre_patches(X.transpose(-1, -2), channels).transpose(-1, -2)


def _channel_means(patches: Tensor, channels: int) -> Tensor:
    """(..., C*p*p) -> (..., C*p*p), every element replaced by its patch-channel mean."""
    x = patches.reshape(*patches.shape[:-1], channels, patches.shape[-1] // channels)
    return x.mean(-1, keepdim=True).expand_as(x).reshape(patches.shape)


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


def upsample_query(lq: Tensor, size: tuple[int, int]) -> Tensor:
    """The degraded input (B, C, h, w) brought to the HR grid ``size`` (bicubic, clamped to [0, 1]).

    The search's ``lq`` query, and the bicubic baseline of the loss's diagnostics; returned as it is when it
    already has ``size``.
    """
    if tuple(lq.shape[-2:]) == tuple(size):
        return lq
    return F.interpolate(lq.float(), size=size, mode="bicubic", align_corners=False).clamp(0, 1)


class _Choice(NamedTuple):
    index: Tensor  # (B, T, K) long, flat window index in the region (0 where padded)
    scores: Tensor  # (B, T, K) classifier probability
    valid: Tensor  # (B, T, K) bool


class _Fit(NamedTuple):
    target: Tensor  # (B, C, H, W)
    mask: Tensor  # (B, 1, H, W) bool
    coefs: Tensor  # (B, T, K)
    r2: Tensor  # (B, T)


@dataclass(frozen=True)
class TextureSearch:
    """The texture classifier and the search settings; call it to search a batch.

    Build it with :meth:`from_config`, so that every setting comes from ``TextureConfig`` (where the defaults
    are written); the loss and the explanations take one.

    Attributes:
        classifier: the frozen texture classifier (:class:`xswinir.texture.TextureClassifier` or a
            :class:`TextureScorer`); its ``patch_size`` is the patch side ``p``.
        stride: step between candidate windows, in region pixels.
        top_k: K, the most windows per patch.
        min_score: candidates with a classifier probability below this are not used.
        max_iou: candidates overlapping the patch's own box more than this are excluded (0: no shared pixel).
        ridge: relative Tikhonov weight of the least-squares solve.
        query: whose patches are compared with the windows: ``gt``'s own or the up-sampled degraded input
            (``lq``); see :meth:`select_query`.
        region_size: side of the search region around the patches (None: the whole image). The loss gets its
            regions cut to this size by the data pipeline; the explanations cut them themselves.
    """

    classifier: TextureScorer
    stride: int
    top_k: int
    min_score: float
    max_iou: float
    ridge: float
    query: TextureQuery
    region_size: int | None

    @classmethod
    def from_config(cls, texture: TextureConfig, classifier: TextureScorer) -> TextureSearch:
        """The search of ``texture`` (a run's ``cfg.texture``) with ``classifier``.

        Raises:
            ConfigError: the classifier was trained on another patch size than ``texture.patch_size``.
        """
        p = getattr(classifier, "patch_size", None)
        if p != texture.patch_size:
            raise ConfigError(f"the texture classifier was trained on {p} px patches but texture.patch_size is "
                              f"{texture.patch_size}; retrain it or set texture.patch_size={p}")
        return cls(classifier, stride=texture.stride, top_k=texture.top_k, min_score=texture.min_score,
                   max_iou=texture.max_iou, ridge=texture.ridge, query=texture.query,
                   region_size=texture.region_size)

    @property
    def patch_size(self) -> int:
        """The patch side ``p``: the classifier's."""
        return int(self.classifier.patch_size)

    def select_query(self, lq_up: Tensor | None) -> Tensor | None:
        """The query image the ``query`` setting asks for: ``lq_up`` for ``lq``, None (gt's own) for ``gt``.

        Raises:
            ConfigError: ``query`` is ``lq`` and ``lq_up`` is None.
        """
        if self.query == "gt":
            return None
        if lq_up is None:
            raise ConfigError("texture.query='lq' needs the degraded input; pass lq to the loss")
        return lq_up

    def attach_match(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Searches a collated training batch and returns it with the match in place of the region.

        Runs where the batch is made (``build_train_batches``' ``batch_fn``: the DataLoader's worker processes),
        so that the training step only computes the term. The match is the one the step would find on the same
        batch: the same call on the same tensors. In a worker process it first calls :func:`keep_freed_memory`.

        Args:
            batch: ``gt`` (B, C, H, W) and, when the region is not gt itself, ``region``, ``gt_offset`` and
                ``region_valid``, as :func:`xswinir.data.collate` makes them.

        Returns:
            A new dict: ``batch`` without ``region``, ``region_valid`` and ``gt_offset``, plus the entries of
            :meth:`TextureMatch.to_batch`.

        Raises:
            ConfigError: ``query`` is ``lq``: the degraded input is made in the training step.
        """
        if self.query != "gt":
            raise ConfigError("the search can run with the data only for texture.query=gt; use texture.search_in=step")
        if torch.utils.data.get_worker_info() is not None:  # a loader worker: its own process, only batches
            keep_freed_memory()
        match = self(batch["gt"], batch.get("region"), batch.get("gt_offset"), batch.get("region_valid"))
        rest = {key: value for key, value in batch.items() if key not in _REGION_KEYS}
        return {**rest, **match.to_batch()}

    def match_from_batch(self, batch: dict[str, Tensor]) -> TextureMatch | None:
        """The match :meth:`attach_match` put into ``batch`` (moved to any device since), or None if it has none."""
        if MATCH_PREFIX + "target" not in batch:
            return None
        tensors = {name: batch[MATCH_PREFIX + name] for name in _MATCH_TENSORS}
        p = self.patch_size
        H, W = tensors["target"].shape[-2:]
        return TextureMatch(**tensors, tiles=(H // p, W // p), ridge=self.ridge, patch_size=p)

    @torch.no_grad()
    def __call__(
        self,
        gt: Tensor,
        region: Tensor | None = None,
        gt_offset: Tensor | None = None,
        region_valid: Tensor | None = None,
        *,
        query: Tensor | None = None,
    ) -> TextureMatch:
        """Finds, for every patch of ``gt``, the K most similar windows of ``region`` and fits the patch with them.

        Args:
            gt: (B, C, H, W) targets in [0, 1]; only whole ``p x p`` patches are explained.
            region: (B, C, R, R') search regions containing ``gt``; None: ``gt`` itself.
            gt_offset: (B, 2) long, top/left of ``gt`` inside ``region``; None: zeros.
            region_valid: (B, 1, R, R') bool, False on padding; windows touching it are not candidates.
            query: (B, C, H, W) aligned with ``gt`` whose patches are compared with the windows instead of gt's
                (e.g. :meth:`select_query` of the up-sampled degraded input); ``c*`` still fits gt's patches.
                None: gt's own patches.

        Returns:
            The :class:`TextureMatch`; no tensor in it requires grad.
        """
        p = self.patch_size
        region_is_gt = region is None
        if region_is_gt:
            region, gt_offset = gt, None
        B, C, H, W = gt.shape
        R, R2 = region.shape[-2:]
        if H < p or W < p or R < p or R2 < p:
            raise ValueError(f"gt {tuple(gt.shape)} and region {tuple(region.shape)} must be at least {p} px")
        if query is not None and query.shape != gt.shape:
            raise ValueError(f"query {tuple(query.shape)} must have gt's shape {tuple(gt.shape)}")
        if gt_offset is None:
            gt_offset = torch.zeros(B, 2, dtype=torch.long, device=gt.device)
        th, tw = H // p, W // p
        grid = torch.arange(th * tw, device=gt.device)
        patch_tl = torch.stack((grid // tw, grid % tw), dim=-1) * p  # (T, 2)
        patch_tl = patch_tl[None] + gt_offset.to(gt.device, torch.long)[:, None, :]  # (B, T, 2) in region px
        with torch.autocast(gt.device.type, enabled=False):
            gt, region = gt.float(), region.float()
            logits = self._score_candidates(gt, region, query, region_is_gt, patch_tl, region_valid)
            choice = self._choose_windows(logits)
            boxes, windows = self._gather_windows(region, choice)
            fit = self._fit(gt, windows, choice.valid)
        return TextureMatch(fit.target, fit.mask, boxes, fit.coefs, choice.scores, choice.valid,
                            torch.cat((patch_tl, patch_tl + p), dim=-1), (th, tw), fit.r2, windows, self.ridge, p)

    def _score_candidates(self, gt: Tensor, region: Tensor, query: Tensor | None, region_is_gt: bool,
                          patch_tl: Tensor, region_valid: Tensor | None) -> Tensor:
        """(B, T, N) classifier logits of every (patch, window) pair; -inf where the window is no candidate."""
        p, stride, features = self.patch_size, self.stride, self.classifier.features
        th, tw = gt.shape[-2] // p, gt.shape[-1] // p
        # One feature pass each: the region's windows and the query's patches (windows at stride p).
        region_feats = features.window_features(region, p, stride)  # (B, F, nh, nw)
        if region_is_gt and query is None and p % stride == 0:
            step = p // stride  # the patches are among the region's windows: no second pass
            patch_feats = region_feats[:, :, ::step, ::step][:, :, :th, :tw]
        else:
            source = gt if query is None else query.float()
            patch_feats = features.window_features(source, p, p)[:, :, :th, :tw]
        region_feats = region_feats.flatten(2).transpose(1, 2)  # (B, N, F)
        patch_feats = patch_feats.flatten(2).transpose(1, 2)  # (B, T, F)
        # The broadcast pair encoding is (B, T, N, F): in chunks of patches so that it stays under ~256 MB.
        chunk = max(1, _PAIR_ELEMENTS // max(region_feats.numel(), 1))
        logits = torch.cat([
            self.classifier.pair_logits(patch_feats[:, i:i + chunk, None, :], region_feats[:, None, :, :])
            for i in range(0, th * tw, chunk)  # one iteration at training sizes; more only for huge regions
        ], dim=1)  # (B, T, N)
        if region_valid is not None:
            region_valid = region_valid.to(gt.device, torch.bool)
        allowed = candidate_mask(patch_tl, tuple(region.shape[-2:]), p, stride, self.max_iou, region_valid)
        return logits.float().masked_fill(~allowed, float("-inf"))

    def _choose_windows(self, logits: Tensor) -> _Choice:
        """The K best candidates of each patch (best first), padded to K, and which of them pass ``min_score``."""
        K = self.top_k
        k = min(K, logits.shape[-1])
        top_logits, top_idx = logits.topk(k, dim=-1)  # (B, T, k), sorted best first
        if k < K:
            top_logits = F.pad(top_logits, (0, K - k), value=float("-inf"))
            top_idx = F.pad(top_idx, (0, K - k))
        # Thresholding on logits avoids a sigmoid over all B*T*N pairs; logit(min_score) is the same cut.
        s = self.min_score
        cut = -math.inf if s <= 0 else math.inf if s >= 1 else math.log(s / (1 - s))
        valid = torch.isfinite(top_logits) & (top_logits >= cut)
        return _Choice(top_idx, torch.sigmoid(top_logits), valid)

    def _gather_windows(self, region: Tensor, choice: _Choice) -> tuple[Tensor, Tensor]:
        """The chosen windows' boxes (B, T, K, 4) and pixels (B, T, C*p*p, K), centred, 0 where not valid."""
        p, stride = self.patch_size, self.stride
        B, C, _, R2 = region.shape
        T, K = choice.index.shape[1:]
        nw = window_grid(R2, p, stride)
        tops = (choice.index // nw) * stride
        lefts = (choice.index % nw) * stride
        # Gather by flat index: (B, T, K, p, p) positions in the region.
        offs = torch.arange(p, device=region.device)
        flat = (tops[..., None, None] + offs[:, None]) * R2 + lefts[..., None, None] + offs
        pixels = region.flatten(2).gather(2, flat.reshape(B, 1, -1).expand(B, C, -1))
        X = pixels.reshape(B, C, T, K, p, p).permute(0, 2, 1, 4, 5, 3).reshape(B, T, C * p * p, K)
        windows = _centre_columns(X, C) * choice.valid[..., None, :]  # structure only; invalid columns 0
        return torch.stack((tops, lefts, tops + p, lefts + p), dim=-1), windows

    def _fit(self, gt: Tensor, windows: Tensor, valid: Tensor) -> _Fit:
        """``c*`` of every patch of ``gt``, ``X c*`` on the image grid, its mask and the share explained."""
        p = self.patch_size
        B, C, H, W = gt.shape
        th, tw = H // p, W // p
        y = to_patches(gt, p)  # (B, T, D)
        y_centred = centre_patches(y, C)
        coefs = solve_coefficients(windows, y_centred, valid, self.ridge)
        fit = (windows @ coefs[..., None]).squeeze(-1)  # (B, T, D), the explained structure
        structure = y_centred.square().sum(-1)
        residual = (y_centred - fit).square().sum(-1)
        used = valid.any(-1)
        # Share of the patch's structure the windows explain; a flat patch (nothing to explain) counts as 0.
        r2 = torch.where(used & (structure > 1e-12), 1 - residual / structure.clamp_min(1e-12),
                         torch.zeros_like(structure)).clamp(0, 1)
        target = from_patches(_channel_means(y, C) + fit, C, p, (th, tw), (H, W))
        patch_ok = used.float().reshape(B, 1, th, 1, tw, 1).expand(B, 1, th, p, tw, p)
        mask = F.pad(patch_ok.reshape(B, 1, th * p, tw * p), (0, W - tw * p, 0, H - th * p)) > 0
        return _Fit(target, mask, coefs, r2)
