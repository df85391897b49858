"""The page at `/` and the offline API docs: in-process for what the server sends, and in headless Chromium
(Debian's `chromium` and `chromium-driver`, driven by selenium) against a real `uvicorn oracle_mnist.api:app`
for what a person sees and can do."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import CHROMIUM_FLAGS, encode, serve_in_subprocess
from PIL import Image

from oracle_mnist.api import STATIC_DIR, Settings, create_app
from oracle_mnist.config import CLASS_CHARACTERS
from oracle_mnist.images import convert

# The page's own font for the class characters (a machine without a CJK font draws boxes instead).
FONT_FAMILY = "Oracle MNIST Glyphs"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Small enough that a test can exceed them with a handful of files.
LIMITS = {"max_files": 4, "max_file_bytes": 20_000}


@pytest.fixture(scope="module")
def client(model_file: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_path=model_file, **LIMITS))) as c:
        yield c


@pytest.fixture(scope="module")
def glyph_files(tmp_path_factory: pytest.TempPathFactory, sample_test_images) -> list[Path]:
    """Real sample test images as PNG files, of different labels."""
    images, labels = sample_test_images
    folder = tmp_path_factory.mktemp("glyphs")
    paths = []
    for label in range(4):
        index = int(np.flatnonzero(labels == label)[0])
        path = folder / f"glyph-{index}.png"
        path.write_bytes(encode(Image.fromarray(images[index])))
        paths.append(path)
    return paths


def local_references(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


# --- what the server sends --------------------------------------------------------------------------------


def test_page_and_its_assets_are_served_from_the_package(client: TestClient):
    resp = client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert '<label for="files">' in html and re.search(
        r'<input id="files"[^>]* type="file"[^>]* multiple', html
    )
    refs = local_references(html)
    assert {"static/page.js", "static/page.css"} <= set(refs)
    for ref in refs:
        assert not ref.startswith(("http:", "https:", "//")), ref
        body = client.get(f"/{ref}")
        assert body.status_code == 200, ref
        assert "http://" not in body.text and "https://" not in body.text, ref


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_load_their_assets_from_this_server(client: TestClient, path: str):
    html = client.get(path).text
    refs = [a or b for a, b in re.findall(r'(?:src|href)="([^"]+)"|url: \'([^\']+)\'', html)]
    assert refs and all(r.startswith("/") and not r.startswith("//") for r in refs), refs
    for ref in refs:
        assert client.get(ref).status_code == 200, ref


def test_model_lists_each_class_character(client: TestClient):
    info = client.get("/model").json()
    assert info["characters"] == [CLASS_CHARACTERS[name] for name in info["class_names"]]
    assert "".join(info["characters"]) == "大日月牛翌田勿矢巳木"


def woff_characters(data: bytes) -> set[str]:
    """The characters a WOFF 1.0 font maps to a glyph (its Windows Unicode cmap, format 4), read with zlib and
    struct alone: no font library is in the lock."""
    assert data[:4] == b"wOFF", data[:4]
    tables = {}
    for i in range(struct.unpack(">H", data[12:14])[0]):
        tag, offset, packed, size, _ = struct.unpack(">4sIIII", data[44 + 20 * i : 64 + 20 * i])
        raw = data[offset : offset + packed]
        tables[tag] = zlib.decompress(raw) if packed < size else raw
    cmap = tables[b"cmap"]

    def u16s(at: int, n: int) -> tuple[int, ...]:
        return struct.unpack(f">{n}H", cmap[at : at + 2 * n])

    chars = set()
    for i in range(u16s(2, 1)[0]):
        platform, encoding = u16s(4 + 8 * i, 2)
        (at,) = struct.unpack(">I", cmap[8 + 8 * i : 12 + 8 * i])
        if (platform, encoding) != (3, 1) or u16s(at, 1)[0] != 4:
            continue
        segments = u16s(at + 6, 1)[0] // 2
        ends = u16s(at + 14, segments)
        starts = u16s(at + 16 + 2 * segments, segments)
        deltas = u16s(at + 16 + 4 * segments, segments)
        ranges_at = at + 16 + 6 * segments
        ranges = u16s(ranges_at, segments)
        for s, (first, last, delta, rng) in enumerate(zip(starts, ends, deltas, ranges, strict=True)):
            for code in range(first, last + 1):
                glyph = code if rng == 0 else u16s(ranges_at + 2 * s + rng + 2 * (code - first), 1)[0]
                if glyph and (glyph + delta) & 0xFFFF:
                    chars.add(chr(code))
    return chars


def test_the_page_ships_a_font_with_exactly_the_class_characters(client: TestClient):
    font = client.get("/static/glyphs.woff")
    assert font.status_code == 200
    assert woff_characters(font.content) == set(CLASS_CHARACTERS.values())
    assert len(font.content) < 8_000  # a subset: the full font is 20 MB
    assert "SIL OPEN FONT LICENSE Version 1.1" in (STATIC_DIR / "OFL.txt").read_text(encoding="utf-8")
    css = client.get("/static/page.css").text
    face = re.search(r"@font-face\s*{([^}]*)}", css)
    assert face and f'font-family: "{FONT_FAMILY}"' in face[1] and 'url("glyphs.woff")' in face[1]
    # The range the browser fetches the font for: every class character, no more.
    codes = {chr(int(code, 16)) for code in re.findall(r"U\+([0-9A-F]+)", face[1])}
    assert codes == set(CLASS_CHARACTERS.values())
    assert css.count(f'font-family: "{FONT_FAMILY}", ') == 2  # the page's text and the .char spans


def data_url_pixels(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))))


def test_include_input_returns_what_the_model_saw(client: TestClient, sample_test_images):
    # A large, dark-on-light, off-centre rendition: the converted square differs from the upload.
    glyph = sample_test_images[0][3]
    scan = Image.fromarray(255 - np.pad(glyph, ((10, 40), (5, 0)))).resize((99, 156))
    files = [("files", ("scan.png", encode(scan), "image/png"))]
    plain = client.post("/predict", files=files).json()["predictions"][0]
    resp = client.post("/predict", files=files, params={"include": "input"})
    assert resp.status_code == 200, resp.text
    pred = resp.json()["predictions"][0]
    assert plain["input"] is None
    assert {k: v for k, v in pred.items() if k != "input"} == {k: v for k, v in plain.items() if k != "input"}
    np.testing.assert_array_equal(data_url_pixels(pred["input"]), convert(scan, 28))
    bad = client.post(
        "/predict", files=[("files", ("a.txt", b"text", "text/plain"))], params={"include": "input"}
    )
    assert bad.status_code == 422 and bad.json()["detail"].startswith("a.txt: not an image")
    assert client.post("/predict", files=files, params={"include": "everything"}).status_code == 422
    params = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["parameters"]
    assert "include" in [p["name"] for p in params]


# --- in a browser ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(model_file: Path) -> Iterator[str]:
    env = {
        "ORACLE_MNIST_MODEL": str(model_file),
        **{f"ORACLE_MNIST_{k.upper()}": str(v) for k, v in LIMITS.items()},
    }
    with serve_in_subprocess(env) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium that can reach 127.0.0.1 only: every other host name fails to resolve, so a page
    that needs a CDN shows it."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, condition: Any, timeout: float = 60) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def open_page(driver: Any, url: str, width: int = 1280, height: int = 900, scale: float = 1) -> None:
    """`scale` 2 at half the width is what 200% browser zoom does to the layout."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": width < 500},
    )
    driver.get(url + "/")
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))


