"""A linear "same texture?" classifier on pairs of named texture features; saving, loading and plotting it.

For two windows a and b with standardised features ``za``, ``zb`` (F each) and standardised named pair features
``g(a, b)`` (P of them, see :mod:`xswinir.texture.features`: the windows' pixel correlation in place and at the
best small shift, the agreement of their gradient orientations and of their spectral shape) the classifier is a
logistic regression on the symmetric pair encoding ``[|za - zb|, za * zb, g]``::

    logit(a, b) = bias + sum_f (w_diff[f] * |za_f - zb_f| + w_prod[f] * za_f * zb_f) + sum_k w_pair[k] * g_k

so it has ``2F + P + 1`` weights (117 with the default 56 features and 4 pair features), each tied to a name: a
negative ``w_diff[f]`` says "a difference in feature f speaks against the same texture", a positive ``w_prod[f]``
says "both windows being high (or both low) in f speaks for it", a positive ``w_pair[k]`` says "agreement k
speaks for it". Swapping a and b gives the same logit exactly. A classifier built with ``pair_features=False``
(the first kind, still read from files of format version 2) has no pair terms.

A saved classifier is a folder with ``classifier.safetensors`` (weights and the feature standardisation) and
``classifier.json`` (feature settings and names, patch size and the training report).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xswinir.errors import UserError
from xswinir.texture.features import TextureFeatures

FORMAT = "xswinir-texture-classifier"
FORMAT_VERSION = 3  # 3: named pair features; 2: texture-only features (no mean brightness or colour), signed ramps
READABLE_VERSIONS = (2, 3)  # a version-2 file is a classifier without pair features
_PAIR_TENSORS = ("weight_pair", "pair_mean", "pair_std")
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"


class TextureClassifierError(UserError, ValueError):
    """A texture classifier folder that is missing, unreadable or does not fit this version."""


class TextureClassifier(nn.Module):
    """P(same texture) for two ``patch_size`` windows, linear in their standardised named features.

    Args:
        patch_size: the window side p the classifier was trained for.
        scales: filter-bank scales of :class:`TextureFeatures`.
        num_orientations: filter orientations of :class:`TextureFeatures`.
        lbp_threshold: LBP threshold of :class:`TextureFeatures`.
        layout_grid: cells per side of the layout features of :class:`TextureFeatures`.
        pair_features: add the named pair features (what :func:`~xswinir.texture.train_texture_classifier`
            trains); then ``features`` returns each window's named features followed by its descriptor.
        max_shift: the largest shift, in pixels, of the ``abs_ncc_best_shift`` pair feature.
    """

    def __init__(self, patch_size: int = 16, scales: tuple[int, ...] = (1, 2, 4), num_orientations: int = 4,
                 lbp_threshold: float = 0.01, layout_grid: int = 4, pair_features: bool = False,
                 max_shift: int = 2) -> None:
        super().__init__()
        self.patch_size = int(patch_size)
        self.features = TextureFeatures(scales, num_orientations, lbp_threshold, layout_grid, pair_features,
                                        max_shift)
        if self.patch_size < self.features.min_size:
            raise ValueError(f"patch_size={patch_size} is smaller than the largest filter "
                             f"({self.features.min_size} px for scales={tuple(scales)})")
        num = self.features.num_features
        self.weight_diff = nn.Parameter(torch.zeros(num))
        self.weight_prod = nn.Parameter(torch.zeros(num))
        self.bias = nn.Parameter(torch.zeros(1))
        self.register_buffer("feature_mean", torch.zeros(num))
        self.register_buffer("feature_std", torch.ones(num))
        if self.has_pair_features:  # registered only then, so that a version-2 file loads as it was written
            pairs = len(self.features.pair_feature_names)
            self.weight_pair = nn.Parameter(torch.zeros(pairs))
            self.register_buffer("pair_mean", torch.zeros(pairs))
            self.register_buffer("pair_std", torch.ones(pairs))
        self.report: dict[str, Any] = {}  # the training report, saved beside the weights

    @property
    def feature_names(self) -> list[str]:
        return self.features.feature_names

    @property
    def pair_feature_names(self) -> list[str]:
        """The named pair features (empty for a classifier without them)."""
        return self.features.pair_feature_names

    @property
    def has_pair_features(self) -> bool:
        return self.features.pair_features_on

    def standardize(self, f: Tensor) -> Tensor:
        """Raw features (..., F) or (..., F + D) -> standardised named features (..., F) (training mean and std)."""
        f = f[..., :self.features.num_features]  # the descriptor, if any, is for the pair features only
        return (f - self.feature_mean.to(f.dtype)) / self.feature_std.to(f.dtype)

    def pair_features(self, fa: Tensor, fb: Tensor) -> Tensor:
        """The raw named pair features (..., P) of broadcast pairs of feature vectors (..., F + D); P may be 0."""
        if not self.has_pair_features:
            return fa.new_zeros(torch.broadcast_shapes(fa.shape[:-1], fb.shape[:-1]) + (0,))
        return self.features.pair_features(fa, fb, (self.patch_size, self.patch_size))

    def standardize_pairs(self, g: Tensor) -> Tensor:
        """Raw pair features (..., P) -> standardised with the training pairs' mean and std."""
        if not self.has_pair_features:
            return g
        return (g - self.pair_mean.to(g.dtype)) / self.pair_std.to(g.dtype)

    def _pair_weights(self, like: Tensor) -> Tensor:
        return self.weight_pair.to(like.dtype) if self.has_pair_features else like.new_zeros(0)

    def pair_logits(self, fa: Tensor, fb: Tensor) -> Tensor:
        """Logit of "same texture" for pairs of *raw* feature vectors (as ``features`` returns them).

        Standardisation happens inside, so do not call :meth:`standardize` first.

        Args:
            fa: (..., F) raw features of the first windows ((..., F + D) with pair features: all that
                ``features`` returns).
            fb: (..., F) raw features of the second windows; broadcasts against ``fa``.

        Returns:
            (...) logits; symmetric in ``fa`` and ``fb``. The all-pairs pattern of the texture search,
            (..., T, 1, F) x (..., 1, N, F) -> (..., T, N), runs without a (..., T, N, F) intermediate when
            no gradient is recorded.
        """
        za, zb = self.standardize(fa), self.standardize(fb)
        w_diff, w_prod = self.weight_diff.to(za.dtype), self.weight_prod.to(za.dtype)
        w_pair = self._pair_weights(za)
        if _is_outer(za, zb) and not torch.is_grad_enabled():
            logits = self._outer_logits(za.squeeze(-2), zb.squeeze(-3), w_diff, w_prod)
            if self.has_pair_features:
                window = (self.patch_size, self.patch_size)
                g = self.features.outer_pair_features(fa.squeeze(-2), fb.squeeze(-3), window)  # (..., T, N, P)
                logits = logits + self.standardize_pairs(g) @ w_pair
            return logits
        logits = (za - zb).abs() @ w_diff + (za * zb) @ w_prod + self.bias.to(za.dtype)
        if self.has_pair_features:
            logits = logits + self.standardize_pairs(self.pair_features(fa, fb)) @ w_pair
        return logits

    def _outer_logits(self, za: Tensor, zb: Tensor, w_diff: Tensor, w_prod: Tensor) -> Tensor:
        """All pairs of (..., T, F) and (..., N, F) -> (..., T, N) without a (..., T, N, F) intermediate.

        ``sum_f w_f |a_f - b_f|`` is an L1 distance of features scaled by ``|w_f|``, added for positive and
        subtracted for negative weights (two ``cdist`` calls); the product term is a matrix product.
        """
        batch = torch.broadcast_shapes(za.shape[:-2], zb.shape[:-2])
        za = za.expand(*batch, *za.shape[-2:])
        zb = zb.expand(*batch, *zb.shape[-2:])
        logits = (za * w_prod) @ zb.transpose(-1, -2) + self.bias.to(za.dtype)
        for sign, sel in ((1.0, w_diff > 0), (-1.0, w_diff < 0)):
            scale = w_diff[sel].abs()
            logits = logits + sign * torch.cdist(za[..., sel] * scale, zb[..., sel] * scale, p=1)
        return logits

    def pair_contributions(self, fa: Tensor, fb: Tensor) -> Tensor:
        """Each named weight's share of the logit: why a pair was (or was not) called the same texture.

        Args:
            fa: (..., F) raw features of the first windows (as ``features`` returns them, with the descriptor
                when the classifier has pair features).
            fb: (..., F) raw features of the second windows; broadcasts against ``fa``.

        Returns:
            (..., 2F + P) weight x encoded feature, in the order (and with the names) of :meth:`weight_table`:
            ``w_diff[f] * |za_f - zb_f|`` then ``w_prod[f] * za_f * zb_f`` for each feature f, then
            ``w_pair[k] * g_k`` for each standardised pair feature k. They sum to ``pair_logits(fa, fb) - bias``;
            positive entries speak for the same texture.
        """
        za, zb = self.standardize(fa), self.standardize(fb)
        diff = (za - zb).abs() * self.weight_diff.to(za.dtype)
        prod = za * zb * self.weight_prod.to(za.dtype)
        named = torch.stack((diff, prod), dim=-1).flatten(-2)  # interleaved: f0|diff|, f0*prod, f1|diff|, ...
        pairs = self.standardize_pairs(self.pair_features(fa, fb)) * self._pair_weights(za)
        return torch.cat((named, pairs), dim=-1)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """P(same texture) of pairs of patches.

        Args:
            a: (N, C, p, p) patches in [0, 1].
            b: (N, C, p, p) patches in [0, 1].

        Returns:
            (N,) probabilities.
        """
        return torch.sigmoid(self.pair_logits(self.features(a), self.features(b)))

    def similarity_map(self, patch: Tensor, image: Tensor, stride: int) -> Tensor:
        """P(same texture as ``patch``) of every window of ``image``.

        Args:
            patch: (C, p, p) in [0, 1].
            image: (C, H, W) in [0, 1], at least p x p.
            stride: step between the windows of ``image``.

        Returns:
            (nh, nw) probabilities; entry (i, j) is for the window at ``(i * stride, j * stride)``.
        """
        p = patch.shape[-1]
        fa = self.features(patch[None])  # (1, F)
        fb = self.features.window_features(image[None], p, stride)[0].permute(1, 2, 0)  # (nh, nw, F)
        return torch.sigmoid(self.pair_logits(fa[0], fb))

    def weight_table(self) -> list[tuple[str, float]]:
        """The weights by name: ``("<feature>|diff|", w)`` and ``("<feature>*prod", w)`` for each feature, in order,
        then ``("pair:<pair feature>", w)`` for each pair feature."""
        rows = []
        for name, wd, wp in zip(self.feature_names, self.weight_diff.tolist(), self.weight_prod.tolist(), strict=True):
            rows += [(f"{name}|diff|", wd), (f"{name}*prod", wp)]
        if self.has_pair_features:
            rows += [(f"pair:{name}", w) for name, w in zip(self.pair_feature_names, self.weight_pair.tolist(),
                                                             strict=True)]
        return rows

    def feature_settings(self) -> dict[str, Any]:
        return {
            "patch_size": self.patch_size, "scales": list(self.features.scales),
            "num_orientations": self.features.num_orientations, "lbp_threshold": self.features.lbp_threshold,
            "layout_grid": self.features.layout_grid, "pair_features": self.has_pair_features,
            "max_shift": self.features.max_shift,
        }


