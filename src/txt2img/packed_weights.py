"""Convolution weights kept in oneDNN's own layout between calls, for float32 inference on CPUs.

PyTorch runs float32 convolutions on CPUs through oneDNN, which computes from weights in a blocked layout of
its own: ``F.conv2d`` reorders the weight into that layout on every call, reading and writing all of it. On
large maps the reorder is small beside the convolution; on small ones it is not. A 3 × 3 convolution with
1,280 channels on Stable Diffusion's 8 × 8 latent map does 1.9 GFLOP of work on 59 MB of weights: on a 2-core
CPU it took 31 ms with the reorder and 8 ms with the weight already reordered (16 × 16: 54 and 32 ms; from
32 × 32 on, within 4%; ``python benchmarks/packed_conv.py``). ``Conv2d`` keeps the reordered copy
(PyTorch's ``mkldnn_reorder_conv2d_weight``, what ``torch.compile`` uses when it freezes weights) and reuses
it while neither the weight nor the input's shape changes.

The cost is memory: a second copy of each weight kept this way, made at its first call. So only convolutions
of at most ``MAX_PIXELS`` input pixels (all images of the batch together) keep one, where the reorder costs
most beside the work: for Stable Diffusion's UNet at 512 × 512 those on its 16 × 16 and 8 × 8 maps, which
hold most of its convolution weights. A weight is packed only while at least ``MIN_AVAILABLE_AFTER`` bytes of
memory stay available afterwards, so packing never takes the memory a call's activations need; a layer left
unpacked runs as before. Packing applies to float32 inference on CPUs with channels-last inputs; training, other devices and
dtypes, and code being compiled always take ``F.conv2d``.

Turn it off with ``set_cpu_weight_packing(False)`` or the environment variable
``TXT2IMG_CPU_PACK_WEIGHTS=0``; results differ from ``F.conv2d`` only by float32 rounding.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from txt2img import memory, precision

logger = logging.getLogger(__name__)

MAX_PIXELS = 16 * 16
"""Largest input (batch × height × width) whose convolutions keep their weights packed: the reorder takes
nearly three times as long as the work on the UNet's 8 × 8 maps, two thirds as long on 16 × 16 ones, and
under 4% of a call from 32 × 32 on."""

MIN_AVAILABLE_AFTER = 4 * 2**30
"""Bytes of memory (``txt2img.memory.available_cpu_memory``) that must stay available after packing a weight:
Stable Diffusion's 512 × 512 decode alone holds about 3 GB of activations."""

_requested: bool | None = None  # set_cpu_weight_packing; None: the environment variable, else on
_broken = False  # set when this PyTorch build lacks the packed-weight operators


def set_cpu_weight_packing(enabled: bool | None) -> None:
    """Keep convolution weights packed for oneDNN between calls (on by default).

    Args:
        enabled: ``True`` or ``False``; ``None`` to go back to ``TXT2IMG_CPU_PACK_WEIGHTS`` (``1``/``0``),
            else on.
    """
    global _requested
    _requested = enabled


def cpu_weight_packing() -> bool:
    """Whether float32 CPU inference packs convolution weights in this process.

    Raises:
        ValueError: If ``TXT2IMG_CPU_PACK_WEIGHTS`` is neither ``0`` nor ``1``.
    """
    if _requested is not None:
        return _requested and not _broken
    value = os.environ.get("TXT2IMG_CPU_PACK_WEIGHTS", "1")
    if value not in ("0", "1"):
        raise ValueError(
            f"TXT2IMG_CPU_PACK_WEIGHTS must be 0 or 1; got {value!r}. Set it to 0 to turn packing off, to 1 or "
            "unset to keep it on."
        )
    return value == "1" and not _broken


