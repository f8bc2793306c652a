"""Reading Shapes-64 attributes back: from pixels (deterministic image analysis, no learned model) and
from canonical captions.

The reader follows ``shared/spec/shapes-64.md``: the background is the dominant colour of the border
pixels; the object is the set of pixels clearly different from it; its colour is the palette entry
nearest the median object pixel; its position the grid cell of its centroid; its size class follows
from its bounding-box side; its shape from how much of its bounding box it fills. ``tests/test_attributes.py``
checks it against ground-truth renderings.
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
CELL_EDGES = (24.0, 40.0)  # grid-cell boundaries in px, halfway between the nominal centres 16, 32, 48
SMALL_BELOW = 23  # bounding-box side in px: below is small (14–18 drawn), else large (28–34 drawn)
# Bounding-box fill ratio: ideally square 1.0, circle π/4 ≈ 0.79, triangle 0.5. On ground-truth renderings
# pixel rounding spreads them to 0.98–1.0, 0.68–0.88 and 0.50–0.60; the thresholds sit midway between.
SQUARE_ABOVE = 0.93
CIRCLE_ABOVE = 0.645

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

    # 2. Object: pixels clearly different from the background; then, to measure its outline, the pixels
    # nearer the object's colour than the background's (coverage above one half on anti-aliased edges).
    offset = pixels - background  # (H, W, 3)
    candidates = (offset**2).sum(-1) > OBJECT_DISTANCE**2
    if candidates.sum() < MIN_OBJECT_PIXELS:
        return Attributes(background=background_name)
    direction = np.median(pixels[candidates], axis=0) - background  # (3,)
    mask = offset @ direction > 0.5 * (direction @ direction)  # (H, W)
    if mask.sum() < MIN_OBJECT_PIXELS:
        return Attributes(background=background_name)
    color_name = _PALETTE_NAMES[int(nearest_color(np.median(pixels[mask], axis=0)))]

    # 3. Geometry: centroid → grid cell, bounding-box side → size, fill ratio → shape.
    rows, cols = np.nonzero(mask)
    center_y, center_x = rows.mean() + 0.5, cols.mean() + 0.5  # pixel centres, in px
    column, row = (int(np.searchsorted(CELL_EDGES, c)) for c in (center_x, center_y))
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = len(rows) / (height * width)
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
