"""The explorable explanation page: one self-contained HTML file per restored image, and an index for a folder.

The page shows the restored image with a layer over its ``p x p`` patches (texture consistency, the trust
estimate, the measured error). Hovering or clicking a patch (or moving with the arrow keys) shows in a side panel
that patch's chosen windows boxed on the image, their coefficients ``c*`` and classifier scores, the patch's
consistency ``r²``, trust estimate and bound, and for each window the classifier's largest contributions by
feature name (weight x encoded feature): why the two were called the same texture.

The page depends on nothing but :class:`PageData`, a plain contract: whoever restores, searches and estimates
trust fills it (:func:`build_page_data` does it from the texture search's match over every patch;
:func:`page_data` runs that search, the trust model and the measured error for a restored image), and
:func:`render_page` turns it into one HTML file that opens from disk without a server or the network (images as
``data:`` URIs, CSS and JavaScript inline, the data as JSON with ``<`` escaped so that no name can end its
script). :func:`explain_folder` writes one page per image and an ``index.html`` ranking them;
:func:`explain_files` does it for image files and a model (``xswinir explain FOLDER --html-dir DIR``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from xswinir.atomic import atomic_write_text
from xswinir.errors import UserError
from xswinir.explain import Degraded, search_blocks, upsample_input
from xswinir.images import read_image
from xswinir.inference import restore
from xswinir.paths import printable_path
from xswinir.texture.classifier import TextureClassifier
from xswinir.texture.search import TextureMatch, TextureSearch
from xswinir.trust import TrustError, TrustMap, TrustModel, estimate_trust, patch_error

# The trust layer and the measured error share one colour scale, cut at this quantile of their values so that a
# few extreme patches do not wash out the rest.
_ERROR_SCALE_QUANTILE = 0.98
# Patches per feature pass of the builder: (chunk * (1 + K), C, p, p) windows at a time.
_CONTRIBUTION_CHUNK = 1024
# What the layers say when nobody says more; page_data() states the trust model's unit (xswinir.trust's).
_TRUST_LABEL = "expected error"
_ERROR_LABEL = "measured mean absolute error (intensity in [0, 1])"
TRUST_LABEL = "expected mean |Y error| of the patch, Y on 0-255"
ERROR_LABEL = "measured mean |Y error| against the HR image, Y on 0-255"


class PageError(UserError, ValueError):
    """Data that a page cannot be made from, or an output folder that cannot take the pages."""


@dataclass
class Window:
    """One chosen window of a patch.

    Attributes:
        box: (top, left, bottom, right) in pixels of the restored image, bottom/right exclusive.
        coef: its least-squares coefficient ``c*`` in the patch's fit.
        score: the classifier's P(same texture) for the patch's query and this window.
        contributions: the largest terms of the classifier's logit as (weight name, weight x encoded feature),
            largest magnitude first; positive speaks for the same texture.
        others: the sum of the logit terms not in ``contributions``, so that
            ``bias + sum(contributions) + others`` is the logit of ``score``.
    """

    box: tuple[int, int, int, int]
    coef: float
    score: float
    contributions: list[tuple[str, float]] = field(default_factory=list)
    others: float = 0.0


@dataclass
class Patch:
    """One ``p x p`` patch of the restored image.

    Attributes:
        row, col: its place on the patch grid.
        box: (top, left, bottom, right) in pixels of the restored image.
        r2: texture consistency in [0, 1]: the share of the patch's structure its windows explain.
        windows: its chosen windows, best score first; empty when none passed ``min_score``.
        trust: the trust model's estimate of the patch's error (unit in :attr:`PageData.trust_label`), or None.
        bound: the trust model's error bound for the patch, or None.
        error: the measured error against a ground-truth image (unit in :attr:`PageData.error_label`), or None.
    """

    row: int
    col: int
    box: tuple[int, int, int, int]
    r2: float
    windows: list[Window] = field(default_factory=list)
    trust: float | None = None
    bound: float | None = None
    error: float | None = None


@dataclass
class PageData:
    """Everything one explanation page shows; the contract between the explanation code and :func:`render_page`.

    Attributes:
        name: what the page is about (the image's file name); any text, escaped on the page.
        restored: (C, H, W) the restored image in [0, 1], C in {1, 3}.
        patch_size: p, the patch side in pixels.
        grid: (th, tw), whole patches per column and row; ``th * p <= H``, ``tw * p <= W``.
        patches: all ``th * tw`` patches in row-major order.
        lq: (C, h, w) the low-quality input in [0, 1], shown stretched to the restored size; or None.
        rebuilt: (C, H, W) ``X c*``, every patch rebuilt from its windows (gray where it has none); or None.
        description: one line on where the image came from (the degradation, the model).
        trust_label: what the trust estimate measures, with its unit (e.g. "expected mean absolute error").
        bound_share: the share of patches of unseen images the bound holds for (e.g. 0.9), or None.
        error_label: what the measured error is, with its unit.
        logit_bias: the classifier's bias, the part of every logit that no feature explains.
        error_scale: the top of the colour scale the trust and error layers share (e.g. the trust model's display
            maximum, the same for every image); None: the 98th percentile of this page's values.
    """

    name: str
    restored: Tensor
    patch_size: int
    grid: tuple[int, int]
    patches: list[Patch]
    lq: Tensor | None = None
    rebuilt: Tensor | None = None
    description: str = ""
    trust_label: str = _TRUST_LABEL
    bound_share: float | None = None
    error_label: str = _ERROR_LABEL
    logit_bias: float = 0.0
    error_scale: float | None = None

    def __post_init__(self) -> None:
        th, tw = self.grid
        p = self.patch_size
        if self.restored.ndim != 3 or self.restored.shape[0] not in (1, 3):
            raise PageError(f"the restored image must be (C, H, W) with C 1 or 3, got {tuple(self.restored.shape)}")
        H, W = self.restored.shape[-2:]
        if p < 1 or th < 1 or tw < 1 or th * p > H or tw * p > W:
            raise PageError(f"a {th}x{tw} grid of {p} px patches does not fit the {W}x{H} image")
        if len(self.patches) != th * tw:
            raise PageError(f"{len(self.patches)} patches given for a {th}x{tw} grid")
        for i, patch in enumerate(self.patches):
            expected = (patch.row * p, patch.col * p, patch.row * p + p, patch.col * p + p)
            if divmod(i, tw) != (patch.row, patch.col) or tuple(patch.box) != expected:
                raise PageError(f"patch {i} is at ({patch.row}, {patch.col}) with box {patch.box}; expected "
                                f"{divmod(i, tw)} with box {expected} (row-major order)")
            for window in patch.windows:
                top, left, bottom, right = window.box
                if not (0 <= top < bottom <= H and 0 <= left < right <= W):
                    raise PageError(f"window {window.box} of patch ({patch.row}, {patch.col}) is outside the "
                                    f"{W}x{H} image")

    @property
    def has_trust(self) -> bool:
        return any(p.trust is not None for p in self.patches)

    @property
    def has_error(self) -> bool:
        return any(p.error is not None for p in self.patches)

    def mean(self, key: str) -> float | None:
        """Mean over the patches of ``"r2"``, ``"trust"``, ``"bound"`` or ``"error"``; None when none has it."""
        values = [getattr(p, key) for p in self.patches if getattr(p, key) is not None]
        return sum(values) / len(values) if values else None

    def badness(self) -> list[float]:
        """Per patch, higher is worse: the trust estimate where given, else the inconsistency ``1 - r²``."""
        if self.has_trust:
            return [p.trust if p.trust is not None else -math.inf for p in self.patches]
        return [1.0 - p.r2 for p in self.patches]

    def worst(self, count: int) -> list[Patch]:
        """The ``count`` worst patches by :meth:`badness`, worst first."""
        bad = self.badness()
        order = sorted(range(len(bad)), key=lambda i: (-bad[i], i))
        return [self.patches[i] for i in order[:count]]


def build_page_data(
    classifier: TextureClassifier,
    restored: Tensor,
    match: TextureMatch | Sequence[tuple[TextureMatch, Tensor | None]],
    *,
    query: Tensor | None = None,
    lq: Tensor | None = None,
    trust: Tensor | None = None,
    bound: Tensor | None = None,
    error: Tensor | None = None,
    name: str = "",
    description: str = "",
    trust_label: str = _TRUST_LABEL,
    bound_share: float | None = None,
    error_label: str = _ERROR_LABEL,
    error_scale: float | None = None,
    top_features: int = 5,
) -> PageData:
    """A page's data from the texture search's match over every patch of the restored image.

    The search may have run in one piece (region = the image) or in blocks, each in its own region: pass
    ``[(match, region_top_left), ...]`` with each match's (B, 2) region top/left in image pixels; a patch
    searched twice takes the later block's result, as the consistency map does.

    Args:
        classifier: the texture classifier the search used.
        restored: (C, H, W) the restored image in [0, 1], the searched image.
        match: the search's result (region = the image), or a sequence of (match, region top/left or None).
        query: (C, H, W) the tiles the classifier compared with the windows (the input up-sampled to the output
            grid); None: the restored image's own patches.
        lq: (C, h, w) the low-quality input, shown on the page; None: not shown.
        trust, bound, error: (th, tw) per-patch trust estimate, bound and measured error; None: no such layer.
        name, description, trust_label, bound_share, error_label, error_scale: as in :class:`PageData`.
        top_features: how many logit terms to keep per window, by magnitude.

    Returns:
        The :class:`PageData`.

    Raises:
        PageError: the match does not cover every whole patch, or a per-patch map has the wrong shape.
    """
    p = int(classifier.patch_size)
    restored = restored.detach().float().cpu()
    _, H, W = restored.shape
    th, tw = H // p, W // p
    if th == 0 or tw == 0:
        raise PageError(f"the image ({W}x{H}) is smaller than one {p} px patch")
    searches = [(match, None)] if not isinstance(match, Sequence) else list(match)
    for label, values in (("trust", trust), ("bound", bound), ("error", error)):
        if values is not None and tuple(values.shape) != (th, tw):
            raise PageError(f"the {label} map has shape {tuple(values.shape)}, expected the patch grid {(th, tw)}")

    # Place every block's patches on the image's patch grid; later blocks win where blocks overlap.
    K = int(searches[0][0].boxes.shape[-2])
    r2 = torch.full((th, tw), float("nan"))
    boxes = torch.zeros(th, tw, K, 4, dtype=torch.long)
    coefs, scores = torch.zeros(th, tw, K), torch.zeros(th, tw, K)
    valid = torch.zeros(th, tw, K, dtype=torch.bool)
    rebuilt = torch.full_like(restored, 0.5)  # gray where a patch has no window: nothing rebuilt
    for m, top_left in searches:
        B = m.tile_r2.shape[0]
        bth, btw = m.tiles
        offset = torch.zeros(B, 2, dtype=torch.long) if top_left is None else top_left.cpu().long().view(B, 2)
        for i in range(B):  # one block at a time: its patches are a bth x btw rectangle of the grid
            top, left = (m.tile_boxes[i, 0, :2].cpu() + offset[i]).tolist()
            r, c = top // p, left // p
            if top % p or left % p or r + bth > th or c + btw > tw:
                raise PageError(f"the match puts a {bth}x{btw} block of patches at pixel ({top}, {left}), off the "
                                f"image's {th}x{tw} grid of {p} px patches")
            r2[r:r + bth, c:c + btw] = m.tile_r2[i].cpu().view(bth, btw)
            boxes[r:r + bth, c:c + btw] = (m.boxes[i].cpu() + offset[i].repeat(2)).view(bth, btw, K, 4)
            coefs[r:r + bth, c:c + btw] = m.coefs[i].cpu().view(bth, btw, K)
            scores[r:r + bth, c:c + btw] = m.scores[i].cpu().view(bth, btw, K)
            valid[r:r + bth, c:c + btw] = m.valid[i].cpu().view(bth, btw, K)
            used = m.valid[i].cpu().any(-1).view(bth, 1, btw, 1).expand(bth, p, btw, p).reshape(bth * p, btw * p)
            area = (slice(None), slice(top, top + bth * p), slice(left, left + btw * p))
            rebuilt[area] = torch.where(used, m.target[i, :, :bth * p, :btw * p].cpu().float(), 0.5)
    missing = int(r2.isnan().sum())
    if missing:
        raise PageError(f"the match covers {th * tw - missing} of the image's {th * tw} patches; search every patch")

    windows = _explained_windows(classifier, restored, query, boxes, valid, coefs, scores, top_features)
    patches = []
    for r in range(th):
        for c in range(tw):
            patches.append(Patch(
                row=r, col=c, box=(r * p, c * p, r * p + p, c * p + p), r2=float(r2[r, c]), windows=windows[r][c],
                trust=_value(trust, r, c), bound=_value(bound, r, c), error=_value(error, r, c),
            ))
    return PageData(
        name=name, restored=restored, patch_size=p, grid=(th, tw), patches=patches,
        lq=None if lq is None else lq.detach().float().cpu(),
        rebuilt=rebuilt.clamp(0, 1),
        description=description, trust_label=trust_label, bound_share=bound_share, error_label=error_label,
        logit_bias=float(classifier.bias.detach().reshape(-1)[0]), error_scale=error_scale,
    )


def _value(values: Tensor | None, r: int, c: int) -> float | None:
    if values is None:
        return None
    v = float(values[r, c])
    return v if math.isfinite(v) else None


def _crops(image: Tensor, top_left: Tensor, p: int) -> Tensor:
    """(n, C, p, p) crops of a (C, H, W) image at (n, 2) top/left positions."""
    offs = torch.arange(p)
    ys = (top_left[:, 0, None] + offs)[:, :, None]  # (n, p, 1)
    xs = (top_left[:, 1, None] + offs)[:, None, :]  # (n, 1, p)
    return image[:, ys, xs].permute(1, 0, 2, 3)  # (C, n, p, p) -> (n, C, p, p)


@torch.no_grad()
def _explained_windows(
    classifier: TextureClassifier, restored: Tensor, query: Tensor | None, boxes: Tensor, valid: Tensor, coefs: Tensor,
    scores: Tensor, top_features: int,
) -> list[list[list[Window]]]:
    """Per patch (th, tw) its valid windows with their largest logit terms, from the classifier's own features."""
    th, tw, K, _ = boxes.shape
    p = int(classifier.patch_size)
    names = [name for name, _ in classifier.weight_table()]
    source = restored if query is None else query.detach().float().cpu()
    device = classifier.bias.device
    grid = torch.stack(torch.meshgrid(torch.arange(th), torch.arange(tw), indexing="ij"), -1).reshape(-1, 2) * p
    flat_boxes, flat_valid = boxes.reshape(-1, K, 4), valid.reshape(-1, K)
    flat_coefs, flat_scores = coefs.reshape(-1, K), scores.reshape(-1, K)
    per_patch: list[list[Window]] = []
    for start in range(0, th * tw, _CONTRIBUTION_CHUNK):
        tl = grid[start:start + _CONTRIBUTION_CHUNK]
        n = len(tl)
        fa = classifier.features(_crops(source, tl, p).to(device))  # (n, F [+ descriptor]) the queries
        fb = classifier.features(_crops(restored, flat_boxes[start:start + n, :, :2].reshape(-1, 2), p).to(device))
        terms = classifier.pair_contributions(fa[:, None, :], fb.reshape(n, K, -1)).float().cpu()  # (n, K, weights)
        order = terms.abs().argsort(dim=-1, descending=True)[..., :top_features]
        top = terms.gather(-1, order)
        rest = terms.sum(-1) - top.sum(-1)
        for i, flat in enumerate(range(start, start + n)):
            per_patch.append([
                Window(box=tuple(flat_boxes[flat, k].tolist()), coef=float(flat_coefs[flat, k]),
                       score=float(flat_scores[flat, k]),
                       contributions=[(names[j], v) for j, v in zip(order[i, k].tolist(), top[i, k].tolist(),
                                                                    strict=True)],
                       others=float(rest[i, k]))
                for k in range(K) if flat_valid[flat, k]
            ])
    return [per_patch[r * tw:(r + 1) * tw] for r in range(th)]


def _pil(image: Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] -> a PIL image (gray for one channel, RGB for three)."""
    array = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _png_uri(image: Image.Image) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _round(value: float | None, digits: int = 5) -> float | None:
    """``digits`` significant digits (smaller pages); None for missing and non-finite values (JSON has no NaN)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def page_json(data: PageData) -> dict[str, Any]:
    """The page's data as plain JSON values: what the page's script reads (and what tests check).

    Feature names are listed once in ``features``; each window's ``top`` holds ``[index, contribution]`` pairs.
    """
    names: dict[str, int] = {}
    patches = []
    for patch in data.patches:
        windows = []
        for w in patch.windows:
            top = [[names.setdefault(name, len(names)), _round(value)] for name, value in w.contributions]
            windows.append({"box": list(w.box), "coef": _round(w.coef), "score": _round(w.score), "top": top,
                            "others": _round(w.others)})
        patches.append({"row": patch.row, "col": patch.col, "box": list(patch.box), "r2": _round(patch.r2),
                        "trust": _round(patch.trust), "bound": _round(patch.bound), "error": _round(patch.error),
                        "windows": windows})
    scale = data.error_scale
    if scale is None:
        errors = [v for p in data.patches for v in (p.trust, p.error) if v is not None and math.isfinite(v)]
        scale = float(torch.tensor(errors).quantile(_ERROR_SCALE_QUANTILE)) if errors else 1.0
    H, W = data.restored.shape[-2:]
    return {
        "name": data.name, "description": data.description, "width": int(W), "height": int(H),
        "patch": data.patch_size, "grid": list(data.grid), "patches": patches, "features": list(names),
        "bias": _round(data.logit_bias), "trustLabel": data.trust_label, "boundShare": data.bound_share,
        "errorLabel": data.error_label, "errorScale": _round(scale if scale > 0 else 1.0),
        "hasTrust": data.has_trust, "hasError": data.has_error, "hasInput": data.lq is not None,
        "hasRebuilt": data.rebuilt is not None, "meanR2": _round(data.mean("r2")),
        "meanTrust": _round(data.mean("trust")), "meanError": _round(data.mean("error")),
    }


def _writable(text: str) -> str:
    """``text`` with lone surrogates (undecodable bytes of a file name) as ``\\udcNN``: UTF-8 can write it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def script_json(value: Any) -> str:
    """JSON safe inside an HTML ``<script>`` element: ASCII only, and no ``<``, ``>`` or ``&`` (so no
    ``</script>`` or ``<!--``), all as ``\\u`` escapes that JSON.parse reads back unchanged; a lone surrogate (an
    undecodable file name byte) stays a valid escape too."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    for char in "<>&":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def render_page(data: PageData) -> str:
    """One self-contained HTML page for ``data``: opens from disk, offline, no server.

    Returns:
        The page's HTML text (UTF-8).
    """
    images = [("restored", "restored", data.restored)]
    if data.lq is not None:
        images.append(("input", "input (low quality)", data.lq))
    if data.rebuilt is not None:
        images.append(("rebuilt", "X c* (rebuilt from windows)", data.rebuilt))
    img_tags = "\n".join(
        f'<img class="base" id="img-{key}" data-key="{key}" alt="{html.escape(label)}" src="{_png_uri(_pil(image))}"'
        f'{"" if key == "restored" else " hidden"}>' for key, label, image in images)
    base_choices = "\n".join(
        f'<label><input type="radio" name="base" value="{key}"{" checked" if key == "restored" else ""}> '
        f"{html.escape(label)}</label>" for key, label, _ in images)
    layers = [("none", "none"), ("consistency", "consistency r²")]
    if data.has_trust:
        layers.append(("trust", "trust estimate"))
    if data.has_error:
        layers.append(("error", "measured error"))
    default_layer = "trust" if data.has_trust else "consistency"
    layer_choices = "\n".join(
        f'<label><input type="radio" name="layer" value="{key}"{" checked" if key == default_layer else ""}> '
        f"{html.escape(label)}</label>" for key, label in layers)
    title = html.escape(f"{_writable(data.name)} – XSwinIR explanation" if data.name else "XSwinIR explanation")
    H, W = data.restored.shape[-2:]
    values = {"title": title, "css": _CSS, "js": _JS, "data": script_json(page_json(data)), "images": img_tags,
              "base_choices": base_choices, "layer_choices": layer_choices, "width": str(W), "height": str(H)}
    # One pass: text put in is never searched again, so a name holding "{js}" stays a name.
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], _PAGE)



