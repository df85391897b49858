"""figures.py: the misclassified gallery shows only mistakes, most confident first, and never fails empty."""

from __future__ import annotations

import numpy as np

from oracle_mnist.figures import misclassified_grid

NAMES = ("big", "sun", "moon")


def _images(n: int) -> np.ndarray:
    # Image k is filled with grey level 10 * (k + 1) (mod 250), so a tile's pixels identify the image it shows.
    return np.stack([np.full((28, 28), (10 * (k + 1)) % 250, np.uint8) for k in range(n)])


def test_grid_holds_mistakes_only_most_confident_first():
    labels = np.array([0, 1, 2, 0, 1])
    preds = np.array([0, 2, 2, 1, 0])  # images 1, 3, 4 are wrong
    confidence = np.array([0.9, 0.5, 0.9, 0.8, 0.6])
    grid = np.asarray(misclassified_grid(_images(5), labels, preds, confidence, NAMES, columns=2, scale=2))

    size = 56
    tile_w = grid.shape[1] // 2
    tile_h = grid.shape[0] // 2
    left = (tile_w - size) // 2
    first = grid[size // 2, left + size // 2]
    second = grid[size // 2, tile_w + left + size // 2]
    third = grid[tile_h + size // 2, left + size // 2]
    assert (first, second, third) == (40, 50, 20)  # images 3 (0.8), 4 (0.6), 1 (0.5)
    assert grid[tile_h + size // 2, tile_w + left + size // 2] == 255  # the fourth slot is empty


def test_grid_is_capped_and_has_a_placeholder_without_mistakes():
    labels = np.zeros(50, np.int64)
    capped = misclassified_grid(_images(50), labels, np.ones(50, np.int64), np.ones(50), NAMES, max_images=4)
    assert (
        capped.size[1]
        < misclassified_grid(_images(50), labels, np.ones(50, np.int64), np.ones(50), NAMES).size[1]
    )
    none = misclassified_grid(_images(3), np.zeros(3, np.int64), np.zeros(3, np.int64), np.ones(3), NAMES)
    assert np.asarray(none).min() == 0  # the text is drawn
