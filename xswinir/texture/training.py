"""Training the linear texture classifier from HR images: pairs drawn as the search uses them, a logistic fit.

Pairs (``cfg.num_pairs``, half positive), all drawn from one seeded ``torch.Generator``, in the same geometry
the texture search uses them (a patch and a candidate window that shares no more than ``max_iou`` of it). Nearby
pairs are a window and a second window of the same image within ``cfg.positive_max_shift * p`` (Chebyshev
distance) that overlaps the first no more than ``max_iou``: the nearest candidates the search may pick.

* positive, correlated: a nearby pair whose luma correlates at least ``cfg.positive_min_correlation`` (in
  absolute value): a window that continues the patch's texture *and* can stand in for it in the fit;
* positive, same texture region: a nearby pair whose luma does *not* correlate that much, in a region of one
  texture: both windows and the window midway between them are textured (luma spread at least
  ``TEXTURED_MIN_SPREAD``) and agree in luma spread and in fine and coarse gradient magnitude within a factor
  ``REGION_MAX_RATIO``. Fur, grass, gravel and sand give such pairs: the same texture with no pixel
  correspondence. ``TEXTURE_POSITIVE_FRACTION`` of the positives (fewer when the images have fewer);
* negative, nearby: a nearby pair whose luma correlates at most ``cfg.near_negative_max_correlation`` and whose
  statistics differ by more than ``REGION_MAX_RATIO`` squared (a texture boundary: one window of grass, one of
  sky); ``cfg.near_negative_fraction`` of the negatives. Nearby pairs between the two rules are not labelled;
* negative, same image ("hard"): windows of one image farther apart than any positive, kept only if their
  features differ more than the ``cfg.hard_negative_quantile`` quantile of the positive pairs' feature distances
  (a whole image can be one texture: far windows that are as alike as neighbours are not labelled at all,
  instead of being labelled wrongly); ``cfg.hard_negative_fraction`` of the negatives;
* negative, across images: windows of two different images fill up the rest.

Ranking triplets teach the order in which the search takes the windows: a patch, the best of
``RANK_CANDIDATES`` candidate windows of its image within twice the positives' reach (the one whose luma correlates
most with the patch, in absolute value, measured on the HR patch also when the query is low-quality: the fit is of
the HR patch), and another of them whose |correlation| is at least ``RANK_MIN_GAP`` lower. A pairwise logistic
loss (weight ``RANK_WEIGHT``) asks the classifier to score the better one higher: "same texture" decides whether
a window is a partner, and among partners the one that can stand in for the patch comes first. As many triplets
as pairs are drawn; the report gives the held-out share ranked right (``rank_accuracy``).

The query side of ``cfg.lq_query_fraction`` of the pairs comes from the *degraded* image (the run's degradation,
up-sampled back to the HR grid), so that one classifier compares HR with HR and low-quality with HR (the seed's
"sub-images of the low-quality input"). The second window of every pair gets a small brightness and contrast
change, so that those are no cue for the label.

The images are split **by image**: ``cfg.holdout_fraction`` of them (at least one) give the held-out pairs,
drawn the same way, and the reported ROC AUC is on those, separately for HR and LQ queries, and for the
same-texture-region positives alone against all negatives (``roc_auc_texture``). With fewer than four images the
held-out pairs come from the training images instead (the report says ``holdout: pairs``).

The features of all windows are computed once; a full-batch L-BFGS (``cfg.steps`` iterations, initial step
``cfg.lr``) then fits the ``2F + P + 1`` weights with an L2 penalty ``cfg.weight_decay`` on the feature
weights, the difference weights constrained to be <= 0 and the pair-feature weights to be >= 0 (see ``_fit``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xswinir.config import ClassifierConfig, Config, ConfigError
from xswinir.errors import UserError
from xswinir.images import ImageReadError
from xswinir.sources import resolve_image_files
from xswinir.texture.classifier import (
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    TextureClassifier,
    save_texture_classifier,
)

log = logging.getLogger(__name__)

BRIGHTNESS_JITTER = 0.05  # +- added to the second window, on the [0, 1] scale
CONTRAST_JITTER = 0.1  # the second window's contrast about its mean is scaled by 1 +- this
FEATURE_CHUNK = 2048  # windows per feature batch: bounds memory at about 60 MB for p = 16
MAX_IMAGE_SIDE = 512  # training images are centre-cropped to this: windows are local, memory is not
# Same-texture-region positives (see the module docstring). Their share of the positives balances the two ideas
# of "same texture": half can stand in for the patch pixel by pixel, half only share its statistics.
TEXTURE_POSITIVE_FRACTION = 0.5
TEXTURED_MIN_SPREAD = 0.02  # luma standard deviation on the [0, 1] scale: below it a window counts as flat
REGION_MAX_RATIO = 1.25  # statistics of one texture region agree within this factor; boundaries differ by its square
# Ranking triplets (see the module docstring): two candidates of one patch whose |luma correlation| with it differs
# at least this much, the better one to be ranked first; their loss counts this much beside the logistic loss.
RANK_MIN_GAP = 0.1
RANK_WEIGHT = 4.0
# The better one of a triplet is the best of this many candidates, the worse one another of them: the order that
# matters is the one at the top, where the search takes its K windows.
RANK_CANDIDATES = 6


def _uniform(n: int, high: Tensor, generator: torch.Generator) -> Tensor:
    """Integers in [0, high) for each of n draws; ``high`` (n,) may differ per draw."""
    return (torch.rand(n, generator=generator, dtype=torch.float64) * high).long().clamp_max(high - 1)


def _crop(images: list[Tensor], index: Tensor, ys: Tensor, xs: Tensor, p: int) -> Tensor:
    """(N, 3, p, p) windows ``images[index[n]][:, ys[n]:ys[n]+p, xs[n]:xs[n]+p]``; one gather per image."""
    out = torch.empty(len(index), 3, p, p)
    offsets = torch.arange(p)
    for i, image in enumerate(images):
        sel = (index == i).nonzero().flatten()
        if len(sel) == 0:
            continue
        rows = (ys[sel, None] + offsets)[:, :, None]  # (n, p, 1)
        cols = (xs[sel, None] + offsets)[:, None, :]  # (n, 1, p)
        out[sel] = image[:, rows, cols].permute(1, 0, 2, 3)
    return out


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random brightness and contrast per window of x (N, 3, p, p), in [0, 1].

    No flips or rotations: the search rebuilds a tile from windows as they are, so a window is only a good
    partner if its structure is laid out like the tile's (the layout features must be able to see that).
    """
    n = len(x)
    brightness = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * BRIGHTNESS_JITTER
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * CONTRAST_JITTER
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp(0.0, 1.0)