def cards(driver: Any, count: int) -> list[dict[str, Any]]:
    """The result cards once `count` of them are finished: file, state, shown text, top class, images."""
    script = """
        return Array.from(document.querySelectorAll('#results .card')).map(c => ({
          file: c.dataset.file, state: c.dataset.state, text: c.innerText,
          index: c.dataset.index === undefined ? null : Number(c.dataset.index),
          top: (c.querySelector('.top .name') || {}).textContent || null,
          char: (c.querySelector('.top .char') || {}).textContent || null,
          rows: c.querySelectorAll('.topk li').length,
          seen: c.querySelector('img.seen') ? [c.querySelector('img.seen').naturalWidth,
                                               c.querySelector('img.seen').naturalHeight] : null,
          unsure: c.querySelector('.unsure') !== null,
          error: (c.querySelector('.error') || {}).textContent || null}));"""
    wait(
        driver,
        lambda d: (
            (got := d.execute_script(script))
            and len(got) == count
            and all(c["state"] != "pending" and (c["seen"] is None or c["seen"][0]) for c in got)
        ),
    )
    return driver.execute_script(script)


def cli_predictions(model: Path, paths: list[Path]) -> dict[str, str]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "oracle_mnist.cli",
            "predict",
            "--json",
            "--model",
            str(model),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return {Path(row["file"]).name: row["name"] for row in json.loads(proc.stdout)}


