"""Evaluation figures as PIL images: the gallery of misclassified test images with true and predicted names."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def misclassified_grid(
    images: np.ndarray,
    labels: np.ndarray,
    preds: np.ndarray,
    confidence: np.ndarray,
    class_names: Sequence[str],
    max_images: int = 36,
    columns: int = 6,
    scale: int = 3,
) -> Image.Image:
    """Tiles of the most confidently wrong test images, each captioned "true: X" / "pred: Y (p)".

    Most confident first: those are the mistakes worth looking at (a label error or a real confusion).
    With no mistakes, a single line says so, so the plot always exists for DVC.
    """
    wrong = np.flatnonzero(preds != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:max_images]
    size = images.shape[1] * scale
    font = ImageFont.load_default(size=max(10, size // 7))
    line = int(font.size) + 3
    tile_w = max(size, *(int(font.getlength(f"pred: {n} (0.00)")) + 6 for n in class_names))
    tile_h = size + 2 * line + 6
    if wrong.size == 0:
        canvas = Image.new("L", (tile_w * 2, line * 2), 255)
        ImageDraw.Draw(canvas).text((4, line // 2), "no misclassified images", fill=0, font=font)
        return canvas
    cols = min(columns, wrong.size)
    rows = -(-wrong.size // cols)
    canvas = Image.new("L", (cols * tile_w, rows * tile_h), 255)
    draw = ImageDraw.Draw(canvas)
    for k, index in enumerate(wrong):
        left, top = (k % cols) * tile_w, (k // cols) * tile_h
        tile = Image.fromarray(images[index]).resize((size, size), Image.Resampling.NEAREST)
        canvas.paste(tile, (left + (tile_w - size) // 2, top))
        draw.text((left + 3, top + size + 2), f"true: {class_names[labels[index]]}", fill=0, font=font)
        pred_text = f"pred: {class_names[preds[index]]} ({confidence[index]:.2f})"
        draw.text((left + 3, top + size + 2 + line), pred_text, fill=0, font=font)
    return canvas