def _is_outer(za: Tensor, zb: Tensor) -> bool:
    """True for the search's pattern (..., T, 1, F) x (..., 1, N, F): every window against every tile."""
    return (za.ndim >= 3 and zb.ndim >= 3 and za.shape[-2] == 1 and zb.shape[-3] == 1
            and za.shape[-3] > 1 and zb.shape[-2] > 1)


def save_texture_classifier(clf: TextureClassifier, path: str | Path) -> Path:
    """Writes ``classifier.safetensors`` and ``classifier.json`` into the folder ``path`` (created).

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().cpu().contiguous()
               for name, t in (*clf.named_parameters(), *clf.named_buffers())
               if name in ("weight_diff", "weight_prod", "bias", "feature_mean", "feature_std", *_PAIR_TENSORS)}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **clf.feature_settings(),
            "feature_names": clf.feature_names, "pair_feature_names": clf.pair_feature_names,
            "bias": float(clf.bias.detach()), "report": clf.report}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_texture_classifier(path: str | Path) -> TextureClassifier:
    """Loads a saved classifier (its folder, or a file inside it), frozen and in eval mode.

    Raises:
        TextureClassifierError: the folder or a file is missing, unreadable, or from another feature set.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    if folder.is_file():
        folder = folder.parent
    meta_file, weights_file = folder / META_FILE, folder / WEIGHTS_FILE
    for file in (meta_file, weights_file):
        if not file.is_file():
            raise TextureClassifierError(f"{file} does not exist; is {path} a folder written by "
                                         "`xswinir texture train`?")
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"'format' is not '{FORMAT}'")
        if meta.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"version {meta.get('version')!r}; this xswinir reads versions {READABLE_VERSIONS}")
        clf = TextureClassifier(int(meta["patch_size"]), tuple(int(s) for s in meta["scales"]),
                                int(meta["num_orientations"]), float(meta["lbp_threshold"]), int(meta["layout_grid"]),
                                pair_features=bool(meta.get("pair_features", False)),
                                max_shift=int(meta.get("max_shift", 2)))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise TextureClassifierError(f"{meta_file} is not a valid texture classifier description ({err})") from err
    if meta.get("feature_names") != clf.feature_names or meta.get("pair_feature_names", []) != clf.pair_feature_names:
        raise TextureClassifierError(f"{meta_file} lists other features than this xswinir computes; retrain it "
                                     "with `xswinir texture train`")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise TextureClassifierError(f"{weights_file} cannot be read ({err})") from err
    expected = {name: t.shape for name, t in clf.state_dict().items()}
    if set(tensors) != set(expected) or any(tensors[n].shape != s for n, s in expected.items()):
        got = {n: tuple(t.shape) for n, t in tensors.items()}
        want = {n: tuple(s) for n, s in expected.items()}
        raise TextureClassifierError(f"{weights_file} holds tensors {got}, expected {want}")
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise TextureClassifierError(f"{weights_file} holds non-finite values")
    clf.load_state_dict(tensors)
    clf.report = meta.get("report") or {}
    clf.requires_grad_(False)
    return clf.eval()


