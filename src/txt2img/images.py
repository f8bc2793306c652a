"""Turning decoded images into what users asked for (PIL, numpy, tensors) and PNG files with metadata.

Convention: the decoder gives (B, 3, H, W) in [-1, 1]; every output here is in [0, 1] (floats) or
0–255 (PIL).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → float32 in [0, 1], clamped."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] → (B, H, W, 3) float32 numpy array."""
    return images.permute(0, 2, 3, 1).cpu().numpy()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) in [0, 1] → uint8 (B, H, W, 3), rounded to the nearest 8-bit value."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) in [0, 1] → RGB PIL images (rounded to the nearest 8-bit value)."""
    return [Image.fromarray(p) for p in to_uint8(images)]


def parameters_text(params: dict[str, Any]) -> str:
    """The widely used "parameters" text: the prompt on the first line, then ``Key: value`` pairs."""
    rest = ", ".join(f"{k.replace('_', ' ').capitalize()}: {v}" for k, v in params.items() if k != "prompt")
    return f"{params.get('prompt', '')}\n{rest}"


def save_png(image: Image.Image, path: str | os.PathLike, params: dict[str, Any]) -> Path:
    """Write ``image`` as a PNG carrying ``params`` in text chunks: ``parameters`` (readable) and ``txt2img`` (JSON)."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", parameters_text(params))
    info.add_itxt("txt2img", json.dumps(params))
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The generation parameters stored by :func:`save_png` in a PNG file (empty when it has none)."""
    with Image.open(path) as image:
        text = image.info.get("txt2img")
    return json.loads(text) if text else {}
