"""Interpretable, named texture features of image windows, computed for every window of an image at once.

Every feature is a window average of a per-pixel map (or the spread of one), so the features of all
``p x p`` windows at a stride come from one pass: the filter responses are computed once per image and then
average-pooled with ``kernel = p`` and ``stride``. The filters are applied without padding ("valid"), and each
window averages only the responses whose filter support lies inside the window, so the features of a window
do not depend on the pixels around it: ``window_features(img)[..., i, j] == forward(window (i, j))``.

Features (56 with the defaults ``scales=(1, 2, 4)``, ``num_orientations=4``, ``layout_grid=4``):

* ``grad_energy_s{s}_o{deg}_mean`` / ``_std``: mean and spread over the window of the magnitude of an
  oriented first derivative of Gaussian (sigma ``s / 2`` px, normalised to respond 1 to a unit ramp) of the
  luminance: how much structure there is at that scale and orientation.
* ``contrast_laplacian_mean``: mean absolute 3 x 3 Laplacian of the luminance (fine-scale local contrast).
* ``luma_std``: BT.601 luminance spread (contrast).
* ``chroma_cb_std``, ``chroma_cr_std``: spread of the colour (BT.601 Cb/Cr) inside the window, 0 for gray, so
  single-channel input gives vectors of the same length.
* ``ramp_x_mean`` / ``ramp_y_mean``: the *signed* mean slope of the luminance at the largest scale, left to right
  and top to bottom: which way the window gets brighter. Two windows on the same shading or edge direction agree.
* ``lbp_ones{k}`` (k = 0..8) and ``lbp_nonuniform``: histogram of rotation-invariant uniform local binary
  patterns (8 neighbours at radius 1; a neighbour counts as "on" when it is brighter than the centre by more
  than ``lbp_threshold``). A uniform pattern (at most two on/off transitions around the circle) is binned by
  its number of "on" neighbours, which is the same under rotation; all other patterns share one bin.
  The histogram is piecewise constant in the image, so it passes no gradient.
* ``layout_r{r}c{c}`` (a ``layout_grid`` x ``layout_grid`` grid, 4 x 4 by default): how much brighter cell (r, c) of
  the window is than the window's mean, in units of the window's luminance spread: a coarse, contrast-normalised
  thumbnail of where the structure is. Through the classifier's product weights two windows whose thumbnails
  agree score high: a low-resolution correlation, which survives blur and noise (the low-quality query side).

No feature is a mean brightness or a mean colour: a texture is the same texture in shade and in light, and a
classifier that matched colour would pick windows that fit a tile's mean, not its structure (measured: the
first classifier, with luma and chroma means, ranked them first). Every feature is unchanged when a constant is
added to the window.

**Pair features** (``pair_features=True``, what the trained classifier uses): agreement between *two* windows,
which no per-window feature can express, each symmetric in the two windows and bounded:

* ``abs_ncc``: |normalised cross-correlation| of the two windows' colour pixels, each channel centred, in
  [0, 1]: exactly how much of one window the other explains alone in the search's least-squares fit (its square
  is that r²), colour included;
* ``abs_ncc_best_shift``: the largest |cross-correlation| of the two unit-norm, centred windows over the shifts
  of at most ``max_shift`` pixels (zero outside the overlap), in [0, 1]: the same structure, slightly offset,
  e.g. a repeated pattern between the search's stride-4 windows;
* ``orientation_agreement``: cosine of the windows' magnitude-weighted gradient-orientation histograms
  (8 bins over [0, 180) degrees), in [0, 1]: the same directions of structure (fur, grass, brick courses), with no
  pixel correspondence at all;
* ``energy_agreement``: cosine of the windows' oriented multi-scale gradient energies (the
  ``grad_energy_*_mean`` features), in [0, 1]: the same spectral shape whatever the contrast (gravel in shade
  and in light), again without pixel correspondence.

They are computed from each window's *descriptor*, which ``forward`` and ``window_features`` append after the
named features when ``pair_features`` is on: the window's pixels centred per channel (``3 * p * p`` values, gray
as gray RGB) and its orientation histogram (8). :meth:`TextureFeatures.pair_features` computes them for broadcast pairs,
:meth:`TextureFeatures.outer_pair_features` for every window against every patch (the search) with matrix
products.
"""