def _correlation(a: Tensor, b: Tensor) -> Tensor:
    """Normalised cross-correlation of the luma of windows a and b (N, 3, p, p) -> (N,) in [-1, 1]."""
    a = a.mean(1).flatten(1)
    b = b.mean(1).flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-6)


def _region_statistics(windows: Tensor) -> Tensor:
    """Log luma spread and log mean fine and coarse gradient magnitude of windows (N, 3, p, p) -> (N, 3).

    What "one texture region" is measured by: three numbers, not the classifier's features, so that the
    classifier does not learn its own labelling rule back.
    """
    luma = windows.mean(1, keepdim=True)  # (N, 1, p, p)
    coarse = F.avg_pool2d(luma, 2)

    def gradient(x: Tensor) -> Tensor:
        return (x.diff(dim=-1).abs().mean((-1, -2, -3)) + x.diff(dim=-2).abs().mean((-1, -2, -3))) / 2

    stats = torch.stack((luma.std((-1, -2, -3)), gradient(luma), gradient(coarse)), dim=-1)
    return stats.clamp_min(1e-4).log()


def _fit_correlation(a: Tensor, b: Tensor) -> Tensor:
    """|cosine| of windows a and b (N, 3, p, p), each centred per channel: how much of a's structure one
    coefficient times b explains in the search's least-squares fit (its square is that r²) -> (N,) in [0, 1]."""
    a = (a - a.mean((-1, -2), keepdim=True)).flatten(1)
    b = (b - b.mean((-1, -2), keepdim=True)).flatten(1)
    return (a * b).sum(1).abs() / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-6)


