"""The native one-pass generator: noise + text → latents, after StyleGAN-T (Sauer et al. 2023) and GigaGAN
(Kang et al. 2023).

``GANGenerator.forward`` is mapping, then synthesis:
- mapping: z (B, z_dim) and the pooled text vector → style w (B, w_dim), an MLP (StyleGAN2 §2);
- synthesis: a learned constant at the lowest resolution, per resolution an optional ×2 upsample, two
  modulated 3×3 convolutions (StyleGAN2 eq. 1–3) and, at the resolutions ``attention`` selects,
  cross-attention from the pixels to the text tokens (GigaGAN §3.2); a 1×1 modulated convolution without
  demodulation gives the latents.

The modulated convolution is the "non-fused" form: scale the input by the style, run one ordinary convolution
for the whole batch, scale the output by the demodulation coefficients. It equals the grouped form
mathematically and is about twice as fast on CPUs.

Output latents are *scaled* latents (see ``txt2img.vae``): the decoder divides by ``scaling_factor``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from txt2img.attention import Attention
from txt2img.generation import GeneratorArg
from txt2img.modeling import ModelConfig, ModelMixin
from txt2img.text_encoder import PromptEmbeds


@dataclasses.dataclass
class GANConfig(ModelConfig):
    """Shape of the native generator.

    Args:
        latent_channels: Channels of the latents it produces (the VAE's ``latent_channels``).
        z_dim: Size of the noise vector.
        w_dim: Size of the style vector.
        text_dim: Feature size of the text tokens (the text encoder's hidden size).
        pooled_dim: Size of the pooled text vector.
        mapping_layers: Layers of the mapping MLP.
        channels: Feature channels per resolution, lowest first; each stage after the first doubles the size.
        attention: Per resolution, whether it cross-attends to the text tokens.
        attention_heads: Heads of each cross-attention.
        const_size: Side of the learned constant at native size.
    """

    latent_channels: int = 4
    z_dim: int = 64
    w_dim: int = 256
    text_dim: int = 512
    pooled_dim: int = 512
    mapping_layers: int = 2
    channels: tuple[int, ...] = (256, 128, 64)
    attention: tuple[bool, ...] = (True, True, False)
    attention_heads: int = 4
    const_size: int = 4

    def __post_init__(self) -> None:
        if len(self.attention) != len(self.channels):
            raise ValueError(
                f"GANConfig: 'attention' has {len(self.attention)} entries but 'channels' has "
                f"{len(self.channels)}; give one per resolution."
            )

    @property
    def upsample_factor(self) -> int:
        """Latent pixels per constant pixel along each side."""
        return 2 ** (len(self.channels) - 1)

    @property
    def sample_size(self) -> int:
        """Native latent side."""
        return self.const_size * self.upsample_factor


# ---------------------------------------------------------------------------------------------------------
# Generation math (pure functions)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row of x (B, D) to unit root mean square."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def truncate(w: torch.Tensor, center: torch.Tensor, psi: float) -> torch.Tensor:
    """The truncation trick: move styles toward ``center`` (psi = 1: unchanged, 0: the center itself)."""
    return w if psi == 1.0 else center + psi * (w - center)


def leaky_relu_gain(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU with StyleGAN's √2 gain, which keeps activations at unit variance."""
    return F.leaky_relu(x, 0.2) * math.sqrt(2.0)


# ---------------------------------------------------------------------------------------------------------
# Blocks


class EqualLinear(nn.Linear):
    """Linear layer with StyleGAN's equalised learning rate: weights stored N(0, 1), scaled at run time."""

    def __init__(self, in_features: int, out_features: int, *, bias_init: float = 0.0) -> None:
        super().__init__(in_features, out_features)
        nn.init.normal_(self.weight)
        nn.init.constant_(self.bias, bias_init)
        self.gain = 1.0 / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.gain, self.bias)


class MappingNetwork(nn.Module):
    """(z (B, z_dim), pooled text (B, pooled_dim)) → style w (B, w_dim)."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.embed_text = EqualLinear(config.pooled_dim, config.w_dim)
        dims = [config.z_dim + config.w_dim] + [config.w_dim] * config.mapping_layers
        self.layers = nn.ModuleList([EqualLinear(a, b) for a, b in itertools.pairwise(dims)])

    def forward(self, z: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        x = torch.cat([normalize_2nd_moment(z), normalize_2nd_moment(self.embed_text(pooled))], dim=1)
        for layer in self.layers:
            x = leaky_relu_gain(layer(x))
        return x


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution, non-fused form. (B, C_in, H, W), w (B, w_dim) → (B, C_out, H, W)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        *,
        kernel_size: int = 3,
        demodulate: bool = True,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.demodulate = demodulate

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        style = self.affine(w)  # (B, C_in)
        weight = self.weight * self.gain  # (C_out, C_in, k, k)
        x = F.conv2d(x * style[:, :, None, None], weight, padding=weight.shape[-1] // 2)
        if self.demodulate:  # 1 / ||weight · style|| per sample and output channel
            energy = style.square() @ weight.square().sum(dim=(2, 3)).t()  # (B, C_out)
            x = x * (energy + 1e-8).rsqrt()[:, :, None, None]
        return x + self.bias[None, :, None, None]


class TextCrossAttention(nn.Module):
    """Pixels attend to text tokens; the result is added back. (B, C, H, W) → (B, C, H, W)."""

    def __init__(self, channels: int, text_dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.attention = Attention(
            channels, context_dim=text_dim, heads=heads, head_dim=max(channels // heads, 1)
        )

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        y = self.attention(y, context=text, mask=mask)
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class SynthesisBlock(nn.Module):
    """One resolution: [×2 upsample] → two modulated convs → [cross-attention to the text]."""

    def __init__(
        self, in_channels: int, out_channels: int, config: GANConfig, *, upsample: bool, attention: bool
    ):
        super().__init__()
        self.upsample = upsample
        self.conv0 = ModulatedConv2d(in_channels, out_channels, config.w_dim)
        self.conv1 = ModulatedConv2d(out_channels, out_channels, config.w_dim)
        self.cross_attention = (
            TextCrossAttention(out_channels, config.text_dim, config.attention_heads) if attention else None
        )

    def forward(
        self, x: torch.Tensor, w: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = leaky_relu_gain(self.conv0(x, w))
        x = leaky_relu_gain(self.conv1(x, w))
        if self.cross_attention is not None:
            x = self.cross_attention(x, text, mask)
        return x


# ---------------------------------------------------------------------------------------------------------
# The generator


class GANGenerator(ModelMixin):
    """Noise and text embeddings in, latents out, in one forward pass.

    Args:
        config: The generator's shape.
    """

    config_class = GANConfig
    config: GANConfig
    alternatives: ClassVar[dict[str, str]] = {
        "UNet2DConditionModel": "txt2img.unet:UNetGenerator",
        "UNetGenerator": "txt2img.unet:UNetGenerator",
    }

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = config
        self.mapping = MappingNetwork(config)
        self.const = nn.Parameter(torch.randn(config.channels[0], config.const_size, config.const_size))
        stages = list(zip((config.channels[0], *config.channels[:-1]), config.channels, config.attention))
        self.blocks = nn.ModuleList(
            [
                SynthesisBlock(c_in, c_out, config, upsample=i > 0, attention=attn)
                for i, (c_in, c_out, attn) in enumerate(stages)
            ]
        )
        self.to_latent = ModulatedConv2d(
            config.channels[-1], config.latent_channels, config.w_dim, kernel_size=1, demodulate=False
        )

    @property
    def sample_size(self) -> int:
        """Native latent side."""
        return self.config.sample_size

    @property
    def size_factor(self) -> int:
        """Latent height and width must be multiples of this."""
        return self.config.upsample_factor

    def noise_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        """The shape of the noise to draw for ``batch_size`` latents of ``height`` × ``width`` latent pixels.

        The native generator's noise is one vector per image, whatever its size.
        """
        return (batch_size, self.config.z_dim)

    @property
    def text_dims(self) -> tuple[int | None, int | None]:
        """Sizes of the text features it takes: (token features, pooled vector)."""
        return self.config.text_dim, self.config.pooled_dim

    @classmethod
    def download_patterns(cls, subfolder: str | None) -> list[str]:
        """The generator's folder and, for a UNet in the diffusers layout, the sibling scheduler config."""
        from txt2img.unet import generator_patterns

        return generator_patterns(subfolder)

    def generate(
        self,
        noise: torch.Tensor,
        embeds: PromptEmbeds,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 1,
        truncation_psi: float = 1.0,
        generator: GeneratorArg = None,
    ) -> torch.Tensor:
        """Generate latents for encoded prompts: the interface the pipeline calls on every generator.

        Args:
            noise: (B, z_dim) standard normal noise, from ``noise_shape``.
            embeds: The encoded prompts.
            height: Latent height; default ``sample_size``.
            width: Latent width; default ``sample_size``.
            num_inference_steps: Must be 1: the GAN generator has a single pass.
            truncation_psi: See :meth:`forward`.
            generator: Unused (the GAN draws no noise after ``noise``).

        Returns:
            Scaled latents (B, latent_channels, height, width).
        """
        if num_inference_steps != 1:
            raise ValueError(
                f"num_inference_steps={num_inference_steps}: a GAN generator makes its latents in one pass; use 1."
            )
        return self(
            noise,
            embeds.hidden_states,
            embeds.pooled,
            embeds.attention_mask,
            height=height,
            width=width,
            truncation_psi=truncation_psi,
        )

    def forward(
        self,
        noise: torch.Tensor,
        hidden_states: torch.Tensor,
        pooled: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        truncation_psi: float = 1.0,
    ) -> torch.Tensor:
        """Generate latents.

        Args:
            noise: (B, z_dim) standard normal noise, from ``noise_shape``.
            hidden_states: (B, L, text_dim) text token features.
            pooled: (B, pooled_dim) pooled text vectors.
            attention_mask: (B, L), 1 for real tokens; ``None`` attends to all tokens.
            height: Latent height, a multiple of ``size_factor``; default ``sample_size``.
            width: Latent width, likewise.
            truncation_psi: Styles are pulled toward the style of zero noise for the same text
                (1: off; smaller: less variety, more typical images).

        Returns:
            Scaled latents (B, latent_channels, height, width).
        """
        height = height or self.sample_size
        width = width or self.sample_size
        w = self.mapping(noise, pooled)  # (B, w_dim)
        if truncation_psi != 1.0:
            w = truncate(w, self.mapping(torch.zeros_like(noise), pooled), truncation_psi)
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        x = self.initial_features(noise.shape[0], height, width)  # (B, C0, h0, w0)
        for block in self.blocks:
            x = block(x, w, hidden_states, mask)
        return self.to_latent(x, w)

    def initial_features(self, batch_size: int, height: int, width: int) -> torch.Tensor:
        """The learned constant, resized when the requested size differs from the native one."""
        factor = self.size_factor
        if height % factor or width % factor:
            raise ValueError(
                f"Latent size {height}×{width} is not a multiple of the generator's factor {factor}."
            )
        const = self.const[None]  # (1, C0, s, s)
        size = (height // factor, width // factor)
        if size != tuple(const.shape[-2:]):
            const = F.interpolate(const, size=size, mode="bilinear", align_corners=False)
        return const.expand(batch_size, -1, -1, -1)
