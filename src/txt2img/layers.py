"""Convolutional building blocks shared by the VAE and the UNet: diffusers' names and math."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, plus a (1×1-projected) shortcut. Shapes (B, C_in, H, W) → (B, C_out, H, W).

    Args:
        in_channels, out_channels: Channels in and out.
        norm_groups: GroupNorm groups.
        eps: GroupNorm epsilon.
        temb_channels: Size of a time embedding added between the convolutions (``None``: none, as in the VAE).
        time_embedding_norm: ``"default"`` adds the projected embedding before the second norm;
            ``"scale_shift"`` uses it as a scale and shift after it.
        output_scale_factor: The sum of shortcut and residual is divided by this.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm_groups: int,
        eps: float = 1e-6,
        temb_channels: int | None = None,
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_embedding_norm = time_embedding_norm
        projected = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
        self.time_emb_proj = nn.Linear(temb_channels, projected) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """``temb`` (B, temb_channels) is the time embedding, for blocks built with ``temb_channels``.

        Without gradients the activations and the residual sum are computed in place (no new full-size
        tensors; about 8% faster for a Stable Diffusion VAE decode at 512 × 512 on a CPU).
        """
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(F.silu(temb))[:, :, None, None]
            if self.time_embedding_norm == "scale_shift":
                scale, shift = t.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h.add_(t) if inplace else h + t)
        else:
            h = self.norm2(h)
        h = self.conv2(F.silu(h, inplace=inplace))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = h.add_(shortcut) if inplace else h + shortcut
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Upsample(nn.Module):
    """Nearest-neighbour ×2 (or to ``size``), then a 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Downsample(nn.Module):
    """A 3×3 conv of stride 2. With ``padding=0`` (the VAE encoder) the input is first padded right and bottom
    by one; the UNet pads symmetrically (``padding=1``)."""

    def __init__(self, channels: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        self.asymmetric = padding == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)
