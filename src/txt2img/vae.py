"""The KL-regularised autoencoder of Stable Diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"), built from its config so one class serves tiny and full-size models.

Value conventions, stated once:
- images are (B, 3, H, W) in [-1, 1];
- latents as the generator produces and the decoder takes them are *scaled*:
  ``scaled = (raw - shift_factor) * scaling_factor``, so that they have roughly unit variance;
- the spatial factor between images and latents is ``2 ** (len(block_out_channels) - 1)``.

Submodule names equal diffusers' ``AutoencoderKL`` (``decoder.up_blocks.0.resnets.0.conv1`` ...), so its
checkpoints load without a key map. ``VAEDecoder`` holds ``post_quant_conv`` + ``decoder``; ``VAEEncoder``
(for training) holds ``encoder`` + ``quant_conv``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from txt2img.attention import SpatialSelfAttention
from txt2img.layers import Downsample, ResnetBlock, Upsample
from txt2img.modeling import ModelConfig, ModelMixin
from txt2img.packed_weights import Conv2d
from txt2img.vae_tiling import DecodeTiling


@dataclasses.dataclass
class VAEConfig(ModelConfig):
    """Shape of a KL autoencoder.

    Args:
        in_channels: Image channels (encoder input).
        out_channels: Image channels (decoder output).
        latent_channels: Channels of the latent image.
        block_out_channels: Channels of each resolution stage, highest resolution first.
        layers_per_block: ResNet blocks per encoder stage (the decoder has one more).
        norm_num_groups: GroupNorm groups.
        mid_block_add_attention: Whether the middle block has its self-attention layer.
        use_quant_conv: Whether the encoder ends with a 1×1 convolution of the moments.
        use_post_quant_conv: Whether the decoder starts with a 1×1 convolution of the latents.
        scaling_factor: Multiplies raw latents to give the scaled latents the generator works in.
        shift_factor: Subtracted from raw latents before scaling (``None``: no shift).
        sample_size: Native image side in pixels.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    sample_size: int = 512

    @property
    def scale_factor(self) -> int:
        """Pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


# diffusers AutoencoderKL config keys: the values txt2img implements, and keys that do not change the networks.
DIFFUSERS_REQUIRED = {
    "act_fn": ("silu",),
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
}
DIFFUSERS_IGNORED = ("force_upcast", "latents_mean", "latents_std")


def config_from_diffusers(data: dict[str, Any], source: str) -> VAEConfig:
    """A ``VAEConfig`` from a diffusers ``AutoencoderKL`` config (or txt2img's own), refusing what differs.

    ``scaling_factor`` defaults to 0.18215 and ``shift_factor`` to none, as in diffusers.

    Raises:
        ValueError: a block type or activation txt2img does not implement, or wrong value types.
    """
    refused = []
    for key, allowed in DIFFUSERS_REQUIRED.items():
        value = data.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and any(v not in allowed for v in values):
            refused.append(f"{key}={value!r} (supported: {allowed[0]!r})")
    if refused:
        raise ValueError(
            f"{source} describes an autoencoder txt2img does not implement: {'; '.join(refused)}."
        )
    kept = {k: v for k, v in data.items() if k not in DIFFUSERS_REQUIRED and k not in DIFFUSERS_IGNORED}
    if isinstance(kept.get("sample_size"), (list, tuple)):  # diffusers allows [height, width]
        kept["sample_size"] = int(kept["sample_size"][0])
    if kept.get("scaling_factor") is None:
        kept.pop("scaling_factor", None)
    return VAEConfig.from_dict(kept, source=source)


def unscale_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    """Scaled latents (the generator's) → raw latents (the decoder network's)."""
    raw = latents / scaling_factor
    return raw + shift_factor if shift_factor is not None else raw


def scale_latents(raw: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    """Raw latents (the encoder network's) → scaled latents (the generator's)."""
    shifted = raw - shift_factor if shift_factor is not None else raw
    return shifted * scaling_factor


# ---------------------------------------------------------------------------------------------------------
# Blocks


class MidBlock(nn.Module):
    """ResNet, self-attention, ResNet at the lowest resolution."""

    def __init__(self, channels: int, *, norm_groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, channels, norm_groups=norm_groups) for _ in range(2)]
        )
        self.attentions = nn.ModuleList(
            [SpatialSelfAttention(channels, norm_groups=norm_groups)] if add_attention else []
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class UpBlock(nn.Module):
    """``num_layers`` ResNet blocks, then an optional ×2 upsampler."""

    def __init__(
        self, in_channels: int, out_channels: int, *, num_layers: int, norm_groups: int, upsample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm_groups=norm_groups)
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class DownBlock(nn.Module):
    """``num_layers`` ResNet blocks, then an optional stride-2 downsampler."""

    def __init__(
        self, in_channels: int, out_channels: int, *, num_layers: int, norm_groups: int, downsample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm_groups=norm_groups)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
        return x


class Decoder(nn.Module):
    """Raw latents (B, latent_channels, h, w) → images (B, out_channels, h·f, w·f), unbounded (≈ [-1, 1])."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = list(reversed(config.block_out_channels))  # lowest resolution first
        groups = config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(
            channels[0], norm_groups=groups, add_attention=config.mid_block_add_attention
        )
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(
                    channels[max(i - 1, 0)],
                    channels[i],
                    num_layers=config.layers_per_block + 1,
                    norm_groups=groups,
                    upsample=i < len(channels) - 1,
                )
                for i in range(len(channels))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=not torch.is_grad_enabled()))


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) in [-1, 1] → mean and log-variance, (B, 2·latent_channels, H/f, W/f)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = list(config.block_out_channels)
        groups = config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(
                    channels[max(i - 1, 0)],
                    channels[i],
                    num_layers=config.layers_per_block,
                    norm_groups=groups,
                    downsample=i < len(channels) - 1,
                )
                for i in range(len(channels))
            ]
        )
        self.mid_block = MidBlock(
            channels[-1], norm_groups=groups, add_attention=config.mid_block_add_attention
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=not torch.is_grad_enabled()))


