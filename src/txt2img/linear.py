"""Linear layers that run as oneDNN 1 × 1 convolutions on CPUs where that is the faster matrix product.

PyTorch computes ``nn.Linear`` on CPUs with its BLAS library (MKL in the official wheels) and convolutions
with oneDNN. The two differ a lot on some machines: on an AMD EPYC with AVX-512, a float32 linear layer of
1,024 rows reaches about 200 GFLOP/s through MKL and about 450 through oneDNN. A linear layer over N rows is
a 1 × 1 convolution over N pixels, and a (N, K) row-major input is already a channels-last (1, K, 1, N) image,
so the convolution needs no copy of the input or the output.

Which library wins depends on the machine, so ``"auto"`` (the default) times both once per process on a
layer of UNet size and uses oneDNN only where it is clearly faster. The choice applies to inference on CPU
in float32 with at least ``MIN_ROWS`` rows; training, other devices and dtypes always use ``F.linear``.
Results differ from ``F.linear`` only by float32 rounding (another summation order).

Override the choice with ``set_cpu_linear_backend`` or the environment variable ``TXT2IMG_CPU_LINEAR``
(``auto``, ``onednn`` or ``blas``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Backend = Literal["auto", "onednn", "blas"]
BACKENDS: tuple[Backend, ...] = ("auto", "onednn", "blas")

MIN_ROWS = 32
"""Rows (tokens × batch) from which the convolution path is used: below it the weight reorder oneDNN does on
every call costs as much as it saves (measured equal at 16 rows of a 1280 × 1280 layer, 1.4× faster at 64)."""

MIN_MACS = 2**22
"""Multiply-adds (rows × in × out features) from which the convolution path is considered: smaller products
take well under a millisecond either way, and never start the ``"auto"`` probe (which costs about 0.1 s once,
more than the embedded model's whole generation)."""

AUTO_MARGIN = 1.15
"""How much faster oneDNN must be in the ``"auto"`` probe to be chosen, so that machines where the two are
close keep one stable choice."""

_requested: Backend | None = None  # set_cpu_linear_backend; None: the environment variable or "auto"
_resolved: bool | None = None  # whether the convolution path is used, once decided


def _check_backend(name: object, source: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}.")
    return name


def set_cpu_linear_backend(backend: Backend | None) -> None:
    """Choose how float32 linear layers run at inference on CPUs.

    Args:
        backend: ``"onednn"`` (as 1 × 1 convolutions), ``"blas"`` (``F.linear``), ``"auto"`` (time both once
            and take the faster), or ``None`` to go back to ``TXT2IMG_CPU_LINEAR`` or ``"auto"``.

    Raises:
        ValueError: For any other value.
    """
    global _requested, _resolved
    _requested = None if backend is None else _check_backend(backend, "backend")
    _resolved = None


def _median_seconds(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2]


def probe_onednn_faster(rows: int = 1024, features: int = 640, runs: int = 5) -> bool:
    """Whether a (rows × features) @ (features × features) product runs ``AUTO_MARGIN`` times faster as a
    oneDNN convolution than through ``F.linear`` on this machine (about 30 ms)."""
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=generator)
    weight = torch.randn(features, features, generator=generator)
    with torch.inference_mode():
        blas, onednn = (lambda: F.linear(x, weight)), (lambda: conv1x1_linear(x, weight, None))
        blas(), onednn()  # first calls allocate and pick kernels
        return _median_seconds(blas, runs) > AUTO_MARGIN * _median_seconds(onednn, runs)


def cpu_linear_backend() -> Literal["onednn", "blas"]:
    """The backend float32 CPU inference uses in this process (running the ``"auto"`` probe if needed).

    Raises:
        ValueError: If ``TXT2IMG_CPU_LINEAR`` holds an unknown name.
    """
    global _resolved
    if _resolved is None:
        requested = _requested or _check_backend(
            os.environ.get("TXT2IMG_CPU_LINEAR", "auto"), "TXT2IMG_CPU_LINEAR"
        )
        _resolved = probe_onednn_faster() if requested == "auto" else requested == "onednn"
    return "onednn" if _resolved else "blas"


def conv1x1_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as a 1 × 1 convolution: x (..., K), weight (M, K) → (..., M)."""
    k, m = x.shape[-1], weight.shape[0]
    rows = x.reshape(1, -1, k)  # (1, N, K); a view when x is contiguous
    image = rows.unsqueeze(1).permute(0, 3, 1, 2)  # (1, K, 1, N), channels-last strides: no copy
    out = F.conv2d(image, weight.view(m, k, 1, 1), bias)  # (1, M, 1, N), channels-last
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], m)  # (..., M)


def _use_conv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and x.dim() >= 2
        and x.numel() >= MIN_ROWS * x.shape[-1]
        and x.numel() * weight.shape[0] >= MIN_MACS
        and cpu_linear_backend() == "onednn"
    )


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) that runs as a oneDNN convolution where that is
    faster: see the module docstring. (…, in_features) → (…, out_features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_conv(x, self.weight):
            return conv1x1_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
