"""The explanation page in a real browser: opened from disk, a patch clicked, the panel read, layers switched.

``XSWINIR_SCREENSHOT=FILE`` also copies the screenshot to FILE (to look at the test page; the README's picture
is taken from a real demo run instead).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch.nn.functional as F

from tests.test_explain_page import HOSTILE, page_classifier, search_for
from xswinir.explain_page import PageData, build_page_data, write_page
from xswinir.images import read_image
from xswinir.sources import skimage_data_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cat_page(name: str = "chelsea.png") -> PageData:
    """The demo's cat (scikit-image's ``chelsea``): a 160 x 224 crop, halved, restored by bilinear up-sampling.

    Real search, real classifier (fixed weights), real measured error against the crop; the trust layer is a
    stand-in (the input's local contrast), since fitting a trust model takes minutes.
    """
    gt = read_image(skimage_data_dir() / "chelsea.png")[:, 70:230, 110:334]
    lq = F.avg_pool2d(gt[None], 2)[0]
    sr = F.interpolate(lq[None], scale_factor=2, mode="bilinear", align_corners=False)[0].clamp(0, 1)
    clf = page_classifier(sr)
    match = search_for(clf)(sr[None], query=sr[None])
    p = clf.patch_size
    error = F.avg_pool2d((sr - gt).abs().mean(0, keepdim=True)[None], p)[0, 0] * 255
    contrast = F.avg_pool2d(sr.mean(0, keepdim=True)[None], p)[0, 0]
    stand_in = (F.avg_pool2d(sr.mean(0, keepdim=True)[None].square(), p)[0, 0] - contrast.square()).sqrt() * 60
    return build_page_data(
        clf, sr, match, query=sr, lq=lq, trust=stand_in, bound=stand_in * 2, error=error, name=name,
        description="scikit-image chelsea, 224 x 160 crop halved and restored by bilinear x2 (a test page)",
        trust_label="stand-in: input contrast, Y 0-255", bound_share=0.9,
        error_label="mean |Y error| against the crop, 0-255",
    )


def shown(text: str, label: str) -> float:
    """The number the panel shows after ``label`` (a regular expression); the page writes minus as U+2212."""
    found = re.search(label + r"([+\u2212-]?\d+(?:\.\d+)?)", text)
    assert found is not None, f"{label!r} not in the panel:\n{text}"
    return float(found.group(1).replace("\u2212", "-"))


def test_a_clicked_patch_is_explained_in_the_panel(chrome, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    data = cat_page()
    page = write_page(data, tmp_path / "page.html")
    chrome.get(page.as_uri())
    WebDriverWait(chrome, 10).until(lambda d: d.find_element(By.ID, "panel-body").text)

    # Click the patch at row 3, column 5: the one with the most windows shows the most.
    th, tw = data.grid
    row, col = 3, 5
    patch = data.patches[row * tw + col]
    assert patch.windows, "the test patch should have partners"
    stage = chrome.find_element(By.ID, "stage")
    scale = stage.size["width"] / data.restored.shape[-1]
    p = data.patch_size
    x = (col * p + p / 2) * scale - stage.size["width"] / 2  # offsets from the element's centre
    y = (row * p + p / 2) * scale - stage.size["height"] / 2
    ActionChains(chrome).move_to_element_with_offset(stage, round(x), round(y)).click().perform()
    panel = chrome.find_element(By.ID, "panel-body")
    WebDriverWait(chrome, 5).until(lambda d: f"Patch row {row}, column {col}" in panel.text)
    text = panel.text
    assert shown(text, r"consistency r²\n") == pytest.approx(patch.r2, abs=1e-3)
    assert shown(text, r"trust estimate\n") == pytest.approx(patch.trust, rel=5e-3)
    assert shown(text, r"measured error\n") == pytest.approx(patch.error, rel=5e-3)
    for k, window in enumerate(patch.windows, 1):
        assert shown(text, rf"window {k}:\s+c\* ") == pytest.approx(window.coef, abs=1e-3)
        assert shown(text, rf"window {k}:\s+c\* \S+,\s+score ") == pytest.approx(window.score, abs=1e-3)
        assert window.contributions[0][0] in text  # the largest term, by name
    boxes = chrome.find_elements(By.CSS_SELECTOR, "#boxes rect")
    assert len(boxes) == len(patch.windows) + 2  # each window, and the patch drawn twice (dark and light)
    assert chrome.execute_script("return location.hash") == f"#patch={row},{col}"

    # The arrow keys move the pinned patch.
    stage.send_keys(Keys.ARROW_RIGHT)
    WebDriverWait(chrome, 5).until(lambda d: f"Patch row {row}, column {col + 1}" in panel.text)

    # Layers: each one paints its own colours; "none" hides the layer.
    def layer(value: str) -> list[int] | None:
        chrome.find_element(By.CSS_SELECTOR, f'input[name="layer"][value="{value}"]').click()
        return chrome.execute_script(
            "const c = document.getElementById('heat'); if (c.hidden) return null;"
            "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);")

    consistency, trust, error = layer("consistency"), layer("trust"), layer("error")
    assert consistency and trust and error and len({tuple(consistency), tuple(trust), tuple(error)}) == 3
    assert "Measured error" in chrome.find_element(By.ID, "layer-note").text
    assert layer("none") is None
    chrome.find_element(By.CSS_SELECTOR, 'input[name="layer"][value="trust"]').click()
    chrome.find_element(By.CSS_SELECTOR, 'input[name="base"][value="input"]').click()
    assert chrome.find_element(By.ID, "img-input").is_displayed()
    chrome.find_element(By.CSS_SELECTOR, 'input[name="base"][value="restored"]').click()
    ActionChains(chrome).move_to_element_with_offset(stage, round(x), round(y)).click().perform()

    assert [entry for entry in chrome.get_log("browser") if entry["level"] == "SEVERE"] == []
    shot = tmp_path / "explain_page.png"
    assert chrome.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("XSWINIR_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["XSWINIR_SCREENSHOT"])


def test_a_hostile_name_is_shown_as_text(chrome, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chrome.get_log("browser")  # start from an empty console
    page = write_page(cat_page(HOSTILE), tmp_path / "hostile.html")
    chrome.get(page.as_uri())
    WebDriverWait(chrome, 10).until(lambda d: d.find_element(By.ID, "panel-body").text)
    assert chrome.title == f"{HOSTILE} – XSwinIR explanation"  # a name, not markup
    assert chrome.execute_script("return document.getElementById('title').textContent") == HOSTILE
    with pytest.raises(NoAlertPresentException):
        chrome.switch_to.alert.text  # noqa: B018 - reading it is the check
    assert [entry for entry in chrome.get_log("browser") if entry["level"] == "SEVERE"] == []
