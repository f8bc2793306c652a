"""The decoder of TAESD, the Tiny AutoEncoder for Stable Diffusion (madebyollin/taesd; diffusers'
``AutoencoderTiny``): a few plain conv blocks distilled to decode SD / SDXL latents ~100× cheaper than the KL
decoder, at some loss of fine detail.

Architecture (``TinyDecoder``), lowest resolution first:
- a soft clamp ``tanh(z / 3) · 3`` keeps raw latents in (-3, 3), whatever the generator produced;
- ``conv_in`` (latent_channels → width) and an activation;
- per stage: ``num_decoder_blocks[i]`` residual blocks (conv-act-conv-act-conv plus the input, then ReLU);
  then, except after the last stage, an ``upsampling_scaling_factor``× ``nn.Upsample`` (no weights); then a
  3×3 conv without bias (the last stage's conv has a bias and outputs the image channels).
So the spatial factor is ``upsampling_scaling_factor ** (stages - 1)``: 8 for TAESD / TAESDXL.

Value conventions, as in ``txt2img.vae``:
- ``decode`` takes *scaled* latents, ``scaled = (raw - shift_factor) · scaling_factor`` (TAESD's
  ``scaling_factor`` is 1.0: its latents are the SD VAE's raw latents), and returns images (B, 3, H, W) in
  nominally [-1, 1], not clamped;
- the network itself maps raw latents → images in [0, 1]; ``decode`` maps that to [-1, 1] as diffusers does.

Parameter names equal diffusers' ``AutoencoderTiny`` (``decoder.layers.5.conv.2.weight``): bare positions in
one ``nn.Sequential``, kept only so that its checkpoints load unchanged (the encoder's keys are skipped).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from txt2img.modeling import ModelConfig, ModelMixin
from txt2img.packed_weights import Conv2d
from txt2img.vae_tiling import DecodeTiling

#: ``act_fn`` values, as diffusers' ``get_activation`` names them (case-insensitive).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
}
#: ``upsample_fn`` values: the ``nn.Upsample`` modes that work on images.
UPSAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")

# Keys of an AutoencoderTiny config.json that do not shape the decoder: the encoder's, the latent ↔ uint8
# packing (``latent_magnitude``, ``latent_shift``: used by diffusers' ``scale_latents``, never by ``decode``;
# the decoder's clamp is fixed at 3), and ``block_out_channels``, a copy of ``decoder_block_out_channels``.
_IGNORED_KEYS = frozenset(
    {
        "in_channels",
        "encoder_block_out_channels",
        "num_encoder_blocks",
        "latent_magnitude",
        "latent_shift",
        "force_upcast",
        "block_out_channels",
    }
)


@dataclasses.dataclass
class TinyVAEConfig(ModelConfig):
    """Shape of a TAESD decoder; the defaults are TAESD's (and TAESDXL's).

    Args:
        out_channels: Image channels.
        latent_channels: Channels of the latent image.
        decoder_block_out_channels: Width of each stage, lowest resolution first; all equal (diffusers'
            ``DecoderTiny`` keeps one width through its upsampling convs).
        num_decoder_blocks: Residual blocks per stage.
        act_fn: Activation inside the blocks: relu, silu (= swish), mish or gelu.
        upsample_fn: ``nn.Upsample`` mode between stages: nearest, nearest-exact, bilinear, bicubic or area.
        upsampling_scaling_factor: Upsampling factor between stages.
        scaling_factor: Multiplies raw latents to give the scaled latents the generator works in.
        shift_factor: Subtracted from raw latents before scaling (``None``: no shift).
        sample_size: Native image side in pixels.
    """

    out_channels: int = 3
    latent_channels: int = 4
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    upsampling_scaling_factor: int = 2
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    sample_size: int = 512

    def __post_init__(self) -> None:
        widths, blocks = self.decoder_block_out_channels, self.num_decoder_blocks
        if not widths or len(widths) != len(blocks):
            raise ValueError(
                f"TinyVAEConfig: 'decoder_block_out_channels' has {len(widths)} entries and 'num_decoder_blocks' "
                f"{len(blocks)}; give one per stage (at least one)."
            )
        if len(set(widths)) != 1:
            raise ValueError(
                f"TinyVAEConfig: 'decoder_block_out_channels' is {list(widths)}, but the tiny decoder keeps one "
                "width through all stages; give equal values."
            )
        if self.act_fn.lower() not in ACTIVATIONS:
            raise ValueError(
                f"TinyVAEConfig: 'act_fn' is {self.act_fn!r}, which is not implemented; use one of "
                f"{', '.join(ACTIVATIONS)}."
            )
        if self.upsample_fn not in UPSAMPLE_MODES:
            raise ValueError(
                f"TinyVAEConfig: 'upsample_fn' is {self.upsample_fn!r}, which is not implemented; use one of "
                f"{', '.join(UPSAMPLE_MODES)}."
            )
        if self.upsampling_scaling_factor < 1:
            raise ValueError(
                f"TinyVAEConfig: 'upsampling_scaling_factor' is {self.upsampling_scaling_factor}; it must be ≥ 1."
            )

    @property
    def scale_factor(self) -> int:
        """Pixels per latent pixel along each side."""
        return self.upsampling_scaling_factor ** (len(self.decoder_block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------------------
# Blocks


class TinyBlock(nn.Module):
    """``relu(x + conv(x))`` with ``conv`` = conv-act-conv-act-conv, all 3×3 at constant width.

    diffusers' ``AutoencoderTinyBlock`` also has a ``skip`` conv, but only where widths change, which they never
    do in the decoder (its ``nn.Identity`` has no weights); the final ReLU is fixed, whatever ``act_fn``.
    """

    def __init__(self, channels: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            Conv2d(channels, channels, 3, padding=1),
            activation(),
            Conv2d(channels, channels, 3, padding=1),
            activation(),
            Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + x)


class TinyDecoder(nn.Module):
    """Raw latents (B, latent_channels, h, w) → images (B, out_channels, h·f, w·f) in nominally [0, 1]."""

    def __init__(self, config: TinyVAEConfig) -> None:
        super().__init__()
        activation = ACTIVATIONS[config.act_fn.lower()]
        widths, num_stages = config.decoder_block_out_channels, len(config.decoder_block_out_channels)
        factor, mode = config.upsampling_scaling_factor, config.upsample_fn
        # Weightless modules (activations, upsamplers) take a position too: the numbering is diffusers'.
        layers: list[nn.Module] = [Conv2d(config.latent_channels, widths[0], 3, padding=1), activation()]
        for i, (width, num_blocks) in enumerate(zip(widths, config.num_decoder_blocks)):
            last = i == num_stages - 1
            layers += [TinyBlock(width, activation) for _ in range(num_blocks)]
            if not last:
                layers.append(nn.Upsample(scale_factor=factor, mode=mode))
            layers.append(Conv2d(width, config.out_channels if last else width, 3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.tanh(z / 3) * 3)


# ---------------------------------------------------------------------------------------------------------
# Model


class TinyVAEDecoder(DecodeTiling, ModelMixin):
    """Turns the generator's latents into images with TAESD's decoder: a drop-in, cheaper ``VAEDecoder``.

    Loads diffusers ``AutoencoderTiny`` folders (e.g. ``madebyollin/taesd``) as well as its own.
    ``enable_slicing`` / ``enable_tiling`` bound the decode's memory (``txt2img.vae_tiling``).

    Args:
        config: The decoder's shape and latent scaling.
    """

    config_class = TinyVAEConfig
    config_aliases: ClassVar[tuple[str, ...]] = ("AutoencoderTiny",)
    config: TinyVAEConfig

    def __init__(self, config: TinyVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = TinyDecoder(config)

    @classmethod
    def config_from_dict(cls, data: dict[str, Any], source: str = "config") -> TinyVAEConfig:
        """The config from our own ``config.json`` or a diffusers ``AutoencoderTiny`` one (encoder keys skipped).

        Raises:
            ValueError: a value of the wrong type, or one this decoder does not implement (naming the key).
        """
        kept = {key: value for key, value in data.items() if key not in _IGNORED_KEYS}
        if kept.get("scaling_factor", 1.0) is None:  # diffusers reads null as its default, 1.0
            kept.pop("scaling_factor")
        return TinyVAEConfig.from_dict(kept, source=source)

    @classmethod
    def checkpoint_key(cls, key: str) -> str | None:
        """diffusers' checkpoint holds the encoder too; skip its keys."""
        return None if key.startswith("encoder.") else key

    def _decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents → images in [-1, 1]: the decoder's [0, 1] output mapped in diffusers' order of operations."""
        return self.decoder(raw).mul(2).sub(1)