def write_page(data: PageData, path: str | Path) -> Path:
    """Writes :func:`render_page` of ``data`` to ``path`` (complete or absent); returns the path."""
    return atomic_write_text(path, render_page(data))


def page_file_name(number: int, name: str) -> str:
    """``<number>-<name's stem, safe characters only>.html``: distinct per number, whatever the name holds."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._")[:60] or "image"
    return f"{number:03d}-{stem}.html"


@dataclass
class IndexEntry:
    """One image of a folder's index.

    Attributes:
        name: the image's name as given (escaped on the page).
        page: its page's file name inside the output folder.
        score: the ranking value: the mean trust estimate, or the mean inconsistency ``1 - r²``.
        mean_r2: the mean consistency r².
        mean_trust: the mean trust estimate, or None.
        worst: its worst patches as (patch, thumbnail ``data:`` URI), worst first.
        preview: the whole restored image, small, as a ``data:`` URI.
    """

    name: str
    page: str
    score: float
    mean_r2: float
    mean_trust: float | None
    worst: list[tuple[Patch, str]]
    preview: str = ""


@dataclass
class FolderPages:
    """What :func:`explain_folder` wrote.

    Attributes:
        index: the index page.
        entries: one per written page, in the index's order (worst first).
        ranked_by: ``"trust"`` or ``"inconsistency"``: what the index ranks by.
        skipped: one line per image that could not be explained, with the reason.
    """

    index: Path
    entries: list[IndexEntry]
    ranked_by: str
    skipped: list[str]


def _preview(data: PageData, size: int = 160) -> str:
    """The restored image shrunk to fit ``size`` x ``size`` (never enlarged)."""
    image = _pil(data.restored)
    image.thumbnail((size, size))
    return _png_uri(image)


def _thumbnail(data: PageData, patch: Patch, size: int = 96) -> str:
    """The patch with half a patch of context on each side, up-scaled to ``size`` px, the patch boxed."""
    p = data.patch_size
    _, H, W = data.restored.shape
    side_h, side_w = min(2 * p, H), min(2 * p, W)
    top = min(max(patch.box[0] - p // 2, 0), H - side_h)
    left = min(max(patch.box[1] - p // 2, 0), W - side_w)
    image = _pil(data.restored[:, top:top + side_h, left:left + side_w]).convert("RGB")  # a white box
    zoom = size / max(side_h, side_w)
    image = image.resize((round(side_w * zoom), round(side_h * zoom)), Image.NEAREST)
    box = [(patch.box[1] - left) * zoom, (patch.box[0] - top) * zoom, (patch.box[3] - left) * zoom - 1,
           (patch.box[2] - top) * zoom - 1]
    draw = ImageDraw.Draw(image)
    draw.rectangle(box, outline=(0, 0, 0), width=3)
    draw.rectangle(box, outline=(255, 255, 255), width=1)
    return _png_uri(image)


def index_entry(data: PageData, page: str, worst: int = 4) -> IndexEntry:
    """The index's row for one page: its means and its ``worst`` patches as thumbnails."""
    mean_trust = data.mean("trust")
    mean_r2 = data.mean("r2") or 0.0
    score = mean_trust if mean_trust is not None else 1.0 - mean_r2
    return IndexEntry(data.name, page, score, mean_r2, mean_trust,
                      [(patch, _thumbnail(data, patch)) for patch in data.worst(worst)], _preview(data))


