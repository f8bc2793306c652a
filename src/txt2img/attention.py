"""Attention through PyTorch's fused ``scaled_dot_product_attention``.

Parameter names follow diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) so that
checkpoints in the diffusers layout load without a key map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention of ``query_dim`` features over themselves or over a ``context_dim`` context.

    Args:
        query_dim: Feature size of the queries (and of the output).
        context_dim: Feature size of the context; ``None`` for self-attention.
        heads: Number of heads.
        head_dim: Feature size of one head.
        bias: Whether the q/k/v projections have a bias.
        upcast: Compute the attention itself in float32 when the inputs are half precision (models whose
            attention logits overflow float16, e.g. Stable Diffusion 2.x).
    """

    def __init__(
        self,
        query_dim: int,
        *,
        context_dim: int | None = None,
        heads: int = 1,
        head_dim: int = 64,
        bias: bool = False,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend ``x`` (B, N, query_dim) to ``context`` (B, L, context_dim), or to itself.

        ``mask`` (B, L) is True for the context positions that may be attended to.
        Returns (B, N, query_dim).
        """
        context = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, h, N, d)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)  # (B, h, L, d)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, L)
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.to_out[0](out)


class SpatialSelfAttention(Attention):
    """GroupNorm, then single-head self-attention over the pixels of a feature map, added back (VAE mid block)."""

    def __init__(self, channels: int, *, norm_groups: int, eps: float = 1e-6) -> None:
        super().__init__(channels, heads=1, head_dim=channels, bias=True)
        self.group_norm = nn.GroupNorm(norm_groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, C, H, W) → (B, C, H, W)."""
        b, c, h, w = x.shape
        y = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        y = super().forward(y)
        return x + y.transpose(1, 2).reshape(b, c, h, w)
