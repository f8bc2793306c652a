"""Shapes-64: the procedural text-to-image data set behind the embedded default model.

Follows ``shared/spec/shapes-64.md``: 64 × 64 RGB images of one circle, square or triangle on a flat
background, each fully described by its caption. Coordinates are continuous pixels: pixel ``(row, col)``
covers ``[col, col + 1) × [row, row + 1)``, so the frame is ``[0, 64] × [0, 64]`` and a centre at
x = 16 lies on the edge between columns 15 and 16.

Value ranges: rendered images are uint8 (H, W, 3) in 0–255; model tensors are float32 (B, 3, H, W) in
[-1, 1] (see :func:`to_tensor`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------
# The vocabulary of the spec

IMAGE_SIZE = 64
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, tuple[int, int]] = {"small": (14, 18), "large": (28, 34)}  # bounding-box side range in px
POSITIONS: dict[str, tuple[int, int]] = {  # phrase → nominal bounding-box centre (x, y) in px
    "in the top left corner": (16, 16),
    "at the top": (32, 16),
    "in the top right corner": (48, 16),
    "on the left": (16, 32),
    "in the center": (32, 32),
    "on the right": (48, 32),
    "in the bottom left corner": (16, 48),
    "at the bottom": (32, 48),
    "in the bottom right corner": (48, 48),
}
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("purple", "triangle"),
        ("orange", "circle"),
        ("green", "square"),
        ("white", "triangle"),
        ("yellow", "square"),
    }
)
JITTER = 2.0  # max offset of the centre from its nominal position, px
SHADE = 12  # max per-channel offset of a rendered colour from its palette value
SUPERSAMPLE = 4  # anti-aliasing: coverage from SUPERSAMPLE × SUPERSAMPLE samples per pixel
HELD_OUT_MODES = ("exclude", "only", "any")

_PAIRS: dict[str, list[tuple[str, str]]] = {
    "exclude": [(c, s) for c in PALETTE for s in SHAPES if (c, s) not in HELD_OUT],
    "only": sorted(HELD_OUT),
    "any": [(c, s) for c in PALETTE for s in SHAPES],
}


# ---------------------------------------------------------------------------------------------------------
# Specs: what one image shows


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that determines one image: the caption's attributes plus the drawn continuous values.

    Attributes:
        shape: One of ``SHAPES``.
        size: ``"small"`` or ``"large"``.
        color: Object colour, a ``PALETTE`` name.
        background: Background colour, a different ``PALETTE`` name.
        position: A ``POSITIONS`` phrase.
        center_x: Bounding-box centre x in px, within ``JITTER`` of the nominal position.
        center_y: Bounding-box centre y in px, likewise.
        side: Bounding-box side in px, within the size's range ``SIZES[size]``.
        color_shade: Per-channel offset of the object's colour from its palette value, each in [-12, 12].
        background_shade: Likewise for the background.
    """

    shape: str
    size: str
    color: str
    background: str
    position: str
    center_x: float
    center_y: float
    side: float
    color_shade: tuple[int, int, int]
    background_shade: tuple[int, int, int]

    @property
    def color_rgb(self) -> tuple[int, int, int]:
        """The object's rendered colour, 0–255."""
        return _shaded(self.color, self.color_shade)

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        """The background's rendered colour, 0–255."""
        return _shaded(self.background, self.background_shade)

    @property
    def attributes(self) -> dict[str, str]:
        """The five captioned attributes by name."""
        return {
            "shape": self.shape,
            "color": self.color,
            "background": self.background,
            "size": self.size,
            "position": self.position,
        }


def _shaded(name: str, shade: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, v + d)) for v, d in zip(PALETTE[name], shade))
    return r, g, b


def spec_from_attributes(
    shape: str, size: str, color: str, background: str, position: str, rng: np.random.Generator
) -> ShapeSpec:
    """Draw the continuous values (centre jitter, side, shades) for given attributes.

    The jitter range is narrowed where needed so that the object stays inside the frame (a 34 px object
    centred at nominal x = 16 may only move right, to 17–18).

    Args:
        shape, size, color, background, position: The attributes, as in :class:`ShapeSpec`.
        rng: The source of randomness.

    Returns:
        The spec.

    Raises:
        ValueError: an unknown attribute value, or the same colour for object and background.
    """
    for name, value, allowed in (
        ("shape", shape, SHAPES),
        ("size", size, SIZES),
        ("color", color, PALETTE),
        ("background", background, PALETTE),
        ("position", position, POSITIONS),
    ):
        if value not in allowed:
            raise ValueError(f"Unknown {name} {value!r}; expected one of {list(allowed)}.")
    if color == background:
        raise ValueError(f"The object and the background must differ in colour; both are {color!r}.")
    low, high = SIZES[size]
    side = float(rng.uniform(low, high))
    nominal_x, nominal_y = POSITIONS[position]
    center_x, center_y = (
        float(rng.uniform(max(c - JITTER, side / 2), min(c + JITTER, IMAGE_SIZE - side / 2)))
        for c in (nominal_x, nominal_y)
    )
    shades = rng.integers(-SHADE, SHADE + 1, size=6)
    return ShapeSpec(
        shape=shape,
        size=size,
        color=color,
        background=background,
        position=position,
        center_x=center_x,
        center_y=center_y,
        side=side,
        color_shade=(int(shades[0]), int(shades[1]), int(shades[2])),
        background_shade=(int(shades[3]), int(shades[4]), int(shades[5])),
    )


