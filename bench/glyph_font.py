"""Make the page's font: src/oracle_mnist/static/glyphs.woff, the ten class characters and nothing else.

A machine without a CJK font draws a box for each of 大 日 月 牛 翌 田 勿 矢 巳 木, so the page ships them. They
are cut from Noto Serif CJK SC Regular, version 2.001 (Debian bookworm's fonts-noto-cjk 1:20220127+repack1-1,
NotoSerifCJK-Regular.ttc; SIL Open Font License 1.1, static/OFL.txt), and the cut is renamed "Oracle MNIST
Glyphs", as the licence asks of a modified version. The characters come from config.CLASS_CHARACTERS, the list
/model gives the page. fontTools is a tool of this script only, not of the project (it is not in the lock):

    apt-get download fonts-noto-cjk && dpkg-deb -x fonts-noto-cjk_*.deb noto
    pip install fonttools
    python bench/glyph_font.py noto/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc

WOFF 1.0 (zlib), not WOFF2: WOFF2's Brotli is in no locked package, and with zlib tests/test_page.py reads the
font's character map with the standard library alone; it takes 2,628 bytes against 2,208. The output is the same
bytes on every run (no timestamp is written).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTCollection, TTFont

from oracle_mnist.config import CLASS_CHARACTERS

STATIC = Path(__file__).resolve().parents[1] / "src/oracle_mnist/static"
SOURCE_FAMILY = "Noto Serif CJK SC"
FAMILY = "Oracle MNIST Glyphs"
# Kept from the source's name table: the copyright (0) and the licence (13, 14); 1-6 are rewritten below.
NAME_IDS = [0, 1, 2, 3, 4, 5, 6, 13, 14]


def source_font(path: Path) -> TTFont:
    """The Simplified Chinese face of the collection, by its name (the index differs between releases)."""
    fonts = TTCollection(str(path)).fonts if path.suffix == ".ttc" else [TTFont(str(path))]
    for font in fonts:
        if font["name"].getDebugName(1) == SOURCE_FAMILY:
            return font
    raise SystemExit(f"{path}: no {SOURCE_FAMILY!r} face in it")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="NotoSerifCJK-Regular.ttc (or an .otf of its SC face)")
    parser.add_argument("-o", "--out", type=Path, default=STATIC / "glyphs.woff")
    args = parser.parse_args()
    font = source_font(args.source)
    version = font["name"].getDebugName(5)
    options = subset.Options()
    # Single characters set horizontally: no shaping and no vertical metrics or forms.
    options.layout_features = []
    options.drop_tables += ["BASE", "GSUB", "GPOS", "VORG", "vhea", "vmtx"]
    options.hinting = False
    options.desubroutinize = True  # ten glyphs share no subroutines worth keeping; compresses better
    options.name_IDs = NAME_IDS
    options.flavor = "woff"
    subsetter = subset.Subsetter(options)
    subsetter.populate(text="".join(CLASS_CHARACTERS.values()))
    subsetter.subset(font)
    names = font["name"]
    for name_id, value in {
        1: FAMILY,
        2: "Regular",
        3: f"{FAMILY} Regular; subset of {SOURCE_FAMILY} {version}",
        4: FAMILY,
        5: version,
        6: FAMILY.replace(" ", "") + "-Regular",
    }.items():
        names.setName(value, name_id, 3, 1, 0x409)  # Windows, English: the names browsers read
    font.recalcTimestamp = False
    font.flavor = "woff"
    font.save(str(args.out))
    print(f"{args.out}: {len(CLASS_CHARACTERS)} characters, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
