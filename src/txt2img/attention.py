"""Attention through PyTorch's fused ``scaled_dot_product_attention``, optionally in chunks of queries.

Parameter names follow diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) so that
checkpoints in the diffusers layout load without a key map.

Attention slicing (diffusers' ``enable_attention_slicing``) splits the N queries into chunks that each attend
to all L keys, so a backend that materialises the attention scores holds (B, h, chunk, L) of them at a time
instead of (B, h, N, L). PyTorch's fused kernels (flash attention on CPU; flash or memory-efficient attention
on CUDA) never hold the scores, and slicing them only costs time, so ``"auto"`` slices only where PyTorch
falls back to its math path and the scores would be large (see ``attention_chunk_size``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from txt2img.linear import Linear

SliceSize = int | Literal["auto", "max"] | None

AUTO_SLICE_BUDGET = 256 * 2**20
"""Bytes of attention scores (counted in float32) that one chunk may hold under ``slice_size="auto"``.
PyTorch's math path holds about 2.3× that at its peak: the scores, their softmax and a temporary."""

MAX_SLICE_QUERIES = 256
"""Queries per chunk under ``slice_size="max"``. For Stable Diffusion's 64×64-latent self-attention (B·h = 5,
N = L = 4096) PyTorch's math path then peaks at 68 MiB instead of 743 MiB, for 1.2–1.7× the time on a busy
2-core CPU; smaller chunks save little more and cost more (128 queries: 1.5–2×, 64: 1.6–2.8×)."""


# ---------------------------------------------------------------------------------------------------------
# The chunk size


def attention_chunk_size(
    batch_heads: int,
    queries: int,
    keys: int,
    head_dim: int,
    element_size: int,
    device_type: str,
    has_mask: bool,
    *,
    fused_enabled: bool = True,
    budget: int | None = None,
) -> int | None:
    """Queries per chunk for ``slice_size="auto"``, or ``None`` to attend in one call.

    The rule, checked against PyTorch 2.13's dispatcher and peak memory (CPU flash attention takes masks since
    PyTorch 2.3):

    1. Where a fused kernel runs, the scores are never materialised, so ``None``:
       - CPU: PyTorch's flash-attention kernel takes every floating dtype, any head size and a boolean
         (B, 1, 1, L) mask (measured: 7 MiB peak for B·h=5, N=L=4096, where the scores are 320 MiB);
       - CUDA (Ampere or newer): flash attention for half precision without a mask and heads ≤ 256, else
         memory-efficient attention for 2- or 4-byte dtypes with head sizes divisible by 8.
    2. Elsewhere (MPS and other devices, CUDA outside those cases, or fused kernels switched off, e.g. by
       ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``) the math path holds the (B·h, N, L) scores, in
       float32 even for half-precision inputs on CPU. If they fit in ``budget`` bytes, ``None``; otherwise the
       largest chunk whose scores fit: ``budget // (batch_heads · keys · max(element_size, 4))``, at least 1.

    Args:
        batch_heads: Batch size times heads (B·h).
        queries: Number of queries (N).
        keys: Number of keys (L).
        head_dim: Feature size of one head (d).
        element_size: Bytes per element of q, k and v as they enter attention (after any upcast).
        device_type: ``torch.device.type`` of the inputs ("cpu", "cuda", "mps", ...).
        has_mask: Whether an attention mask is passed.
        fused_enabled: Whether PyTorch's fused kernels are switched on (``sdpa_kernel`` can turn them off).
        budget: Bytes the scores of one chunk may take; ``AUTO_SLICE_BUDGET`` by default.

    Returns:
        Queries per chunk, smaller than ``queries``, or ``None``.
    """
    if fused_enabled and _fused_kernel_runs(device_type, head_dim, element_size, has_mask):
        return None
    budget = AUTO_SLICE_BUDGET if budget is None else budget
    row_bytes = batch_heads * keys * max(element_size, 4)  # scores of one query, every batch entry and head
    if queries * row_bytes <= budget:
        return None
    return max(1, budget // row_bytes)


def _fused_kernel_runs(device_type: str, head_dim: int, element_size: int, has_mask: bool) -> bool:
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        flash = element_size == 2 and not has_mask and head_dim <= 256
        mem_efficient = element_size in (2, 4) and head_dim % 8 == 0
        return flash or mem_efficient
    return False


def _fused_kernels_enabled(device_type: str) -> bool:
    # These flags govern the CPU kernels too, despite the module's name.
    if device_type == "cpu":
        return torch.backends.cuda.flash_sdp_enabled()
    return torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()


def _check_slice_size(slice_size: object) -> SliceSize:
    if slice_size is None or slice_size in ("auto", "max"):
        return slice_size
    if isinstance(slice_size, int) and not isinstance(slice_size, bool) and slice_size > 0:
        return slice_size
    raise ValueError(f'slice_size must be None, "auto", "max" or a positive int, not {slice_size!r}')


def _chunk_size(slice_size: SliceSize, q: torch.Tensor, k: torch.Tensor, has_mask: bool) -> int | None:
    """Queries per chunk for q (B, h, N, d) and k (B, h, L, d) under ``slice_size``; ``None`` for one call."""
    slice_size = _check_slice_size(slice_size)
    if slice_size == "auto":
        b, h, n, d = q.shape
        device_type = q.device.type
        fused_enabled = _fused_kernels_enabled(device_type)
        return attention_chunk_size(
            b * h, n, k.shape[2], d, q.element_size(), device_type, has_mask, fused_enabled=fused_enabled
        )
    if slice_size == "max":
        return MAX_SLICE_QUERIES
    return slice_size


# ---------------------------------------------------------------------------------------------------------
# Modules


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

    ``slice_size`` (``None``: off) is a plain attribute read on every call; set it with ``set_slice_size``.
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
        self.slice_size: SliceSize = None
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner, query_dim)])

    def set_slice_size(self, slice_size: SliceSize) -> None:
        """Compute attention in chunks of queries, to bound the memory of backends that hold the scores.

        Args:
            slice_size: ``None`` for one call; an int for that many queries per chunk; ``"max"`` for
                ``MAX_SLICE_QUERIES`` per chunk; ``"auto"`` to slice only where PyTorch would hold more than
                ``AUTO_SLICE_BUDGET`` bytes of scores (``attention_chunk_size``).

        With autograd on, the math path keeps every chunk's probabilities for the backward pass, so the
        saving is mostly one of inference.

        Raises:
            ValueError: For any other value.
        """
        self.slice_size = _check_slice_size(slice_size)

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
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        chunk = _chunk_size(self.slice_size, q, k, attn_mask is not None)
        if chunk is None or chunk >= n:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
        else:  # each chunk of queries attends to every key: scores (B, h, chunk, L)
            parts = [
                F.scaled_dot_product_attention(q_part, k, v, attn_mask=attn_mask)
                for q_part in q.split(chunk, 2)
            ]
            out = torch.cat(parts, dim=2)  # (B, h, N, d)
        out = out.to(dtype).transpose(1, 2).reshape(b, n, -1)
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


def set_attention_slicing(module: nn.Module, slice_size: SliceSize) -> int:
    """Set ``slice_size`` on every ``Attention`` in ``module`` (see ``Attention.set_slice_size``).

    Args:
        module: A model or any module tree, e.g. one pipeline component.
        slice_size: ``None`` (off), ``"auto"``, ``"max"`` or queries per chunk.

    Returns:
        How many attention layers were set.
    """
    slice_size = _check_slice_size(slice_size)
    layers = [layer for layer in module.modules() if isinstance(layer, Attention)]
    for layer in layers:
        layer.set_slice_size(slice_size)
    return len(layers)
