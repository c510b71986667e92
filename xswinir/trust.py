"""Trust maps: how wrong each patch of a restored image probably is, measured without the HR image.

**Unit.** The error of a patch is the mean absolute difference of its luma (BT.601 Y, 0-255 scale, both images
rounded to 8 bits) from the HR image: ``patch_error``. The patches are the ``p x p`` squares of the texture
classifier's grid (``p = classifier.patch_size``, 16 by default), whole squares only.

**The model** is linear in named per-patch signals and predicts ``ln(1 + error)``::

    ln(1 + error) ~ bias + sum_s weight[s] * (signal[s] - mean[s]) / std[s]

fitted by ridge least squares (:func:`fit_linear`) on patches of training images degraded as the model was
trained. The weights are on standardised signals, so their sizes compare, and they are stored with their names.
The map reports two numbers per patch, both in error units (Y, 0-255):

* ``expected``: ``exp(prediction) * smear - 1`` with Duan's smearing factor ``smear = mean(exp(residual))`` over
  the fitting patches, the mean error of patches with these signals (``exp(prediction) - 1`` alone would be
  closer to their median);
* ``bound``: ``exp(prediction + q) - 1`` where ``q`` is the split-conformal quantile of the residuals on
  *calibration* images that the fit never saw (:func:`conformal_quantile`): on images exchangeable with the
  calibration images, at least ``coverage`` (default 90 %) of patches have an error at or below their bound.

**Signals** (:data:`SIGNALS`; ``up`` is the input brought to the output grid as the texture search's query,
:func:`xswinir.explain.upsample_input`):

* ``log_input_std`` / ``log_output_std``: ``ln(1 + std of Y)`` of ``up`` / of the output in the patch: contrast;
* ``log_input_texture`` / ``log_output_texture``: ``ln(1 + 255 * sum of the classifier's grad_energy_*_mean
  features)`` of the patch of ``up`` / of the output: the filter-bank energy the classifier sees;
* ``consistency_r2``: :func:`xswinir.explain.consistency_map` of the output with ``up`` as the query, in [0, 1];
* ``partners``: how many of the search's ``top_k`` windows score at least ``min_score`` (0..K), and
  ``partner_score``: their mean classifier score (0 without partners), from the same searches
  (:func:`search_stats`);
* ``log_change``: ``ln(1 + mean |Y(output) - Y(up)|)``: how much the model changed the patch;
* ``log_input_noise``: ``ln(1 + sigma)``, Immerkær's noise estimate of the whole input (Y, 0-255), one value per
  image: the same restoration is harder on a noisier photo;
* ``log_input_blur``: ``ln(1 + sigma)``, an edge-width estimate of the input's blur (:func:`blur_sigma`, in input
  pixels), one value per image: lost detail is what a restoration gets wrong;
* ``log_ensemble_spread`` (only when fitted with ``self_ensemble``): ``ln(1 + mean per-pixel std of Y)`` over the
  8 flips/transposes of the input, 8 forward passes.

A trust model is one JSON file (:func:`save_trust`, :func:`load_trust`) that carries the texture classifier it
was fitted with (its two files, the weights base64-encoded), so it travels on its own.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xswinir.atomic import atomic_write_text
from xswinir.config import TextureConfig
from xswinir.errors import UserError
from xswinir.evaluation import to_8bit
from xswinir.explain import search_blocks, upsample_input
from xswinir.images import read_image_data, to_channels, write_image
from xswinir.inference import restore
from xswinir.metrics import rgb_to_y
from xswinir.texture import TextureSearch, load_texture_classifier, save_texture_classifier
from xswinir.texture.classifier import META_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

FORMAT = "xswinir-trust"
FORMAT_VERSION = 1
SIGNALS = (
    "log_input_std", "log_output_std", "log_input_texture", "log_output_texture", "consistency_r2", "partners",
    "partner_score", "log_change", "log_input_noise", "log_input_blur",
)
ENSEMBLE_SIGNAL = "log_ensemble_spread"
# The search settings a trust model keeps: its signals were measured with them.
SEARCH_FIELDS = ("stride", "top_k", "min_score", "max_iou", "ridge", "region_size")


class TrustError(UserError, ValueError):
    """A trust file that cannot be used, or inputs a trust map cannot be made for."""


def luma255(x: Tensor) -> Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 1, H, W) luma on the 0-255 scale: BT.601 Y for RGB, ``255 x`` for gray."""
    return rgb_to_y(x) if x.shape[1] == 3 else x[:, :1] * 255.0


def _patch_mean(x: Tensor, p: int) -> Tensor:
    """(B, 1, H, W) -> (H // p, W // p) means over whole patches of the first image."""
    return F.avg_pool2d(x[:1].float(), p, p)[0, 0]


def _patch_std(x: Tensor, p: int) -> Tensor:
    mean = _patch_mean(x, p)
    return (_patch_mean(x * x, p) - mean * mean).clamp_min(0).sqrt()