def no_horizontal_scroll(driver: Any) -> bool:
    # The root's clientWidth is the layout viewport (a phone's zooms out to show overflow, so not innerWidth).
    return driver.execute_script(
        "const root = document.documentElement; return root.scrollWidth <= root.clientWidth"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "viewport", [(1280, 900, 1), (640, 450, 2), (375, 667, 2)], ids=["desktop", "zoom-200", "phone"]
)
def test_page_shows_the_clis_answer_for_real_images(
    browser, server: str, model_file: Path, glyph_files: list[Path], viewport
):
    open_page(browser, server, *viewport)
    browser.find_element("id", "files").send_keys("\n".join(map(str, glyph_files[:3])))
    shown = cards(browser, 3)
    expected = cli_predictions(model_file, glyph_files[:3])
    assert {c["file"]: c["top"] for c in shown} == expected
    for card in shown:
        assert card["state"] == "done" and card["char"] == CLASS_CHARACTERS[card["top"]]
        assert card["rows"] == 3 and card["seen"] == [28, 28]
    assert no_horizontal_scroll(browser)


@pytest.mark.slow
def test_page_classifies_a_dropped_image(browser, server: str, model_file: Path, glyph_files: list[Path]):
    open_page(browser, server)
    browser.execute_script(
        """const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
           const dt = new DataTransfer();
           dt.items.add(new File([bytes], arguments[1], {type: 'image/png'}));
           document.querySelector('#drop').dispatchEvent(
             new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));""",
        base64.b64encode(glyph_files[3].read_bytes()).decode(),
        glyph_files[3].name,
    )
    [card] = cards(browser, 1)
    assert card["top"] == cli_predictions(model_file, glyph_files[3:])[glyph_files[3].name]