def _features(clf: TextureClassifier, windows: Tensor, progress: bool) -> Tensor:
    from tqdm import tqdm

    chunks = windows.split(FEATURE_CHUNK)
    if not chunks:  # no windows: an empty (0, F + D)
        size = clf.features.num_features + clf.features.descriptor_size(tuple(windows.shape[-2:]))
        return windows.new_zeros(0, size)
    with torch.no_grad():
        bar = tqdm(chunks, desc="texture features", disable=None if progress else True, leave=False)
        return torch.cat([clf.features(c) for c in bar])


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve by ranking (Mann-Whitney U), ties counted as half.

    Args:
        scores: (N,) any real scores, higher meaning "positive".
        labels: (N,) 0/1 or bool.

    Returns:
        AUC in [0, 1]; NaN if one class is absent.
    """
    labels = labels.bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    # A group of tied scores occupies ranks (end - count + 1 .. end); each member gets their average.
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _overlap_iou(dy: Tensor, dx: Tensor, p: int) -> Tensor:
    """IoU of two p x p boxes offset by (dy, dx) pixels."""
    inter = ((p - dy.abs()).clamp_min(0) * (p - dx.abs()).clamp_min(0)).double()
    return inter / (2 * p * p - inter)


@dataclass
class _Pairs:
    """Features of drawn pairs: ``fa`` is the query side, ``fb`` the candidate side."""

    fa: Tensor  # (N, F + D) features and descriptors, as the classifier's ``features`` returns them
    fb: Tensor  # (N, F + D)
    labels: Tensor  # (N,) 1 = same texture
    lq_query: Tensor  # (N,) bool, the query window came from the degraded image
    texture_positive: Tensor  # (N,) bool, a same-texture-region positive (no pixel correspondence asked)
    counts: dict[str, int]

    def subset(self, index: Tensor) -> _Pairs:
        return _Pairs(self.fa[index], self.fb[index], self.labels[index], self.lq_query[index],
                      self.texture_positive[index], self.counts)


@dataclass
class _Rankings:
    """Features of ranking triplets: a query and two candidates, the ``better`` one to be scored higher."""

    fa: Tensor  # (N, F + D)
    better: Tensor  # (N, F + D)
    worse: Tensor  # (N, F + D)
    lq_query: Tensor  # (N,) bool

    def subset(self, index: Tensor) -> _Rankings:
        return _Rankings(self.fa[index], self.better[index], self.worse[index], self.lq_query[index])


def _nearby(img: Tensor, ya: Tensor, xa: Tensor, reach: int, span: Tensor, p: int, max_iou: float,
            generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """A random window within Chebyshev distance ``reach`` of each (ya, xa): its (yb, xb) and whether it is
    inside its image and overlaps the first no more than ``max_iou``."""
    dy = torch.randint(-reach, reach + 1, (len(img),), generator=generator)
    dx = torch.randint(-reach, reach + 1, (len(img),), generator=generator)
    yb, xb = ya + dy, xa + dx
    ok = (_overlap_iou(dy, dx, p) <= max_iou) & (yb >= 0) & (xb >= 0) & (yb < span[img, 0]) & (xb < span[img, 1])
    return yb, xb, ok


def _query_and_candidates(images: list[Tensor], lq_images: list[Tensor] | None, index: Tensor,
                          query: tuple[Tensor, Tensor], candidates: list[tuple[Tensor, Tensor]], p: int,
                          cfg: ClassifierConfig, clf: TextureClassifier, generator: torch.Generator,
                          progress: bool) -> tuple[Tensor, list[Tensor], Tensor]:
    """Features of query windows (``lq_query_fraction`` of them from the degraded images) and of candidate
    windows of the same images (brightness and contrast jittered); and which queries are low-quality."""
    ya, xa = query
    lq = torch.zeros(len(index), dtype=torch.bool)
    windows = _crop(images, index, ya, xa, p)
    if lq_images is not None and cfg.lq_query_fraction > 0:
        lq = torch.rand(len(index), generator=generator) < cfg.lq_query_fraction
        windows[lq] = _crop(lq_images, index[lq], ya[lq], xa[lq], p)
    others = [_features(clf, _augment(_crop(images, index, yb, xb, p), generator), progress) for yb, xb in candidates]
    return _features(clf, windows, progress), others, lq


def _sample_rankings(images: list[Tensor], lq_images: list[Tensor] | None, num: int, p: int, max_iou: float,
                     cfg: ClassifierConfig, clf: TextureClassifier, generator: torch.Generator,
                     progress: bool) -> _Rankings:
    """Draws up to ``num`` ranking triplets from ``images`` as described in the module docstring."""
    span = torch.tensor([img.shape[-2:] for img in images]) - p + 1
    reach = 2 * max(p, round(cfg.positive_max_shift * p))
    parts: list[tuple[Tensor, ...]] = []
    found = 0
    for _ in range(20):  # rejection sampling
        img = torch.randint(0, len(images), (2 * max(num - found, 1),), generator=generator)
        ya = _uniform(len(img), span[img, 0], generator)
        xa = _uniform(len(img), span[img, 1], generator)
        anchor = _crop(images, img, ya, xa, p)
        ys, xs, corr = [], [], []
        for _ in range(RANK_CANDIDATES):
            y, x, ok = _nearby(img, ya, xa, reach, span, p, max_iou, generator)
            y, x = torch.where(ok, y, ya), torch.where(ok, x, xa)  # (the anchor itself stands in; masked out below)
            c = _fit_correlation(anchor, _crop(images, img, y, x, p))
            ys.append(y)
            xs.append(x)
            corr.append(torch.where(ok, c, torch.full_like(c, -math.inf)))
        ys, xs, corr = torch.stack(ys, 1), torch.stack(xs, 1), torch.stack(corr, 1)  # (n, M) each
        best = corr.argmax(1, keepdim=True)
        best_corr = corr.gather(1, best)
        # The worse one: any other candidate at least RANK_MIN_GAP below the best, at random.
        eligible = torch.isfinite(corr) & (corr <= best_corr - RANK_MIN_GAP)
        lottery = torch.rand(corr.shape, generator=generator).masked_fill(~eligible, -1.0)
        worst = lottery.argmax(1, keepdim=True)
        sel = (eligible.any(1) & torch.isfinite(best_corr[:, 0])).nonzero().flatten()[: num - found]
        parts.append((img[sel], ya[sel], xa[sel], ys.gather(1, best)[sel, 0], xs.gather(1, best)[sel, 0],
                      ys.gather(1, worst)[sel, 0], xs.gather(1, worst)[sel, 0]))
        found += len(sel)
        if found >= num:
            break
    index, ya, xa, yb, xb, yw, xw = (torch.cat(column) for column in zip(*parts, strict=True))
    fa, (better, worse), lq = _query_and_candidates(images, lq_images, index, (ya, xa), [(yb, xb), (yw, xw)], p,
                                                    cfg, clf, generator, progress)
    return _Rankings(fa, better, worse, lq)


def _nearby_pairs(images: list[Tensor], span: Tensor, reach: int, p: int, max_iou: float, cfg: ClassifierConfig,
                  wanted: dict[str, int], generator: torch.Generator) -> dict[str, tuple[Tensor, ...]]:
    """Nearby windows the search could pick (overlap <= max_iou), inside the image, sorted by what they show.

    Args:
        span: (I, 2) window positions per axis of each image.
        wanted: how many pairs of each kind: ``correlated`` and ``texture`` (positives; texture positives found
            count against the correlated ones) and ``near`` (a boundary: negative).

    Returns:
        Per kind ``(image, ya, xa, image, yb, xb)``, each (n,) long, at most ``wanted`` of them.
    """
    kinds: dict[str, list[tuple[Tensor, ...]]] = {kind: [] for kind in wanted}
    found = dict.fromkeys(wanted, 0)

    def missing() -> dict[str, int]:
        return {"correlated": wanted["correlated"] - min(found["texture"], wanted["texture"]) - found["correlated"],
                "texture": wanted["texture"] - found["texture"], "near": wanted["near"] - found["near"]}

    for _ in range(20):  # rejection sampling; a few rounds suffice
        img = torch.randint(0, len(images), (8 * max(*missing().values(), 1),), generator=generator)
        ya, xa = _uniform(len(img), span[img, 0], generator), _uniform(len(img), span[img, 1], generator)
        yb, xb, ok = _nearby(img, ya, xa, reach, span, p, max_iou, generator)
        ok = ok.nonzero().flatten()
        chosen = {"correlated": ok, "texture": ok[:0], "near": ok[:0]}
        if cfg.positive_min_correlation > 0 and len(ok):
            a, b = _crop(images, img[ok], ya[ok], xa[ok], p), _crop(images, img[ok], yb[ok], xb[ok], p)
            midway = _crop(images, img[ok], (ya[ok] + yb[ok]) // 2, (xa[ok] + xb[ok]) // 2, p)
            corr = _correlation(a, b)
            stats = torch.stack([_region_statistics(w) for w in (a, midway, b)])  # (3, n, 3)
            spread = (stats.amax(0) - stats.amin(0)).amax(-1)  # the largest disagreement of the three windows
            textured = (a.mean(1).flatten(1).std(1) >= TEXTURED_MIN_SPREAD) & (
                b.mean(1).flatten(1).std(1) >= TEXTURED_MIN_SPREAD)
            one_region = textured & (spread <= math.log(REGION_MAX_RATIO))
            boundary = spread > 2 * math.log(REGION_MAX_RATIO)
            chosen = {"correlated": ok[corr >= cfg.positive_min_correlation],
                      "texture": ok[(corr.abs() < cfg.positive_min_correlation) & one_region],
                      "near": ok[(corr.abs() <= cfg.near_negative_max_correlation) & boundary]}
        need = missing()
        for kind, index in chosen.items():
            index = index[: max(need[kind], 0)]
            kinds[kind].append((img[index], ya[index], xa[index], img[index], yb[index], xb[index]))
            found[kind] += len(index)
        if max(missing().values()) <= 0:
            break
    joined = {kind: tuple(torch.cat(column) for column in zip(*parts, strict=True)) for kind, parts in kinds.items()}
    n_correlated = wanted["correlated"] - len(joined["texture"][0])  # texture positives found late leave fewer
    joined["correlated"] = tuple(column[:n_correlated] for column in joined["correlated"])
    return joined


def _far_candidates(span: Tensor, reach: int, p: int, num: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    """Up to ``num`` pairs of windows of one image farther apart than any positive, from images big enough.

    Returns:
        ``(image, ya, xa, image, yb, xb)``, each (n,) long.
    """
    far_apart = reach + p
    eligible = ((span - 1).amax(1) >= far_apart).nonzero().flatten()
    if not len(eligible) or not num:
        return tuple(torch.zeros(0, dtype=torch.long) for _ in range(6))
    cand = eligible[torch.randint(0, len(eligible), (num,), generator=generator)]
    ya, xa = _uniform(num, span[cand, 0], generator), _uniform(num, span[cand, 1], generator)
    yb, xb = _uniform(num, span[cand, 0], generator), _uniform(num, span[cand, 1], generator)
    far = torch.maximum((ya - yb).abs(), (xa - xb).abs()) >= far_apart
    return cand[far], ya[far], xa[far], cand[far], yb[far], xb[far]


def _sample_pairs(images: list[Tensor], lq_images: list[Tensor] | None, num_pairs: int, p: int, max_iou: float,
                  cfg: ClassifierConfig, clf: TextureClassifier, generator: torch.Generator,
                  progress: bool) -> _Pairs:
    """Draws ``num_pairs`` pairs from ``images`` as described in the module docstring and computes features."""
    span = torch.tensor([img.shape[-2:] for img in images]) - p + 1  # (I, 2) window positions per axis
    num_images = len(images)
    n_pos = num_pairs // 2
    n_neg = num_pairs - n_pos
    reach = max(p, round(cfg.positive_max_shift * p))  # positives lie within this Chebyshev distance
    by_correlation = cfg.positive_min_correlation > 0
    wanted = {"correlated": n_pos, "texture": round(n_pos * TEXTURE_POSITIVE_FRACTION) if by_correlation else 0,
              "near": round(n_neg * cfg.near_negative_fraction) if by_correlation else 0}
    nearby = _nearby_pairs(images, span, reach, p, max_iou, cfg, wanted, generator)
    n_correlated, n_texture, found_near = (len(nearby[kind][0]) for kind in ("correlated", "texture", "near"))
    n_pos = n_correlated + n_texture
    if n_pos == 0:
        raise ConfigError(f"texture classifier: no image is large enough for two {p} px windows that overlap at "
                          f"most texture.max_iou={max_iou}; give images at least {2 * p} px wide")
    n_hard = min(round(n_neg * cfg.hard_negative_fraction) if num_images > 1 else n_neg, n_neg - found_near)
    hard_parts = _far_candidates(span, reach, p, 4 * n_hard, generator)  # 4x the need, filtered below
    n_hard_cand = len(hard_parts[0])

    def pair_features(parts: list[tuple[Tensor, ...]]) -> tuple[Tensor, Tensor, Tensor]:
        index_a, ya, xa, index_b, yb, xb = (torch.cat(column) for column in zip(*parts, strict=True))
        lq = torch.zeros(len(index_a), dtype=torch.bool)
        windows_a = _crop(images, index_a, ya, xa, p)
        if lq_images is not None and cfg.lq_query_fraction > 0:
            lq = torch.rand(len(index_a), generator=generator) < cfg.lq_query_fraction
            windows_a[lq] = _crop(lq_images, index_a[lq], ya[lq], xa[lq], p)
        windows_b = _augment(_crop(images, index_b, yb, xb, p), generator)
        return _features(clf, windows_a, progress), _features(clf, windows_b, progress), lq

    fa, fb, lq_query = pair_features([nearby["correlated"], nearby["texture"], hard_parts])
    # Keep the hard candidates that differ more than the chosen quantile of positive pairs (named features only:
    # the descriptor's pixels are no texture statistics).
    both = torch.cat([fa, fb])[:, :clf.features.num_features]
    z = (both - both.mean(0)) / both.std(0).clamp_min(1e-6)
    dist = (z[: len(fa)] - z[len(fa):]).norm(dim=1)
    hard = torch.arange(n_pos, n_pos + n_hard_cand)
    if n_hard_cand:
        threshold = torch.quantile(dist[:n_pos], cfg.hard_negative_quantile)
        hard = hard[dist[hard] > threshold][:n_hard]
    keep = torch.cat([torch.arange(n_pos), hard])
    fa, fb, lq_query = fa[keep], fb[keep], lq_query[keep]
    if found_near:
        fa_near, fb_near, lq_near = pair_features([nearby["near"]])
        fa, fb, lq_query = torch.cat([fa, fa_near]), torch.cat([fb, fb_near]), torch.cat([lq_query, lq_near])

    # Across images: whatever the hard negatives leave.
    n_cross = n_neg - len(hard) - found_near if num_images > 1 else 0
    if n_cross:
        img_a = torch.randint(0, num_images, (n_cross,), generator=generator)
        img_b = (img_a + torch.randint(1, num_images, (n_cross,), generator=generator)) % num_images
        a = (img_a, _uniform(n_cross, span[img_a, 0], generator), _uniform(n_cross, span[img_a, 1], generator))
        b = (img_b, _uniform(n_cross, span[img_b, 0], generator), _uniform(n_cross, span[img_b, 1], generator))
        fa_cross, fb_cross, lq_cross = pair_features([(*a, *b)])
        fa, fb, lq_query = torch.cat([fa, fa_cross]), torch.cat([fb, fb_cross]), torch.cat([lq_query, lq_cross])
    labels = torch.cat([torch.ones(n_pos), torch.zeros(len(fa) - n_pos)])
    texture_positive = torch.zeros(len(fa), dtype=torch.bool)
    texture_positive[n_correlated:n_pos] = True
    counts = {"positive": n_pos, "positive_texture": n_texture, "negative_nearby": found_near,
              "negative_same_image": len(hard), "negative_other_image": n_cross}
    return _Pairs(fa, fb, labels, lq_query, texture_positive, counts)


def _fit(clf: TextureClassifier, pairs: _Pairs, rankings: _Rankings | None, cfg: ClassifierConfig,
         progress: bool) -> None:
    """Full-batch L-BFGS on the logistic loss of the pairs + ``RANK_WEIGHT`` x the pairwise logistic loss of the
    rankings + ``weight_decay / 2 * ||w||^2`` (bias not penalised).

    The difference weights are fitted as ``-softplus(v)``, so they are never positive: a difference in a
    feature can only speak against "same texture", which keeps each weight readable on its own (unconstrained,
    correlated features such as the LBP bins, which sum to 1, trade weights of opposite signs). For the same
    reason the pair-feature weights are fitted as ``softplus(v)``: agreement can only speak for it.
    """
    from tqdm import tqdm

    encoded = _encode(clf, pairs.fa, pairs.fb)  # the pair encoding, computed once
    labels = pairs.labels
    # A ranking's logit difference is linear in the difference of the two encodings.
    ranked = None
    if rankings is not None and len(rankings.fa):
        better, worse = _encode(clf, rankings.fa, rankings.better), _encode(clf, rankings.fa, rankings.worse)
        ranked = tuple(b - w for b, w in zip(better, worse, strict=True))
    raw_diff = torch.zeros_like(clf.weight_diff, requires_grad=True)
    weight_prod = torch.zeros_like(clf.weight_prod, requires_grad=True)
    raw_pair = torch.zeros(encoded[2].shape[-1], requires_grad=True)
    bias = torch.zeros_like(clf.bias, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [raw_diff, weight_prod, raw_pair, bias], lr=cfg.lr, max_iter=cfg.steps, history_size=20,
        line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12,
    )
    bar = tqdm(desc="fitting", total=cfg.steps, disable=None if progress else True, leave=False)  # None: terminals only

    def closure() -> Tensor:
        optimizer.zero_grad()
        weight_diff, weight_pair = -F.softplus(raw_diff), F.softplus(raw_pair)

        def linear(diff: Tensor, prod: Tensor, pair: Tensor) -> Tensor:
            return diff @ weight_diff + prod @ weight_prod + pair @ weight_pair

        loss = F.binary_cross_entropy_with_logits(linear(*encoded) + bias, labels)
        if ranked is not None:
            loss = loss + RANK_WEIGHT * F.softplus(-linear(*ranked)).mean()  # -log sigmoid(better - worse)
        penalty = weight_diff.square().sum() + weight_prod.square().sum() + weight_pair.square().sum()
        loss = loss + 0.5 * cfg.weight_decay * penalty
        loss.backward()
        bar.update(1)
        return loss

    optimizer.step(closure)
    bar.close()
    with torch.no_grad():
        clf.weight_diff.copy_(-F.softplus(raw_diff))
        clf.weight_prod.copy_(weight_prod)
        clf.bias.copy_(bias)
        if clf.has_pair_features:
            clf.weight_pair.copy_(F.softplus(raw_pair))


def _encode(clf: TextureClassifier, fa: Tensor, fb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The classifier's pair encoding of raw feature vectors: |za - zb| (N, F), za * zb (N, F), pair features (N, P)."""
    za, zb = clf.standardize(fa), clf.standardize(fb)
    return (za - zb).abs(), za * zb, clf.standardize_pairs(clf.pair_features(fa, fb))