from __future__ import annotations

import math

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Spreads are sqrt(E[x^2] - E[x]^2 + eps) - sqrt(eps): finite gradients also in flat windows.
_STD_EPS = 1e-8
# Layout cells are divided by the window's luma spread plus this, so that flat, noisy windows get no layout.
_LAYOUT_SPREAD_FLOOR = 0.02
# The 8 neighbours of the LBP in circular order (dy, dx), so that "transitions" are between adjacent ones.
_LBP_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))
_LBP_BINS = 10  # 0..8 "on" neighbours of a uniform pattern, plus one bin for non-uniform patterns

PAIR_FEATURE_NAMES = ("abs_ncc", "abs_ncc_best_shift", "orientation_agreement", "energy_agreement")
ORIENTATION_BINS = 8  # gradient-orientation histogram bins over [0, 180) degrees
# Soft orientation binning: a pixel adds m * max(0, cos(2 (theta - centre)))^this to each bin; 4 gives a bin a
# half width at half height of about 16 degrees, a little more than the 11.25 degrees to the bin's edge.
_ORIENTATION_SHARPNESS = 4
# Norm floors of the pair features, so that flat, noisy windows agree with nothing instead of with everything:
# a window's luminance spread below this counts as this (NCC), and so do histogram and energy norms below theirs.
_NCC_SPREAD_FLOOR = 0.005  # luminance standard deviation, on the [0, 1] scale (about 1.3 grey levels)
_AGREEMENT_NORM_FLOOR = 1e-3  # intensity per pixel, the unit of the gradient features


def _oriented_kernels(scale: int, num_orientations: int) -> Tensor:
    """First-derivative-of-Gaussian kernels steered to ``num_orientations`` angles in [0, 180) degrees.

    Returns:
        (num_orientations, 1, 2 * scale + 1, 2 * scale + 1); each responds with 1 to a unit ramp
        ``I = x cos(theta) + y sin(theta)`` (units: intensity per pixel).
    """
    sigma = scale / 2.0
    u = torch.arange(-scale, scale + 1, dtype=torch.float64)
    g = torch.exp(-(u**2) / (2 * sigma**2))
    gy, gx = torch.meshgrid(u, u, indexing="ij")
    gauss = g[:, None] * g[None, :]
    dx = gx * gauss
    dx = dx / (dx * gx).sum()  # F.conv2d correlates: response to I = x is sum(k * x) = 1
    dy = dx.t()
    angles = torch.arange(num_orientations, dtype=torch.float64) * math.pi / num_orientations
    kernels = torch.cos(angles)[:, None, None] * dx + torch.sin(angles)[:, None, None] * dy
    return kernels[:, None].float()


def _pool(x: Tensor, kernel: tuple[int, int], stride: int) -> Tensor:
    """Window means of per-pixel maps (B, K, h, w) -> (B, K, nh, nw)."""
    if tuple(x.shape[-2:]) == tuple(kernel):  # one window (forward on patches): a plain mean is much faster
        return x.mean(dim=(-2, -1), keepdim=True)
    # Separable: 2k instead of k^2 additions per output; about 1.5x faster for the whole window_features.
    # Off the CPU one kernel launch per pass (the slices below would be 2k launches); on it too when the windows
    # do not overlap (the patches of a crop), where the slices' per-call overhead outweighs what they save.
    if x.device.type != "cpu" or stride >= max(kernel):
        x = F.avg_pool2d(x, kernel_size=(kernel[0], 1), stride=(stride, 1))
        return F.avg_pool2d(x, kernel_size=(1, kernel[1]), stride=(1, stride))
    return _axis_means(_axis_means(x, kernel[0], stride, -2), kernel[1], stride, -1)