def sample_spec(rng: np.random.Generator, *, held_out: str = "exclude") -> ShapeSpec:
    """Draw a random spec: attributes uniformly, then the continuous values.

    Args:
        rng: The source of randomness.
        held_out: ``"exclude"`` (training: never a ``HELD_OUT`` (colour, shape) pair), ``"only"`` (only
            held-out pairs) or ``"any"``.

    Returns:
        The spec; its background always differs from its colour.
    """
    if held_out not in _PAIRS:
        raise ValueError(f"held_out={held_out!r} is not one of {HELD_OUT_MODES}.")
    pairs = _PAIRS[held_out]
    color, shape = pairs[int(rng.integers(len(pairs)))]
    backgrounds = [name for name in PALETTE if name != color]
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    return spec_from_attributes(shape, size, color, background, position, rng)


# ---------------------------------------------------------------------------------------------------------
# Rendering

_SUBPIXEL = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sample offsets inside one pixel


def _inside(spec: ShapeSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether points (x (1, W), y (H, 1), in px) lie inside the shape → bool (H, W)."""
    half = spec.side / 2
    dx, dy = x - spec.center_x, y - spec.center_y
    if spec.shape == "circle":
        return dx * dx + dy * dy <= half * half
    if spec.shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Triangle pointing up: apex at (cx, top), base of width `side` at the bottom, so the half-width at
    # depth d below the apex is d / 2.
    depth = dy + half
    return (np.abs(dx) <= depth / 2) & (depth >= 0) & (dy <= half)


def coverage(spec: ShapeSpec) -> tuple[slice, slice, np.ndarray]:
    """The fraction of each pixel the object covers, in the pixel window around its bounding box.

    Returns:
        ``(rows, cols, cov)``: the window as slices of the 64 × 64 frame and float32 (h, w) in [0, 1].
    """
    half = spec.side / 2
    x0, x1 = max(0, math.floor(spec.center_x - half)), min(IMAGE_SIZE, math.ceil(spec.center_x + half))
    y0, y1 = max(0, math.floor(spec.center_y - half)), min(IMAGE_SIZE, math.ceil(spec.center_y + half))
    xs = (np.arange(x0, x1)[:, None] + _SUBPIXEL).reshape(1, -1)  # (1, w * S)
    ys = (np.arange(y0, y1)[:, None] + _SUBPIXEL).reshape(-1, 1)  # (h * S, 1)
    inside = _inside(spec, xs, ys).reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE)
    cov = inside.mean(axis=(1, 3), dtype=np.float32)  # (h, w)
    return slice(y0, y1), slice(x0, x1), cov


def render(spec: ShapeSpec) -> np.ndarray:
    """Draw one image: the object over a flat background, edges anti-aliased by coverage.

    Args:
        spec: What to draw.

    Returns:
        uint8 (64, 64, 3), 0–255.
    """
    background = np.asarray(spec.background_rgb, dtype=np.float32)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = spec.background_rgb
    rows, cols, cov = coverage(spec)
    blend = background + cov[..., None] * (np.asarray(spec.color_rgb, dtype=np.float32) - background)
    image[rows, cols] = np.rint(blend).astype(np.uint8)
    return image


def render_batch(specs: Sequence[ShapeSpec]) -> np.ndarray:
    """Draw several images: uint8 (B, 64, 64, 3)."""
    images = np.empty((len(specs), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, spec in enumerate(specs):
        images[i] = render(spec)
    return images


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 pixels (..., H, W, 3) in 0–255 → float32 tensor (..., 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------------------
# Captions

CANONICAL_PROBABILITY = 0.5  # share of varied captions returned in exactly the canonical form
DROP_PROBABILITY = 0.25  # chance of leaving out each of the size, position and background phrases


def canonical_caption(spec: ShapeSpec) -> str:
    """The caption every evaluation uses.

    E.g. ``a large red circle in the top left corner on a blue background``. The template is the spec's,
    word for word: ``a`` even before ``orange`` (``an`` is a training variation).
    """
    return f"a {spec.size} {spec.color} {spec.shape} {spec.position} on a {spec.background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def varied_caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """A training caption: the canonical one half of the time, otherwise a truthful variation of it.

    Variations leave out the size, position or background phrase (each with probability 1/4; the image
    still has a value for it), put the background before the position or the position first, and use
    ``an`` where English wants it (``an orange circle``, ``on an orange background``).

    Args:
        spec: The image's spec.
        rng: The source of randomness.

    Returns:
        A caption naming only attributes true of the image.
    """
    if rng.random() < CANONICAL_PROBABILITY:
        return canonical_caption(spec)
    keep_size, keep_position, keep_background = rng.random(3) >= DROP_PROBABILITY
    words = ([spec.size] if keep_size else []) + [spec.color, spec.shape]
    noun = f"{_article(words[0])} {' '.join(words)}"
    background = f"on {_article(spec.background)} {spec.background} background" if keep_background else None
    position = spec.position if keep_position else None
    order = int(rng.integers(3))
    if order == 2 and position is not None:  # position first: "in the center, a red circle on ..."
        return ", ".join([position, " ".join(p for p in (noun, background) if p)])
    tail = (position, background) if order == 0 else (background, position)
    return " ".join(p for p in (noun, *tail) if p)


def swap_shape(caption: str, rng: np.random.Generator) -> str:
    """The caption with its shape word replaced by another shape: a hard negative for the discriminator.

    The new shape is drawn among those that keep the (colour, shape) pair out of ``HELD_OUT``, so a
    held-out pair never appears in training, not even as a negative.

    Args:
        caption: A Shapes-64 caption (canonical or varied): its colour word directly precedes its shape word.
        rng: The source of randomness.

    Returns:
        The caption with only the shape word changed.

    Raises:
        ValueError: If the caption names no shape.
    """
    words = caption.split(" ")
    index = next((i for i, word in enumerate(words) if word.rstrip(",") in SHAPES), None)
    if index is None:
        raise ValueError(f"swap_shape: the caption {caption!r} names none of the shapes {SHAPES}.")
    shape = words[index].rstrip(",")
    color = words[index - 1] if index > 0 else ""
    choices = [other for other in SHAPES if other != shape and (color, other) not in HELD_OUT]
    words[index] = words[index].replace(shape, choices[int(rng.integers(len(choices)))])
    return " ".join(words)


# ---------------------------------------------------------------------------------------------------------
# Data sets


def sample_batch(
    rng: np.random.Generator, batch_size: int, *, held_out: str = "exclude", canonical: bool = False
) -> tuple[torch.Tensor, list[str], list[ShapeSpec]]:
    """A random training batch.

    Args:
        rng: The source of randomness.
        batch_size: Number of images B.
        held_out: As in :func:`sample_spec`.
        canonical: Canonical captions only (else :func:`varied_caption`).

    Returns:
        ``(images, captions, specs)``: float32 (B, 3, 64, 64) in [-1, 1], B captions and B specs.
    """
    specs = [sample_spec(rng, held_out=held_out) for _ in range(batch_size)]
    captions = [canonical_caption(s) if canonical else varied_caption(s, rng) for s in specs]
    return to_tensor(render_batch(specs)), captions, specs


class ShapesDataset(torch.utils.data.IterableDataset):
    """An endless, deterministic stream of ``(image, caption)``: float32 (3, 64, 64) in [-1, 1] and a str.

    Each rank and each DataLoader worker draws its own stream, from the seed sequence
    ``SeedSequence(seed, spawn_key=(rank, worker))``: the same seed, rank and worker count give the same
    data, and no two ranks or workers repeat each other.

    Args:
        seed: Seed of the stream.
        held_out: As in :func:`sample_spec`; ``"exclude"`` for training.
        canonical_only: Canonical captions only (else :func:`varied_caption`).
        rank: This process's rank among ``world_size`` data-parallel processes.
        world_size: Number of data-parallel processes.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        held_out: str = "exclude",
        canonical_only: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if held_out not in HELD_OUT_MODES:
            raise ValueError(f"held_out={held_out!r} is not one of {HELD_OUT_MODES}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}.")
        self.seed = seed
        self.held_out = held_out
        self.canonical_only = canonical_only
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(self.rank, worker_id)))
        while True:
            spec = sample_spec(rng, held_out=self.held_out)
            caption = canonical_caption(spec) if self.canonical_only else varied_caption(spec, rng)
            yield to_tensor(render(spec)), caption
