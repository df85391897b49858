"""`dvc plots diff` on a fresh copy of the repository writes a page that draws every chart in a browser that
can reach no other host: vega, vega-lite and vega-embed come inlined in the repository's plots template
(vendor/vega/), not from DVC's default CDN."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CHROMIUM_FLAGS, REPO, dvc

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# Installed before any script of the page runs: script errors and resources that failed to load (a blocked
# CDN) are recorded, so a page that silently draws nothing fails with the reason.
RECORD_ERRORS = """
window.__errors = [];
window.addEventListener('error', e => {
  const src = e.target && (e.target.src || e.target.href);
  window.__errors.push(src ? `failed to load ${src}` : `${e.message} (${e.filename}:${e.lineno})`);
}, true);
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium that can reach 127.0.0.1 only (CHROMIUM_FLAGS): any other host fails to resolve."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
def test_dvc_plots_diff_renders_every_chart_offline(repo_copy: Path, tmp_path: Path, browser: Any) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    out = tmp_path / "dvc_plots"
    dvc(repo_copy, "plots", "diff", "HEAD", "-o", str(out))
    shown = json.loads(dvc(repo_copy, "plots", "diff", "HEAD", "--json").stdout)
    charts = sum(entry["type"] == "vega" for entries in shown["data"].values() for entry in entries)
    # The committed curves, confusion matrices, per-class bars and reliability diagram.
    assert charts >= 5, shown["data"].keys()

    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_ERRORS})
    browser.get((out / "index.html").as_uri())
    count_drawn = "return document.querySelectorAll('.vega-embed .marks').length"
    with contextlib.suppress(TimeoutException):  # the assertions below say what is missing
        WebDriverWait(browser, 30).until(
            lambda d: (
                d.execute_script(count_drawn) >= charts or d.execute_script("return window.__errors.length")
            )
        )
    errors = browser.execute_script("return window.__errors")
    assert errors == []
    assert browser.execute_script(count_drawn) == charts
    # Drawn, not empty frames: each chart has a size.
    sizes = browser.execute_script(
        "return Array.from(document.querySelectorAll('.vega-embed .marks'))"
        ".map(e => [e.clientWidth, e.clientHeight])"
    )
    assert all(w > 50 and h > 50 for w, h in sizes), sizes


def test_dvc_uses_the_template_with_the_pinned_packages_inlined() -> None:
    """The committed template is what make_template.py makes of its pinned versions, DVC is set to use it, and
    it stays under the repository's 1 MiB per file."""
    from configobj import ConfigObj

    spec = importlib.util.spec_from_file_location("make_template", REPO / "vendor/vega/make_template.py")
    make_template = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_template)
    configured = ConfigObj(str(REPO / ".dvc/config"))["plots"]["html_template"]
    assert (REPO / ".dvc" / configured).resolve() == make_template.TEMPLATE
    page = make_template.TEMPLATE.read_text(encoding="utf-8")
    assert len(page.encode("utf-8")) < make_template.MAX_BYTES
    for name, (version, build) in make_template.PACKAGES.items():
        assert f"  {name} {version}, {build} (npm integrity sha512-" in page, name
        assert f"<script>/*! {name} {version}, {build}\n" in page, name
    # DVC fills these; its scripts placeholder would bring back the CDN's script tags.
    assert "{plot_divs}" in page and "{scripts}" not in page
    assert not re.search(r"<(script|link)[^>]+(src|href)=", page)
