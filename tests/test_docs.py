"""The documentation site: `mkdocs build --strict` passes, every page links only images that exist, are
real PNGs and are small, and the conversion figure is made from the real sample by the shared converter."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO
from PIL import Image

DOCS = REPO / "docs"
MAX_IMAGE_BYTES = 150_000


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def nav_pages() -> list[str]:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    return [page for entry in config["nav"] for page in entry.values()]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site `mkdocs build --strict` makes of the repository's docs, built once for the module."""
    site = tmp_path_factory.mktemp("docs") / "site"
    proc = mkdocs_build(REPO / "mkdocs.yml", site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return site


def test_site_builds_strict_with_every_page(site: Path) -> None:
    pages = nav_pages()
    assert {
        "index.md",
        "pipeline.md",
        "data.md",
        "experiments.md",
        "remotes.md",
        "serving.md",
        "results.md",
    } <= set(pages)
    for page in pages:
        html = site / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        assert html.is_file(), page
    assert not (site / "make_images.py").exists()


class _Loads(HTMLParser):
    """The URLs a page makes the browser fetch by itself (scripts, stylesheets, icons, images, frames), not
    the links a reader may follow."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "link" and attr.get("rel") not in ("canonical", "alternate", "next", "prev"):
            self.urls.append(attr.get("href") or "")
        elif tag in ("script", "img", "iframe", "source", "audio", "video", "embed") and attr.get("src"):
            self.urls.append(attr["src"])


def test_site_loads_nothing_from_other_hosts(site: Path) -> None:
    """Read offline (or behind a firewall), every page gets all its scripts and styles from the site itself;
    code is highlighted at build time, not by highlight.js from a CDN."""
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > len(nav_pages())  # the 404 page too
    for page in pages:
        parser = _Loads()
        parser.feed(page.read_text(encoding="utf-8"))
        assert parser.urls, page
        for url in parser.urls:
            assert not re.match(r"([a-z]+:)?//", url, re.IGNORECASE), f"{page.relative_to(site)}: loads {url}"
            # The 404 page's are absolute, from the site root.
            path = url.split("?")[0].split("#")[0]
            target = site / path.lstrip("/") if path.startswith("/") else page.parent / path
            assert target.is_file(), f"{page.relative_to(site)}: {url} is not in the site"
    for css in site.rglob("*.css"):
        text = css.read_text(encoding="utf-8")
        imports = re.findall(r"(?:@import\s*(?:url\()?|url\()\s*['\"]?([^'\")\s;]+)", text)
        external = [url for url in imports if re.match(r"([a-z]+:)?//", url, re.IGNORECASE)]
        assert not external, f"{css.relative_to(site)}: {external}"
    experiments = (site / "experiments/index.html").read_text(encoding="utf-8")
    assert "hljs" not in experiments
    assert '<div class="codehilite"><pre><span></span><code>dvc<span class="w"> </span>' in experiments
    assert "css/pygments.css" in experiments


def test_pages_show_existing_small_png_images() -> None:
    seen = set()
    for page in nav_pages():
        for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (DOCS / page).read_text(encoding="utf-8")):
            path = (DOCS / page).parent / link
            assert path.suffix == ".png" and path.is_file(), f"{page}: {link}"
            assert path.stat().st_size <= MAX_IMAGE_BYTES, f"{link}: {path.stat().st_size} bytes"
            with Image.open(path) as img:
                img.verify()
            seen.add(path.relative_to(DOCS).as_posix())
    assert "images/conversion.png" in seen
    assert {"images/plots/Confusion_matrix.png", "images/plots/plots_samples.png"} <= seen


def test_strict_build_fails_on_a_missing_image(tmp_path: Path) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / "index.md", "a", encoding="utf-8") as page:
        page.write("\n![gone](images/no-such-figure.png)\n")
    proc = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    assert "no-such-figure.png" in proc.stdout + proc.stderr


def test_conversion_figure_from_the_real_sample(sample_dir: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_images", DOCS / "make_images.py")
    make_images = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_images)
    out = tmp_path / "conversion.png"
    make_images.conversion_figure(sample_dir, out)
    tile, pad = make_images.TILE, 4
    columns = len(make_images.RENDITIONS) + len(make_images.TEST_RENDITIONS)
    with Image.open(out) as img:
        assert img.size == (columns * (tile + pad) + pad, 3 * (tile + pad) + pad)
        sheet = img.convert("L")
    # Each converted glyph (middle row) is light ink on a dark ground, like the originals (bottom row).
    for c in range(columns):
        x = pad + c * (tile + pad)
        converted = np.asarray(sheet.crop((x, pad + tile + pad, x + tile, pad + 2 * tile + pad)))
        assert converted[0, 0] < 128 and converted.max() > int(converted[0, 0]) + 100, c
