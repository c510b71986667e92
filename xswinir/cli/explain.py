"""``xswinir explain IMAGE``: a picture of what the texture term does for a restored image.

``--html`` adds the explorable page of every patch beside the PNG (:mod:`xswinir.explain_page`); ``xswinir explain
FOLDER --html-dir DIR`` writes one page per image and an index ranking them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from xswinir.cli.options import add_max_pixels_argument, apply_max_pixels
from xswinir.config import DEFAULT_DEGRADATION, DEGRADATION_PRESETS, ConfigError, TextureConfig, load_config
from xswinir.paths import printable_path
from xswinir.sources import resolve_image_files

if TYPE_CHECKING:  # annotations only: the command's start-up loads no torch
    import torch
    from torch import Tensor, nn

    from xswinir.explain import Degraded
    from xswinir.texture import TextureSearch
    from xswinir.trust import TrustModel

HELP = ("restore an image (a real low-quality one with --lq, or a degraded HR one) and draw the texture windows "
        "and texture consistency behind the loss (PNG, optional HTML)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="an image file (PNG, JPEG, ...): HR, degraded first; with --lq the input itself; "
                                      "or, with --html-dir, a folder of them")
    parser.add_argument("--lq", action="store_true",
                        help="IMAGE is a real low-quality input: restore it as it is, no degradation, no HR needed")
    parser.add_argument("--checkpoint", required=True,
                        help="a model: training checkpoint folder, .safetensors or official .pth (with --preset)")
    parser.add_argument("--classifier", default=None,
                        help="a texture classifier folder (default: the one inside a training checkpoint)")
    parser.add_argument("--preset", default=None, help="model preset, needed for official .pth files")
    parser.add_argument("--degradation", default=None, help=f"degradation preset applied to an HR IMAGE "
                                                             f"(default: {DEFAULT_DEGRADATION}; not with --lq)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the degradation (default: 0; not with --lq)")
    parser.add_argument("--patches", type=int, default=3,
                        help="how many tiles to explain, where the texture is strongest (default: %(default)s)")
    parser.add_argument("--tile-at", action="append", default=None, metavar="TOP,LEFT",
                        help="explain the tile at these pixel coordinates of the HR image (with --lq: of the "
                             "restored output) instead (repeatable)")
    parser.add_argument("--out", default="explain.png", help="the PNG to write (default: %(default)s)")
    parser.add_argument("--html", action="store_true",
                        help="also write the explorable page beside the PNG (.html): click any patch for its windows, "
                             "c*, scores, r², trust and the features that paired them; one self-contained file")
    parser.add_argument("--html-dir", metavar="DIR", default=None,
                        help="for a folder IMAGE: write one explorable page per image into DIR and an index.html "
                             "ranking the images (no PNG)")
    parser.add_argument("--trust", metavar="FILE", default=None,
                        help="a trust model (`xswinir trust fit`): the PNG and the pages show each patch's expected "
                             "error (the pages also its bound), and the index ranks by it (default: by inconsistency)")
    parser.add_argument("--tile", type=int, default=None,
                        help="LR tile size for the model on large images (default: the whole image at once)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_max_pixels_argument(parser)


def _positions(values: list[str] | None):
    """The ``--tile-at TOP,LEFT`` values as an (n, 2) tensor, or None."""
    # Imported here, not at the top: `xswinir --help` and the other commands must not load torch.
    import torch

    from xswinir.explain import ExplainError

    if not values:
        return None
    out = []
    for text in values:
        try:
            top, left = (int(v) for v in text.split(","))
        except ValueError as err:
            raise ExplainError(f"--tile-at {text!r} is not TOP,LEFT in pixels") from err
        out.append((top, left))
    return torch.tensor(out)


def run(args: argparse.Namespace) -> int:
    from xswinir.checkpoint import local_checkpoint

    with local_checkpoint(args.checkpoint) as checkpoint:  # one in a bucket (s3://...) is downloaded first
        return _run(args, checkpoint)


def _run(args: argparse.Namespace, checkpoint: Path) -> int:
    # Imported here, not at the top: `xswinir --help` and the other commands must not load torch.
    from xswinir.checkpoint import CLASSIFIER_DIR, CONFIG_FILE, CheckpointError, load_model
    from xswinir.explain import ExplainError, degrade_hr, explain
    from xswinir.explain_page import page_data, write_page
    from xswinir.images import read_image
    from xswinir.inference import resolve_device
    from xswinir.texture import TextureSearch, load_texture_classifier
    from xswinir.trust import estimate_trust, load_trust

    apply_max_pixels(args)
    if args.patches < 1:
        raise ExplainError(f"--patches must be >= 1, got {args.patches}")
    if args.lq and (args.degradation is not None or args.seed is not None):
        raise ExplainError("--degradation and --seed degrade an HR image; with --lq the image is used as it is")
    folder = Path(args.image).is_dir()
    if folder and args.html_dir is None:
        raise ExplainError("a folder IMAGE makes one explorable page per image: pass --html-dir DIR")
    if not folder and args.html_dir is not None:
        raise ExplainError("--html-dir is for a folder IMAGE; for one image pass --html (the page goes beside the PNG)")
    degradation = args.degradation or DEFAULT_DEGRADATION
    if degradation not in DEGRADATION_PRESETS:
        raise ConfigError(f"unknown --degradation {degradation!r}; choose one of {sorted(DEGRADATION_PRESETS)}")
    classifier_path = args.classifier
    if classifier_path is None:
        if not checkpoint.exists():  # said first: a missing checkpoint holds no classifier either
            raise CheckpointError(f"checkpoint {printable_path(checkpoint)} does not exist")
        if not (checkpoint / CLASSIFIER_DIR).is_dir():
            raise ExplainError(f"{checkpoint} holds no texture classifier; pass --classifier FOLDER")
        classifier_path = checkpoint / CLASSIFIER_DIR
    device = resolve_device(args.device)
    model, model_cfg = load_model(checkpoint, preset=args.preset)
    image = None if folder else read_image(args.image, channels=model_cfg.in_chans)
    classifier = load_texture_classifier(classifier_path)

    # A training checkpoint carries its config: its texture search settings are what the loss used.
    texture = TextureConfig()
    if (checkpoint / CONFIG_FILE).is_file():
        texture = load_config(checkpoint / CONFIG_FILE).texture
    search = TextureSearch.from_config(dataclasses.replace(texture, patch_size=classifier.patch_size), classifier)
    trust = None if args.trust is None else load_trust(args.trust)
    if folder:
        degrade = None if args.lq else functools.partial(
            degrade_hr, degradation=DEGRADATION_PRESETS[degradation], scale=model_cfg.upscale,
            patch_size=search.patch_size, seed=args.seed or 0, device=device)
        return _explain_folder(args, model, search, degrade, trust, model_cfg.in_chans, device)
    positions = _positions(args.tile_at)
    try:
        hr, lq, description = None, image, None
        if not args.lq:  # an HR image: degraded as in training and evaluation, then explained beside it
            hr, lq, description = degrade_hr(image, DEGRADATION_PRESETS[degradation], model_cfg.upscale,
                                             search.patch_size, seed=args.seed or 0, device=device)
        result = explain(model, search, lq, hr=hr, description=description, patches=args.patches,
                         positions=positions, out=args.out, tile=args.tile, device=device,
                         trust=None if trust is None else functools.partial(
                             estimate_trust, trust, trust.load_search(), model=model, tile=args.tile, device=device))
    except ExplainError as err:
        raise ExplainError(f"{printable_path(args.image)}: {err}") from err  # say which of the user's files
    print(f"wrote {printable_path(result.png)}")
    print(("input: " if args.lq else "degradation: ") + result.description)
    r2 = "consistency r²" if args.lq else "HR fit r²  restored consistency r²"
    print(f"  tile  top,left   windows  {r2}")
    for s in result.tile_summary:
        line = f"  {s['patch']:>4}  {s['tile'][0]:>4},{s['tile'][1]:<4} {s['windows']:>7}  {s['r2']:>10.3f}"
        print(line if args.lq else f"{line}  {s['consistency']:>21.3f}")
        for r in (r for r in result.rows if r["patch"] == s["patch"]):
            print(f"          window {r['rank']} at {r['window'][0]},{r['window'][1]}  c*={r['coef']:+.3f}  "
                  f"score={r['score']:.3f}")
    th, tw = result.consistency.shape
    print(f"mean texture consistency of the restored image: {result.consistency_mean:.3f} "
          f"({th}x{tw} tiles of {classifier.patch_size} px)")
    if args.html:
        data = page_data(search, result.lq, result.sr, hr=result.hr, trust=trust, trust_map=result.trust, model=model,
                         name=printable_path(Path(args.image).name), description=result.description, tile=args.tile,
                         device=device)
        print(f"wrote {printable_path(write_page(data, Path(args.out).with_suffix('.html')))} (the explorable page)")
    return 0


def _explain_folder(args: argparse.Namespace, model: nn.Module, search: TextureSearch,
                    degrade: Callable[[Tensor], Degraded] | None, trust: TrustModel | None, channels: int,
                    device: torch.device) -> int:
    """``explain FOLDER --html-dir DIR``: one page per image and the index, with a progress bar."""
    # lazy: keeps torch off `xswinir --help`
    from xswinir.explain import ExplainError
    from xswinir.explain_page import explain_files

    try:
        files = resolve_image_files(args.image)
    except FileNotFoundError as err:
        raise ExplainError(printable_path(str(err))) from err
    result = explain_files(model, search, files, args.html_dir, degrade=degrade, trust=trust, channels=channels,
                           tile=args.tile, device=device)
    ranked = "mean trust estimate" if result.ranked_by == "trust" else "mean inconsistency 1 - r² (no --trust given)"
    print(f"wrote {len(result.entries)} pages and {printable_path(result.index)}, ranked by {ranked}")
    for line in result.skipped:
        print(f"skipped {line}")
    return 0
