"""The explorable explanation page: its data contract, its escaping and the folder index (no browser here)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xswinir.checkpoint import save_weights
from xswinir.cli import main
from xswinir.config import DEGRADATION_PRESETS
from xswinir.errors import UserError
from xswinir.explain import Degraded, consistency_map, degrade_hr, upsample_input
from xswinir.explain_page import (
    PageData,
    PageError,
    build_page_data,
    explain_files,
    explain_folder,
    page_data,
    page_file_name,
    page_json,
    render_page,
    write_page,
)
from xswinir.images import read_image, write_image
from xswinir.model import build_swinir
from xswinir.model_spec import MODEL_PRESETS
from xswinir.texture import TextureClassifier, save_texture_classifier
from xswinir.texture.search import TextureSearch
from xswinir.trust import SIGNALS, TrustModel, embed_classifier, estimate_trust, patch_error, save_trust

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOSTILE = 'a</script><script>alert("x")</script><!--{js}\u2028&amp;.png'


def stripes_and_noise(generator: torch.Generator, height: int = 48, width: int = 64) -> torch.Tensor:
    """Vertical stripes on the left half, noise on the right: (3, height, width) in [0, 1]."""
    xx = torch.arange(width * 1.0).expand(height, width)
    image = (0.5 + 0.35 * torch.sin(xx * math.pi / 4)).expand(3, height, width).clone()
    image[:, :, width // 2:] = torch.rand(3, height, width - width // 2, generator=generator)
    return image


def page_classifier(image: torch.Tensor, patch_size: int = 16, pair_features: bool = False) -> TextureClassifier:
    """The real classifier with fixed weights (training takes too long here), standardised on ``image``.

    Differences speak against the same texture and agreement in the layout thumbnail for it, so a window's
    logit has terms of both signs.
    """
    clf = TextureClassifier(patch_size, scales=(1, 2), pair_features=pair_features)
    with torch.no_grad():
        feats = clf.features.window_features(image[None], patch_size, 4).flatten(2)[0].T
        feats = feats[:, :clf.features.num_features]  # the named features; a pair descriptor follows them
        clf.feature_mean.copy_(feats.mean(0))
        clf.feature_std.copy_(torch.where(feats.std(0) > 1e-6, feats.std(0), torch.ones(())))
        layout = torch.tensor([name.startswith("layout_") for name in clf.feature_names])
        clf.weight_diff.fill_(-4.0 / feats.shape[1])
        clf.weight_prod.copy_(layout.float() * 0.2)
        clf.bias.fill_(3.0)
        if pair_features:
            clf.weight_pair.fill_(0.5)  # agreement speaks for the same texture
    return clf.eval()


def search_for(clf: TextureClassifier, min_score: float = 0.5) -> TextureSearch:
    return TextureSearch(clf, stride=4, top_k=3, min_score=min_score, max_iou=0.0, ridge=1e-3, query="lq",
                         region_size=None)


def page_for(image: torch.Tensor, clf: TextureClassifier, name: str = "image.png", **kwargs) -> PageData:
    """Page data of ``image`` as its own restoration, the query a noisy copy, through the real search."""
    query = (image + 0.03 * torch.randn(image.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    match = search_for(clf)(image[None], query=query[None])
    return build_page_data(clf, image, match, query=query, lq=query[:, ::2, ::2], name=name, **kwargs)


def embedded_json(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="page-data">(.*?)</script>', page, re.S)
    assert found is not None
    return json.loads(found.group(1))


@pytest.mark.parametrize("pair_features", [False, True])
def test_pair_contributions_sum_to_the_logit_minus_bias(generator, pair_features):
    clf = TextureClassifier(16, scales=(1, 2), pair_features=pair_features)
    with torch.no_grad():
        for weight in (p for name, p in clf.named_parameters() if name.startswith("weight_")):
            weight.copy_(torch.randn(weight.shape, generator=generator))
        clf.bias.fill_(0.7)
        clf.feature_mean.copy_(0.1 * torch.rand(clf.feature_mean.shape, generator=generator))
        clf.feature_std.copy_(0.5 + torch.rand(clf.feature_std.shape, generator=generator))
    fa = clf.features(torch.rand(6, 3, 16, 16, generator=generator))[:, None]  # (6, 1, F [+ descriptor])
    fb = clf.features(torch.rand(4, 3, 16, 16, generator=generator))[None]
    terms = clf.pair_contributions(fa, fb)
    names = [name for name, _ in clf.weight_table()]
    assert terms.shape == (6, 4, len(names)) and any(n.startswith("pair:") for n in names) == pair_features
    torch.testing.assert_close(terms.sum(-1), clf.pair_logits(fa, fb) - 0.7, rtol=1e-5, atol=1e-5)
    # In the order of weight_table: feature 3's product weight alone gives entry 2 * 3 + 1.
    with torch.no_grad():
        for weight in (p for name, p in clf.named_parameters() if name.startswith("weight_")):
            weight.zero_()
        clf.weight_prod[3] = 2.0
    terms = clf.pair_contributions(fa, fb)
    assert names[7] == f"{clf.feature_names[3]}*prod"
    assert terms[..., 7].abs().min() > 0 and terms[..., torch.arange(len(names)) != 7].abs().max() == 0


@pytest.mark.parametrize("pair_features", [False, True])
def test_every_patch_is_on_the_page_with_its_windows_inside_the_image(generator, pair_features):
    image = stripes_and_noise(generator)  # 3 x 4 patches of 16 px
    clf = page_classifier(image, pair_features=pair_features)
    trust, error = torch.rand(2, 3, 4, generator=generator)
    data = page_for(image, clf, trust=trust, error=error)
    payload = page_json(data)
    assert payload["grid"] == [3, 4] and payload["width"] == 64 and payload["height"] == 48
    assert [(p["row"], p["col"]) for p in payload["patches"]] == [(r, c) for r in range(3) for c in range(4)]
    assert sum(len(p["windows"]) for p in payload["patches"]) > 6  # the stripes find partners
    for patch in payload["patches"]:
        top, left, bottom, right = patch["box"]
        assert (bottom - top, right - left) == (16, 16) and 0 <= patch["r2"] <= 1
        assert patch["trust"] is not None and patch["error"] is not None
        for window in patch["windows"]:
            top, left, bottom, right = window["box"]
            assert 0 <= top < bottom <= 48 and 0 <= left < right <= 64 and (bottom - top, right - left) == (16, 16)
            names = [payload["features"][i] for i, _ in window["top"]]
            assert len(names) == 5 and all(n.endswith(("|diff|", "*prod")) or n.startswith("pair:") for n in names)
            values = [abs(v) for _, v in window["top"]]
            assert values == sorted(values, reverse=True)
    # The contributions are the classifier's own: bias + shown + others is the logit of the search's score.
    for patch in data.patches:
        for window in patch.windows:
            logit = data.logit_bias + sum(v for _, v in window.contributions) + window.others
            assert abs(1 / (1 + math.exp(-logit)) - window.score) < 1e-4


def test_the_search_in_blocks_lands_on_the_image_grid(generator):
    image = stripes_and_noise(generator)
    clf = page_classifier(image)
    search = search_for(clf, min_score=0.0)
    # Two blocks of 2 patch columns, each searched in its own 48 x 48 region (the middle of the image is shared).
    regions = torch.stack([image[:, :, 0:48], image[:, :, 16:64]])
    gts = torch.stack([image[:, :, 0:32], image[:, :, 32:64]])
    region_tl = torch.tensor([[0, 0], [0, 16]])
    match = search(gts, regions, torch.tensor([[0, 0], [0, 16]]))
    data = build_page_data(clf, image, [(match, region_tl)])
    r2 = torch.tensor([p.r2 for p in data.patches]).reshape(3, 4)
    torch.testing.assert_close(r2[:, :2].flatten(), match.tile_r2[0])
    torch.testing.assert_close(r2[:, 2:].flatten(), match.tile_r2[1])
    right = data.patches[3]  # row 0, column 3: second block, its windows shifted by the region's 16 px
    assert {w.box[1] for w in right.windows} <= set(range(16, 49))
    assert data.rebuilt is not None and data.rebuilt.shape == image.shape
    with pytest.raises(PageError, match="covers 6 of the image's 12 patches"):
        build_page_data(clf, image, search(gts[:1], regions[:1]))


def test_page_data_rejects_maps_off_the_grid(generator):
    image = stripes_and_noise(generator)
    clf = page_classifier(image)
    with pytest.raises(PageError, match="trust map has shape"):
        page_for(image, clf, trust=torch.zeros(4, 3))


def test_a_hostile_name_stays_text(generator):
    image = stripes_and_noise(generator, 32, 32)
    page = render_page(page_for(image, page_classifier(image), name=HOSTILE, description="<b>desc</b>"))
    assert page.count("<script") == 2  # the data and the page's own script; nothing the name brought
    assert "</script><script>alert" not in page and "<b>desc" not in page
    data = embedded_json(page)
    assert data["name"] == HOSTILE and data["description"] == "<b>desc</b>"
    assert "<title>a&lt;/script&gt;&lt;script&gt;alert(&quot;x&quot;)" in page


def test_an_undecodable_file_name_can_be_written(generator, tmp_path):
    image = stripes_and_noise(generator, 32, 32)
    name = "caf\udce9.png"  # the Latin-1 byte 0xE9 of a file name, as Python decodes it
    page = write_page(page_for(image, page_classifier(image), name=name), tmp_path / "page.html")
    assert embedded_json(page.read_text())["name"] == name  # JSON keeps the surrogate as an escape


def test_the_page_needs_no_network(generator):
    image = stripes_and_noise(generator, 32, 32)
    page = render_page(page_for(image, page_classifier(image)))
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "@import" not in page and "url(" not in page
    # The one http URL is the SVG namespace name, which no browser fetches.
    assert set(re.findall(r"https?://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg"}


def test_page_file_names_are_safe_and_distinct():
    names = [page_file_name(i, n) for i, n in enumerate(["a.png", "a.jpg", HOSTILE, "../../etc/passwd", ".png"], 1)]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"\d{3}-[A-Za-z0-9._-]+\.html", n) for n in names)


def test_folder_index_ranks_the_least_trustworthy_first(generator, tmp_path):
    image = stripes_and_noise(generator, 32, 32)
    clf = page_classifier(image)
    trust = {"calm.png": 0.1, "bad.png": 0.9, HOSTILE: 0.5}

    def make_page(path: Path) -> PageData:
        if path.name == "broken.png":
            raise UserError("broken.png is not an image")
        name = str(path.relative_to(tmp_path))  # the hostile one holds a "/"
        return page_for(image, clf, name=name, trust=torch.full((2, 2), trust[name]))

    progress = io.StringIO()
    files = [tmp_path / n for n in ("calm.png", "broken.png", "bad.png", HOSTILE)]
    result = explain_folder(files, tmp_path / "out", make_page, worst=2, stream=progress)
    assert result.ranked_by == "trust"
    assert [e.name for e in result.entries] == ["bad.png", HOSTILE, "calm.png"]
    assert len(result.skipped) == 1 and "broken.png is not an image" in result.skipped[0]
    lines = progress.getvalue().rstrip("\n").split("\n")  # the hostile name holds a U+2028
    assert len(lines) == 4 and lines[1].startswith("explain 2/4:") and "skipped" in lines[1]
    index = result.index.read_text()
    assert "Ranked by the mean trust estimate" in index and "<script" not in index
    assert index.index("003-bad.html") < index.index("001-calm.html")
    assert len(re.findall(r'href="003-bad.html#patch=\d+,\d+"', index)) == 2  # its 2 worst patches
    for entry in result.entries:
        page = (tmp_path / "out" / entry.page).read_text()
        assert embedded_json(page)["name"] == entry.name


def test_folder_index_without_trust_ranks_by_inconsistency_and_says_so(generator, tmp_path):
    stripes, noise = stripes_and_noise(generator, 32, 64).split(32, dim=-1)
    clf = page_classifier(torch.cat([stripes, noise], -1))
    images = {"stripes.png": stripes, "noise.png": noise}
    result = explain_folder([tmp_path / "stripes.png", tmp_path / "noise.png"], tmp_path,
                            lambda path: page_for(images[path.name], clf, name=path.name), stream=io.StringIO())
    assert result.ranked_by == "inconsistency"
    assert [e.name for e in result.entries] == ["noise.png", "stripes.png"]  # noise: nothing explains it
    assert result.entries[0].mean_r2 < result.entries[1].mean_r2
    assert "No trust model was given: ranked by the mean inconsistency" in result.index.read_text()


def test_a_folder_without_one_good_image_is_an_error(tmp_path):
    def make_page(path: Path) -> PageData:
        raise UserError(f"{path.name}: unreadable")

    with pytest.raises(PageError, match="none of the 1 images"):
        explain_folder([tmp_path / "x.png"], tmp_path, make_page, stream=io.StringIO())


class Upsampler(nn.Module):
    """A restorer that only up-samples (bilinear): tiny, deterministic, and its output's texture is the input's."""

    upscale = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.upscale, mode="bilinear", align_corners=False)


def contrast_trust(clf: TextureClassifier) -> TrustModel:
    """A trust model by hand: ``ln(1 + error) = 0.5 + 0.5 * log_input_std``, its bound 0.4 above."""
    weights = [0.5 if name == "log_input_std" else 0.0 for name in SIGNALS]
    search = {"stride": 4, "top_k": 3, "min_score": 0.5, "max_iou": 0.0, "ridge": 1e-3, "region_size": 32}
    return TrustModel(signal_names=SIGNALS, signal_mean=[0.0] * len(SIGNALS), signal_std=[1.0] * len(SIGNALS),
                      weights=weights, bias=0.5, smear=1.0, quantile=0.4, coverage=0.9, patch_size=16, scale=2,
                      search=search, display_max=10.0, classifier=embed_classifier(clf))


def test_explain_files_ranks_real_restorations_by_their_trust(generator, tmp_path):
    stripes = stripes_and_noise(generator, 32, 64)[:, :, :32]
    flat = torch.full_like(stripes, 0.5)
    for name, image in (("flat.png", flat), ("stripes.png", stripes)):
        write_image(tmp_path / name, image)
    clf = page_classifier(torch.cat([stripes, flat], -1))
    search = dataclasses.replace(search_for(clf), region_size=32)  # blocks of 2 x 2 patches, as the map runs
    trust = contrast_trust(clf)
    files = [tmp_path / "flat.png", tmp_path / "stripes.png"]
    result = explain_files(Upsampler(), search, files, tmp_path / "pages", trust=trust, stream=io.StringIO())
    assert result.ranked_by == "trust"
    assert [e.name for e in result.entries] == ["stripes.png", "flat.png"]  # more contrast: more expected error
    payload = embedded_json((tmp_path / "pages" / result.entries[0].page).read_text())
    assert payload["hasTrust"] and not payload["hasError"] and payload["grid"] == [4, 4]
    assert payload["boundShare"] == 0.9 and payload["errorScale"] == 10.0 and "Y on 0-255" in payload["trustLabel"]
    lq = read_image(tmp_path / "stripes.png")
    sr = Upsampler()(lq[None])[0].clamp(0, 1)
    expected = estimate_trust(trust, trust.load_search(), lq, sr)
    trusts = torch.tensor([p["trust"] for p in payload["patches"]]).reshape(4, 4)
    bounds = torch.tensor([p["bound"] for p in payload["patches"]]).reshape(4, 4)
    torch.testing.assert_close(trusts, expected.expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bounds, expected.bound, rtol=1e-4, atol=1e-4)
    # The page's r² is the consistency map's: the same search, block by block.
    r2 = torch.tensor([p["r2"] for p in payload["patches"]]).reshape(4, 4)
    torch.testing.assert_close(r2, consistency_map(search, sr, upsample_input(lq, 2)), rtol=0, atol=1e-4)


def test_explain_files_of_hr_images_measures_the_error(generator, tmp_path):
    image = stripes_and_noise(generator, 32, 32)
    write_image(tmp_path / "hr.png", image)
    clf = page_classifier(image)

    def degrade(hr: torch.Tensor) -> Degraded:
        return degrade_hr(hr, DEGRADATION_PRESETS["bicubic"], 2, 16)

    result = explain_files(Upsampler(), search_for(clf), [tmp_path / "hr.png"], tmp_path / "pages", degrade=degrade,
                           stream=io.StringIO())
    assert result.ranked_by == "inconsistency"
    payload = embedded_json((tmp_path / "pages" / result.entries[0].page).read_text())
    assert payload["hasError"] and not payload["hasTrust"] and "HR image" in payload["errorLabel"]
    hr, lq, _ = degrade(read_image(tmp_path / "hr.png"))
    error = patch_error(Upsampler()(lq[None])[0].clamp(0, 1), hr, 16)
    torch.testing.assert_close(torch.tensor([p["error"] for p in payload["patches"]]).reshape(2, 2), error,
                               rtol=1e-4, atol=1e-4)


@pytest.fixture
def cli_parts(tmp_path: Path, generator: torch.Generator) -> dict[str, Path]:
    """A folder of two inputs and one too small, the tiny SwinIR's weights, a classifier and a trust file."""
    images = tmp_path / "photos"
    images.mkdir()
    write_image(images / "stripes.png", stripes_and_noise(generator, 32, 32))
    write_image(images / "flat.png", torch.full((3, 24, 32), 0.5))
    write_image(images / "small.png", torch.rand(3, 6, 6, generator=generator))
    clf = page_classifier(stripes_and_noise(generator, 64, 64))
    save_texture_classifier(clf, tmp_path / "clf")
    save_trust(contrast_trust(clf), tmp_path / "trust.json")
    torch.manual_seed(0)
    cfg = MODEL_PRESETS["tiny-x2"]
    save_weights(build_swinir(cfg), cfg, tmp_path / "model.safetensors")
    return {"images": images, "classifier": tmp_path / "clf", "model": tmp_path / "model.safetensors",
            "trust": tmp_path / "trust.json"}


