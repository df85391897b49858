"""The documentation site: `mkdocs build --strict` passes, every page links only images that exist, are
real PNGs and are small, and the conversion figure is made from the real sample by the shared converter."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def test_site_builds_strict_with_every_page(tmp_path: Path) -> None:
    proc = mkdocs_build(REPO / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stdout + proc.stderr
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
        html = tmp_path / "site" / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        assert html.is_file(), page
    assert not (tmp_path / "site" / "make_images.py").exists()


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