def _axis_means(x: Tensor, kernel: int, stride: int, dim: int) -> Tensor:
    """Means of ``kernel`` consecutive entries along ``dim`` at ``stride``: ``F.avg_pool2d`` on one axis, bit for bit.

    avg_pool2d's CPU kernel adds a window's entries one after another in float32 and divides the sum by
    ``kernel``, one output at a time; the same additions done as ``kernel`` whole-tensor additions of strided
    slices give the same bits and vectorise: 2-4x faster at the search's sizes (``bench.bench_texture``).
    """
    n = (x.shape[dim] - kernel) // stride + 1
    span = (n - 1) * stride + 1
    every = (slice(None),) * (dim % x.ndim) + (slice(None, None, stride),)
    total = x.narrow(dim, 0, span)[every].clone()
    for offset in range(1, kernel):
        total += x.narrow(dim, offset, span)[every]
    return total / kernel


def _mean_and_std(x: Tensor, kernel: tuple[int, int], stride: int) -> tuple[Tensor, Tensor]:
    """Window mean and spread of per-pixel maps ``x`` (B, K, h, w) -> two (B, K, nh, nw)."""
    mean = _pool(x, kernel, stride)
    var = _pool(x * x, kernel, stride) - mean * mean
    return mean, _soft_sqrt(var.clamp_min(0.0))


def _centred_windows(x: Tensor, window: tuple[int, int], stride: int, grid: tuple[int, int],
                     out: Tensor | None = None) -> Tensor:
    """(B, 3, H, W) -> (B, 3*h*w, nh, nw): every window's pixels minus its per-channel mean, channel-major.

    With ``out`` (a (B, 3*h*w, nh, nw) view, e.g. the descriptor's channels of the feature tensor, no gradient)
    the result is written there instead of a new tensor: the search's regions skip a copy of all their pixels.
    """
    B, C = x.shape[:2]
    h, w = window
    # Tensor.unfold's strided view copied into place: the same values as F.unfold, about 3x faster.
    cols = x.unfold(2, h, stride).unfold(3, w, stride)  # (B, C, nh, nw, h, w), a view
    cols = cols.permute(0, 1, 4, 5, 2, 3).reshape(B, C, h * w, grid[0] * grid[1])
    mean = cols.mean(2, keepdim=True)  # on this contiguous layout: the reduction order decides the bits
    if out is None:
        return (cols - mean).flatten(1, 2).unflatten(-1, tuple(grid))
    torch.sub(cols, mean, out=out.view(B, C, h * w, grid[0] * grid[1]))
    return out


def _shifts(max_shift: int) -> list[tuple[int, int]]:
    """All (dy, dx) with |dy|, |dx| <= max_shift, row-major, so that (0, 0) is the middle entry."""
    steps = range(-max_shift, max_shift + 1)
    return [(dy, dx) for dy in steps for dx in steps]


def _overlap(x: Tensor, dy: int, dx: int) -> Tensor:
    """Pixels ``x(y)`` of windows x (..., C, h, w) at the positions y that stay inside after a move by -(dy, dx).

    ``_overlap(a, -dy, -dx) * _overlap(b, dy, dx)`` pairs ``a(x)`` with ``b(x + (dy, dx))`` wherever both exist.
    """
    h, w = x.shape[-2:]
    return x[..., max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]


