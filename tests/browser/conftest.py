"""A real headless Chromium for the page tests: Debian's ``chromium`` and ``chromium-driver`` packages.

``.ci/run`` installs them when missing; elsewhere the tests skip with the reason. Set ``CHROMIUM`` and
``CHROMEDRIVER`` to use other binaries.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest


def _binary(env: str, *names: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    return next((found for name in names if (found := shutil.which(name))), None)


@pytest.fixture(scope="session")
def chrome() -> Iterator[object]:
    """A headless Chromium driven through its WebDriver, a 1366 x 768 viewport, logging the console."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    browser = _binary("CHROMIUM", "chromium", "chromium-browser")
    driver_path = _binary("CHROMEDRIVER", "chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("Chromium or chromedriver not found: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1366,900", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        # The viewport itself, not the window around it: a small laptop screen.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1366, "height": 768, "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()
