"""Reading Shapes-64 attributes back: from pixels (deterministic image analysis, no learned model) and
from canonical captions.

The reader follows ``shared/spec/shapes-64.md``: the background is the dominant colour of the border
pixels; the object is the set of pixels clearly different from it; its colour is the palette entry
nearest the median object pixel; its position the grid cell of its centroid; its size class follows
from its bounding-box side; its shape from how much of its bounding box it fills, both measured from each
pixel's coverage to a fraction of a pixel, so that an edge falling mid-pixel does not add a row.
``tests/test_attributes.py`` checks it against ground-truth renderings, also under pixel noise and blur.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from txt2img.training.shapes import IMAGE_SIZE, PALETTE, POSITIONS, SHAPES, SIZES

ATTRIBUTE_NAMES = ("shape", "color", "background", "size", "position")

BORDER = 2  # width in px of the frame ring whose dominant colour is the background
OBJECT_DISTANCE = 30.0  # a pixel this far (Euclidean, 0–255 RGB) from the background is clearly object
MIN_OBJECT_PIXELS = 12  # fewer object pixels than this: no object found
MIN_PIECE_PIXELS = 5  # a separate piece of the object smaller than this (and not the largest) is a speck
CELL_EDGES = (24.0, 40.0)  # grid-cell boundaries in px, halfway between the nominal centres 16, 32, 48
SMALL_BELOW = 23  # bounding-box side in px: below is small (14–18 drawn), else large (28–34 drawn)
COVERAGE_FLOOR = 0.1  # coverage within this of 0 or of 1 counts as 0 or 1: pixel noise, not an edge
# Bounding-box fill ratio, measured from coverage: ideally square 1.0, circle π/4 ≈ 0.79, triangle 0.5. On
# 9,000 ground-truth renderings it spreads to 0.998–1.0, 0.757–0.811 and 0.513–0.579; the thresholds sit
# midway between.
SQUARE_ABOVE = 0.905
CIRCLE_ABOVE = 0.67

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)  # (8, 3)
# (column, row) of the 3 × 3 grid → position phrase
_CELLS = {((x - 16) // 16, (y - 16) // 16): phrase for phrase, (x, y) in POSITIONS.items()}


@dataclass(frozen=True)
class Attributes:
    """The attributes read from one image; ``None`` where unreadable (e.g. no object found)."""

    shape: str | None = None
    size: str | None = None
    color: str | None = None
    background: str | None = None
    position: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        """The attributes by name."""
        return asdict(self)


def nearest_color(rgb: np.ndarray) -> np.ndarray:
    """Palette indices nearest to colours: float (..., 3) in 0–255 → int (...)."""
    distance = ((rgb[..., None, :] - _PALETTE_RGB) ** 2).sum(-1)  # (..., 8)
    return distance.argmin(-1)


def _with_neighbours(array: np.ndarray) -> np.ndarray:
    """Each pixel and its 8 neighbours, zero beyond the edges: (H, W) → (9, H, W)."""
    height, width = array.shape
    padded = np.pad(array, 1)
    return np.stack(
        [padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    )


def _without_specks(mask: np.ndarray) -> np.ndarray:
    """The mask without its separate pieces (8-connected) of under ``MIN_PIECE_PIXELS`` pixels, the largest
    piece always kept: bool (H, W) → bool (H, W)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:  # each piece takes its largest label, one pixel further each round
        spread = np.where(mask, _with_neighbours(labels).max(0), 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    names, sizes = np.unique(labels[mask], return_counts=True)
    kept = names[(sizes >= MIN_PIECE_PIXELS) | (sizes == sizes.max())]
    return np.isin(labels, kept)


def _profile(row_coverage: np.ndarray) -> np.ndarray:
    """Each row's share of the object's height from its most-covered pixels (R,): at least the lesser of
    the largest shares before and after it, so that a gap inside the object counts in full."""
    rising = np.maximum.accumulate(row_coverage)
    falling = np.maximum.accumulate(row_coverage[::-1])[::-1]
    return np.minimum(rising, falling)


def _extent(coverage: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """Height, width and area of the object in px, to a fraction of a pixel, from its coverage.

    Counting whole pixels over one half misreads an edge that falls mid-pixel: pixel noise lifts a few
    pixels of a half-covered row above one half, the bounding box gains a whole row for them, and a 16 px
    square fills 16/17 of it. Here a row counts for its most-covered pixel (one half for that row, in its
    height as in its area), so a square fills its box whatever its edges' sub-pixel position; a row inside
    the object counts in full however little of it is covered, so two pieces, stripes or dots fill their
    box as little as they do to the eye.

    Args:
        coverage: float (H, W) in [0, 1].
        mask: bool (H, W), the object's pixels (over one half, specks removed).

    Returns:
        ``(height, width, area)``, measured in the mask's bounding box grown by one pixel on each side
        (where an edge row under one half lies), with coverage within ``COVERAGE_FLOOR`` of 0 or 1 taken as 0
        or 1 and coverage outside the mask's 8 neighbours taken as 0.
    """
    rows, cols = np.nonzero(mask)
    stretched = np.clip((coverage - COVERAGE_FLOOR) / (1.0 - 2.0 * COVERAGE_FLOOR), 0.0, 1.0)
    covered = np.where(_with_neighbours(mask).any(0), stretched, 0.0)
    top, left = max(int(rows.min()) - 1, 0), max(int(cols.min()) - 1, 0)
    window = covered[top : rows.max() + 2, left : cols.max() + 2]
    height, width = _profile(window.max(1)).sum(), _profile(window.max(0)).sum()
    return float(height), float(width), float(window.sum())


def _border_pixels(image: np.ndarray) -> np.ndarray:
    middle = image[BORDER:-BORDER]
    parts = (image[:BORDER], image[-BORDER:], middle[:, :BORDER], middle[:, -BORDER:])
    return np.concatenate([p.reshape(-1, 3) for p in parts]).astype(np.float32)


def read_attributes(image: np.ndarray) -> Attributes:
    """Read the five attributes from one image.

    Args:
        image: uint8 (64, 64, 3), 0–255.

    Returns:
        The attributes; object attributes are ``None`` when no object stands out from the background.
    """
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"Expected an image of shape ({IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {image.shape}.")
    pixels = image.astype(np.float32)

    # 1. Background: the most frequent palette colour on the border, refined to the median of those pixels.
    border = _border_pixels(image)
    labels = nearest_color(border)
    dominant = np.bincount(labels, minlength=len(_PALETTE_NAMES)).argmax()
    background = np.median(border[labels == dominant], axis=0)  # (3,)
    background_name = _PALETTE_NAMES[int(nearest_color(background))]

    # 2. Object: pixels clearly different from the background. Each pixel's coverage, the fraction of it the
    # object covers, is its offset from the background along the object's colour: 0 on the background, 1
    # inside, between on anti-aliased edges. The object's pixels are those more than half covered.
    offset = pixels - background  # (H, W, 3)
    candidates = (offset**2).sum(-1) > OBJECT_DISTANCE**2
    if candidates.sum() < MIN_OBJECT_PIXELS:
        return Attributes(background=background_name)
    direction = np.median(pixels[candidates], axis=0) - background  # (3,)
    if direction @ direction == 0:  # the object's median colour is the background's: nothing stands out
        return Attributes(background=background_name)
    coverage = np.clip(offset @ direction / (direction @ direction), 0.0, 1.0)  # (H, W)
    mask = _without_specks(coverage > 0.5)
    if mask.sum() < MIN_OBJECT_PIXELS:
        return Attributes(background=background_name)
    color_name = _PALETTE_NAMES[int(nearest_color(np.median(pixels[mask], axis=0)))]

    # 3. Geometry: centroid → grid cell, bounding-box side → size, fill ratio → shape.
    rows, cols = np.nonzero(mask)
    center_y, center_x = rows.mean() + 0.5, cols.mean() + 0.5  # pixel centres, in px
    column, row = (int(np.searchsorted(CELL_EDGES, c)) for c in (center_x, center_y))
    height, width, area = _extent(coverage, mask)
    fill = area / (height * width)
    shape = "square" if fill > SQUARE_ABOVE else "circle" if fill > CIRCLE_ABOVE else "triangle"
    return Attributes(
        shape=shape,
        size="small" if max(height, width) < SMALL_BELOW else "large",
        color=color_name,
        background=background_name,
        position=_CELLS[column, row],
    )


# ---------------------------------------------------------------------------------------------------------
# Captions

_WORD = r"([a-z]+)"
_NOUN = re.compile(rf"\ban? (?:({'|'.join(SIZES)}) )?{_WORD} ({'|'.join(SHAPES)})\b")
_BACKGROUND = re.compile(rf"\bon an? {_WORD} background\b")
_POSITIONS_LONGEST_FIRST = sorted(POSITIONS, key=len, reverse=True)


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a caption names: the inverse of ``canonical_caption``.

    Also reads the training variations of ``varied_caption`` (phrases left out or reordered, ``an``);
    a phrase left out is absent from the result.

    Args:
        caption: e.g. ``a large red circle in the top left corner on a blue background``.

    Returns:
        The attributes named, by name (all five for a canonical caption).

    Raises:
        ValueError: the caption names no object, an unknown colour, or has words beyond these phrases.
    """
    text = caption.strip().lower()
    found: dict[str, str] = {}
    background = _BACKGROUND.search(text)
    if background:
        found["background"] = background.group(1)
        text = text[: background.start()] + text[background.end() :]
    for phrase in _POSITIONS_LONGEST_FIRST:
        if re.search(rf"\b{phrase}\b", text):
            found["position"] = phrase
            text = re.sub(rf"\b{phrase}\b", "", text, count=1)
            break
    noun = _NOUN.search(text)
    if noun is None:
        raise ValueError(f"No '[a|an] [size] <colour> <shape>' phrase in caption {caption!r}.")
    if noun.group(1):
        found["size"] = noun.group(1)
    found["color"], found["shape"] = noun.group(2), noun.group(3)
    rest = (text[: noun.start()] + text[noun.end() :]).replace(",", " ").split()
    unknown = [found[k] for k in ("color", "background") if k in found and found[k] not in PALETTE]
    if rest or unknown:
        raise ValueError(f"Caption {caption!r} has unknown words {rest + unknown}.")
    return found