# ---------------------------------------------------------------------------------------------------------
# Models


class VAEDecoder(DecodeTiling, ModelMixin):
    """Turns the generator's latents into images: the decoding half of a KL autoencoder.

    ``enable_slicing`` / ``enable_tiling`` bound the decode's memory for large batches and images
    (``txt2img.vae_tiling``); tiled images differ slightly from untiled ones, as GroupNorm and the mid block's
    self-attention see one tile only.

    Args:
        config: The autoencoder's shape and latent scaling.
    """

    config_class = VAEConfig
    config: VAEConfig
    config_aliases: ClassVar[tuple[str, ...]] = ("AutoencoderKL",)
    alternatives: ClassVar[dict[str, str]] = {
        "AutoencoderTiny": "txt2img.vae_tiny:TinyVAEDecoder",
        "TinyVAEDecoder": "txt2img.vae_tiny:TinyVAEDecoder",
    }

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.post_quant_conv = (
            Conv2d(config.latent_channels, config.latent_channels, 1) if config.use_post_quant_conv else None
        )
        self.decoder = Decoder(config)

    @classmethod
    def config_from_dict(cls, data: dict[str, Any], source: str = "config") -> VAEConfig:
        return config_from_diffusers(data, source)

    @classmethod
    def checkpoint_key(cls, key: str) -> str | None:
        """A full autoencoder's file also holds the encoder: its keys are skipped."""
        return None if key.startswith(("encoder.", "quant_conv.")) else key

    def _decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents → images: ``post_quant_conv``, then the decoder network."""
        if self.post_quant_conv is not None:
            raw = self.post_quant_conv(raw)
        return self.decoder(raw)


class VAEEncoder(ModelMixin):
    """Turns images into latents (for training): the encoding half of a KL autoencoder.

    Args:
        config: The autoencoder's shape and latent scaling; the same config as its decoder.
    """

    config_class = VAEConfig
    config: VAEConfig
    config_aliases: ClassVar[tuple[str, ...]] = ("AutoencoderKL",)

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        channels = 2 * config.latent_channels
        self.quant_conv = Conv2d(channels, channels, 1) if config.use_quant_conv else None

    @classmethod
    def config_from_dict(cls, data: dict[str, Any], source: str = "config") -> VAEConfig:
        return config_from_diffusers(data, source)

    @classmethod
    def checkpoint_key(cls, key: str) -> str | None:
        """A full autoencoder's file also holds the decoder: its keys are skipped."""
        return None if key.startswith(("decoder.", "post_quant_conv.")) else key

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(images)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode images (B, 3, H, W) in [-1, 1].

        Returns:
            ``(mean, logvar)`` of the raw latent posterior, each (B, latent_channels, H/f, W/f).
        """
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def sample(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw scaled latents ``(mean + std·ε - shift) · scaling_factor`` for images in [-1, 1]."""
        mean, logvar = self.encode(images)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        raw = mean + torch.exp(0.5 * logvar) * noise
        return scale_latents(raw, self.config.scaling_factor, self.config.shift_factor)