@functools.cache
def _available() -> bool:
    """Whether this PyTorch build has oneDNN and the packed-weight convolution (asked once per process)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class WeightPack:
    """The oneDNN-layout copy of one weight for one input shape; rebuilt when either changes.

    The copy and what it was made for are held as one pair and read once per call, so threads calling one
    layer with different shapes never see one's copy under the other's key. Deep copies and pickles of a
    module start with an empty pack (oneDNN tensors cannot be copied).
    """

    def __init__(self) -> None:
        self.entry: tuple[tuple[Any, ...], torch.Tensor] | None = None  # (what it was made for, the copy)
        # False while the layer's weights come and go (offloading): see set_module_packing.
        self.allowed = True

    @property
    def tensor(self) -> torch.Tensor | None:
        """The packed copy, if one is held."""
        entry = self.entry
        return None if entry is None else entry[1]

    @property
    def key(self) -> tuple[Any, ...] | None:
        """(data pointer, version, shape of the weight, input shape, convolution settings) of the copy held."""
        entry = self.entry
        return None if entry is None else entry[0]

    def clear(self) -> None:
        """Drop the packed copy."""
        self.entry = None

    def get(
        self, weight: torch.Tensor, input_shape: tuple[int, ...], conv: tuple[Any, ...]
    ) -> torch.Tensor | None:
        """The packed ``weight`` (O, I/groups, kH, kW) for inputs of ``input_shape``; ``conv`` = (padding,
        stride, dilation, groups). ``None`` where packing it would leave too little memory available."""
        # A weight made in inference mode counts no versions: for it only a new tensor is noticed.
        version = None if weight.is_inference() else weight._version
        key = (weight.data_ptr(), version, weight.shape, input_shape, conv)
        entry = self.entry
        if entry is not None and entry[0] == key:
            return entry[1]
        self.entry = None  # the old copy goes before its replacement is made
        available = memory.available_cpu_memory()
        if available is not None and available - weight.nbytes < MIN_AVAILABLE_AFTER:
            return None
        padding, stride, dilation, groups = conv
        # The input size lets oneDNN pick the layout its kernel for that size wants (PyTorch's stub omits it).
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(  # type: ignore[call-arg]
            weight.detach().contiguous().to_mkldnn(), padding, stride, dilation, groups, list(input_shape)
        )
        self.entry = (key, packed)
        return packed

    def __deepcopy__(self, memo: dict[int, Any]) -> WeightPack:
        pack = WeightPack()
        pack.allowed = self.allowed
        return pack

    def __getstate__(self) -> dict[str, Any]:
        return {"entry": None, "allowed": self.allowed}


def set_module_packing(module: nn.Module, allowed: bool) -> None:
    """Allow or forbid packed weights in every layer of ``module``; forbidding drops the copies made so far.

    Offloading forbids them while it is on: it brings each layer's weights back as new tensors on every call,
    so packed copies would be made again each time and would keep in memory what offloading puts to rest.
    """
    for layer in module.modules():
        pack = getattr(layer, "weight_pack", None)
        if isinstance(pack, WeightPack):
            pack.allowed = allowed
            if not allowed:
                pack.clear()


def packed_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pack: WeightPack,
    *,
    padding: list[int],
    stride: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """``F.conv2d`` with ``weight`` taken from ``pack``: x (B, C, H, W) → (B, O, H', W'), channels-last.

    Where this PyTorch build cannot pack the weight, ``F.conv2d`` computes it, and packing stays off for the
    rest of the process.
    """
    global _broken
    conv = (padding, stride, dilation, groups)
    try:
        packed = pack.get(weight, tuple(x.shape), conv)
        if packed is None:
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *conv, "none", [], "")
    except RuntimeError as error:
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # raises too if x is wrong
        _broken = True  # x was fine: this build cannot pack
        logger.info(
            "convolution weights are not kept packed in this process: this PyTorch cannot (%s)", error
        )
        return out


def use_packed(x: torch.Tensor, module: Conv2d) -> bool:
    """Whether ``module``'s convolution of ``x`` (B, C, H, W) should use its packed weight: float32 inference
    on a CPU, a small channels-last input, packing switched on, allowed for the layer and supported by this
    build, no code being compiled, and the weight the layer's own. A copy made for one call
    (``txt2img.precision``'s float32 copy of a half-precision weight) is never packed: its packed copy would
    outlive it."""
    return (
        x.device.type == "cpu"
        and x.dtype == module.weight.dtype == torch.float32
        and x.dim() == 4
        and x.shape[0] * x.shape[2] * x.shape[3] <= MAX_PIXELS
        and x.is_contiguous(memory_format=torch.channels_last)  # oneDNN's output is channels-last
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and not torch.is_grad_enabled()
        and module.weight_pack.allowed
        and cpu_weight_packing()
        and not torch.compiler.is_compiling()
        and not precision.computes_in_copies(module)
        and _available()
    )


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) that keeps its weight packed for oneDNN at CPU
    inference on small maps: see the module docstring. (B, C, H, W) → (B, O, H', W')."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight_pack = WeightPack()

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self.weight_pack.clear()  # .to(), .half(), .cuda(): the packed copy would stay behind in CPU memory
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_packed(x, self):
            return packed_conv2d(
                x,
                self.weight,
                self.bias,
                self.weight_pack,
                padding=list(cast(tuple[int, int], self.padding)),  # not a string: use_packed checked
                stride=list(self.stride),
                dilation=list(self.dilation),
                groups=self.groups,
            )
        return super().forward(x)