def patch_error(sr: Tensor, gt: Tensor, patch_size: int) -> Tensor:
    """The measured error of every whole patch: mean ``|Y(sr) - Y(gt)|`` on 8-bit images, Y on 0-255.

    Args:
        sr: (C, H, W) or (1, C, H, W) restored image in [0, 1].
        gt: the HR image, same shape.
        patch_size: patch side p.

    Returns:
        (H // p, W // p) float32.
    """
    sr, gt = (x if x.ndim == 4 else x[None] for x in (sr, gt))
    if sr.shape != gt.shape:
        raise TrustError(f"sr {tuple(sr.shape)} and gt {tuple(gt.shape)} differ in shape")
    diff = (luma255(to_8bit(sr.float())) - luma255(to_8bit(gt.float()))).abs()
    return _patch_mean(diff, patch_size)


def noise_sigma(image: Tensor) -> float:
    """Immerkær's fast noise estimate (1996) of an image's luma, on the 0-255 scale.

    ``sigma = sqrt(pi / 2) / (6 (W - 2) (H - 2)) * sum |I * M|`` with the 3 x 3 mask ``M`` that is the difference
    of two Laplacians, which cancels image structure up to second order and keeps white noise.

    Args:
        image: (C, H, W) or (1, C, H, W) in [0, 1], at least 3 x 3.
    """
    x = luma255((image if image.ndim == 4 else image[None]).float())
    if min(x.shape[-2:]) < 3:
        return 0.0
    mask = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], device=x.device)[None, None]
    response = F.conv2d(x[:1], mask).abs()
    return float(math.sqrt(math.pi / 2) * response.mean() / 6.0)


def _gradient_magnitude(y: Tensor, sigma: float) -> Tensor:
    """(1, 1, H, W) -> (1, 1, H - 2, W - 2): central-difference gradient magnitude after a Gaussian of ``sigma``."""
    size = 2 * math.ceil(3 * sigma) + 1
    z = kornia.filters.gaussian_blur2d(y, (size, size), (sigma, sigma), border_type="replicate")
    gx = (z[..., 1:-1, 2:] - z[..., 1:-1, :-2]) / 2
    gy = (z[..., 2:, 1:-1] - z[..., :-2, 1:-1]) / 2
    return (gx * gx + gy * gy).sqrt()


def blur_sigma(image: Tensor, fine: float = 1.0, coarse: float = 2.0, share: float = 0.02) -> float:
    """An edge-width estimate of an image's blur: the sigma of a Gaussian blur, in the image's pixels.

    A step edge of height ``h`` blurred by a Gaussian of sigma ``b`` and smoothed once more with one of sigma ``s``
    has the peak gradient ``h / sqrt(2 pi (b² + s²))``, so the ratio ``r`` of the peaks at ``s = fine`` and
    ``s = coarse`` gives ``b² = (coarse² - r² fine²) / (r² - 1)`` whatever the edge's contrast. The ratio is the
    median over the strongest ``share`` of the coarse gradients (edges rather than noise, which the coarse Gaussian
    mostly removes). Measured on training images degraded with ``blur-noise``: rank correlation 0.65 with the
    applied blur, which noise barely disturbs (-0.17 with the applied noise).

    Args:
        image: (C, H, W) or (1, C, H, W) in [0, 1], at least ``6 coarse + 3`` px per side (else 0 is returned).
    """
    y = luma255((image if image.ndim == 4 else image[None])[:1].float())
    if min(y.shape[-2:]) < 6 * coarse + 3:
        return 0.0
    g_fine, g_coarse = _gradient_magnitude(y, fine).flatten(), _gradient_magnitude(y, coarse).flatten()
    k = max(1, min(g_coarse.numel(), round(g_coarse.numel() * (1 - share))))
    edges = g_coarse >= g_coarse.kthvalue(k).values
    ratio = float((g_fine[edges] / g_coarse[edges].clamp_min(1e-6)).median())
    return math.sqrt(max(0.0, (coarse**2 - ratio**2 * fine**2) / max(ratio**2 - 1, 1e-6)))


def _texture_energy(classifier: nn.Module, image: Tensor) -> Tensor:
    """(B, C, H, W) -> (th, tw): the sum of the classifier's ``grad_energy_*_mean`` features of each patch."""
    p = int(classifier.patch_size)
    names = list(classifier.feature_names)
    picks = [i for i, name in enumerate(names) if name.startswith("grad_energy_") and name.endswith("_mean")]
    if not picks:
        raise TrustError("the texture classifier has no grad_energy_*_mean features; refit the trust model with it")
    feats = classifier.features.window_features(image[:1].float(), p, p)  # (1, F, th, tw)
    return feats[0, picks].sum(0)


