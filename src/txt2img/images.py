"""Turning decoded images into what users asked for: PIL images, numpy arrays, tensors.

Convention: the decoder gives (B, 3, H, W) in [-1, 1]; every output here is in [0, 1] (floats) or
0–255 (PIL).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

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