def rank_entries(entries: Sequence[IndexEntry]) -> tuple[list[IndexEntry], str]:
    """Worst image first: by mean trust estimate when every image has one, else by mean inconsistency ``1 - r²``.

    Returns:
        The entries in that order and ``"trust"`` or ``"inconsistency"``.
    """
    by_trust = bool(entries) and all(e.mean_trust is not None for e in entries)
    key = (lambda e: e.mean_trust) if by_trust else (lambda e: 1.0 - e.mean_r2)
    ordered = sorted(entries, key=lambda e: (-key(e), e.page))
    return ordered, "trust" if by_trust else "inconsistency"


def render_index(entries: Sequence[IndexEntry], ranked_by: str, title: str = "XSwinIR explanations",
                 skipped: Sequence[str] = ()) -> str:
    """The folder's index page: the images ranked worst first, their worst patches linking into their pages."""
    esc = html.escape
    if ranked_by == "trust":
        how = ("Ranked by the mean trust estimate (the expected error the trust model predicts per patch, without "
               "the ground truth): the images to check first are on top.")
        head = "mean trust estimate"
    else:
        how = ("No trust model was given: ranked by the mean inconsistency 1 − r² (the share of each patch's "
               "structure that no window of the same texture explains). Inconsistency is not an error "
               "estimate: flat patches count as inconsistent.")
        head = "mean 1 − r²"
    rows = []
    for rank, e in enumerate(entries, 1):
        href = urllib.parse.quote(e.page)
        thumbs = "".join(
            f'<a href="{esc(href)}#patch={patch.row},{patch.col}" title="patch row {patch.row}, column '
            f'{patch.col}"><img src="{uri}" alt="patch {patch.row},{patch.col}" width="96" height="96">'
            f"<span>{_patch_value(patch, ranked_by)}</span></a>" for patch, uri in e.worst)
        rows.append(f'<tr><td>{rank}</td><td class="name"><a href="{esc(href)}"><img src="{e.preview}" alt="">'
                    f"<br>{esc(_writable(e.name))}</a></td><td>{e.score:.4g}</td><td>{e.mean_r2:.3f}</td>"
                    f'<td><div class="thumbs">{thumbs}</div></td></tr>')
    notes = "".join(f"<li>{esc(_writable(line))}</li>" for line in skipped)
    skipped_html = f"<h2>Not explained</h2><ul>{notes}</ul>" if notes else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{_INDEX_CSS}</style>
