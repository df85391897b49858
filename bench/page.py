"""The page at `/` in headless Chromium against a real `uvicorn oracle_mnist.api:app` on 127.0.0.1: its weight and
the time from dropping one image to its result, and optionally a screenshot with real predictions.

    python bench/page.py                                   # models/model.pt, 20 drops
    python bench/page.py --model M.pt --screenshot docs/images/page.png

Weight: bytes of the HTML, JavaScript and CSS as served (uncompressed). Drop to result: measured in the page,
from dispatching a `drop` event with one real sample glyph (PNG) to the result card being filled in (upload,
decode, conversion, forward pass, PNG of the converted input, rendering); the first drop is a warm-up. Needs
Debian's `chromium` and `chromium-driver`, and selenium.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import CHROMIUM_FLAGS, SAMPLE_DIR, encode, enlarge, serve_in_subprocess, tint

from oracle_mnist.datasets import IDX_FILES, read_idx_split

DROP_AND_TIME = """
const [b64, name, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
document.querySelector('#results').replaceChildren();
const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
const dt = new DataTransfer();
dt.items.add(new File([bytes], name, {type: 'image/png'}));
const start = performance.now();
new MutationObserver((_, observer) => {
  const card = document.querySelector('#results .card');
  if (card && card.dataset.state !== 'pending') {
    observer.disconnect();
    const seen = card.querySelector('img.seen');
    (seen ? seen.decode() : Promise.resolve()).then(() => done(performance.now() - start));
  }
}).observe(document.querySelector('#results'), {subtree: true, childList: true, attributes: true});
document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
"""


def chromium(profile: Path) -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def page_weight(url: str) -> dict[str, int]:
    with httpx.Client(base_url=url) as http:
        return {path: len(http.get(path).content) for path in ("/", "/static/page.js", "/static/page.css")}


def open_page(driver: Any, url: str, width: int, height: int) -> None:
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    driver.get(url + "/")
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return document.body.dataset.ready === 'true'")
    )


def drop_times(driver: Any, url: str, png: bytes, runs: int) -> list[float]:
    open_page(driver, url, 1280, 900)
    driver.set_script_timeout(60)
    payload = base64.b64encode(png).decode()
    times = [driver.execute_async_script(DROP_AND_TIME, payload, "glyph.png") for _ in range(runs + 1)]
    return times[1:]


def screenshot(driver: Any, url: str, files: list[Path], out: Path) -> None:
    """The page after choosing `files`, cropped to its content."""
    width = 1100
    open_page(driver, url, width, 900)
    driver.find_element("id", "files").send_keys("\n".join(map(str, files)))
    WebDriverWait(driver, 120).until(
        lambda d: d.execute_script(
            "const c = [...document.querySelectorAll('#results .card')];"
            "return c.length === arguments[0] && c.every(x => x.dataset.state !== 'pending')"
            " && [...document.images].every(i => i.complete)",
            len(files),
        )
    )
    height = driver.execute_script("return document.documentElement.scrollHeight")
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    # 128 colours keep the PNG small enough for the docs (the page is mostly flat colour).
    shot.quantize(128).save(out, optimize=True)
    print(f"screenshot: {out} ({width}x{height}, {out.stat().st_size} bytes)")


def screenshot_files(folder: Path) -> list[Path]:
    """Real test glyphs: two as the dataset has them, two made to look like scans, and one text file."""
    images, labels = read_idx_split(*(SAMPLE_DIR / name for name in IDX_FILES["test"]), 10)
    picks = [int(np.flatnonzero(labels == label)[0]) for label in (0, 2, 5, 9)]
    files = []
    for n, index in enumerate(picks):
        glyph = images[index]
        img = Image.fromarray(glyph) if n < 2 else Image.fromarray(tint(enlarge(glyph, 5)))
        path = folder / f"{'glyph' if n < 2 else 'scan'}-{index}.{'png' if n < 2 else 'jpg'}"
        path.write_bytes(encode(img, "PNG" if n < 2 else "JPEG"))
        files.append(path)
    notes = folder / "notes.txt"
    notes.write_text("field notes, not an image\n")
    return [*files, notes]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--runs", type=int, default=20, help="timed drops (after one warm-up)")
    parser.add_argument(
        "--screenshot", type=Path, help="write a screenshot of the page with predictions here"
    )
    args = parser.parse_args()
    if not args.model.is_file():
        sys.exit(f"error: {args.model}: model file not found (run `dvc repro` or pass --model)")
    with (
        tempfile.TemporaryDirectory() as tmp,
        serve_in_subprocess({"ORACLE_MNIST_MODEL": str(args.model)}) as url,
    ):
        weight = page_weight(url)
        print(
            "page weight: "
            + ", ".join(f"{p} {n} B" for p, n in weight.items())
            + f"; total {sum(weight.values())} B"
        )
        files = screenshot_files(Path(tmp))
        driver = chromium(Path(tmp) / "profile")
        try:
            times = drop_times(driver, url, files[0].read_bytes(), args.runs)
            print(
                f"drop to result, one image ({args.runs} drops): median {statistics.median(times):.0f} ms, "
                f"min {min(times):.0f} ms, max {max(times):.0f} ms"
            )
            if args.screenshot:
                screenshot(driver, url, files, args.screenshot)
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
