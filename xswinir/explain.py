"""Explanation pictures: what the texture term asks of a restored image, and why.

For an HR image, :func:`explain` degrades it with the config's degradations, restores it with the model, and
for a few tiles (where the texture is strongest, or given) runs the same :func:`~xswinir.losses.texture_search`
the loss uses: the K windows the texture classifier found most similar (boxed on the HR image, with their
least-squares coefficients and classifier scores), the target tile, and ``X c*``, the tile rebuilt only from
those other windows. Beside them: the classifier's similarity heat-map of the first tile over the whole
image and the classifier's weights by feature name. One PNG (matplotlib, no GUI backend), optionally a small
self-contained HTML page with the PNG inline and a table of the chosen windows.
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

from xswinir.config import Config
from xswinir.errors import UserError
from xswinir.losses import TextureMatch, texture_search

log = logging.getLogger(__name__)

_BOX_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


class ExplainError(UserError, ValueError):
    """An image or a setting that an explanation cannot be made for."""


@dataclass
class Explanation:
    """What :func:`explain` produced.

    Attributes:
        figure: the matplotlib Figure (Agg); draw or save it again as you like.
        png: where the PNG was written, or None.
        html: where the HTML page was written, or None.
        rows: one dict per chosen window: ``patch``, ``rank``, ``tile`` and ``window`` boxes
            (top, left, bottom, right in HR pixels), ``coef``, ``score``.
        description: what the degradation did to the input.
        lq: (C, h, w) the degraded input; sr: (C, H, W) the restored image; hr: (C, H, W) the cropped HR image.
        tiles: (n, 2) top/left of the explained tiles in HR pixels.
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


