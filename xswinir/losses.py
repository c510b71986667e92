"""The training loss: SwinIR's pixel loss plus the explainable texture term.

``L = pixel(sr, gt) + texture_weight * texture(sr, gt)``

**The search** (:class:`~xswinir.texture.search.TextureSearch`): for every ``p x p`` patch of ``gt`` the texture
classifier picks up to ``K`` windows of the HR search region that show the same texture (compared with the patch,
or with the same place of the up-sampled low-quality input, ``texture.query = "lq"``); centred per channel they
are the columns of ``X~``, and ``X c* := mean(y) + X~ c*`` is the patch rebuilt from other places of the image.

**The term** (``loss.texture_form``):

* ``projection`` (default): ``mean |P_X (sr - gt)|`` with ``P_X = X~ (X~^T X~ + ridge)^-1 X~^T``, the part of
  the restoration error that lies in the span of the patch's texture exemplars, i.e. the error in the
  "texture directions" of that patch. It is 0 with a zero gradient at ``sr = gt`` (consistent), and its negative
  gradient never points away from gt (``<P e, e> >= 0``), so it can only sharpen the pixel loss where the
  texture is, never pull the output elsewhere.
* ``pull``: ``mean |sr - X c*|`` over explained patches, the first form: it pulls the output towards the patch
  rebuilt from other windows. Its minimum is not at gt: with an L2 distance the optimum is
  ``(gt + lambda X c*) / (1 + lambda)``. Kept so that the study can compare it.
* ``gated_pull``: the pull form on the patches where ``X c*`` fits gt better than bicubic of the input does,
  and nowhere else: a per-patch gate, open where ``sum_patch d(X c*, gt) < sum_patch d(bicubic(lq), gt)``
  (``d`` the term's distance), so the output is pulled only towards a rebuild that beats the plain up-sampling
  of what the model sees (on most patches it does not, see below). The gate is a measurement on gt: no
  gradient flows through it, and a closed patch gets none from the term. With the L1 distances of the pixel
  loss and the term and ``lambda < 1`` the total loss stays smallest at ``sr = gt``: per pixel
  ``|s - gt| + lambda |s - X c*|`` is minimal at ``s = gt`` (with L2 it is ``(gt + lambda X c*) / (1 + lambda)``,
  as for ``pull``, on open patches only). Needs the degraded input (``lq``).

All are averaged over *all* pixels of ``sr`` (patches without a usable window contribute 0), so lambda means the
same whatever share of patches the search explains. Measured on held-out BSD/Set5 crops (``python -m
bench.bench_selection``, README "texture term"): the bicubic-up-sampled degraded input is closer to gt than
``X c*`` on most patches, so pulling towards ``X c*`` moves the output away from gt there, while a gradient step on
the projection term reduces ``|sr - gt|`` on every patch.

The search runs without gradients; only ``sr`` receives them. Training may run it in the data pipeline and hand
the loss the match (``match``, see :meth:`TextureSearch.attach_match`); the term is the same.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
from torch import Tensor, nn

from xswinir.config import Config, ConfigError, LossConfig, PixelLoss, TextureForm
from xswinir.texture.search import (
    TextureMatch,
    TextureSearch,
    centre_patches,
    from_patches,
    solve_coefficients,
    to_patches,
    upsample_query,
)

Dist = Literal["l1", "l2", "charbonnier"]
# The diagnostics of the search, reported as 0 when lambda is 0 (the search does not run then).
_TEXTURE_KEYS = ("texture", "texture_score", "texture_underfilled", "texture_tiles_used", "texture_r2",
                 "texture_fit_error", "coef_mean", "coef_abs_max")


def project_onto_windows(match: TextureMatch, x: Tensor) -> Tensor:
    """``P_X x``: the part of each patch of ``x`` that the patch's chosen windows span, around the patch's mean.

    Linear in ``x`` and differentiable (the windows are fixed); 0 for patches without a valid window.

    Args:
        match: the search whose windows span the texture of each patch.
        x: (B, C, H, W), e.g. the restoration error ``sr - gt``.

    Returns:
        (B, T, C*p*p) projected patches.
    """
    centred = centre_patches(to_patches(x.float(), match.patch_size), x.shape[1])
    coefs = solve_coefficients(match.windows, centred, match.valid, match.ridge)
    return (match.windows @ coefs[..., None]).squeeze(-1)


def pull_gate(match: TextureMatch, gt: Tensor, lq_up: Tensor, kind: Dist, eps: float) -> Tensor:
    """Where ``gated_pull`` pulls: the patches whose ``X c*`` is closer to gt than the up-sampled input is.

    Args:
        match: the search on ``gt``.
        gt: (B, C, H, W) ground truth.
        lq_up: (B, C, H, W) the degraded input up-sampled to gt's grid (:func:`upsample_query`).
        kind: the distance, summed over each patch's pixels and channels.
        eps: the Charbonnier epsilon.

    Returns:
        (B, T) bool, True for the patches with a valid window whose ``X c*`` is strictly closer to gt than
        ``lq_up`` is. No gradient.
    """
    p = match.patch_size
    with torch.no_grad():
        fit = to_patches(distance(match.target, gt, kind, eps), p).sum(-1)  # (B, T)
        bicubic = to_patches(distance(lq_up.to(gt.dtype), gt, kind, eps), p).sum(-1)
        return (fit < bicubic) & match.valid.any(-1)


def patch_pixels(per_patch: Tensor, match: TextureMatch, size: tuple[int, int]) -> Tensor:
    """A per-patch flag (B, T) on the image grid: (B, 1, H, W) bool, False beyond the whole patches."""
    p = match.patch_size
    flags = per_patch.float()[..., None].expand(*per_patch.shape, p * p)  # (B, T, 1*p*p)
    return from_patches(flags, 1, p, match.tiles, size) > 0


def distance(x: Tensor, y: Tensor, kind: Dist, eps: float) -> Tensor:
    """Element-wise distance, not reduced: ``|x - y|``, ``(x - y)^2`` or ``sqrt((x - y)^2 + eps^2)``."""
    diff = x - y
    if kind == "l1":
        return diff.abs()
    if kind == "l2":
        return diff.square()
    if kind == "charbonnier":
        return (diff.square() + eps * eps).sqrt()
    raise ValueError(f"unknown distance {kind!r}; choose l1, l2 or charbonnier")


class CombinedLoss(nn.Module):
    """``pixel(sr, gt) + texture_weight * texture(sr, gt)`` with the diagnostics of the search.

    No argument has a default: :meth:`from_config` (or :func:`build_loss` for a run) passes every one from
    ``LossConfig``, and the search carries ``TextureConfig``'s settings.

    Args:
        search: the texture search (its classifier is frozen here); may be None when ``texture_weight`` is 0.
        pixel: the pixel loss (SwinIR: l1), a mean over all elements.
        texture_weight: lambda; 0 skips the search and gives exactly the pixel loss.
        texture_form: ``projection`` (consistent: 0 at sr = gt), ``pull`` (towards ``X c*``) or ``gated_pull``
            (towards ``X c*`` where it beats bicubic of the input); see the module.
        texture_dist: the element-wise distance of the term, averaged over all pixels.
        charbonnier_eps: epsilon of the Charbonnier distance.
    """

    def __init__(
        self,
        search: TextureSearch | None,
        *,
        pixel: PixelLoss,
        texture_weight: float,
        texture_form: TextureForm,
        texture_dist: PixelLoss,
        charbonnier_eps: float,
    ) -> None:
        super().__init__()
        if texture_weight > 0 and search is None:
            raise ConfigError("loss.texture_weight > 0 needs a texture classifier")
        if texture_form not in typing.get_args(TextureForm):
            raise ConfigError(f"unknown loss.texture_form {texture_form!r}; choose one of "
                              f"{list(typing.get_args(TextureForm))}")
        self.texture_search = search
        # The search's classifier registered here too, so that .to(device) moves it and train() keeps it in eval.
        self.classifier = None if search is None else search.classifier
        if self.classifier is not None:
            # Frozen: the search is a fixed measurement, never something the optimiser may bend.
            self.classifier.requires_grad_(False).eval()
        self.pixel = pixel
        self.texture_weight = texture_weight
        self.texture_form = texture_form
        self.texture_dist = texture_dist
        self.charbonnier_eps = charbonnier_eps

    @classmethod
    def from_config(cls, loss: LossConfig, search: TextureSearch | None) -> CombinedLoss:
        """The loss of ``loss`` (a run's ``cfg.loss``) over ``search``."""
        return cls(search, pixel=loss.pixel, texture_weight=loss.texture_weight, texture_form=loss.texture_form,
                   texture_dist=loss.texture_dist, charbonnier_eps=loss.charbonnier_eps)

    def train(self, mode: bool = True) -> CombinedLoss:
        super().train(mode)
        if self.classifier is not None:
            self.classifier.eval()  # the classifier stays in eval mode whatever the trainer does
        return self

    def search(self, gt: Tensor, region: Tensor | None = None, gt_offset: Tensor | None = None,
               region_valid: Tensor | None = None, lq_up: Tensor | None = None) -> TextureMatch:
        """The texture search of this loss; the arguments are those of :meth:`TextureSearch.__call__`.

        ``lq_up`` (the degraded input up-sampled to gt's grid) is the query when the search's ``query`` is ``lq``.
        """
        if self.texture_search is None:
            raise ConfigError("the texture search needs a texture classifier")
        return self.texture_search(gt, region, gt_offset, region_valid,
                                   query=self.texture_search.select_query(lq_up))

    def texture_term(self, sr: Tensor, gt: Tensor, match: TextureMatch, lq_up: Tensor | None = None) -> Tensor:
        """The 0-dim texture term of ``sr`` for a search made on ``gt``, averaged over all pixels of ``sr``.

        ``lq_up`` (the degraded input up-sampled to gt's grid) is needed by ``gated_pull`` only.
        """
        if self.texture_form == "projection":
            projected = project_onto_windows(match, sr - gt)
            d = distance(projected, torch.zeros_like(projected), self.texture_dist, self.charbonnier_eps)
            if self.texture_dist == "charbonnier":
                d = d - self.charbonnier_eps  # exactly 0 at sr = gt
            return d.sum() / sr.numel()
        mask = match.mask if self.texture_form == "pull" else patch_pixels(self._gate(match, gt, lq_up), match,
                                                                               tuple(gt.shape[-2:]))
        d = distance(sr, match.target, self.texture_dist, self.charbonnier_eps) * mask.to(sr.dtype)
        return d.sum() / sr.numel()

    def _gate(self, match: TextureMatch, gt: Tensor, lq_up: Tensor | None) -> Tensor:
        if lq_up is None:
            raise ConfigError("loss.texture_form=gated_pull needs the degraded input; pass lq to the loss")
        return pull_gate(match, gt, lq_up, self.texture_dist, self.charbonnier_eps)

    def forward(self, sr: Tensor, gt: Tensor, region: Tensor | None = None, gt_offset: Tensor | None = None,
                region_valid: Tensor | None = None, lq: Tensor | None = None,
                match: TextureMatch | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Computes the loss.

        Args:
            sr: (B, C, H, W) the model's output.
            gt: (B, C, H, W) ground truth in [0, 1].
            region: (B, C, R, R') the HR search region containing ``gt``; None: ``gt`` itself.
            gt_offset: (B, 2) long, top/left of ``gt`` inside ``region``.
            region_valid: (B, 1, R, R') bool, False on padded pixels.
            lq: (B, C, h, w) the degraded input: the query when the search's ``query`` is ``lq``, the bicubic
                baseline of ``gated_pull`` and of the diagnostics.
            match: the search on ``gt``, made already (in the data pipeline, :meth:`TextureSearch.attach_match`);
                None: searched here. ``region``, ``gt_offset`` and ``region_valid`` are then not used.

        Returns:
            ``(total, parts)``: the 0-dim loss, and 0-dim detached tensors (no host sync) ``pixel``,
            ``texture``, ``texture_score`` (mean probability of the used windows), ``texture_underfilled``
            (share of patches with fewer than K windows above ``min_score``), ``texture_tiles_used`` (share of
            patches with at least one), ``texture_r2`` (mean share of a used patch's structure that ``X c*``
            explains), ``texture_fit_error`` (mean ``|X c* - gt|`` on used patches) and, with ``lq``,
            ``texture_bicubic_error`` (mean ``|bicubic(lq) - gt|`` on the same pixels), ``coef_mean``,
            ``coef_abs_max``; for ``gated_pull`` also ``texture_gate_open`` (share of all patches the term pulls).
        """
        pixel = distance(sr, gt, self.pixel, self.charbonnier_eps).mean()
        if self.texture_weight == 0:
            return pixel, {"pixel": pixel.detach(), **dict.fromkeys(_TEXTURE_KEYS, pixel.detach().new_zeros(()))}
        lq_up = upsample_query(lq, gt.shape[-2:]) if lq is not None else None
        if match is None:
            match = self.search(gt, region, gt_offset, region_valid, lq_up)  # a method: bench/gpu_check times it
        texture = self.texture_term(sr, gt, match, lq_up)
        parts = {"pixel": pixel.detach(), "texture": texture.detach(), **self._diagnostics(match, gt, lq_up)}
        if self.texture_form == "gated_pull":
            parts["texture_gate_open"] = self._gate(match, gt, lq_up).float().mean()
        return pixel + self.texture_weight * texture, parts

    def _diagnostics(self, match: TextureMatch, gt: Tensor, lq_up: Tensor | None) -> dict[str, Tensor]:
        """What the search found, as 0-dim tensors: see :meth:`forward`."""
        used = match.valid.float()
        n_used = used.sum().clamp_min(1)
        patch_used = match.valid.any(-1).float()
        mask = match.mask.to(gt.dtype)
        n_pixels = (mask.sum() * gt.shape[1]).clamp_min(1)
        parts = {
            "texture_score": (match.scores * used).sum() / n_used,
            "texture_underfilled": (match.valid.sum(-1) < match.valid.shape[-1]).float().mean(),  # K entries
            "texture_tiles_used": patch_used.mean(),
            "texture_r2": (match.tile_r2 * patch_used).sum() / patch_used.sum().clamp_min(1),
            "texture_fit_error": ((match.target - gt).abs() * mask).sum() / n_pixels,
            "coef_mean": (match.coefs * used).sum() / n_used,
            "coef_abs_max": match.coefs.abs().amax(),
        }
        if lq_up is not None:
            parts["texture_bicubic_error"] = ((lq_up - gt).abs() * mask).sum() / n_pixels
        return parts


def build_loss(cfg: Config, classifier: nn.Module | None) -> CombinedLoss:
    """The loss of a run: ``cfg.loss`` over the search of ``cfg.texture``.

    ``classifier`` may be None when lambda is 0 (it is then not used, and its patch size not checked).
    """
    search = None
    if classifier is not None and cfg.texture_enabled:
        search = TextureSearch.from_config(cfg.texture, classifier)
    return CombinedLoss.from_config(cfg.loss, search)