</head><body>
<h1>{esc(title)}</h1>
<p>{len(entries)} image{"" if len(entries) == 1 else "s"}. {how} Each thumbnail is one of the image's worst patches
(boxed, with half a patch around it); follow it to that patch on the image's page.</p>
<table>
<thead><tr><th>#</th><th>image</th><th>{head}</th><th>mean r²</th><th>worst patches</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
{skipped_html}
</body></html>
"""


def _patch_value(patch: Patch, ranked_by: str) -> str:
    if ranked_by == "trust" and patch.trust is not None:
        return f"{patch.trust:.3g}"
    return f"r² {patch.r2:.2f}"


def explain_folder(
    images: Sequence[str | Path],
    out_dir: str | Path,
    make_page: Callable[[Path], PageData],
    *,
    worst: int = 4,
    stream: TextIO | None = None,
) -> FolderPages:
    """Writes one page per image and an ``index.html`` ranking them into ``out_dir``.

    Progress goes to ``stream`` (default stderr): a tqdm bar on a terminal, one plain line per image elsewhere
    (a log file, CI), where a redrawn bar would pile up.

    Args:
        images: the image files, in the order of their page numbers.
        out_dir: the output folder (created).
        make_page: the per-image work (restore, search, trust): an image file -> its :class:`PageData`. A
            :class:`~xswinir.errors.UserError` it raises skips the image with its message.
        worst: thumbnails per image in the index.
        stream: where progress goes.

    Returns:
        The :class:`FolderPages`.

    Raises:
        PageError: no image could be explained.
    """
    out = Path(out_dir)
    stream = stream or sys.stderr
    entries: list[IndexEntry] = []
    skipped: list[str] = []
    bar = None
    if stream.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(images), desc="explain", unit="image", file=stream, dynamic_ncols=True)
    for number, image in enumerate(images, 1):
        path = Path(image)
        try:
            data = make_page(path)
        except UserError as err:
            skipped.append(f"{printable_path(path)}: {err}")
            line = f"explain {number}/{len(images)}: {printable_path(path)} skipped ({err})"
        else:
            page = page_file_name(number, path.name)
            write_page(data, out / page)
            entries.append(index_entry(data, page, worst))
            line = f"explain {number}/{len(images)}: {printable_path(path)} -> {printable_path(out / page)}"
        if bar is not None:
            bar.update(1)
        else:
            print(line, file=stream, flush=True)
    if bar is not None:
        bar.close()
    if not entries:
        raise PageError(f"none of the {len(images)} images could be explained: " + "; ".join(skipped))
    ordered, ranked_by = rank_entries(entries)
    index = atomic_write_text(out / "index.html", render_index(ordered, ranked_by, skipped=skipped))
    return FolderPages(index, ordered, ranked_by, skipped)



def page_data(
    search: TextureSearch,
    lq: Tensor,
    sr: Tensor,
    *,
    hr: Tensor | None = None,
    trust: TrustModel | None = None,
    trust_search: TextureSearch | None = None,
    trust_map: TrustMap | None = None,
    model: nn.Module | None = None,
    name: str = "",
    description: str = "",
    tile: int | None = None,
    device: str | torch.device = "cpu",
) -> PageData:
    """The page of one restored image: the search over every patch, the trust map, the error when HR is given.

    The search runs on the output with the input up-sampled to the output grid as the query, block by block as
    the consistency map runs it (:func:`xswinir.explain.search_blocks`), so the page's r² is the map's.

    Args:
        search: the texture search.
        lq: (C, h, w) the input in [0, 1].
        sr: (C, H, W) the model's output for it in [0, 1], a whole multiple of the input's size.
        hr: (C, H, W) the HR image; None: no measured error layer.
        trust: a fitted trust model; None: no trust layer.
        trust_search: its texture search (:meth:`TrustModel.load_search`); None: loaded here.
        trust_map: the trust map of this ``(lq, sr)`` already made with ``trust`` (e.g. :attr:`Explanation.trust
            <xswinir.explain.Explanation>`): used as it is, not estimated again (the self-ensemble's passes are
            most of its cost).
        model: the restoration model, needed when the trust model uses the self-ensemble spread.
        name, description: as in :class:`PageData`.
        tile: LR tile size for the self-ensemble's passes.
        device: where the search (and the ensemble) runs.

    Raises:
        ExplainError: the output is smaller than a patch, or not a whole multiple of the input.
        TrustError: the trust model was fitted at another scale.
    """
    lq, sr = lq.float().cpu(), sr.float().cpu()
    query = upsample_input(lq, sr.shape[-1] // lq.shape[-1])
    searches = list(search_blocks(search, sr, query, device=device))  # checks the sizes
    p = search.patch_size
    expected = bound = error = None
    labels: dict[str, Any] = {}
    if trust is not None:
        if trust_map is None:
            trust_map = estimate_trust(trust, trust_search or trust.load_search(), lq, sr, model=model, tile=tile,
                                       device=device)
        elif tuple(trust_map.output_size) != tuple(sr.shape[-2:]) or trust_map.patch_size != p:
            raise ValueError(f"the trust map given is of a {trust_map.output_size} output in {trust_map.patch_size} "
                             f"px patches, not of this {tuple(sr.shape[-2:])} output in {p} px patches")
        expected, bound = trust_map.expected, trust_map.bound
        labels = {"trust_label": TRUST_LABEL, "bound_share": trust.coverage, "error_scale": trust.display_max}
    if hr is not None:
        error = patch_error(sr, hr, p)
        labels["error_label"] = ERROR_LABEL
    return build_page_data(search.classifier, sr, searches, query=query, lq=lq, trust=expected, bound=bound,
                           error=error, name=name, description=description, **labels)


def explain_files(
    model: nn.Module,
    search: TextureSearch,
    files: Sequence[str | Path],
    out_dir: str | Path,
    *,
    degrade: Callable[[Tensor], Degraded] | None = None,
    trust: TrustModel | None = None,
    channels: int = 3,
    tile: int | None = None,
    device: str | torch.device = "cpu",
    stream: TextIO | None = None,
) -> FolderPages:
    """Restores each image file, writes its page and the index (:func:`explain_folder`).

    Args:
        model: the restoration model.
        search: the texture search.
        files: the images: real low-quality inputs, or HR images when ``degrade`` is given.
        out_dir: the output folder.
        degrade: makes the input of an HR image (e.g. :func:`xswinir.explain.degrade_hr` with the run's
            degradation); the page then also shows the measured error. None: the files are the inputs.
        trust: a fitted trust model for the trust layer and the ranking; None: ranked by inconsistency.
        channels: the model's input channels.
        tile: LR tile size for the model on large images.
        device: where the model and the search run.
        stream: where progress goes (default stderr).

    Raises:
        TrustError: the trust model does not fit the model's scale or the classifier's patches.
        PageError: no image could be explained.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    trust_search = None
    if trust is not None:
        scale = int(getattr(model, "upscale", trust.scale) or 1)
        if (trust.scale, trust.patch_size) != (scale, search.patch_size):
            raise TrustError(f"the trust model was fitted for x{trust.scale} outputs and {trust.patch_size} px "
                             f"patches; the model is x{scale} and the classifier's patches are {search.patch_size} px")
        trust_search = trust.load_search()

    def make_page(path: Path) -> PageData:
        image = read_image(path, channels=channels)
        hr, lq, description = None, image, None
        if degrade is not None:
            hr, lq, description = degrade(image)
        sr = restore(model, lq[None].to(device), tile=tile)[0].clamp(0, 1).float().cpu()
        if description is None:
            description = (f"given low-quality input, {lq.shape[-1]}x{lq.shape[-2]}, restored to "
                           f"{sr.shape[-1]}x{sr.shape[-2]} (no HR image)")
        return page_data(search, lq, sr, hr=hr, trust=trust, trust_search=trust_search, model=model,
                         name=printable_path(path.name), description=description, tile=tile, device=device)

    return explain_folder([Path(f) for f in files], out_dir, make_page, stream=stream)

