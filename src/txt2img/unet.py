"""One-step UNet generators: the denoising UNet of Stable Diffusion 1.x / 2.x (Rombach et al. 2022), as used
by the adversarially distilled one-step models SD-Turbo (Sauer et al. 2023, "Adversarial Diffusion
Distillation") and SDXS (Song et al. 2024), which map noise and text to latents in a single forward pass.

``UNetGenerator`` is built from a diffusers ``UNet2DConditionModel`` config and its submodules carry the same
names (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` ...), so a ``unet/`` folder of the
diffusers layout loads without a key map. ``generate`` runs the sampler of ``txt2img.schedulers`` around it:
one UNet pass by default, 2–4 when asked (re-noise and refine, as these models are used).

The network, top to bottom (shapes for a batch of B latents of h × w):
- time: a sinusoidal embedding of the timestep → a 2-layer MLP → ``emb`` (B, time_embed_dim);
- ``conv_in``: (B, in_channels, h, w) → (B, c0, h, w);
- down blocks: per resolution ``layers_per_block`` × (ResNet block [+ text transformer]), then a stride-2
  conv; every output is kept as a skip connection;
- mid block: ResNet, text transformer, ResNet at the lowest resolution (or nothing);
- up blocks: per resolution ``layers_per_block + 1`` × (concatenate a skip, ResNet [+ transformer]), then
  nearest ×2 and a conv;
- GroupNorm, SiLU, ``conv_out``: → (B, out_channels, h, w), the model output (ε, v or x0 by the scheduler's
  ``prediction_type``).

A text transformer (diffusers' ``Transformer2DModel``) is GroupNorm → 1×1 conv or linear projection →
``transformer_layers`` × (self-attention, cross-attention to the text tokens, GEGLU feed-forward, each
pre-LayerNorm and residual) → projection back, added to its input. ``only_cross_attention`` makes the first
attention attend to the text as well. ``attention_head_dim`` in these configs is, for historical reasons, the
number of heads (diffusers issue 2011); each head has ``channels / heads`` features.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from txt2img import hub
from txt2img.attention import Attention
from txt2img.generation import GeneratorArg
from txt2img.layers import Downsample, ResnetBlock, Upsample
from txt2img.linear import Linear
from txt2img.modeling import ModelConfig, ModelMixin
from txt2img.packed_weights import Conv2d
from txt2img.schedulers import SchedulerConfig, make_schedule, scale_model_input, step
from txt2img.text_encoder import PromptEmbeds

logger = logging.getLogger(__name__)

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
#: The sampler used when a UNet folder comes without one: SD-Turbo's.
DEFAULT_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
}
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers UNet2DConditionModel options txt2img does not implement, with the value at which they are off.
UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "cross_attention_norm": None,
    "class_embeddings_concat": False,
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "act_fn": "silu",
}
# Options that do not change inference (or only matter for block types refused above).
IGNORED_OPTIONS = ("dropout", "mid_block_only_cross_attention", "addition_embed_type_num_heads")


@dataclasses.dataclass
class UNetConfig(ModelConfig):
    """Shape of a Stable Diffusion 1.x / 2.x UNet, in diffusers' ``UNet2DConditionModel`` names.

    Per-resolution settings take one value for all resolutions or a list with one per down block (highest
    resolution first; up blocks use them reversed).

    Args:
        sample_size: Native latent side (64 for 512 × 512 images with an 8× VAE).
        in_channels: Latent channels in.
        out_channels: Channels of the model output.
        center_input_sample: Map the input from [0, 1] to [-1, 1] first.
        flip_sin_to_cos: Order of the timestep embedding's halves (cos first when true).
        freq_shift: Frequency shift of the timestep embedding.
        down_block_types: ``"CrossAttnDownBlock2D"`` or ``"DownBlock2D"`` per resolution.
        mid_block_type: ``"UNetMidBlock2DCrossAttn"`` or ``None`` (no middle block).
        up_block_types: ``"CrossAttnUpBlock2D"`` or ``"UpBlock2D"`` per resolution, lowest first.
        only_cross_attention: The first attention of each transformer layer attends to the text too.
        block_out_channels: Channels per resolution.
        layers_per_block: ResNet (+ transformer) layers per down block; up blocks have one more.
        downsample_padding: Padding of the stride-2 convolutions.
        mid_block_scale_factor: Output scale of the middle block's ResNets.
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon of the ResNets and the output norm.
        cross_attention_dim: Feature size of the text tokens.
        transformer_layers_per_block: Transformer layers in each text transformer.
        attention_head_dim: Number of attention heads (sic, see the module docstring).
        use_linear_projection: Linear instead of 1×1-conv projections into and out of the transformers.
        upcast_attention: Compute attention in float32 when the model runs in half precision.
        resnet_time_scale_shift: ``"default"`` or ``"scale_shift"`` time conditioning of the ResNets.
        time_embedding_dim: Size of the time embedding; default ``4 · block_out_channels[0]``.
        time_embedding_act_fn: Activation applied to the time embedding before the blocks (``None``: none).
        timestep_post_act: Activation after the time MLP (``None``: none).
        conv_in_kernel: Kernel size of ``conv_in``.
        conv_out_kernel: Kernel size of ``conv_out``.
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        problems = []
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            problems.append(
                f"down_block_types and up_block_types need {n} entries, one per block_out_channels"
            )
        problems += [
            f"down block type {t!r} (supported: {DOWN_BLOCK_TYPES})"
            for t in self.down_block_types
            if t not in DOWN_BLOCK_TYPES
        ]
        problems += [
            f"up block type {t!r} (supported: {UP_BLOCK_TYPES})"
            for t in self.up_block_types
            if t not in UP_BLOCK_TYPES
        ]
        if self.mid_block_type not in MID_BLOCK_TYPES:
            problems.append(f"mid_block_type {self.mid_block_type!r} (supported: {MID_BLOCK_TYPES})")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            problems.append(f"resnet_time_scale_shift {self.resnet_time_scale_shift!r}")
        for name in ("time_embedding_act_fn", "timestep_post_act"):
            if getattr(self, name) not in (None, *ACTIVATIONS):
                problems.append(f"{name} {getattr(self, name)!r} (supported: {sorted(ACTIVATIONS)})")
        for name in (
            "only_cross_attention",
            "layers_per_block",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "attention_head_dim",
        ):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                problems.append(f"{name} has {len(value)} entries, expected {n}")
        if problems:
            raise ValueError("Unsupported UNet config: " + "; ".join(problems) + ".")

    def per_block(self, name: str) -> tuple[Any, ...]:
        """A per-resolution setting as one value per down block."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "gelu": F.gelu,
    "relu": F.relu,
}


# ---------------------------------------------------------------------------------------------------------
# Generation math (pure functions)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, *, flip_sin_to_cos: bool, freq_shift: float
) -> torch.Tensor:
    """Sinusoidal embedding (B,) → (B, dim) in float32, as in DDPM and diffusers' ``get_timestep_embedding``:
    frequencies ``exp(-ln(10000) · i / (dim/2 - freq_shift))``, sines then cosines (swapped when flipped)."""
    half = dim // 2
    exponent = (
        -math.log(10000)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / (half - freq_shift)
    )
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


# ---------------------------------------------------------------------------------------------------------
# Blocks


class TimestepEmbedding(nn.Module):
    """The time MLP: (B, in_dim) → (B, time_embed_dim)."""

    def __init__(self, in_dim: int, dim: int, post_act: str | None) -> None:
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)
        self.post_act = post_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_2(F.silu(self.linear_1(x)))
        return ACTIVATIONS[self.post_act](x) if self.post_act else x


class GEGLU(nn.Module):
    """A linear layer to twice the width, then ``a · gelu(b)`` of its two halves (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(b)


class FeedForward(nn.Module):
    """GEGLU to ``4 · dim``, then back to ``dim``; ``net.1`` is diffusers' (inactive) dropout slot."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Self- (or text-) attention, text cross-attention and a feed-forward, each pre-LayerNorm, each residual.
    Tokens (B, N, dim) → (B, N, dim)."""

    def __init__(
        self, dim: int, heads: int, context_dim: int, *, only_cross_attention: bool, upcast: bool
    ) -> None:
        super().__init__()
        head_dim = dim // heads
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(
            dim,
            context_dim=context_dim if only_cross_attention else None,
            heads=heads,
            head_dim=head_dim,
            upcast=upcast,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim=context_dim, heads=heads, head_dim=head_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """A text transformer over the pixels of a feature map: (B, C, H, W) → (B, C, H, W), residual."""

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        config: UNetConfig,
        *,
        layers: int,
        only_cross_attention: bool,
    ) -> None:
        super().__init__()
        self.linear = config.use_linear_projection
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, channels) if self.linear else Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [
                TransformerBlock(
                    channels,
                    heads,
                    context_dim,
                    only_cross_attention=only_cross_attention,
                    upcast=config.upcast_attention,
                )
                for _ in range(layers)
            ]
        )
        self.proj_out = Linear(channels, channels) if self.linear else Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear:
            y = self.proj_out(y)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if not self.linear:
            y = self.proj_out(y)
        return y + x