def test_cli_explains_a_folder_as_pages_ranked_by_trust(cli_parts, tmp_path, capsys):
    out = tmp_path / "pages"
    rc = main(["explain", str(cli_parts["images"]), "--lq", "--checkpoint", str(cli_parts["model"]), "--classifier",
               str(cli_parts["classifier"]), "--trust", str(cli_parts["trust"]), "--html-dir", str(out),
               "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr()
    assert "wrote 2 pages" in printed.out and "ranked by mean trust estimate" in printed.out
    assert "skipped" in printed.out and "small.png" in printed.out  # 12 px output: smaller than a patch
    assert "explain 3/3:" in printed.err  # progress, one line per image off a terminal
    index = (out / "index.html").read_text()
    assert index.index("stripes.png") < index.index("flat.png")  # the contrast trust model: stripes are worse
    pages = sorted(out.glob("*-*.html"))
    assert [p.name for p in pages] == ["001-flat.html", "003-stripes.html"]  # numbered in the folder's order
    assert embedded_json(pages[1].read_text())["hasTrust"]
    assert not list(tmp_path.glob("*.png"))  # a folder gets pages, not pictures


def test_cli_adds_the_page_of_one_hr_image(cli_parts, tmp_path, capsys):
    image = cli_parts["images"] / "stripes.png"
    rc = main(["explain", str(image), "--checkpoint", str(cli_parts["model"]), "--classifier",
               str(cli_parts["classifier"]), "--degradation", "bicubic", "--out", str(tmp_path / "x.png"),
               "--html", "--device", "cpu"])
    assert rc == 0 and (tmp_path / "x.png").is_file()
    page = tmp_path / "x.html"  # beside the PNG
    assert f"wrote {page}" in capsys.readouterr().out
    payload = embedded_json(page.read_text())
    assert payload["hasError"] and not payload["hasTrust"] and payload["grid"] == [2, 2]


def test_cli_pages_need_an_output_folder(cli_parts, capsys):
    common = ["--checkpoint", str(cli_parts["model"]), "--classifier", str(cli_parts["classifier"])]
    assert main(["explain", str(cli_parts["images"]), "--lq", *common]) == 2
    assert "a folder IMAGE makes one explorable page per image: pass --html-dir DIR" in capsys.readouterr().err
    assert main(["explain", str(cli_parts["images"] / "flat.png"), "--lq", "--html-dir", "d", *common]) == 2
    assert "--html-dir is for a folder IMAGE" in capsys.readouterr().err


def test_a_trust_map_made_before_is_used_as_it_is(generator, monkeypatch):
    """`xswinir demo` and `explain --html` hand the page the trust map the picture already made: the page is the
    same as when it estimates the map itself, without the second estimate; a map of another output is refused."""
    import xswinir.explain_page as explain_page

    stripes = stripes_and_noise(generator, 32, 64)[:, :, :32]
    clf = page_classifier(stripes)
    search = dataclasses.replace(search_for(clf), region_size=32)
    trust = contrast_trust(clf)
    sr = Upsampler()(stripes[None])[0].clamp(0, 1)
    estimated = page_data(search, stripes, sr, trust=trust)
    made = estimate_trust(trust, trust.load_search(), stripes, sr)
    monkeypatch.setattr(explain_page, "estimate_trust", lambda *a, **k: pytest.fail("estimated again"))
    given = page_data(search, stripes, sr, trust=trust, trust_map=made)
    assert page_json(given) == page_json(estimated)
    with pytest.raises(ValueError, match="not of this"):
        page_data(search, stripes[:, :16], sr[:, :32], trust=trust, trust_map=made)