_INDEX_CSS = """
body{margin:18px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;
background:#f6f7f9}
h1{font-size:20px}
p{max-width:70em}
table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #d9dde3;padding:6px 10px;text-align:left;vertical-align:middle}
td{font-variant-numeric:tabular-nums}
td.name{overflow-wrap:anywhere;max-width:24em}
div.thumbs{display:flex;gap:8px;flex-wrap:wrap}
td.name img{max-width:160px;border:1px solid #d9dde3}
div.thumbs a{display:flex;flex-direction:column;align-items:center;font-size:11px;color:#5b6472;
text-decoration:none}
div.thumbs img{image-rendering:pixelated;border:1px solid #d9dde3}
a:focus-visible{outline:2px solid #2458d6;outline-offset:2px}
"""

_CSS = """
:root{--fg:#1d2430;--muted:#5b6472;--line:#d9dde3;--bg:#f6f7f9;--card:#fff;--accent:#2458d6;--pos:#1a8a4a;
--neg:#c2392b}
*{box-sizing:border-box}
figure{margin:0}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg)}
header{padding:10px 18px;background:var(--card);border-bottom:1px solid var(--line)}
h1{font-size:18px;margin:0 0 2px;overflow-wrap:anywhere}
h2{font-size:15px;margin:0 0 6px}
h3{font-size:13px;margin:10px 0 4px}
.muted{color:var(--muted)}
.summary{display:flex;flex-wrap:wrap;gap:4px 18px;margin-top:4px}
.summary b{font-variant-numeric:tabular-nums}
main{display:grid;grid-template-columns:minmax(0,1fr) minmax(340px,430px);gap:14px;padding:14px 18px}
@media (max-width:900px){main{grid-template-columns:1fr}}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.toolbar{display:flex;flex-wrap:wrap;gap:6px 18px;align-items:center;margin-bottom:8px}
fieldset{border:0;margin:0;padding:0;display:flex;flex-wrap:wrap;gap:2px 10px;align-items:center}
legend{font-weight:600;padding:0;margin-right:6px;float:left}
label{cursor:pointer;white-space:nowrap}
#stage{position:relative;margin:0 auto;outline:none;cursor:crosshair;background:#222;line-height:0}
#stage:focus-visible{box-shadow:0 0 0 3px var(--accent)}
#stage img,#stage canvas,#stage svg{position:absolute;left:0;top:0;width:100%;height:100%}
#stage.pixelated img,#heat{image-rendering:pixelated}
#heat{width:auto;height:auto}
#boxes rect{fill:none;vector-effect:non-scaling-stroke}
#boxes text{font-family:system-ui,sans-serif;font-weight:bold;paint-order:stroke;stroke:#000}
.colorbar{display:flex;align-items:center;gap:8px;margin-top:8px;flex-wrap:wrap}
.colorbar .bar{width:200px;height:12px;border:1px solid var(--line);border-radius:2px}
#layer-note{flex-basis:100%}
#panel{position:sticky;top:10px;max-height:calc(100vh - 20px);overflow:auto}
dl.stats{display:grid;grid-template-columns:auto 1fr;gap:2px 12px;margin:6px 0}
dl.stats dt{color:var(--muted)}
dl.stats dd{margin:0;font-variant-numeric:tabular-nums}
.thumbs{display:flex;gap:10px;flex-wrap:wrap}
.thumbs figure{margin:0;text-align:center;font-size:11px;color:var(--muted)}
canvas.thumb{width:72px;height:72px;image-rendering:pixelated;border:1px solid var(--line);display:block}
.window{border-top:1px solid var(--line);padding-top:8px;margin-top:8px;display:grid;
grid-template-columns:76px 1fr;gap:4px 10px}
.window .head{font-weight:600}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}
.contrib{display:grid;grid-template-columns:minmax(0,1fr) 90px 52px;gap:1px 6px;align-items:center;font-size:12px;
grid-column:1/-1}
.contrib .name{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.contrib .track{position:relative;height:10px;background:#eef0f3}
.contrib .track span{position:absolute;top:0;height:10px}
.contrib .track i{position:absolute;left:50%;top:-2px;height:14px;border-left:1px solid #999}
.contrib .val{text-align:right;font-variant-numeric:tabular-nums}
.logit{grid-column:1/-1;font-size:12px;color:var(--muted)}
#worst{display:flex;flex-wrap:wrap;gap:4px}
#worst button{font:inherit;font-size:12px;padding:2px 6px;border:1px solid var(--line);border-radius:4px;
background:var(--card);cursor:pointer}
#worst button:focus-visible,input:focus-visible{outline:2px solid var(--accent);outline-offset:1px}
details{margin-top:10px}
summary{cursor:pointer;font-weight:600}
"""

_JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("page-data").textContent);
const W = D.width, H = D.height, P = D.patch, TH = D.grid[0], TW = D.grid[1];
const BOX_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];
const MAPS = {
  viridis: ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"],
  inferno: ["#000004", "#210c4a", "#57106e", "#8a226a", "#bc3754", "#e45a31", "#f98e09", "#f9cb35", "#fcffa4"],
};
const LAYERS = {
  consistency: {key: "r2", map: "viridis", lo: 0, hi: 1,
    note: "Consistency r²: the share of each patch's structure that windows elsewhere in the image, with the " +
          "texture of the input at that place, explain (1: fully). It is no error estimate: flat patches score 0."},
  trust: {key: "trust", map: "inferno", lo: 0, hi: D.errorScale,
    note: "Trust estimate: " + D.trustLabel + " per patch, predicted without the ground truth. Bright: " +
          "probably wrong."},
  error: {key: "error", map: "inferno", lo: 0, hi: D.errorScale,
    note: "Measured error: " + D.errorLabel + " against the ground truth, on the trust layer's colour scale."},
};
const $ = (id) => document.getElementById(id);
const stage = $("stage"), heat = $("heat"), svg = $("boxes"), panel = $("panel-body");
const SVG_NS = "http://www.w3.org/2000/svg";
const state = {pinned: 0, shown: 0, layer: "none", base: "restored"};

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function fmt(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }
function sig(v) { return v === null || v === undefined ? "–" : String(Number(Number(v).toPrecision(3))); }
function signed(v, digits) { return (v >= 0 ? "+" : "−") + Math.abs(v).toFixed(digits); }
function hexRgb(h) { return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)); }
function colour(map, t) {
  const stops = MAPS[map], x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2);
  const a = hexRgb(stops[i]), b = hexRgb(stops[i + 1]), f = x - i;
  return a.map((v, j) => Math.round(v + (b[j] - v) * f));
}
function gradient(map) { return "linear-gradient(to right," + MAPS[map].join(",") + ")"; }

