"""Device and dtype policy: one place that turns the user's ``device=`` and ``dtype=`` into torch objects.

- ``device=None`` is the CPU; a string such as ``"cuda"`` or ``"cuda:1"`` is checked against the hardware.
- ``dtype=None`` means ``"auto"``: bfloat16 on CUDA GPUs that have it (float16 on older ones), float16 on
  Apple MPS, float32 on CPUs.
- On a CPU, PyTorch emulates float16/bfloat16 arithmetic at a large cost (a small VAE decode: 0.28 s in
  float32, 65 s in float16 on our 2-core test machines). An explicit half-precision ``dtype`` there stores the
  weights in that type (half the memory) and computes every layer in float32 (``txt2img.precision``), with a
  warning once per process.
- ``torch_dtype=`` is the older name of ``dtype=``: accepted with a warning, refused together with it.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from txt2img import precision

logger = logging.getLogger(__name__)
_warned_cpu_half = False

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: torch.device | str | None) -> torch.device:
    """Turn ``device`` into a ``torch.device``, checking that it exists.

    Raises:
        ValueError: an unknown device name, or an accelerator that this machine lacks.
    """
    if device is None:
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device={device!r} is not a device name: use 'cpu', 'cuda', 'cuda:1' or 'mps'."
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was asked for, but no CUDA GPU is available here: use device='cpu'."
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} was asked for, but MPS is not available here: use device='cpu'.")
    return resolved


def resolve_dtype(
    dtype: torch.dtype | str | None,
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> torch.dtype:
    """Turn ``dtype`` (or the deprecated ``torch_dtype``) into a floating ``torch.dtype``.

    Raises:
        ValueError: both names given, or a name that is not a floating dtype.
    """
    if torch_dtype is not None:
        if dtype is not None:
            raise ValueError("Pass dtype= or torch_dtype= (its older name), not both.")
        warnings.warn("torch_dtype= is deprecated: use dtype=.", FutureWarning, stacklevel=3)
        dtype = torch_dtype
    if dtype is None:
        return auto_dtype(device)
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype} is not a floating-point type: use float32, float16 or bfloat16.")
        return dtype
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name == "auto":
            return auto_dtype(device)
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    raise ValueError(f"dtype={dtype!r} is not supported: use 'float32', 'float16', 'bfloat16' or 'auto'.")


def auto_dtype(device: torch.device | str | None) -> torch.dtype:
    """The dtype ``"auto"`` picks for ``device``: bfloat16 on CUDA GPUs that support it (its float32 range
    avoids the overflows of float16 VAEs), else float16; float16 on MPS; float32 on CPUs."""
    kind = resolve_device(device).type  # a clear error for a name that is not a device
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.float32


def computes_natively(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` runs ``dtype`` arithmetic at full speed (CPUs: only float32 and float64)."""
    return device.type != "cpu" or dtype in (torch.float32, torch.float64)


def place(module: nn.Module, device: torch.device | None, dtype: torch.dtype | None) -> nn.Module:
    """Move ``module`` to ``device`` and store its weights in ``dtype`` (``None``: unchanged). Where the device
    would emulate ``dtype`` (half precision on a CPU), the layers compute in float32 instead; returns ``module``."""
    global _warned_cpu_half
    module.to(device=device, dtype=dtype)
    first = next((t for t in module.parameters() if t.is_floating_point()), None)
    if first is None:
        return module
    stored, target = dtype or first.dtype, device or first.device
    if computes_natively(target, stored):
        precision.set_compute_dtype(module, None)
    else:
        if not _warned_cpu_half:
            _warned_cpu_half = True
            logger.warning(
                "%s weights on the CPU: stored in %s (half the memory) but computed in float32, because this "
                "CPU emulates %s arithmetic at a large cost. Use dtype=torch.float32 to store float32 weights.",
                str(stored).removeprefix("torch."),
                stored,
                str(stored).removeprefix("torch."),
            )
        precision.set_compute_dtype(module, torch.float32)
    return module