def _regions(image: Tensor, tiles: Tensor, patch_size: int, region_size: int | None) -> tuple[Tensor, Tensor]:
    """Search regions around each tile, clamped inside the image: (n, C, R, R') and region top/left (n, 2)."""
    _, H, W = image.shape
    if region_size is None:
        return image[None].expand(len(tiles), -1, -1, -1), torch.zeros_like(tiles)
    rh, rw = min(region_size, H), min(region_size, W)
    top = (tiles[:, 0] + patch_size // 2 - rh // 2).clamp(0, H - rh)
    left = (tiles[:, 1] + patch_size // 2 - rw // 2).clamp(0, W - rw)
    regions = torch.stack([image[:, t:t + rh, u:u + rw] for t, u in zip(top.tolist(), left.tolist(), strict=True)])
    return regions, torch.stack((top, left), dim=1)


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
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    from xswinir.degradations import build_degrader, describe_params
    from xswinir.inference import restore
    from xswinir.texture import plot_classifier_weights

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

    # Degrade and restore, as in training and evaluation.
    generator = torch.Generator(device=device.type).manual_seed(seed)
    degrader = build_degrader(cfg.degradation, scale).to(device)
    with torch.no_grad():
        lq, params = degrader(hr[None].to(device), generator)
    description = describe_params(params, 0)
    model = model.to(device).eval()
    sr = restore(model, lq, tile=tile)[0].clamp(0, 1).cpu()
    lq = lq[0].cpu()

    # The tiles and their texture search, with the loss's own settings.
    if tiles is None:
        tiles = pick_tiles(hr, p, patches)
    tiles = torch.as_tensor(tiles, dtype=torch.long).reshape(-1, 2)
    if len(tiles) == 0 or ((tiles < 0) | (tiles + p > torch.tensor([H, W]))).any():
        raise ExplainError(f"tiles {tiles.tolist()} must lie inside the {W}x{H} image (top, left; {p} px each)")
    t = cfg.texture
    regions, region_tl = _regions(hr, tiles, p, t.region_size)
    gt = torch.stack([hr[:, y:y + p, x:x + p] for y, x in tiles.tolist()])
    classifier = classifier.to(device).eval()
    match: TextureMatch = texture_search(
        classifier, gt.to(device), regions.to(device), (tiles - region_tl).to(device), stride=t.stride,
        top_k=t.top_k, min_score=t.min_score, max_iou=t.max_iou, ridge=t.ridge,
    )
    boxes = (match.boxes[:, 0].cpu() + region_tl.repeat(1, 2)[:, None, :]).tolist()  # (n, K, 4) HR pixels
    coefs, scores, valid = match.coefs[:, 0].cpu(), match.scores[:, 0].cpu(), match.valid[:, 0].cpu()
    targets = match.target.cpu()
    with torch.no_grad():
        heat = classifier.similarity_map(gt[0].to(device), hr.to(device), t.stride).cpu()

    rows = []
    for i, (y, x) in enumerate(tiles.tolist()):
        for k in range(t.top_k):
            if valid[i, k]:
                rows.append({"patch": i + 1, "rank": k + 1, "tile": [y, x, y + p, x + p], "window": boxes[i][k],
                             "coef": float(coefs[i, k]), "score": float(scores[i, k])})

    # Layout: an overview row, then one row per tile: search region, target, X c*, restored, K windows.
    # Two sub-figures, so that the long feature names of the weight chart do not widen the tile columns.
    n, K = len(tiles), t.top_k
    cols = 4 + K
    fig = Figure(figsize=(max(1.7 * cols, 14.0), 3.8 + 1.9 * n), layout="constrained")
    top_fig, rows_fig = fig.subfigures(2, 1, height_ratios=[3.8, 1.9 * n])
    overview = top_fig.subplots(1, 4, width_ratios=[1.0, 1.0, 1.25, 1.3])
    _show(overview[0], lq, f"input (x{scale} down)\n{description}", fontsize=7)
    _show(overview[1], sr, "restored")
    ax = overview[2]
    _show(ax, hr, f"HR, tile 1 similarity (stride {t.stride})")
    # Heat-map cells sit on the window centres.
    extent = (-0.5 + p / 2, -0.5 + p / 2 + heat.shape[1] * t.stride, -0.5 + p / 2 + heat.shape[0] * t.stride,
              -0.5 + p / 2)
    im = ax.imshow(heat.numpy(), cmap="magma", alpha=0.6, vmin=0, vmax=1, extent=extent, interpolation="nearest")
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    for i, (y, x) in enumerate(tiles.tolist()):
        _box(ax, [y, x, y + p, x + p], "white", 2.0)
        ax.text(x, y - 2, str(i + 1), color="white", fontsize=8, va="bottom")
    top_fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="P(same texture)")
    ax = overview[3]
    plot_classifier_weights(classifier, ax, top=10)
    ax.tick_params(labelsize=6)
    ax.title.set_fontsize(8)
    ax.xaxis.label.set_fontsize(7)
    grid = rows_fig.subplots(n, cols, squeeze=False)

    for i, (y, x) in enumerate(tiles.tolist()):
        r_top, r_left = region_tl[i].tolist()
        region = regions[i]
        ax = grid[i, 0]
        _show(ax, region, f"tile {i + 1}: search region", fontsize=7)
        _box(ax, [y - r_top, x - r_left, y - r_top + p, x - r_left + p], "white", 2.0, "--")
        for k in range(K):
            if valid[i, k]:
                b = boxes[i][k]
                _box(ax, [b[0] - r_top, b[1] - r_left, b[2] - r_top, b[3] - r_left], _BOX_COLORS[k % 8])
        _show(grid[i, 1], gt[i], f"target tile ({y}, {x})", fontsize=7)
        err = (targets[i] - gt[i]).abs().mean().item()
        used = int(valid[i].sum())
        _show(grid[i, 2], targets[i], f"X c* ({used} windows)\nmean |err| {err:.3f}"
              if used else "no window above\nmin_score", fontsize=7)
        _show(grid[i, 3], sr[:, y:y + p, x:x + p], "restored tile", fontsize=7)
        for k in range(K):
            ax = grid[i, 4 + k]
            b = boxes[i][k]
            if valid[i, k]:
                _show(ax, hr[:, b[0]:b[2], b[1]:b[3]], f"c={coefs[i, k]:+.2f} s={scores[i, k]:.2f}", fontsize=7)
                for spine in ax.spines.values():
                    spine.set_edgecolor(_BOX_COLORS[k % 8])
                    spine.set_linewidth(2.0)
            else:
                ax.axis("off")

    png = html_path = None
    if out is not None:
        png = Path(out)
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=110)
        log.info("explanation written to %s", png)
        if html:
            html_path = png.with_suffix(".html")
            html_path.write_text(render_html(png.read_bytes(), rows, description, p))
            log.info("explanation page written to %s", html_path)
    return Explanation(fig, png, html_path, rows, description, lq, sr, hr, tiles)


def render_html(png: bytes, rows: list[dict[str, Any]], description: str, patch_size: int) -> str:
    """A self-contained page: the PNG inline (base64) and a table of the chosen windows."""
    data = base64.b64encode(png).decode("ascii")
    esc = html_lib.escape
    body = "\n".join(
        f"<tr><td>{r['patch']}</td><td>{r['rank']}</td><td>{esc(str(r['tile']))}</td>"
        f"<td>{esc(str(r['window']))}</td><td>{r['coef']:+.3f}</td><td>{r['score']:.3f}</td></tr>"
        for r in rows
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>XSwinIR explanation</title>
<style>body{{font-family:sans-serif;margin:1.5em}} img{{max-width:100%}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style>
</head><body>
<h1>XSwinIR explanation</h1>
<p>Degradation: {esc(description)}</p>
<img alt="explanation" src="data:image/png;base64,{data}">
<h2>Chosen windows</h2>
<p>For each {patch_size}&times;{patch_size} tile, the windows the texture classifier scored most similar
(boxes as top, left, bottom, right in HR pixels), their least-squares coefficient c* and the classifier's
P(same texture).</p>
<table><thead><tr><th>tile #</th><th>rank</th><th>tile box</th><th>window box</th><th>c*</th><th>score</th></tr>
</thead><tbody>
{body}
</tbody></table>
</body></html>
"""