def _resnet(
    in_channels: int, out_channels: int, config: UNetConfig, output_scale_factor: float = 1.0
) -> ResnetBlock:
    return ResnetBlock(
        in_channels,
        out_channels,
        norm_groups=config.norm_num_groups,
        eps=config.norm_eps,
        temb_channels=config.time_embed_dim,
        time_embedding_norm=config.resnet_time_scale_shift,
        output_scale_factor=output_scale_factor,
    )


def _text_transformers(config: UNetConfig, index: int, channels: int, count: int) -> nn.ModuleList:
    """``count`` text transformers with the settings of down block ``index`` (up blocks pass their mirror)."""
    return nn.ModuleList(
        Transformer2D(
            channels,
            config.per_block("attention_head_dim")[index],
            config.per_block("cross_attention_dim")[index],
            config,
            layers=config.per_block("transformer_layers_per_block")[index],
            only_cross_attention=config.per_block("only_cross_attention")[index],
        )
        for _ in range(count)
    )


class DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (with ``attentions``) or ``DownBlock2D``: layers, then an optional stride-2 conv.

    ``forward`` returns the output and every intermediate state, for the skip connections.
    """

    def __init__(self, index: int, in_channels: int, config: UNetConfig) -> None:
        super().__init__()
        out_channels = config.block_out_channels[index]
        layers = config.per_block("layers_per_block")[index]
        self.resnets = nn.ModuleList(
            [_resnet(in_channels if i == 0 else out_channels, out_channels, config) for i in range(layers)]
        )
        with_text = config.down_block_types[index] == "CrossAttnDownBlock2D"
        self.attentions = _text_transformers(config, index, out_channels, layers if with_text else 0)
        is_last = index == len(config.block_out_channels) - 1
        self.downsamplers = nn.ModuleList(
            [] if is_last else [Downsample(out_channels, padding=config.downsample_padding)]
        )

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        states = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
            states.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            states.append(x)
        return x, states


class MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: ResNet, text transformer, ResNet."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        channels = config.block_out_channels[-1]
        scale = config.mid_block_scale_factor
        self.resnets = nn.ModuleList([_resnet(channels, channels, config, scale) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [
                Transformer2D(
                    channels,
                    config.per_block("attention_head_dim")[-1],
                    config.per_block("cross_attention_dim")[-1],
                    config,
                    layers=config.per_block("transformer_layers_per_block")[-1],
                    only_cross_attention=False,
                )
            ]
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` or ``UpBlock2D``: each layer concatenates one skip connection first; then an
    optional nearest ×2 upsampler. ``index`` counts from the lowest resolution."""

    def __init__(self, index: int, config: UNetConfig) -> None:
        super().__init__()
        channels = list(reversed(config.block_out_channels))
        n = len(channels)
        out_channels = channels[index]
        prev_channels = channels[max(index - 1, 0)]
        skip_in = channels[min(index + 1, n - 1)]
        down_index = n - 1 - index  # the settings of the matching down block
        layers = config.per_block("layers_per_block")[down_index] + 1
        self.resnets = nn.ModuleList(
            [
                _resnet(
                    (prev_channels if i == 0 else out_channels)
                    + (skip_in if i == layers - 1 else out_channels),
                    out_channels,
                    config,
                )
                for i in range(layers)
            ]
        )
        with_text = config.up_block_types[index] == "CrossAttnUpBlock2D"
        self.attentions = _text_transformers(config, down_index, out_channels, layers if with_text else 0)
        self.upsamplers = nn.ModuleList([] if index == n - 1 else [Upsample(out_channels)])

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        size: tuple[int, int] | None,
    ) -> torch.Tensor:
        """``skips`` are consumed from the end; ``size`` is the spatial size to upsample to."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for upsampler in self.upsamplers:
            x = upsampler(x, size)
        return x


# ---------------------------------------------------------------------------------------------------------
# The generator


class UNetGenerator(ModelMixin):
    """A one-step (or few-step) UNet generator: noise and text features in, latents out.

    Loaded by ``GANGenerator.from_pretrained`` (or this class's) from a diffusers ``unet/`` folder, with the
    sampler of the sibling ``scheduler/scheduler_config.json`` (SD-Turbo's Euler sampler with trailing
    timesteps when there is none). Saved as txt2img's layout: ``config.json``, the weights and
    ``scheduler_config.json`` in one folder.

    Args:
        config: The UNet's shape.
        scheduler: The sampler's settings; default SD-Turbo's.
    """

    config_class = UNetConfig
    config: UNetConfig
    config_aliases: ClassVar[tuple[str, ...]] = ("UNet2DConditionModel",)

    def __init__(self, config: UNetConfig, scheduler: SchedulerConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.scheduler = scheduler or SchedulerConfig.from_dict(DEFAULT_SCHEDULER)
        c0 = config.block_out_channels[0]
        self.conv_in = Conv2d(
            config.in_channels, c0, config.conv_in_kernel, padding=(config.conv_in_kernel - 1) // 2
        )
        self.time_embedding = TimestepEmbedding(c0, config.time_embed_dim, config.timestep_post_act)
        channels = (c0, *config.block_out_channels[:-1])
        self.down_blocks = nn.ModuleList(
            [DownBlock(i, channels[i], config) for i in range(len(config.block_out_channels))]
        )
        self.mid_block = MidBlock(config) if config.mid_block_type is not None else None
        self.up_blocks = nn.ModuleList([UpBlock(i, config) for i in range(len(config.block_out_channels))])
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, c0, eps=config.norm_eps)
        self.conv_out = Conv2d(
            c0, config.out_channels, config.conv_out_kernel, padding=(config.conv_out_kernel - 1) // 2
        )

    # -----------------------------------------------------------------------------------------------------
    # What the pipeline asks of a generator

    @property
    def sample_size(self) -> int:
        """Native latent side."""
        return self.config.sample_size

    @property
    def size_factor(self) -> int:
        """Latent height and width must be multiples of this (any size works: skips set the upsampled sizes)."""
        return 1

    def noise_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        """Initial noise: one latent image per sample, (B, in_channels, height, width)."""
        return (batch_size, self.config.in_channels, height, width)

    @property
    def text_dims(self) -> tuple[int | None, int | None]:
        """Sizes of the text features it takes: (token features, pooled vector: unused, ``None``)."""
        dims = set(self.config.per_block("cross_attention_dim"))
        return (dims.pop() if len(dims) == 1 else None), None

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
        """Sample latents: ``num_inference_steps`` UNet passes under the scheduler (1 = one forward pass).

        Args:
            noise: (B, in_channels, h, w) standard normal noise, from ``noise_shape``.
            embeds: The encoded prompts (their token features; the UNet attends to every token, as diffusers'
                Stable Diffusion pipeline does).
            height: Unused (the noise sets the size); accepted for the generator interface.
            width: Unused, likewise.
            num_inference_steps: UNet passes; 2–4 re-noise and refine.
            truncation_psi: Must be 1 (truncation belongs to the native GAN generator).
            generator: Draws the fresh noise of multi-step samplers (same generator as for ``noise``).

        Returns:
            Scaled latents (B, out_channels, h, w).
        """
        if truncation_psi != 1.0:
            raise ValueError(
                "truncation_psi is a setting of txt2img's GAN generators; a UNet generator needs 1.0."
            )
        schedule = make_schedule(self.scheduler, num_inference_steps)
        context = embeds.hidden_states
        x = noise * schedule.init_noise_sigma
        for i, t in enumerate(schedule.timesteps):
            prediction = self(scale_model_input(schedule, i, x), t, context)
            x = step(schedule, i, prediction, x, generator)
        return x

    # -----------------------------------------------------------------------------------------------------
    # The network

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """One UNet pass.

        Args:
            sample: (B, in_channels, h, w) latents, already scaled for the scheduler's step.
            timestep: The timestep, a number or a tensor of shape () or (B,).
            encoder_hidden_states: (B, L, cross_attention_dim) text token features.

        Returns:
            The model output (B, out_channels, h, w).
        """
        config = self.config
        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.reshape(-1).expand(sample.shape[0])
        t_emb = timestep_embedding(
            timesteps,
            config.block_out_channels[0],
            flip_sin_to_cos=config.flip_sin_to_cos,
            freq_shift=config.freq_shift,
        )
        emb = self.time_embedding(t_emb.to(sample.dtype))
        if config.time_embedding_act_fn:
            emb = ACTIVATIONS[config.time_embedding_act_fn](emb)
        if config.center_input_sample:
            sample = 2 * sample - 1.0

        x = self.conv_in(sample)
        skips = [x]
        for down in self.down_blocks:
            x, states = down(x, emb, encoder_hidden_states)
            skips.extend(states)
        if self.mid_block is not None:
            x = self.mid_block(x, emb, encoder_hidden_states)
        for up in self.up_blocks:
            n = len(cast(UpBlock, up).resnets)
            size = tuple(skips[-n - 1].shape[-2:]) if len(skips) > n else None
            x = up(x, skips, emb, encoder_hidden_states, size)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=not torch.is_grad_enabled()))

    # -----------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def config_from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        """Read a diffusers ``UNet2DConditionModel`` config (or txt2img's), refusing options not implemented."""
        refused = []
        for key, off in UNSUPPORTED_OPTIONS.items():
            value = data.get(key, off)
            if value != off and not (
                isinstance(off, float) and isinstance(value, (int, float)) and float(value) == off
            ):
                refused.append(f"{key}={value!r}")
        if data.get("addition_embed_type") == "text_time":
            raise ValueError(
                f"{source} is an SDXL-architecture UNet (addition_embed_type 'text_time'), which txt2img does not "
                "run yet; Stable Diffusion 1.x/2.x UNets (SD-Turbo, SDXS) are supported."
            )
        if refused:
            raise ValueError(
                f"{source} uses UNet options txt2img does not implement: {', '.join(refused)}. "
                "Supported: the Stable Diffusion 1.x/2.x family (see the 'Hub checkpoints' docs page)."
            )
        nullable = {
            name
            for name, hint in typing.get_type_hints(UNetConfig).items()
            if type(None) in typing.get_args(hint)
        }
        kept = {
            k: v
            for k, v in data.items()
            if k not in UNSUPPORTED_OPTIONS
            and k not in IGNORED_OPTIONS
            and not (v is None and k not in nullable)  # diffusers writes null for "the default"
        }
        if isinstance(kept.get("sample_size"), (list, tuple)):  # [height, width]
            kept["sample_size"] = int(kept["sample_size"][0])
        try:
            return UNetConfig.from_dict(kept, source=source)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from error

    @classmethod
    def download_patterns(cls, subfolder: str | None) -> list[str]:
        """The UNet folder and, in the diffusers layout, the sibling ``scheduler/`` folder's config."""
        return generator_patterns(subfolder)

    @classmethod
    def load_folder(
        cls,
        folder: Path,
        data: dict[str, Any],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> UNetGenerator:
        model = super().load_folder(folder, data, dtype=dtype, device=device)
        model.scheduler = read_scheduler(folder)
        return model

    def save_files(self, folder: Path) -> None:
        """Write ``config.json``, the safetensors weights and ``scheduler_config.json`` into ``folder``."""
        super().save_files(folder)
        payload = json.dumps(self.scheduler.to_dict(), indent=2) + "\n"
        (folder / SCHEDULER_CONFIG_NAME).write_text(payload)


def generator_patterns(subfolder: str | None) -> list[str]:
    """Files to fetch for a generator in ``subfolder``: its folder, plus ``scheduler/scheduler_config.json``
    beside it (the diffusers layout keeps a UNet's sampler there)."""
    patterns = hub.component_patterns(subfolder)
    if subfolder:
        patterns.append(f"{hub.sibling(subfolder, 'scheduler')}/{SCHEDULER_CONFIG_NAME}")
    return patterns


def read_scheduler(folder: Path) -> SchedulerConfig:
    """The sampler of a UNet folder: its own ``scheduler_config.json``, else the diffusers layout's sibling
    ``scheduler/`` folder, else SD-Turbo's (logged)."""
    for path in (
        folder / SCHEDULER_CONFIG_NAME,
        hub.subfolder_of(folder.parent, "scheduler") / SCHEDULER_CONFIG_NAME,
    ):
        if path.is_file():
            return SchedulerConfig.from_file(path)
    logger.info(
        "No %s beside %s: sampling with SD-Turbo's Euler scheduler (trailing timesteps).",
        SCHEDULER_CONFIG_NAME,
        folder,
    )
    return SchedulerConfig.from_dict(DEFAULT_SCHEDULER)
