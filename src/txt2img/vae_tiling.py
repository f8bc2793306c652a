"""Sliced and tiled decoding, shared by both decoders (``VAEDecoder``, ``TinyVAEDecoder``), so that a large
batch or a large image decodes within a bounded memory.

Slicing decodes one image of the batch at a time: the result equals the batched decode (up to float rounding),
and the decoder's activations are held for one image only.

Tiling cuts the latents into overlapping square tiles of ``tile_size`` latent pixels, decodes each tile on its
own, and cross-fades the decoded tiles in pixel space; the activations are held for one tile only (the output
image itself is still allocated whole).

Why naive tiling shows seams: a tile's border pixels are decoded without their neighbours (every 3×3
convolution zero-pads at the tile's edge instead of seeing the next tile), so two tiles that meet at a hard cut
disagree along it and the image shows a step there. Here each tile is decoded with ``overlap`` latent pixels of
context from its neighbour, and across the overlap the two tiles' weights ramp linearly from one to the other
(in both directions; every output pixel's weights sum to 1), so what disagreement is left is spread over
``overlap × scale_factor`` pixels instead of concentrated in one step.

What tiling cannot make equal: layers that look at the whole image see only their tile. In the KL decoder
(``VAEDecoder``) these are the GroupNorm layers (statistics per tile) and the mid block's self-attention
(which attends within the tile only), so a tiled decode differs slightly from the untiled one, most where
tiles differ in content; the blend keeps that difference free of seams but does not remove it. TAESD
(``TinyVAEDecoder``) has only convolutions: its tiled decode differs only where a tile's edge falls within a
convolution's reach of a blended pixel.

Units: ``tile_size`` and ``overlap`` count latent pixels (64 latent pixels = 512 image pixels for an 8× decoder).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

#: Defaults of ``enable_tiling``, in latent pixels: 512-pixel tiles for an 8× decoder, 128 pixels of blend.
DEFAULT_TILE_SIZE = 64
DEFAULT_OVERLAP = 16

DecodeFn = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Validated tiling settings, in latent pixels.

    Args:
        tile_size: Side of a square latent tile.
        overlap: Latent pixels that neighbouring tiles share, blended linearly; at most half of ``tile_size``,
            so that no pixel is blended from more than two tiles along an axis.
    """

    tile_size: int = DEFAULT_TILE_SIZE
    overlap: int = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        for name in ("tile_size", "overlap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Tiling: '{name}' must be a positive int (latent pixels), got {value!r}.")
        if 2 * self.overlap > self.tile_size:
            raise ValueError(
                f"Tiling: 'overlap' ({self.overlap}) must be less than 'tile_size' ({self.tile_size}) and at most "
                f"half of it ({self.tile_size // 2}), so that each pixel blends at most two tiles per axis."
            )