function drawHeat() {
  const layer = LAYERS[state.layer];
  heat.hidden = !layer;
  $("colorbar").hidden = !layer;
  if (!layer) { $("layer-note").textContent = ""; return; }
  heat.width = TW; heat.height = TH;
  heat.style.width = (TW * P / W * 100) + "%";
  heat.style.height = (TH * P / H * 100) + "%";
  heat.style.opacity = $("opacity").value / 100;
  const ctx = heat.getContext("2d"), img = ctx.createImageData(TW, TH);
  D.patches.forEach((p, i) => {
    const v = p[layer.key];
    if (v === null) return;  // transparent: no value for this patch
    const [r, g, b] = colour(layer.map, (v - layer.lo) / ((layer.hi - layer.lo) || 1));
    img.data.set([r, g, b, 255], i * 4);
  });
  ctx.putImageData(img, 0, 0);
  $("cb-bar").style.background = gradient(layer.map);
  $("cb-lo").textContent = "0";
  $("cb-hi").textContent = layer.key === "r2" ? "1" : "≥ " + sig(layer.hi);
  $("layer-note").textContent = layer.note;
}

function rect(box, colour, width, dash) {
  const r = document.createElementNS(SVG_NS, "rect");
  r.setAttribute("x", box[1]); r.setAttribute("y", box[0]);
  r.setAttribute("width", box[3] - box[1]); r.setAttribute("height", box[2] - box[0]);
  r.setAttribute("stroke", colour); r.setAttribute("stroke-width", width);
  if (dash) r.setAttribute("stroke-dasharray", dash);
  svg.appendChild(r);
}
function label(box, text, colour) {
  const t = document.createElementNS(SVG_NS, "text");
  t.setAttribute("x", box[1] + 1); t.setAttribute("y", box[2] - 2);
  t.setAttribute("fill", colour);
  const unit = W / stage.clientWidth;  // image pixels per screen pixel: labels keep their screen size
  t.setAttribute("font-size", 13 * unit);
  t.setAttribute("stroke-width", 3 * unit);
  t.textContent = text;
  svg.appendChild(t);
}
function drawBoxes() {
  svg.replaceChildren();
  const p = D.patches[state.shown];
  p.windows.forEach((w, k) => { rect(w.box, BOX_COLORS[k % 8], 2); label(w.box, String(k + 1), BOX_COLORS[k % 8]); });
  rect(p.box, "#000", 4);
  rect(p.box, "#fff", 2);
  if (state.pinned !== state.shown) rect(D.patches[state.pinned].box, "#fff", 1.5, "4 3");
}

function thumb(imageKey, box, title, caption = true) {
  const fig = el("figure"), canvas = el("canvas", {class: "thumb", width: 72, height: 72, role: "img",
                                                  "aria-label": title});
  const img = $("img-" + imageKey);
  const sx = img.naturalWidth / W, sy = img.naturalHeight / H;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  const draw = () => ctx.drawImage(img, box[1] * sx, box[0] * sy, (box[3] - box[1]) * sx, (box[2] - box[0]) * sy,
                                   0, 0, 72, 72);
  if (img.complete) draw(); else img.addEventListener("load", draw, {once: true});
  fig.append(canvas);
  if (caption) fig.append(el("figcaption", {}, title));
  return fig;
}

function describe(name) {  // the weight_table's names: "<feature>|diff|", "<feature>*prod", "pair:<agreement>"
  if (name.endsWith("|diff|")) return "how much the patch and the window differ in " + name.slice(0, -6);
  if (name.endsWith("*prod")) return "whether the patch and the window are both high (or both low) in " +
                                     name.slice(0, -5);
  if (name.startsWith("pair:")) return "how the patch and the window agree in " + name.slice(5);
  return name;
}
function contributionRows(w) {
  const box = el("div", {class: "contrib"});
  const biggest = Math.max(1e-9, ...w.top.map((t) => Math.abs(t[1])));
  for (const [index, value] of w.top) {
    const name = D.features[index];
    const track = el("div", {class: "track"}), bar = el("span");
    const half = Math.abs(value) / biggest * 50;
    bar.style.left = (value >= 0 ? 50 : 50 - half) + "%";
    bar.style.width = half + "%";
    bar.style.background = value >= 0 ? "var(--pos)" : "var(--neg)";
    track.append(bar, el("i"));
    box.append(el("span", {class: "name", title: describe(name)}, name), track,
               el("span", {class: "val"}, signed(value, 2)));
  }
  return box;
}

function showPanel() {
  const i = state.shown, p = D.patches[i];
  panel.replaceChildren();
  const pinned = i === state.pinned;
  panel.append(el("h2", {}, "Patch row " + p.row + ", column " + p.col + (pinned ? "" : " (hover)")));
  panel.append(el("div", {class: "muted"}, "pixels " + p.box[0] + "–" + p.box[2] + " down, " + p.box[1] + "–" +
                  p.box[3] + " across; " + p.windows.length + " window" + (p.windows.length === 1 ? "" : "s")));
  const dl = el("dl", {class: "stats"});
  const add = (k, v) => { dl.append(el("dt", {}, k), el("dd", {}, v)); };
  add("consistency r²", fmt(p.r2, 3));
  if (D.hasTrust) {
    add("trust estimate", sig(p.trust) + " (" + D.trustLabel + ")");
    if (p.bound !== null) add("error bound", "≤ " + sig(p.bound) + (D.boundShare ? " for " +
        Math.round(D.boundShare * 100) + " % of patches" : ""));
  }
  if (D.hasError) add("measured error", sig(p.error) + " (" + D.errorLabel + ")");
  panel.append(dl);
  const thumbs = el("div", {class: "thumbs"});
  thumbs.append(thumb("restored", p.box, "restored"));
  if (D.hasInput) thumbs.append(thumb("input", p.box, "input"));
  if (D.hasRebuilt) thumbs.append(thumb("rebuilt", p.box, "X c*"));
  panel.append(thumbs);
  panel.append(el("h3", {}, "Windows of the same texture"));
  if (!p.windows.length) {
    panel.append(el("p", {class: "muted"}, "No window scored above min_score: the patch is fitted by its mean " +
                    "only, so its consistency r² is 0."));
  }
  p.windows.forEach((w, k) => {
    const box = el("div", {class: "window"});
    box.append(thumb("restored", w.box, "window " + (k + 1), false));
    const head = el("div");
    const title = el("div", {class: "head"});
    const sw = el("span", {class: "swatch"});
    sw.style.background = BOX_COLORS[k % 8];
    title.append(sw, document.createTextNode("window " + (k + 1) + ":  c* " + signed(w.coef, 3) + ",  score " +
                                             fmt(w.score, 3)));
    head.append(title, el("div", {class: "muted"}, "at " + w.box[0] + ", " + w.box[1] + " (top, left)"));
    head.append(el("div", {class: "muted"}, "why the same texture (weight × feature):"));
    box.append(head, contributionRows(w));
    const logit = D.bias + w.top.reduce((s, t) => s + t[1], 0) + w.others;
    box.append(el("div", {class: "logit"}, "logit " + signed(logit, 2) + " = bias " + signed(D.bias, 2) +
                  " + shown " + signed(logit - D.bias - w.others, 2) + " + other features " + signed(w.others, 2)));
    panel.append(box);
  });
}