@pytest.mark.slow
def test_page_shows_each_error_beside_its_file(browser, server: str, glyph_files: list[Path], tmp_path: Path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, not an image")
    noise = tmp_path / "noise.png"
    noise.write_bytes(encode(Image.effect_noise((200, 200), 80)))
    assert noise.stat().st_size > LIMITS["max_file_bytes"]
    files = [glyph_files[0], notes, noise, glyph_files[1], glyph_files[2]]
    open_page(browser, server)
    browser.find_element("id", "files").send_keys("\n".join(map(str, files)))
    shown = {c["file"]: c for c in cards(browser, 5)}
    assert [shown[f.name]["state"] for f in files] == ["done", "error", "error", "done", "error"]
    assert "not an image" in shown["notes.txt"]["error"]
    assert "too large" in shown["noise.png"]["error"]
    assert "at most 4 images" in shown[glyph_files[2].name]["error"]
    for card in shown.values():
        assert not re.search(r"[{}]|detail|null|undefined", card["text"]), card["text"]


@pytest.mark.slow
def test_page_flags_an_unsure_answer_when_the_api_says_so(browser, server: str, glyph_files: list[Path]):
    open_page(browser, server)
    # A real glyph without a minimum confidence is not unsure: the page shows no flag; a response that
    # carries one gets it.
    browser.find_element("id", "files").send_keys(str(glyph_files[0]))
    [plain] = cards(browser, 1)
    assert plain["state"] == "done" and not plain["unsure"]
    browser.execute_script(
        """const real = window.fetch;
           window.fetch = async (...args) => {
             const resp = await real(...args);
             if (!String(args[0]).startsWith('predict')) return resp;
             const body = await resp.json();
             body.predictions.forEach(p => { p.unsure = true; });
             return new Response(JSON.stringify(body), {status: resp.status});
           };
           document.querySelector('#results').replaceChildren();"""
    )
    browser.find_element("id", "files").send_keys(str(glyph_files[0]))
    [flagged] = cards(browser, 1)
    assert flagged["unsure"] and "Unsure" in flagged["text"] and "null" not in flagged["text"]


@pytest.mark.slow
def test_page_draws_the_class_characters_with_its_own_font(browser, server: str):
    open_page(browser, server)  # the model's description lists every class with its character
    wait(browser, lambda d: d.execute_script("return document.fonts.status === 'loaded'"))
    faces = browser.execute_script(
        "return Array.from(document.fonts).map(f => [f.family.replace(/\"/g, ''), f.status])"
    )
    assert faces == [[FONT_FAMILY, "loaded"]]
    # What Chromium drew the text with, by font: each class character once, all from the shipped font
    # (a character missing from it would be drawn from another font, or as a box), whatever this machine
    # has installed.
    browser.execute_cdp_cmd("DOM.enable", {})
    browser.execute_cdp_cmd("CSS.enable", {})
    root = browser.execute_cdp_cmd("DOM.getDocument", {})["root"]["nodeId"]
    node = browser.execute_cdp_cmd("DOM.querySelector", {"nodeId": root, "selector": "#model"})["nodeId"]
    fonts = browser.execute_cdp_cmd("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
    text = browser.find_element("id", "model").text
    assert all(char in text for char in CLASS_CHARACTERS.values())
    ours = [f for f in fonts if f["familyName"] == FONT_FAMILY]
    assert ours and ours[0]["isCustomFont"], fonts
    assert ours[0]["glyphCount"] == len(CLASS_CHARACTERS), fonts


@pytest.mark.slow
def test_page_says_why_a_blank_or_tiny_image_is_unsure(browser, server: str, tmp_path: Path):
    blank = tmp_path / "blank.png"
    blank.write_bytes(encode(Image.new("L", (100, 100), 255)))
    dot = tmp_path / "dot.png"
    dot.write_bytes(encode(Image.new("L", (1, 1), 0)))
    open_page(browser, server)
    browser.find_element("id", "files").send_keys(f"{blank}\n{dot}")
    shown = {c["file"]: c for c in cards(browser, 2)}
    assert shown["blank.png"]["unsure"] and "holds no ink" in shown["blank.png"]["text"]
    assert shown["dot.png"]["unsure"] and "too small to hold a character" in shown["dot.png"]["text"]


@pytest.mark.slow
def test_page_works_from_the_keyboard_alone(browser, server: str, glyph_files: list[Path]):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_page(browser, server)
    focused = "return [document.activeElement.id, document.activeElement.labels?.[0]?.textContent]"
    ActionChains(browser).send_keys(Keys.TAB).perform()
    assert browser.execute_script(focused) == ["files", "Choose one or more images"]
    outline = "return getComputedStyle(document.activeElement).outlineStyle"
    assert browser.execute_script(outline) != "none"  # a visible focus ring
    # Enter or Space opens the system file chooser; selenium types the chosen path into the focused picker.
    browser.switch_to.active_element.send_keys(str(glyph_files[0]))
    assert cards(browser, 1)[0]["state"] == "done"
    ActionChains(browser).send_keys(Keys.TAB).perform()
    assert browser.execute_script(focused)[0] == "clear"
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    wait(
        browser, lambda d: d.execute_script("return document.querySelectorAll('#results .card').length === 0")
    )


@pytest.mark.slow
def test_docs_render_without_network(browser, server: str):
    browser.get(server + "/docs")
    title = wait(browser, lambda d: d.find_elements("css selector", "#swagger-ui .info .title"))
    assert title[0].text.startswith("oracle-mnist")
    assert wait(browser, lambda d: d.find_elements("css selector", "#swagger-ui .opblock-summary-path"))
    browser.get(server + "/redoc")
    assert wait(browser, lambda d: "/predict" in d.find_element("tag name", "body").text)