def plot_classifier_weights(clf: TextureClassifier, path_or_axes: Any, top: int | None = None) -> Any:
    """Horizontal bar chart of the weights by name: per feature a |diff| bar and a product bar, per pair feature one.

    Args:
        clf: the classifier.
        path_or_axes: a file to write (PNG, ...) or a matplotlib ``Axes`` to draw into.
        top: only the ``top`` rows (features and pair features) with the largest total absolute weight; None: all.

    Returns:
        The written path, or the Axes drawn into.
    """
    pairs = clf.weight_pair.detach().cpu() if clf.has_pair_features else torch.zeros(0)
    names = [f"pair:{name}" for name in clf.pair_feature_names] + clf.feature_names  # pair features on top
    wd = torch.cat((torch.zeros(len(pairs)), clf.weight_diff.detach().cpu()))
    wp = torch.cat((torch.zeros(len(pairs)), clf.weight_prod.detach().cpu()))
    wg = torch.cat((pairs, torch.zeros(len(clf.feature_names))))
    order = list(range(len(names)))
    if top is not None:
        order = sorted(torch.argsort(wd.abs() + wp.abs() + wg.abs(), descending=True)[:top].tolist())
    y = torch.arange(len(order), dtype=torch.float32).numpy()
    if isinstance(path_or_axes, (str, Path)):
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

        fig = Figure(figsize=(7, 1.0 + 0.24 * len(order)))
        ax = fig.subplots()
    else:
        fig, ax = None, path_or_axes
    ax.barh(y - 0.2, wd[order].numpy(), height=0.4, color="tab:red", label="|a - b| (difference)")
    ax.barh(y + 0.2, wp[order].numpy(), height=0.4, color="tab:blue", label="a * b (product)")
    if len(pairs):
        ax.barh(y, wg[order].numpy(), height=0.6, color="tab:green", label="pair feature (agreement)")
    ax.set_yticks(y, [names[i] for i in order], fontsize=7)
    ax.set_ylim(len(order) - 0.5, -0.5)  # the first feature on top, no empty margin
    ax.axvline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("weight on standardised feature (logit of same texture)")
    ax.set_title(f"texture classifier, p={clf.patch_size}, bias={float(clf.bias.detach()):.2f}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    if fig is None:
        return ax
    path = Path(path_or_axes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