function show(i) { state.shown = i; drawBoxes(); showPanel(); }
function pin(i) {
  state.pinned = i;
  show(i);
  history.replaceState(null, "", "#patch=" + D.patches[i].row + "," + D.patches[i].col);
}
function patchAt(event) {
  const r = stage.getBoundingClientRect();
  const x = (event.clientX - r.left) / r.width * W, y = (event.clientY - r.top) / r.height * H;
  const row = Math.floor(y / P), col = Math.floor(x / P);
  return row >= 0 && row < TH && col >= 0 && col < TW ? row * TW + col : -1;
}
stage.addEventListener("mousemove", (e) => { const i = patchAt(e); if (i >= 0 && i !== state.shown) show(i); });
stage.addEventListener("mouseleave", () => show(state.pinned));
stage.addEventListener("click", (e) => { const i = patchAt(e); if (i >= 0) pin(i); stage.focus(); });
stage.addEventListener("keydown", (e) => {
  const moves = {ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0]};
  if (!(e.key in moves)) return;
  e.preventDefault();
  const p = D.patches[state.pinned], [dr, dc] = moves[e.key];
  const row = Math.min(Math.max(p.row + dr, 0), TH - 1), col = Math.min(Math.max(p.col + dc, 0), TW - 1);
  pin(row * TW + col);
});
for (const input of document.querySelectorAll('input[name="layer"]')) {
  input.addEventListener("change", () => { state.layer = input.value; drawHeat(); });
}
for (const input of document.querySelectorAll('input[name="base"]')) {
  input.addEventListener("change", () => {
    state.base = input.value;
    for (const img of document.querySelectorAll("img.base")) img.hidden = img.dataset.key !== state.base;
  });
}
$("opacity").addEventListener("input", () => { heat.style.opacity = $("opacity").value / 100; });

function fit() {
  const avail = $("stage-room").clientWidth;
  const room = Math.max(240, window.innerHeight - $("stage-room").getBoundingClientRect().top - 130);
  const s = Math.min(avail / W, room / H);
  stage.style.width = Math.floor(W * s) + "px";
  stage.style.height = Math.floor(H * s) + "px";
  stage.classList.toggle("pixelated", s >= 1.5);
  drawBoxes();
}
window.addEventListener("resize", fit);

function summary() {
  const parts = [["patches", TH * TW + " of " + P + " px"], ["mean consistency r²", fmt(D.meanR2, 3)]];
  if (D.hasTrust) parts.push(["mean trust estimate", sig(D.meanTrust)]);
  if (D.hasError) parts.push(["mean measured error", sig(D.meanError)]);
  for (const [k, v] of parts) {
    const span = el("span", {}, k + " ");
    span.append(el("b", {}, v));
    $("summary").append(span);
  }
  $("title").textContent = D.name || "XSwinIR explanation";
  $("description").textContent = D.description;
}
function worstList() {
  const bad = D.patches.map((p, i) => [D.hasTrust ? (p.trust ?? -Infinity) : 1 - p.r2, i]);
  bad.sort((a, b) => b[0] - a[0] || a[1] - b[1]);
  $("worst-note").textContent = D.hasTrust ? "highest trust estimate (expected error) first"
                                           : "least consistent first (no trust model was given)";
  for (const [, i] of bad.slice(0, 8)) {
    const p = D.patches[i];
    const button = el("button", {type: "button"}, p.row + "," + p.col + ": " +
                      (D.hasTrust ? sig(p.trust) : "r² " + fmt(p.r2, 2)));
    button.addEventListener("click", () => { pin(i); stage.focus(); });
    $("worst").append(button);
  }
  return bad[0][1];
}

summary();
const first = worstList();
const hash = /^#patch=(\d+),(\d+)$/.exec(location.hash);
state.layer = document.querySelector('input[name="layer"]:checked').value;
fit();
drawHeat();
pin(hash && +hash[1] < TH && +hash[2] < TW ? +hash[1] * TW + +hash[2] : first);
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head><body>
<header>
<h1 id="title"></h1>
<div id="description" class="muted"></div>
<div id="summary" class="summary"></div>
</header>
<main>
<section class="card" aria-label="restored image">
<div class="toolbar">
<fieldset><legend>Layer</legend>
{layer_choices}
</fieldset>
<fieldset><legend>Image</legend>
{base_choices}
</fieldset>
<label>opacity <input type="range" id="opacity" min="0" max="100" value="45" aria-label="layer opacity"></label>
</div>
<div id="stage-room">
<div id="stage" tabindex="0" role="application"
 aria-label="Restored image. Click a patch or use the arrow keys to move between patches; the panel explains it.">
{images}
<canvas id="heat" hidden></canvas>
<svg id="boxes" viewBox="0 0 {width} {height}" preserveAspectRatio="none" aria-hidden="true"></svg>
</div>
</div>
<div class="colorbar" id="colorbar" hidden>
<span id="cb-lo"></span><span class="bar" id="cb-bar"></span><span id="cb-hi"></span>
<span id="layer-note" class="muted"></span>
</div>
<p class="muted">Hover to look, click (or arrow keys) to pin a patch. Boxes: the patch (white) and its windows.</p>
</section>
<aside class="card" id="panel" aria-label="the chosen patch">
<div id="panel-body" aria-live="polite"></div>
<h3>Worst patches</h3>
<div id="worst-note" class="muted"></div>
<div id="worst"></div>
<details><summary>How to read this</summary>
<p>For each patch the texture classifier looks for windows elsewhere in the restored image that show the same
texture as the input at that place, and the least-squares fit X c* rebuilds the patch's structure from them:
<b>c*</b> is each window's coefficient, the <b>score</b> the classifier's P(same texture), <b>r²</b> the share of
the patch's structure the windows explain. The bars split the classifier's logit into weight × feature terms by
name: green speaks for the same texture, red against. <i>feature</i>|diff| is the weight on how much the two
differ in that feature, <i>feature</i>*prod on whether both are high (or both low) in it, pair:<i>name</i> on
how the two agree (their correlation, gradient orientations, spectra); all standardised. The trust estimate
predicts the patch's error without the ground truth; the bound holds for the
stated share of patches on images the trust model never saw. Consistency is not correctness: an output that
invents one texture everywhere is consistent, and flat patches have nothing to explain (r² 0).</p>
</details>
</aside>
</main>
<script type="application/json" id="page-data">{data}</script>
<script>{js}</script>
</body></html>
"""