def search_stats(
    search: TextureSearch, image: Tensor, query: Tensor, device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per whole patch of ``image``: its consistency r², its number of partner windows and their mean score.

    One pass of :func:`xswinir.explain.search_blocks`, the blocks :func:`xswinir.explain.consistency_map` searches,
    so the r² is the map's value exactly.

    Args:
        search: the texture search (classifier and settings); ``p = search.patch_size``.
        image: (C, H, W) the restored output in [0, 1].
        query: (C, H, W) the input on the output grid.
        device: where the search runs.

    Returns:
        ``r2`` (th, tw) in [0, 1], ``count`` (th, tw) windows scoring at least ``min_score`` (0..K) and ``score``
        (th, tw) their mean classifier score (0 for none), float32 on the CPU.
    """
    p = search.patch_size
    out = torch.zeros(3, image.shape[-2] // p, image.shape[-1] // p)
    for match, region_tl in search_blocks(search, image, query, device=device):
        bth, btw = match.tiles
        valid = match.valid.float().cpu()  # (n, T, K)
        count = valid.sum(-1)
        score = (match.scores.float().cpu() * valid).sum(-1) / count.clamp_min(1)
        stats = torch.stack([match.tile_r2.float().cpu(), count, score], 1).reshape(-1, 3, bth, btw)
        block_tl = (match.tile_boxes[:, 0, :2].cpu() + region_tl) // p  # (n, 2) in patches
        for (y, x), values in zip(block_tl.tolist(), stats, strict=True):  # later blocks win the overlap
            out[:, y:y + bth, x:x + btw] = values
    return out[0], out[1], out[2]


# 4 rotations, without and with a flip; the first is the identity (the plain output).
_DIHEDRAL = [(k, flip) for flip in (False, True) for k in range(4)]


def _dihedral(x: Tensor, k: int, flip: bool, inverse: bool = False) -> Tensor:
    if inverse:
        x = torch.rot90(x, -k, (-2, -1))
        return x.flip(-1) if flip else x
    x = x.flip(-1) if flip else x
    return torch.rot90(x, k, (-2, -1))


def ensemble_outputs(model: nn.Module, lq: Tensor, tile: int | None = None, overlap: int = 32) -> Tensor:
    """The model's outputs for the 8 flips/rotations of the input, each brought back: (8, C, H, W) in [0, 1].

    Args:
        model: the restoration model, in eval mode on ``lq``'s device.
        lq: (C, h, w) the input.
        tile: LR tile size for inference (:func:`xswinir.inference.restore`); None: whole images.
    """
    outs = [_dihedral(restore(model, _dihedral(lq, k, flip)[None], tile=tile, overlap=overlap)[0], k, flip, True)
            for k, flip in _DIHEDRAL]
    return torch.stack(outs).clamp(0, 1)


@dataclass
class PatchSignals:
    """Named per-patch signals of one restored image.

    Attributes:
        names: the signal names, in the order of the last axis of ``values``.
        values: (th, tw, S) float32 on the CPU.
    """

    names: tuple[str, ...]
    values: Tensor

    def __getitem__(self, name: str) -> Tensor:
        """(th, tw) values of one signal."""
        if name not in self.names:
            raise KeyError(f"no signal {name!r}; have {list(self.names)}")
        return self.values[..., self.names.index(name)]

    def select(self, names: Iterable[str]) -> Tensor:
        """(th, tw, len(names)) values of the given signals, in that order."""
        return torch.stack([self[name] for name in names], dim=-1)


def measure_signals(
    search: TextureSearch,
    lq: Tensor,
    sr: Tensor,
    *,
    ensemble: Tensor | None = None,
    device: str | torch.device = "cpu",
) -> PatchSignals:
    """Every signal of :data:`SIGNALS` (and :data:`ENSEMBLE_SIGNAL` when ``ensemble`` is given) for each patch.

    Args:
        search: the texture search (classifier and settings); its patch size is the grid.
        lq: (C, h, w) the input in [0, 1].
        sr: (C, H, W) the restored output in [0, 1], ``H = s h``, ``W = s w``.
        ensemble: (8, C, H, W) the outputs of :func:`ensemble_outputs`, or None.
        device: where the texture search runs.

    Returns:
        The :class:`PatchSignals` of the ``H // p x W // p`` whole patches.
    """
    p = search.patch_size
    if sr.shape[-2] < p or sr.shape[-1] < p:
        raise TrustError(f"the output ({sr.shape[-1]}x{sr.shape[-2]}) is smaller than one {p} px patch")
    scale = sr.shape[-1] // lq.shape[-1]
    if tuple(sr.shape[-2:]) != (lq.shape[-2] * scale, lq.shape[-1] * scale):
        raise TrustError(f"the output {tuple(sr.shape)} is not an integer multiple of the input {tuple(lq.shape)}")
    sr = sr.float().cpu().clamp(0, 1)
    up = upsample_input(lq.float().cpu(), scale)
    sr_y, up_y = luma255(sr[None]), luma255(up[None])
    th, tw = sr.shape[-2] // p, sr.shape[-1] // p
    r2, count, score = search_stats(search, sr, up, device)
    classifier = search.classifier.cpu()
    with torch.no_grad():
        values = {
            "log_input_std": _patch_std(up_y, p).log1p(),
            "log_output_std": _patch_std(sr_y, p).log1p(),
            "log_input_texture": (255.0 * _texture_energy(classifier, up[None])).clamp_min(0).log1p(),
            "log_output_texture": (255.0 * _texture_energy(classifier, sr[None])).clamp_min(0).log1p(),
            "consistency_r2": r2,
            "partners": count,
            "partner_score": score,
            "log_change": _patch_mean((sr_y - up_y).abs(), p).log1p(),
            "log_input_noise": torch.full((th, tw), math.log1p(noise_sigma(lq))),
            "log_input_blur": torch.full((th, tw), math.log1p(blur_sigma(lq))),
        }
        if ensemble is not None:
            spread = luma255(ensemble.float().cpu()).std(dim=0, keepdim=True)  # (1, 1, H, W) per-pixel std
            values[ENSEMBLE_SIGNAL] = _patch_mean(spread, p).log1p()
    names = tuple(values)
    return PatchSignals(names, torch.stack([values[n].float()[:th, :tw] for n in names], dim=-1))


def fit_linear(X: Tensor, y: Tensor, ridge: float = 1e-3) -> tuple[Tensor, float, Tensor, Tensor]:
    """Ridge least squares on standardised columns: ``y ~ bias + ((X - mean) / std) @ weights``.

    The bias is not penalised (it is ``mean(y)``, the columns being centred); the penalty is ``ridge * n`` on the
    standardised weights, so ``ridge`` means the same whatever the number of rows. Solved in float64 from the
    normal equations (S x S, a handful of signals) with ``torch.linalg.solve``.

    Args:
        X: (n, S) signals.
        y: (n,) targets.
        ridge: relative penalty; 0 is ordinary least squares.

    Returns:
        ``weights`` (S,) on standardised columns, ``bias``, and the columns' ``mean`` (S,) and ``std`` (S,); a
        constant column gets std 1 and weight 0.
    """
    if X.ndim != 2 or y.shape != X.shape[:1] or len(y) < 2:
        raise TrustError(f"fit_linear needs (n, S) signals and (n,) targets with n >= 2, got {tuple(X.shape)} and "
                         f"{tuple(y.shape)}")
    X, y = X.double(), y.double()
    mean = X.mean(0)
    std = X.std(0)
    constant = std < 1e-9
    std = torch.where(constant, torch.ones_like(std), std)
    Z = (X - mean) / std
    Z[:, constant] = 0.0
    n, S = Z.shape
    gram = Z.T @ Z + (ridge * n + 1e-12) * torch.eye(S, dtype=Z.dtype)
    weights = torch.linalg.solve(gram, Z.T @ (y - y.mean()))
    return weights.float(), float(y.mean()), mean.float(), std.float()


def conformal_quantile(residuals: Tensor, coverage: float) -> float:
    """The split-conformal upper quantile: the ``ceil((n + 1) coverage)``-th smallest calibration residual.

    For a new residual exchangeable with the ``n`` calibration ones, ``P(new <= q) >= coverage`` (and below
    ``coverage + 1 / (n + 1)`` without ties); ``inf`` when ``n`` is too small for that share.

    Args:
        residuals: (n,) ``target - prediction`` on calibration data.
        coverage: the share in (0, 1).
    """
    if not 0 < coverage < 1:
        raise TrustError(f"coverage must lie in (0, 1), got {coverage}")
    n = residuals.numel()
    k = math.ceil((n + 1) * coverage)
    if k > n:
        return math.inf
    return float(residuals.flatten().double().sort().values[k - 1])


@dataclass
class TrustMap:
    """A trust map of one restored image; patches are the ``patch_size`` squares of the output, row-major.

    Attributes:
        expected: (th, tw) expected error of each patch (mean |Y error|, 0-255).
        bound: (th, tw) the patch's conformal upper bound on its error at the model's ``coverage``.
        patch_size: the patch side p in output pixels.
        output_size: (H, W) of the model's output the patches lie in.
        signals: the signals the estimate was made from.
        display_max: the expected error at the top of the model's colour scale (the same for every image).
        coverage: the share of patches of unseen images the bound holds for (e.g. 0.9).
    """

    expected: Tensor
    bound: Tensor
    patch_size: int
    output_size: tuple[int, int]
    signals: PatchSignals
    display_max: float
    coverage: float

    def output_factor(self, size: tuple[int, int] | None) -> float:
        """Pixels of a picture of ``size`` (a resize of the output, e.g. ``--outscale``) per output pixel."""
        return 1.0 if size is None else size[1] / self.output_size[1]

    def rows(self, size: tuple[int, int] | None = None) -> list[tuple[int, int, int, int, float, float]]:
        """``(top, left, bottom, right, expected, bound)`` per patch, row-major.

        Args:
            size: (H, W) of the written picture when it was resized from the model's output; the boxes are in
                its pixels (rounded). None: the model's output pixels. Bottom and right are exclusive.
        """
        f, p, out = self.output_factor(size), self.patch_size, []
        th, tw = self.expected.shape
        for i in range(th):
            for j in range(tw):
                box = (round(i * p * f), round(j * p * f), round((i + 1) * p * f), round((j + 1) * p * f))
                out.append((*box, float(self.expected[i, j]), float(self.bound[i, j])))
        return out


@dataclass
class TrustModel:
    """A fitted trust model: named weights, standardisation, calibration and the classifier behind its signals.

    Attributes:
        signal_names: the signals, in the order of the weights.
        signal_mean: per signal, its mean on the fitting patches.
        signal_std: per signal, its standard deviation there (1 for a constant signal).
        weights: per signal, the weight on the standardised signal (change of ``ln(1 + error)`` per std).
        bias: ``ln(1 + error)`` predicted for average signals.
        smear: Duan's factor ``mean(exp(residual))`` on the fitting patches.
        quantile: the conformal quantile ``q`` of the calibration residuals.
        coverage: the share of patches the bound is for.
        patch_size: patch side p (the classifier's).
        scale: the model's up-scaling factor the signals were measured at.
        search: the texture search settings (:data:`SEARCH_FIELDS`).
        display_max: the error at the top of the heat-map's colour scale (the 99th percentile of the expected
            error on the calibration patches), the same for every image.
        report: how it was fitted: images, patches, R², calibration coverage, degradation, seconds.
        classifier: the texture classifier's files, ``{"json": dict, "safetensors": base64 str}``.
    """

    signal_names: tuple[str, ...]
    signal_mean: list[float]
    signal_std: list[float]
    weights: list[float]
    bias: float
    smear: float
    quantile: float
    coverage: float
    patch_size: int
    scale: int
    search: dict[str, Any]
    display_max: float
    report: dict[str, Any] = field(default_factory=dict)
    classifier: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def uses_ensemble(self) -> bool:
        """True when a signal is the x8 self-ensemble spread (8 forward passes per image)."""
        return ENSEMBLE_SIGNAL in self.signal_names

    def load_search(self) -> TextureSearch:
        """The texture search the signals are measured with: the carried classifier and the stored settings."""
        texture = replace(TextureConfig(), patch_size=self.patch_size, **self.search)
        return TextureSearch.from_config(texture, self.load_classifier())

    def log_error(self, X: Tensor) -> Tensor:
        """(..., S) signals in ``signal_names`` order -> (...) predicted ``ln(1 + error)``."""
        mean, std = torch.tensor(self.signal_mean), torch.tensor(self.signal_std)
        return ((X.float() - mean) / std) @ torch.tensor(self.weights) + self.bias

    def predict(self, signals: PatchSignals, output_size: tuple[int, int]) -> TrustMap:
        """The trust map of one image from its signals; ``output_size`` (H, W) is the model output's."""
        z = self.log_error(signals.select(self.signal_names))
        expected = (z.exp() * self.smear - 1).clamp_min(0)
        bound = ((z + self.quantile).exp() - 1).clamp_min(0)
        return TrustMap(expected, bound, self.patch_size, output_size, signals, self.display_max, self.coverage)

    def weight_table(self) -> list[tuple[str, float, float]]:
        """``(name, weight per std, weight per unit of the signal)`` for each signal, in order."""
        return [(name, w, w / s) for name, w, s in zip(self.signal_names, self.weights, self.signal_std, strict=True)]

    def load_classifier(self) -> nn.Module:
        """The texture classifier the trust model was fitted with (frozen, eval mode)."""
        try:
            meta, weights = self.classifier["json"], base64.b64decode(self.classifier["safetensors"])
        except (KeyError, TypeError, ValueError) as err:
            raise TrustError(f"the trust model carries no readable texture classifier ({err})") from err
        with tempfile.TemporaryDirectory(prefix="xswinir-trust-") as folder:
            (Path(folder) / META_FILE).write_text(json.dumps(meta))
            (Path(folder) / WEIGHTS_FILE).write_bytes(weights)
            return load_texture_classifier(folder)


def embed_classifier(classifier: nn.Module) -> dict[str, Any]:
    """A texture classifier's two files as a JSON-able dict (:meth:`TrustModel.load_classifier` reads it back)."""
    with tempfile.TemporaryDirectory(prefix="xswinir-trust-") as folder:
        save_texture_classifier(classifier, folder)
        return {"json": json.loads((Path(folder) / META_FILE).read_text()),
                "safetensors": base64.b64encode((Path(folder) / WEIGHTS_FILE).read_bytes()).decode("ascii")}


def save_trust(trust: TrustModel, path: str | Path) -> Path:
    """Writes the trust model as one JSON file (weights by name first, the classifier last); returns the path."""
    data = {"format": FORMAT, "version": FORMAT_VERSION, "unit": "mean |Y error| per patch, Y on 0-255 (8-bit)",
            "target": "ln(1 + error)", **asdict(trust)}
    data["signal_names"] = list(trust.signal_names)
    data["quantile"] = trust.quantile if math.isfinite(trust.quantile) else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return path


def load_trust(path: str | Path) -> TrustModel:
    """Reads a file written by :func:`save_trust`.

    Raises:
        TrustError: the file is missing, not JSON, of another format, or inconsistent.
    """
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise TrustError(f"{path} does not exist; write one with `xswinir trust fit`") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrustError(f"{path} is not a trust file ({err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TrustError(f"{path} is not a trust file (its 'format' is not '{FORMAT}')")
    if data.get("version") != FORMAT_VERSION:
        raise TrustError(f"{path}: trust file version {data.get('version')!r}; this xswinir reads {FORMAT_VERSION}")
    try:
        names = tuple(str(n) for n in data["signal_names"])
        trust = TrustModel(
            signal_names=names, signal_mean=[float(v) for v in data["signal_mean"]],
            signal_std=[float(v) for v in data["signal_std"]], weights=[float(v) for v in data["weights"]],
            bias=float(data["bias"]), smear=float(data["smear"]),
            quantile=math.inf if data["quantile"] is None else float(data["quantile"]),
            coverage=float(data["coverage"]), patch_size=int(data["patch_size"]), scale=int(data["scale"]),
            search={k: data["search"][k] for k in SEARCH_FIELDS}, display_max=float(data["display_max"]),
            report=dict(data.get("report") or {}), classifier=dict(data["classifier"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise TrustError(f"{path} is not a valid trust file ({type(err).__name__}: {err})") from err
    unknown = set(names) - set(SIGNALS) - {ENSEMBLE_SIGNAL}
    lengths = {len(trust.signal_mean), len(trust.signal_std), len(trust.weights)}
    if unknown or lengths != {len(names)}:
        raise TrustError(f"{path}: signals {sorted(unknown)} unknown to this xswinir, or weight lists of another "
                         f"length than the {len(names)} signals")
    return trust


def estimate_trust(
    trust: TrustModel,
    search: TextureSearch,
    lq: Tensor,
    sr: Tensor,
    *,
    model: nn.Module | None = None,
    ensemble: Tensor | None = None,
    tile: int | None = None,
    overlap: int = 32,
    device: str | torch.device = "cpu",
) -> TrustMap:
    """The trust map of a restored image: no HR image needed.

    Args:
        trust: the fitted model.
        search: its texture search (:meth:`TrustModel.load_search`).
        lq: (C, h, w) the input in [0, 1].
        sr: (C, H, W) the model's output for it in [0, 1], before any resize.
        model: the restoration model (eval mode, on ``device``); needed when the trust model uses the
            self-ensemble spread and ``ensemble`` is not given.
        ensemble: (8, C, H, W) :func:`ensemble_outputs`, if already computed.
        tile: LR tile size for the self-ensemble passes.

    Raises:
        TrustError: the scale differs from the one the trust model was fitted at, or the output is smaller than
            a patch, or the self-ensemble is needed without a model.
    """
    scale = sr.shape[-1] // max(lq.shape[-1], 1)
    if scale != trust.scale:
        raise TrustError(f"the trust model was fitted for x{trust.scale} outputs, this output is x{scale}")
    if trust.uses_ensemble and ensemble is None:
        if model is None:
            raise TrustError("this trust model uses the x8 self-ensemble spread: it needs the restoration model")
        ensemble = ensemble_outputs(model, lq.to(device), tile, overlap).cpu()
    signals = measure_signals(search, lq, sr,
                              ensemble=ensemble if trust.uses_ensemble else None, device=device)
    return trust.predict(signals, tuple(sr.shape[-2:]))


@dataclass
class PatchSample:
    """Signals and measured errors of the patches of several images (the fit's and the benchmark's data).

    Attributes:
        names: the signal names (columns of ``signals``).
        signals: (n, S) float32.
        error: (n,) measured error (mean |Y error|, 0-255).
        image: (n,) long, the index of each patch's image in ``image_names``.
        image_names: the images, in the order they were measured.
    """

    names: tuple[str, ...]
    signals: Tensor
    error: Tensor
    image: Tensor
    image_names: list[str]

    def subset(self, images: Iterable[int]) -> PatchSample:
        keep = torch.isin(self.image, torch.tensor(sorted(set(images)), dtype=torch.long))
        return PatchSample(self.names, self.signals[keep], self.error[keep], self.image[keep], self.image_names)

    def column(self, name: str) -> Tensor:
        return self.signals[:, self.names.index(name)]


def center_crop(image: Tensor, size: int | None, multiple: int) -> Tensor:
    """The central ``size x size`` (at most the image) crop of a (C, H, W) image, sides cut to a ``multiple``."""
    _, H, W = image.shape
    h, w = (min(n, size) if size else n for n in (H, W))
    h, w = h // multiple * multiple, w // multiple * multiple
    top, left = (H - h) // 2, (W - w) // 2
    return image[:, top:top + h, left:left + w]


def collect_patches(
    model: nn.Module,
    search: TextureSearch,
    images: Iterable[tuple[str, Tensor]],
    degrade: Callable[[Tensor, str], Tensor],
    *,
    scale: int,
    crop: int | None = 192,
    self_ensemble: bool = False,
    tile: int | None = None,
    device: str | torch.device = "cpu",
    total: int | None = None,
    label: str = "trust",
) -> PatchSample:
    """Degrades, restores and measures images: every patch's signals and its real error.

    Args:
        model: the restoration model (eval mode, on ``device``).
        search: the texture search (classifier and settings).
        images: ``(name, gt)`` pairs, gt (C, H, W) in [0, 1].
        degrade: ``(gt, name) -> lq`` (C, H / s, W / s) on the 8-bit grid, seeded by the name.
        scale: the model's scale s.
        crop: the central crop of each HR image (a multiple of ``s`` and ``p``); None: the whole image.
        self_ensemble: also measure :data:`ENSEMBLE_SIGNAL` (8 more forward passes per image).
        tile: LR tile size of the model's inference.
        device: where the model and the search run.
        total: the number of images, for the progress lines; None: unknown.
        label: the progress lines' prefix.

    Returns:
        The :class:`PatchSample`; images smaller than one patch are skipped with a warning.
    """
    p = search.patch_size
    device = torch.device(device)
    rows_x, rows_e, rows_i, names, signal_names = [], [], [], [], None
    start, last_report = time.perf_counter(), time.perf_counter()
    for index, (name, gt) in enumerate(images):
        gt = center_crop(gt.float(), crop, math.lcm(scale, p))
        if min(gt.shape[-2:]) < p:
            log.warning("%s: skipped, smaller than one %d px patch after cropping", name, p)
            continue
        lq = degrade(gt, name)
        with torch.no_grad():
            if self_ensemble:
                ensemble = ensemble_outputs(model, lq.to(device), tile).cpu()
                sr = to_8bit(ensemble[0])  # the identity member: the plain output
            else:
                ensemble = None
                sr = to_8bit(restore(model, lq[None].to(device), tile=tile)[0].float().cpu())
        signals = measure_signals(search, lq, sr, ensemble=ensemble, device=device)
        signal_names = signals.names
        rows_x.append(signals.values.reshape(-1, len(signals.names)))
        rows_e.append(patch_error(sr, gt, p).flatten())
        rows_i.append(torch.full((rows_e[-1].numel(),), len(names), dtype=torch.long))
        names.append(name)
        now = time.perf_counter()
        if now - last_report > 20 or (total is not None and index + 1 == total):
            shown = f"{index + 1}/{total}" if total else f"{index + 1}"
            log.info("%s: %s images measured, %d patches, %.0f s", label, shown, sum(len(e) for e in rows_e),
                     now - start)
            last_report = now
    if not names:
        raise TrustError("no image was large enough to measure a single patch")
    return PatchSample(signal_names, torch.cat(rows_x), torch.cat(rows_e), torch.cat(rows_i), names)


def split_images(count: int, calibration_share: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``count`` image indices into fitting and calibration images (disjoint, both non-empty).

    Raises:
        TrustError: fewer than 2 images, or a share outside (0, 1).
    """
    if not 0 < calibration_share < 1:
        raise TrustError(f"the calibration share must lie in (0, 1), got {calibration_share}")
    if count < 2:
        raise TrustError(f"fitting and calibration need at least 2 images, got {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    n_cal = min(count - 1, max(1, round(count * calibration_share)))
    return sorted(order[n_cal:]), sorted(order[:n_cal])


def fit_trust(
    sample: PatchSample,
    fit_images: list[int],
    calibration_images: list[int],
    *,
    search: TextureSearch,
    scale: int,
    coverage: float = 0.9,
    ridge: float = 1e-3,
    signal_names: Iterable[str] | None = None,
    report: dict[str, Any] | None = None,
) -> TrustModel:
    """Fits the linear model on the fitting images' patches and calibrates its bound on the others.

    Args:
        sample: the measured patches of all images.
        fit_images: indices (into ``sample.image_names``) of the fitting images.
        calibration_images: indices of the calibration images, disjoint from ``fit_images``.
        search: the texture search the signals were measured with (its classifier is embedded in the model).
        scale: the restoration model's scale.
        coverage: the share of patches the bound is for.
        ridge: :func:`fit_linear`'s penalty.
        signal_names: the signals to use; None: all of ``sample``'s.
        report: extra entries for the model's report (e.g. the degradation).

    Raises:
        TrustError: the image sets overlap or one of them has no patch.
    """
    if set(fit_images) & set(calibration_images):
        raise TrustError("fitting and calibration images must be disjoint")
    names = tuple(signal_names or sample.names)
    fit, cal = sample.subset(fit_images), sample.subset(calibration_images)
    if len(fit.error) < 2 or len(cal.error) < 1:
        raise TrustError(f"{len(fit.error)} fitting and {len(cal.error)} calibration patches: too few")
    columns = [sample.names.index(n) for n in names]
    target = fit.error.log1p()
    weights, bias, mean, std = fit_linear(fit.signals[:, columns], target, ridge)
    trust = TrustModel(
        signal_names=names, signal_mean=mean.tolist(), signal_std=std.tolist(), weights=weights.tolist(), bias=bias,
        smear=1.0, quantile=math.inf, coverage=coverage, patch_size=search.patch_size, scale=int(scale),
        search={k: getattr(search, k) for k in SEARCH_FIELDS}, display_max=1.0,
        classifier=embed_classifier(search.classifier),
    )
    fit_residual = target - trust.log_error(fit.signals[:, columns])
    trust.smear = float(fit_residual.double().exp().mean())
    cal_pred = trust.log_error(cal.signals[:, columns])
    trust.quantile = conformal_quantile(cal.error.log1p() - cal_pred, coverage)
    expected_cal = (cal_pred.exp() * trust.smear - 1).clamp_min(0)
    trust.display_max = max(float(torch.quantile(expected_cal.double(), 0.99)), 1e-3)
    bound_cal = ((cal_pred + trust.quantile).exp() - 1).clamp_min(0)
    r2 = 1 - float(fit_residual.var() / target.var().clamp_min(1e-12))
    trust.report = {
        "fit_images": len(fit_images), "calibration_images": len(calibration_images), "fit_patches": len(fit.error),
        "calibration_patches": len(cal.error), "r2_log_error_fit": r2,
        "calibration_coverage": float((cal.error <= bound_cal).float().mean()),
        "calibration_mean_error": float(cal.error.mean()), **(report or {}),
    }
    return trust


def heatmap(trust_map: TrustMap, size: tuple[int, int], vmax: float) -> Tensor:
    """The expected error as a colour picture (matplotlib's ``magma``: 0 black, ``vmax`` and above light yellow).

    Args:
        trust_map: the map.
        size: (H, W) of the picture, the written output's size; the model's output is ``th p x tw p`` plus a
            strip beyond the last whole patch, and ``size`` may be a resize of it (``--outscale``). Each patch
            fills its square; the strip is black.
        vmax: the error at the top of the colour scale.

    Returns:
        (3, H, W) float32 in [0, 1].
    """
    from matplotlib import colormaps

    th, tw = trust_map.expected.shape
    values = (trust_map.expected / max(vmax, 1e-6)).clamp(0, 1)
    rgb = torch.from_numpy(colormaps["magma"](values.numpy())[..., :3]).float().permute(2, 0, 1)  # (3, th, tw)
    rgb = torch.cat([rgb, torch.zeros(3, 1, tw)], 1)
    rgb = torch.cat([rgb, torch.zeros(3, th + 1, 1)], 2)  # row th / column tw: the black strip

    def index(length: int, patches: int, factor: float) -> Tensor:
        # Output pixel -> patch; pixels beyond the last whole patch -> the black row/column.
        return (torch.arange(length) / (trust_map.patch_size * factor)).floor().long().clamp_max(patches)

    factor = trust_map.output_factor(size)
    return rgb[:, index(size[0], th, factor)][:, :, index(size[1], tw, factor)]


def trust_paths(target: str | Path) -> tuple[Path, Path]:
    """``<name>_trust.png`` and ``<name>_trust.csv`` beside an output file ``<name>.<ext>``."""
    target = Path(target)
    return target.with_name(f"{target.stem}_trust.png"), target.with_name(f"{target.stem}_trust.csv")


def write_trust_map(
    trust: TrustModel,
    search: TextureSearch,
    model: nn.Module,
    path: str | Path,
    target: str | Path,
    in_chans: int,
    *,
    size: tuple[int, int] | None = None,
    tile: int | None = None,
    overlap: int = 32,
    device: str | torch.device = "cpu",
) -> tuple[Path, Path]:
    """The trust map of an image file restored by ``model``, written beside its output ``target``.

    The input is read again and restored once more as the trust model was fitted (the plain output, no
    self-ensemble, at the model's scale); the map describes that output.

    Args:
        trust: the fitted trust model; search: its :meth:`TrustModel.load_search`.
        model: the restoration model (eval mode, on ``device``).
        path: the input image file.
        target: the written output; the files are ``<target stem>_trust.png`` and ``.csv`` beside it.
        in_chans: the model's input channels (a gray input is replicated for an RGB model).
        size: (H, W) of the written output when it was resized (``--outscale``); None: the model's output size.
        tile, overlap: the model's tiled inference (:func:`xswinir.inference.restore`).
        device: where the model and the search run.

    Returns:
        The heat-map PNG (the expected error, :func:`heatmap`, colour scale 0 to ``trust.display_max``) and the
        CSV: one row per patch with ``top, left, bottom, right`` (output pixels, bottom/right exclusive),
        ``expected_error`` and ``bound`` (mean |Y error|, Y on 0-255).

    Raises:
        ImageReadError: the input cannot be read.
        TrustError: the model's scale is not the trust model's, or the output is smaller than a patch.
    """
    lq = to_channels(read_image_data(path).image, in_chans).float()
    with torch.no_grad():
        sr = to_8bit(restore(model, lq[None].to(device), tile=tile, overlap=overlap)[0].float().cpu())
    trust_map = estimate_trust(trust, search, lq, sr, model=model, tile=tile, overlap=overlap, device=device)
    picture, table = trust_paths(target)
    write_image(picture, heatmap(trust_map, size or tuple(sr.shape[-2:]), trust.display_max), overwrite=True)
    lines = ["top,left,bottom,right,expected_error,bound"]
    lines += [f"{top},{left},{bottom},{right},{expected:.3f},{bound:.3f}"
              for top, left, bottom, right, expected, bound in trust_map.rows(size)]
    atomic_write_text(table, "\n".join(lines) + "\n")
    return picture, table