def _moved_copies(x: Tensor, shifts: list[tuple[int, int]]) -> Tensor:
    """Windows x (..., C, h, w) moved by each (dy, dx) of ``shifts``, zero where nothing moved in: (..., S, C, h, w).

    Copy ``s`` is ``out(y) = x(y - (dy, dx))``; written into one zeroed tensor (no padded copy per shift).
    """
    out = x.new_zeros(*x.shape[:-3], len(shifts), *x.shape[-3:])
    h, w = x.shape[-2:]
    for i, (dy, dx) in enumerate(shifts):
        out[..., i, :, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = _overlap(x, -dy, -dx)
    return out


def _unit(pixels: Tensor) -> Tensor:
    """Windows (..., C, h, w) centred per channel and scaled to unit norm; a spread below the floor counts as it."""
    pixels = pixels - pixels.mean((-1, -2), keepdim=True)
    norm = pixels.square().sum((-1, -2, -3), keepdim=True).sqrt()
    return pixels / norm.clamp_min(_NCC_SPREAD_FLOOR * math.sqrt(pixels.shape[-3:].numel()))


def _cosine_unit(x: Tensor) -> Tensor:
    """Vectors (..., K) scaled to unit norm; a norm below the floor counts as the floor."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_AGREEMENT_NORM_FLOOR)


def _soft_sqrt(x: Tensor) -> Tensor:
    """sqrt(x) with a finite gradient at 0, and exactly 0 there (gray RGB == gray single-channel)."""
    return torch.sqrt(x + _STD_EPS) - _STD_EPS**0.5


class TextureFeatures(nn.Module):
    """Named texture features of image windows: oriented gradient energies, contrast, colour, an LBP histogram.

    Args:
        scales: filter-bank scales in pixels; scale ``s`` uses a ``(2s + 1)``-tap kernel, so windows must be at
            least ``2 * max(scales) + 1`` pixels wide.
        num_orientations: orientations of the derivative filters, evenly spaced over [0, 180) degrees.
        lbp_threshold: how much brighter than the centre (in [0, 1] intensity) a neighbour must be to count as
            "on" in the local binary pattern; keeps sensor noise in flat areas from filling random bins.
        layout_grid: cells per side of the layout thumbnail (0: no layout features).
        pair_features: append each window's descriptor (centred pixels, orientation histogram) after the named
            features, for :meth:`pair_features`.
        max_shift: the largest shift, in pixels, of ``abs_ncc_best_shift``.
    """

    def __init__(self, scales: tuple[int, ...] = (1, 2, 4), num_orientations: int = 4,
                 lbp_threshold: float = 0.01, layout_grid: int = 4, pair_features: bool = False,
                 max_shift: int = 2) -> None:
        super().__init__()
        self.layout_grid = int(layout_grid)
        if not scales or any(s < 1 for s in scales) or num_orientations < 1:
            raise ValueError(f"scales {scales} must be positive integers and num_orientations >= 1")
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.pair_features_on = bool(pair_features)
        self.max_shift = int(max_shift)
        self.scales = tuple(int(s) for s in scales)
        self.num_orientations = int(num_orientations)
        self.lbp_threshold = float(lbp_threshold)
        for s in self.scales:
            self.register_buffer(f"kernels_s{s}", _oriented_kernels(s, num_orientations), persistent=False)
        self.register_buffer("ramp_kernels", _oriented_kernels(max(self.scales), 2), persistent=False)
        laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("laplacian", laplacian[None, None], persistent=False)

        degrees = [round(180 * i / num_orientations) for i in range(num_orientations)]
        names = []
        for s in self.scales:
            for stat in ("mean", "std"):
                names += [f"grad_energy_s{s}_o{d}_{stat}" for d in degrees]
        names += ["contrast_laplacian_mean", "luma_std", "chroma_cb_std", "chroma_cr_std", "ramp_x_mean", "ramp_y_mean"]
        names += [f"lbp_ones{k}" for k in range(9)] + ["lbp_nonuniform"]
        names += [f"layout_r{r}c{c}" for r in range(self.layout_grid) for c in range(self.layout_grid)]
        self.feature_names: list[str] = names
        self.pair_feature_names: list[str] = list(PAIR_FEATURE_NAMES) if self.pair_features_on else []
        self.register_buffer("gradient_kernels", _oriented_kernels(1, 2), persistent=False)  # d/dx, d/dy
        energy = [i for i, n in enumerate(names) if n.startswith("grad_energy_") and n.endswith("_mean")]
        self.register_buffer("energy_index", torch.tensor(energy), persistent=False)

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @property
    def min_size(self) -> int:
        """The smallest window the largest filter fits into."""
        return 2 * max(self.scales) + 1

    def descriptor_size(self, window: tuple[int, int]) -> int:
        """How many descriptor values follow the named features for an ``h x w`` window (0 without pairs)."""
        return 3 * window[0] * window[1] + ORIENTATION_BINS if self.pair_features_on else 0

    def extra_repr(self) -> str:
        return (f"scales={self.scales}, num_orientations={self.num_orientations}, features={self.num_features}, "
                f"pair_features={self.pair_feature_names or None}")

    def forward(self, patches: Tensor) -> Tensor:
        """Features of whole patches.

        Args:
            patches: (N, C, p, p) with C in {1, 3}, values in [0, 1] (non-square patches work too).

        Returns:
            (N, F) features in the order of ``feature_names``; with ``pair_features``, (N, F + D) with the
            ``D = descriptor_size((p, p))`` descriptor values after them.
        """
        h, w = patches.shape[-2:]
        return self._features(patches, (h, w), stride=1)[..., 0, 0]

    def window_features(self, images: Tensor, patch_size: int, stride: int) -> Tensor:
        """Features of every ``patch_size`` window of each image at ``stride``, in one pass.

        Args:
            images: (B, C, H, W) with C in {1, 3}, values in [0, 1].
            patch_size: window side p; H and W must be at least p.
            stride: step between windows; window (i, j) is ``images[..., i*stride:i*stride+p, j*stride:j*stride+p]``.

        Returns:
            (B, F, nh, nw) with ``nh = (H - p) // stride + 1`` and ``nw = (W - p) // stride + 1``
            ((B, F + D, nh, nw) with ``pair_features``); ``[..., i, j]`` equals ``forward`` of window (i, j) up
            to float rounding.
        """
        if images.shape[-2] < patch_size or images.shape[-1] < patch_size:
            raise ValueError(f"images {tuple(images.shape[-2:])} are smaller than the window {patch_size}")
        return self._features(images, (patch_size, patch_size), stride)

    def _features(self, x: Tensor, window: tuple[int, int], stride: int) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, 1 or 3, H, W) images, got {tuple(x.shape)}")
        if min(window) < self.min_size:
            raise ValueError(f"window {window} is smaller than {self.min_size} px, the largest filter "
                             f"(scales={self.scales})")
        ph, pw = window
        x = x.float()
        if x.shape[1] == 3:
            ycbcr = kornia.color.rgb_to_ycbcr(x)
            luma, chroma = ycbcr[:, :1], ycbcr[:, 1:] - 0.5  # chroma 0 for gray pixels
        else:
            luma, chroma = x, None

        out = []
        for s in self.scales:
            kernels = getattr(self, f"kernels_s{s}").to(luma.dtype)
            energy = F.conv2d(luma, kernels).abs()  # (B, O, H - 2s, W - 2s), valid positions only
            k = 2 * s  # the valid map is this much smaller than the image
            out.extend(_mean_and_std(energy, (ph - k, pw - k), stride))
        laplacian = F.conv2d(luma, self.laplacian.to(luma.dtype)).abs()  # (B, 1, H - 2, W - 2)
        out.append(_pool(laplacian, (ph - 2, pw - 2), stride))
        luma_mean, luma_spread = _mean_and_std(luma, (ph, pw), stride)  # also the layout's reference
        out.append(luma_spread)
        if chroma is not None:
            out += [_mean_and_std(chroma[:, i:i + 1], (ph, pw), stride)[1] for i in (0, 1)]
        else:
            ref = out[-1]
            out.append(ref.new_zeros(ref.shape[0], 2, *ref.shape[2:]))
        k = 2 * max(self.scales)
        ramps = F.conv2d(luma, self.ramp_kernels.to(luma.dtype))  # (B, 2, H - k, W - k), signed
        out.append(_pool(ramps, (ph - k, pw - k), stride))

        out.append(_pool(self._lbp_onehot(luma), (ph - 2, pw - 2), stride))
        if self.layout_grid:
            out.append(self._layout(luma, (ph, pw), stride, luma_mean, luma_spread))
        if not self.pair_features_on:
            return torch.cat(out, dim=1)
        rgb = x.expand(-1, 3, -1, -1)  # gray as gray RGB: the same correlations, vectors of one length
        hist = _pool(self._orientation_votes(luma), (ph - 2, pw - 2), stride)
        grid = hist.shape[-2:]
        if torch.is_grad_enabled() and x.requires_grad:  # out= records no gradient
            return torch.cat([*out, _centred_windows(rgb, (ph, pw), stride, grid), hist], dim=1)
        # The descriptor (3 p^2 values per window, most of the tensor) is written into place, not concatenated.
        named = torch.cat(out, dim=1)
        F_, D = named.shape[1], 3 * ph * pw
        result = named.new_empty(named.shape[0], F_ + D + hist.shape[1], *grid)
        result[:, :F_] = named
        _centred_windows(rgb, (ph, pw), stride, grid, out=result[:, F_:F_ + D])
        result[:, F_ + D:] = hist
        return result

    def _orientation_votes(self, luma: Tensor) -> Tensor:
        """(B, 1, H, W) -> (B, 8, H - 2, W - 2): each pixel's gradient magnitude, soft-binned by orientation."""
        g = F.conv2d(luma, self.gradient_kernels.to(luma.dtype))  # (B, 2, H - 2, W - 2): d/dx, d/dy
        gx, gy = g[:, :1], g[:, 1:]
        m2 = gx * gx + gy * gy
        magnitude = _soft_sqrt(m2)
        # The doubled angle makes orientation (not direction) continuous: theta and theta + 180 are one bin.
        cos2, sin2 = (gx * gx - gy * gy) / (m2 + 1e-12), 2 * gx * gy / (m2 + 1e-12)
        centres = torch.arange(ORIENTATION_BINS, device=luma.device, dtype=luma.dtype)
        centres = centres * (2 * math.pi / ORIENTATION_BINS)  # doubled angles of the bins' centres
        closeness = cos2 * centres.cos()[:, None, None] + sin2 * centres.sin()[:, None, None]  # (B, 8, h, w)
        return magnitude * closeness.clamp_min(0) ** _ORIENTATION_SHARPNESS

    def split(self, f: Tensor, window: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """A feature vector (..., F + D) -> named features (..., F), pixels centred per channel (..., 3, h, w),
        orientation histogram (..., 8)."""
        num, (h, w) = self.num_features, window
        if f.shape[-1] != num + self.descriptor_size(window):
            raise ValueError(f"expected {num} features and a {h}x{w} descriptor ({num + self.descriptor_size(window)} "
                             f"values), got {f.shape[-1]}")
        pixels = f[..., num:num + 3 * h * w].unflatten(-1, (3, h, w))
        return f[..., :num], pixels, f[..., num + 3 * h * w:]

    def pair_features(self, fa: Tensor, fb: Tensor, window: tuple[int, int]) -> Tensor:
        """The named pair features of broadcast pairs of feature vectors.

        Args:
            fa: (..., F + D) vectors of the first windows, as ``forward`` returns them with ``pair_features``.
            fb: (..., F + D) of the second windows; broadcasts against ``fa``.
            window: the windows' (h, w).

        Returns:
            (..., P) in the order of ``pair_feature_names``, symmetric in ``fa`` and ``fb`` (exactly: every
            term is a sum of the same products in the same order), each in [0, 1] for real windows.
        """
        named_a, pixels_a, hist_a = self.split(fa, window)
        named_b, pixels_b, hist_b = self.split(fb, window)
        a, b = _unit(pixels_a), _unit(pixels_b)
        shifts = []
        for dy, dx in _shifts(self.max_shift):  # sum over x and channels of a(x) b(x + (dy, dx)) where both exist
            shifts.append((_overlap(a, -dy, -dx) * _overlap(b, dy, dx)).sum((-1, -2, -3)).abs())
        correlations = torch.stack(shifts, dim=-1)
        ncc = correlations[..., len(shifts) // 2]  # the middle shift is (0, 0)
        orientation = (_cosine_unit(hist_a) * _cosine_unit(hist_b)).sum(-1)
        energy = self._energies(named_a, named_b)
        energy = (_cosine_unit(energy[0]) * _cosine_unit(energy[1])).sum(-1)
        return torch.stack((ncc, correlations.amax(-1), orientation, energy), dim=-1)

    def outer_pair_features(self, fa: Tensor, fb: Tensor, window: tuple[int, int]) -> Tensor:
        """The pair features of every vector of ``fa`` with every vector of ``fb``, by matrix products.

        Args:
            fa: (..., T, F + D), e.g. the patches of the search.
            fb: (..., N, F + D), e.g. the candidate windows; the leading dimensions broadcast.
            window: the windows' (h, w).

        Returns:
            (..., T, N, P), equal to ``pair_features(fa[..., :, None, :], fb[..., None, :, :], window)`` up to
            float rounding, without a (..., T, N, F + D) intermediate.
        """
        named_a, pixels_a, hist_a = self.split(fa, window)
        named_b, pixels_b, hist_b = self.split(fb, window)
        a, b = _unit(pixels_a), _unit(pixels_b).flatten(-3)  # (..., T, 3, h, w), (..., N, 3*h*w)
        shifted = _moved_copies(a, _shifts(self.max_shift))  # (..., T, S, 3, h, w)
        T, S = shifted.shape[-5:-3]
        correlations = (shifted.flatten(-3).flatten(-3, -2) @ b.transpose(-1, -2)).abs_()  # (..., T * S, N)
        correlations = correlations.unflatten(-2, (T, S))  # (..., T, S, N)
        ncc = correlations[..., S // 2, :]
        orientation = _cosine_unit(hist_a) @ _cosine_unit(hist_b).transpose(-1, -2)
        energy_a, energy_b = self._energies(named_a, named_b)
        energy = _cosine_unit(energy_a) @ _cosine_unit(energy_b).transpose(-1, -2)
        return torch.stack((ncc, correlations.amax(-2), orientation, energy), dim=-1)

    def _energies(self, named_a: Tensor, named_b: Tensor) -> tuple[Tensor, Tensor]:
        index = self.energy_index.to(named_a.device)
        return named_a.index_select(-1, index), named_b.index_select(-1, index)

    def _layout(self, luma: Tensor, window: tuple[int, int], stride: int, mean: Tensor, spread: Tensor) -> Tensor:
        """(B, 1, H, W) -> (B, g*g, nh, nw): cell means minus the window mean, over the window's spread.

        ``mean`` and ``spread`` (B, 1, nh, nw) are the windows' luma mean and spread (:func:`_mean_and_std`).
        """
        g = self.layout_grid
        ph, pw = window
        ch, cw = ph // g, pw // g
        nh, nw = mean.shape[-2:]
        cells = F.avg_pool2d(luma, (ch, cw), stride=1)  # the mean of the cell starting at every pixel
        out = []
        for r in range(g):
            for c in range(g):
                top, left = r * ch, c * cw
                out.append(cells[..., top:top + (nh - 1) * stride + 1:stride, left:left + (nw - 1) * stride + 1:stride])
        return (torch.cat(out, dim=1) - mean) / (spread + _LAYOUT_SPREAD_FLOOR)

    def _lbp_onehot(self, luma: Tensor) -> Tensor:
        """(B, 1, H, W) -> (B, 10, H - 2, W - 2) one-hot rotation-invariant uniform LBP codes."""
        h, w = luma.shape[-2:]
        luma = luma.detach()  # the codes are piecewise constant: no gradient to carry
        centre = luma[:, 0, 1:h - 1, 1:w - 1]
        # Count "on" neighbours and on/off transitions around the circle without stacking the 8 bit planes.
        first = prev = luma[:, 0, 1:h - 1, :w - 2] - centre > self.lbp_threshold  # neighbour (0, -1)
        ones = first.to(torch.uint8)
        transitions = torch.zeros_like(ones)
        for dy, dx in _LBP_NEIGHBOURS[:-1]:
            bit = luma[:, 0, 1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] - centre > self.lbp_threshold
            ones += bit
            transitions += bit != prev
            prev = bit
        transitions += prev != first
        codes = torch.where(transitions <= 2, ones, torch.full_like(ones, _LBP_BINS - 1))
        bins = torch.arange(_LBP_BINS, device=codes.device)[:, None, None]
        return (codes[:, None] == bins).to(luma.dtype)