def _rank_accuracy(clf: TextureClassifier, rankings: _Rankings, select: Tensor) -> float | None:
    """Share of the selected triplets whose better candidate scores higher; None for none."""
    if not bool(select.any()):
        return None
    with torch.no_grad():
        better = clf.pair_logits(rankings.fa[select], rankings.better[select])
        worse = clf.pair_logits(rankings.fa[select], rankings.worse[select])
    return float((better > worse).float().mean())


def _scores(clf: TextureClassifier, fa: Tensor, fb: Tensor, labels: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = clf.pair_logits(fa, fb)
    accuracy = float(((logits > 0).float() == labels).float().mean())
    return accuracy, roc_auc(logits, labels)


def degraded_views(images: list[Tensor], degrade: Callable[[Tensor, torch.Generator], Tensor],
                   generator: torch.Generator) -> list[Tensor]:
    """Each image degraded and brought back to its own HR grid: the low-quality query side of the pairs.

    Args:
        images: (3, H, W) in [0, 1].
        degrade: (1, 3, H, W), generator -> (1, 3, h, w), e.g. a :class:`xswinir.degradations.Degrader`.
    """
    out = []
    with torch.no_grad():
        for image in images:
            lq = degrade(image[None], generator)
            up = F.interpolate(lq.float(), size=image.shape[-2:], mode="bicubic", align_corners=False)
            out.append(up[0].clamp(0, 1))
    return out


def train_texture_classifier(images: list[Tensor], patch_size: int, cfg: ClassifierConfig, progress: bool = True,
                             *, max_iou: float = 0.0,
                             degrade: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                             ) -> tuple[TextureClassifier, dict[str, Any]]:
    """Trains a texture classifier on windows of ``images``; deterministic for a fixed ``cfg.seed``.

    Args:
        images: HR images, each (C, H, W) with C in {1, 3}, values in [0, 1]; at least p x p.
        patch_size: window side p.
        cfg: pair counts, feature settings and optimiser settings.
        progress: show progress bars.
        max_iou: the search's overlap limit: positives overlap no more than this.
        degrade: makes the low-quality query side (the run's degradation, see :func:`degraded_views`);
            None: every query is an HR window.

    Returns:
        The trained classifier (with pair features; train mode off) and a report: ``roc_auc`` / ``accuracy`` on
        held-out pairs of held-out images with HR queries, ``roc_auc_lq`` with LQ queries, ``roc_auc_texture``
        for the same-texture-region positives against all negatives (HR queries), the same on the training
        pairs, pair counts by kind, ``holdout`` (``images`` or ``pairs``) and ``seconds``.

    Raises:
        ConfigError: ``patch_size`` is smaller than the largest filter, or no image is big enough.
    """
    start = time.perf_counter()
    try:
        clf = TextureClassifier(patch_size, cfg.scales, cfg.num_orientations, layout_grid=cfg.layout_grid,
                                pair_features=True)
    except ValueError as err:
        raise ConfigError(f"texture classifier: {err}; use a larger texture.patch_size or smaller "
                          "texture.classifier.scales") from err
    usable = [img.float().expand(3, -1, -1) if img.shape[0] == 1 else img.float()
              for img in images if min(img.shape[-2:]) >= patch_size]
    if not usable:
        raise ConfigError(f"texture classifier: none of the {len(images)} images is at least {patch_size} px")
    generator = torch.Generator().manual_seed(cfg.seed)
    lq_views = degraded_views(usable, degrade, generator) if degrade is not None else None
    log.info("texture classifier: %d pairs of %d px windows from %d images, %d features and %d pair features",
             cfg.num_pairs, patch_size, len(usable), clf.features.num_features, len(clf.pair_feature_names))

    (train, train_rank), (test, test_rank), by_image = _train_and_test_pairs(usable, lq_views, patch_size, max_iou,
                                                                            cfg, clf, generator, progress)
    if bool((train.labels == 0).all()) or bool((train.labels == 1).all()):
        raise ConfigError(f"texture classifier: no negative pairs; give at least two images, or one at least "
                          f"{3 * patch_size} px wide")
    informative = _standardise(clf, train)
    _fit(clf, train, train_rank, cfg, progress)
    with torch.no_grad():
        clf.weight_diff.masked_fill_(~informative, 0.0)
        clf.weight_prod.masked_fill_(~informative, 0.0)

    hr, lq = ~test.lq_query, test.lq_query
    accuracy, auc = _scores(clf, test.fa[hr], test.fb[hr], test.labels[hr])
    accuracy_lq, auc_lq = _scores(clf, test.fa[lq], test.fb[lq], test.labels[lq]) if lq.any() else (None, None)
    texture = hr & (test.texture_positive | (test.labels == 0))
    auc_texture = _scores(clf, test.fa[texture], test.fb[texture], test.labels[texture])[1]
    train_accuracy, train_auc = _scores(clf, train.fa, train.fb, train.labels)
    report = {
        "accuracy": accuracy, "roc_auc": auc, "accuracy_lq": accuracy_lq, "roc_auc_lq": auc_lq,
        "roc_auc_texture": None if math.isnan(auc_texture) else auc_texture,
        "rank_accuracy": _rank_accuracy(clf, test_rank, ~test_rank.lq_query),
        "rank_accuracy_lq": _rank_accuracy(clf, test_rank, test_rank.lq_query),
        "num_rankings": len(train_rank.fa),
        "train_accuracy": train_accuracy, "train_roc_auc": train_auc, "holdout": "images" if by_image else "pairs",
        "num_train_pairs": len(train.labels), "num_holdout_pairs": len(test.labels),
        **{f"num_{k}": v for k, v in train.counts.items()},
        "num_images": len(usable), "patch_size": patch_size, "max_iou": max_iou,
        "num_features": clf.features.num_features, "num_pair_features": len(clf.pair_feature_names),
        "num_parameters": sum(t.numel() for t in clf.parameters()), "seconds": time.perf_counter() - start,
    }
    clf.report = report
    log.info("texture classifier: held-out %s, ROC AUC %.3f (HR queries)%s (%.1f s)", report["holdout"], auc,
             f", {auc_lq:.3f} (LQ queries)" if auc_lq is not None else "", report["seconds"])
    return clf.eval(), report


def _train_and_test_pairs(usable: list[Tensor], lq_views: list[Tensor] | None, patch_size: int, max_iou: float,
                          cfg: ClassifierConfig, clf: TextureClassifier, generator: torch.Generator,
                          progress: bool) -> tuple[tuple[_Pairs, _Rankings], tuple[_Pairs, _Rankings], bool]:
    """The training and the held-out pairs and rankings: from disjoint images when there are at least four, else
    from the same images, split.

    Returns:
        ``((train pairs, train rankings), (test pairs, test rankings), by_image)``.
    """
    n_test_pairs = max(2, round(cfg.num_pairs * cfg.holdout_fraction))
    if len(usable) >= 4:
        order = torch.randperm(len(usable), generator=generator).tolist()
        n_test_images = max(1, round(len(usable) * cfg.holdout_fraction))
        test_ids, train_ids = order[:n_test_images], order[n_test_images:]

        def pick(ids: list[int], views: list[Tensor] | None) -> list[Tensor] | None:
            return [views[i] for i in ids] if views is not None else None

        sets = []
        for ids, num in ((train_ids, cfg.num_pairs - n_test_pairs), (test_ids, n_test_pairs)):
            images, views = pick(ids, usable), pick(ids, lq_views)
            sets.append((_sample_pairs(images, views, num, patch_size, max_iou, cfg, clf, generator, progress),
                         _sample_rankings(images, views, num, patch_size, max_iou, cfg, clf, generator, progress)))
        return sets[0], sets[1], True
    log.warning("texture classifier: %d images are too few to hold some out; the held-out pairs come from "
                "the training images", len(usable))
    both = _sample_pairs(usable, lq_views, cfg.num_pairs, patch_size, max_iou, cfg, clf, generator, progress)
    rankings = _sample_rankings(usable, lq_views, cfg.num_pairs, patch_size, max_iou, cfg, clf, generator, progress)
    order = torch.randperm(len(both.labels), generator=generator)
    n_holdout = max(1, round(len(both.labels) * cfg.holdout_fraction))
    rank_order = torch.randperm(len(rankings.fa), generator=generator)
    n_rank_holdout = round(len(rankings.fa) * cfg.holdout_fraction)
    train = (both.subset(order[n_holdout:]), rankings.subset(rank_order[n_rank_holdout:]))
    test = (both.subset(order[:n_holdout]), rankings.subset(rank_order[:n_rank_holdout]))
    return train, test, False


def _standardise(clf: TextureClassifier, train: _Pairs) -> Tensor:
    """Sets the classifier's feature and pair-feature standardisation from the training pairs.

    Returns:
        (F,) bool, the named features that vary in the data. Constant ones (colour of gray data) get std 1
        instead of inf, and later weights of exactly 0: the data says nothing about them, and the plot should
        not suggest otherwise.
    """
    named = clf.features.num_features
    train_features = torch.cat([train.fa, train.fb])[:, :named]
    std = train_features.std(0)
    informative = std > 1e-6
    with torch.no_grad():
        clf.feature_mean.copy_(train_features.mean(0))
        clf.feature_std.copy_(torch.where(informative, std, torch.ones_like(std)))
        if clf.has_pair_features:
            pairs = clf.pair_features(train.fa, train.fb)
            pair_std = pairs.std(0)
            clf.pair_mean.copy_(pairs.mean(0))
            clf.pair_std.copy_(torch.where(pair_std > 1e-6, pair_std, torch.ones_like(pair_std)))
    return informative


def _source_key(source: str) -> list[list[Any]]:
    """What identifies the training images: paths and byte sizes of the files (or shards) a source names."""
    from xswinir.shards import is_shard_source, shard_files

    if is_shard_source(source):
        fs, files = shard_files(source)
        return [[info.path, info.size] for info in fs.get_file_info(files)]
    try:
        files = resolve_image_files(source)
    except FileNotFoundError as err:
        raise UserError(f"texture classifier training images: {err}") from err
    return [[str(f), f.stat().st_size] for f in files]


def load_training_images(source: str, max_images: int | None = None) -> list[Tensor]:
    """The images of a source (folder, file, ``skimage:...`` or Parquet shards) as (3, H, W) in [0, 1].

    Unreadable images (corrupt, truncated, over the pixel limit) are logged and skipped.

    Args:
        source: as ``data.train``.
        max_images: keep this many, evenly spaced over the source, each centre-cropped to at most
            ``MAX_IMAGE_SIDE`` per side (bounds memory for large datasets); None: all, uncropped.
    """
    from xswinir.data import open_images

    images = open_images(source, channels=3)
    count = len(images)
    if max_images is None or count <= max_images:
        indices = list(range(count))
    else:
        indices = sorted({int(i * count / max_images) for i in range(max_images)})
    out = []
    skipped: list[str] = []
    for i in indices:
        try:
            image = images.load(i)
        except ImageReadError as err:  # named and skipped, as everywhere else images are read
            skipped.append(str(err))
            log.warning("texture classifier: skipping %s", err)
            continue
        if max_images is not None:
            h, w = image.shape[-2:]
            top, left = max(0, (h - MAX_IMAGE_SIDE) // 2), max(0, (w - MAX_IMAGE_SIDE) // 2)
            image = image[:, top:top + MAX_IMAGE_SIDE, left:left + MAX_IMAGE_SIDE].contiguous()
        out.append(image)
    if not out:
        first = f"; first: {skipped[0]}" if skipped else ""
        raise UserError(f"texture classifier training images: none of the {len(indices)} images of {source} is "
                        f"readable{first}")
    if skipped:
        log.warning("texture classifier: skipped %d of %d images of %s", len(skipped), len(indices), source)
    return out


def run_degradation(cfg: Config) -> Callable[[Tensor, torch.Generator], Tensor] | None:
    """The run's degradation as :func:`train_texture_classifier` wants it; None when no query is low-quality."""
    if cfg.texture.classifier.lq_query_fraction <= 0:
        return None
    from xswinir.degradations import build_degrader
    from xswinir.resize import modcrop

    degrader = build_degrader(cfg.degradation, cfg.scale)

    def degrade(image: Tensor, generator: torch.Generator) -> Tensor:
        return degrader(modcrop(image, cfg.scale), generator)[0]

    return degrade


def ensure_texture_classifier(cfg: Config, cache_dir: str | Path) -> Path:
    """The folder of the texture classifier a run uses, trained and cached on first use.

    ``cfg.texture.classifier.path`` when it is set. Otherwise a classifier trained on ``cfg.data.train`` at
    ``cfg.texture.patch_size``, cached under ``cache_dir/<hash of the settings and the image files>/`` and
    reused when present. Concurrent callers (Ray Tune trials) are safe: each trains into a private folder
    and renames it into place; the first rename wins.

    Raises:
        UserError: the given path holds no classifier, or the training images cannot be found.
    """
    ccfg = cfg.texture.classifier
    if ccfg.path is not None:
        path = Path(ccfg.path).expanduser()
        if not (path / META_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise UserError(f"texture.classifier.path={ccfg.path} holds no {META_FILE} and {WEIGHTS_FILE}")
        return path
    settings = {k: v for k, v in cfg.to_dict()["texture"]["classifier"].items() if k != "path"}
    key = {"classifier": settings, "patch_size": cfg.texture.patch_size, "max_iou": cfg.texture.max_iou,
           "degradation": cfg.to_dict()["degradation"], "scale": cfg.scale, "source": cfg.data.train,
           "files": _source_key(cfg.data.train), "format": FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    target = Path(cache_dir).expanduser() / digest
    if (target / META_FILE).is_file() and (target / WEIGHTS_FILE).is_file():
        log.info("texture classifier: reusing %s", target)
        return target
    images = load_training_images(cfg.data.train, ccfg.max_images)
    clf, _ = train_texture_classifier(images, cfg.texture.patch_size, ccfg, max_iou=cfg.texture.max_iou,
                                      degrade=run_degradation(cfg))
    private = target.parent / f".{digest}.{os.getpid()}.tmp"
    save_texture_classifier(clf, private)
    (private / "key.json").write_text(json.dumps(key, indent=2) + "\n")
    try:
        private.rename(target)
    except OSError:  # another process got there first; its classifier is the same
        shutil.rmtree(private, ignore_errors=True)
    log.info("texture classifier: cached in %s", target)
    return target