# ---------------------------------------------------------------------------------------------------------
# Pure functions: where the tiles go and how much each counts


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the tiles covering ``[0, length)``: every ``tile - overlap``, the last one flush with the end.

    All tiles are ``tile`` long (one tile of ``length`` if that is shorter); neighbours share at least
    ``overlap``, the last two possibly more.
    """
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def blend_weights(starts: list[int], tile: int, overlap: int, scale: int = 1) -> torch.Tensor:
    """Weights (len(starts), tile·scale) of each tile along one axis, at ``scale`` output pixels per latent pixel.

    Between tiles i and i+1 the weights ramp linearly over the last ``overlap`` latent pixels of tile i
    (all of their overlap, except before a last tile pushed back to end flush, where the rest of the
    overlap keeps tile i alone). Each output pixel's weights sum to 1 when ``2 · overlap ≤ tile``.
    """
    size, ramp = tile * scale, overlap * scale
    rise = (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp  # symmetric: rise[k] + rise[-1 - k] == 1
    weights = torch.ones(len(starts), size, dtype=torch.float64)
    for i in range(len(starts) - 1):
        weights[i, size - ramp :] = 1 - rise
        offset = (starts[i] + tile - overlap - starts[i + 1]) * scale  # where the ramp begins in tile i+1
        weights[i + 1, :offset] = 0
        weights[i + 1, offset : offset + ramp] = rise
    return weights


# ---------------------------------------------------------------------------------------------------------
# Decoding


def decode_tiled(latents: torch.Tensor, decode_fn: DecodeFn, tiling: Tiling) -> torch.Tensor:
    """Decode latents (B, c, h, w) tile by tile and blend the tiles: images (B, C, h·f, w·f).

    ``decode_fn`` maps latents to images at any size, with a fixed factor f. Latents that fit in one tile are
    decoded whole, unchanged.
    """
    h, w = latents.shape[-2:]
    tile, overlap = tiling.tile_size, tiling.overlap
    if h <= tile and w <= tile:
        return decode_fn(latents)
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    tile_h, tile_w = min(tile, h), min(tile, w)
    out: torch.Tensor | None = None
    for i, y in enumerate(rows):
        for j, x in enumerate(cols):
            decoded = decode_fn(latents[..., y : y + tile_h, x : x + tile_w])  # (B, C, tile_h·f, tile_w·f)
            if out is None:
                f = decoded.shape[-1] // tile_w
                out = decoded.new_zeros((*decoded.shape[:2], h * f, w * f))
                weights_y = blend_weights(rows, tile_h, overlap, f).to(decoded.device, decoded.dtype)
                weights_x = blend_weights(cols, tile_w, overlap, f).to(decoded.device, decoded.dtype)
            weight = weights_y[i][:, None] * weights_x[j][None, :]  # (tile_h·f, tile_w·f)
            out[..., y * f : (y + tile_h) * f, x * f : (x + tile_w) * f] += decoded * weight
    assert out is not None
    return out


def decode_sliced(latents: torch.Tensor, decode_fn: DecodeFn) -> torch.Tensor:
    """Decode latents (B, c, h, w) one image at a time: images (B, C, H, W)."""
    return torch.cat([decode_fn(latents[i : i + 1]) for i in range(latents.shape[0])])


class DecodeTiling:
    """``enable_slicing`` / ``enable_tiling`` for a decoder: plain attributes, read once per call.

    The settings are not saved with the model. A call reads them once at its start, so changing them from
    another thread affects later calls only.
    """

    #: Decode one image of the batch at a time.
    slicing: bool = False
    #: Decode in blended tiles (``None``: whole).
    tiling: Tiling | None = None
    #: The decoder's config (the class this mixes into sets it).
    config: Any

    def enable_slicing(self) -> None:
        """Decode one image of a batch at a time: same images, activations held for one image only."""
        self.slicing = True

    def disable_slicing(self) -> None:
        """Decode the whole batch at once (the default)."""
        self.slicing = False

    def enable_tiling(self, tile_size: int = DEFAULT_TILE_SIZE, overlap: int = DEFAULT_OVERLAP) -> None:
        """Decode large latents in overlapping tiles blended linearly, within a memory bounded by one tile.

        Args:
            tile_size: Side of a latent tile, in latent pixels (64 = 512 image pixels for an 8× decoder).
                Latents no larger than one tile decode whole, exactly as without tiling.
            overlap: Latent pixels shared by neighbouring tiles and cross-faded; 1 to ``tile_size // 2``.
                More overlap gives each tile more context (a smaller difference from the untiled decode) at the
                cost of more tiles.

        Raises:
            ValueError: ``tile_size`` or ``overlap`` not a positive int, or ``overlap`` above half the tile.
        """
        self.tiling = Tiling(tile_size, overlap)

    def disable_tiling(self) -> None:
        """Decode whole latents at once (the default)."""
        self.tiling = None

    @property
    def scale_factor(self) -> int:
        """Pixels per latent pixel along each side."""
        return self.config.scale_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents (as a generator produces them), whole, per image or in tiles.

        Args:
            latents: (B, latent_channels, h, w).

        Returns:
            Images (B, out_channels, h·f, w·f), nominally in [-1, 1] (not clamped).
        """
        from txt2img.vae import unscale_latents  # vae.py builds on this module

        config = self.config
        if latents.ndim != 4 or latents.shape[1] != config.latent_channels:
            raise ValueError(
                f"{type(self).__name__}.decode expects latents of shape (B, {config.latent_channels}, h, w), "
                f"got {tuple(latents.shape)}."
            )
        raw = unscale_latents(latents, config.scaling_factor, config.shift_factor)
        return self._decode_tiled_or_sliced(raw, self._decode_raw)

    def _decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents → images in [-1, 1]: the decoder network itself."""
        raise NotImplementedError

    def _decode_tiled_or_sliced(self, latents: torch.Tensor, decode_fn: DecodeFn) -> torch.Tensor:
        """``decode_fn(latents)``, per image if slicing and in blended tiles if tiling."""
        tiling, slicing = self.tiling, self.slicing
        decode_one = decode_fn if tiling is None else lambda z: decode_tiled(z, decode_fn, tiling)
        return decode_sliced(latents, decode_one) if slicing else decode_one(latents)
