"""Refusing a call that would exhaust memory, before it starts.

A call's activations grow with batch × height × width. One too large for the machine would be ended by the
kernel's out-of-memory killer, taking the whole process (a server, a notebook) with it, or on a GPU fail deep
inside a layer. So each call first estimates the memory its activations need and compares it with what the
execution device has available; above that it raises :class:`InsufficientMemoryError`, naming both numbers and
what to change, before any work is done. ``Txt2ImgPipeline.set_memory_limit`` sets another limit or none.

The estimate, from the components' configs:

- while a network runs it holds about ``ACTIVATION_FACTOR`` copies of its largest feature map (the input kept
  for a residual sum, a normalised copy, a convolution's output); a UNet also holds its skip connections;
- the decoder holds them for one image under ``vae.enable_slicing()`` and for one tile under
  ``vae.enable_tiling()``;
- plus the encoded prompts and the output images (float32 copies in [-1, 1] and [0, 1], 8-bit ones for PIL).

It leaves out the weights (already resident: they are not in the available memory anyway; under model offload
to a GPU the largest component's weights are added) and attention scores, which PyTorch's fused kernels never
hold on CPUs and recent GPUs and which ``enable_attention_slicing`` bounds elsewhere. For calls of 100 MiB and
more, the measured peaks of the embedded model and of KL and tiny decoders were 0.6–1.35× the estimate
(docs/reliability.md): it is a guard against calls that cannot fit, not a budget to fill. A call allowed may
still not fit when other calls or processes take memory meanwhile.

Available memory: on Linux ``MemAvailable`` (free memory plus what the kernel can reclaim), lowered to the
room left under the process's cgroup limit (containers); elsewhere the free physical pages; on CUDA the free
device memory plus PyTorch's cached blocks; on MPS the recommended working set less what is allocated.
Where none of these can be read, the check is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from txt2img.pipeline import Txt2ImgPipeline

MemoryLimit = int | Literal["auto"] | None

ACTIVATION_FACTOR = 4
"""Copies of a network's largest feature map alive at its peak: the input kept for the residual sum, its
normalised copy, a convolution's output, a temporary."""

_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


class InsufficientMemoryError(MemoryError, ValueError):
    """A call's estimated memory exceeds the memory limit: refused before it starts.

    A ``MemoryError`` (the process is fine, the request is too large for it) and a ``ValueError`` (an argument
    that cannot work here), so that either ``except`` catches it.
    """


# ---------------------------------------------------------------------------------------------------------
# What is available


def available_memory(device: torch.device) -> int | None:
    """Bytes that a call may still allocate on ``device``; ``None`` where it cannot be read."""
    if device.type == "cpu":
        return available_cpu_memory()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "mps":
        return max(0, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return None


def available_cpu_memory() -> int | None:
    """Available RAM: ``MemAvailable``, capped by the cgroup's room; else free physical pages; else ``None``."""
    candidates = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    if candidates:
        return min(candidates)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform (macOS lacks SC_AVPHYS_PAGES)
        return None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """The limit of this process's memory cgroup minus its usage (less reclaimable file cache); ``None``
    without a limit. cgroup v2 (``memory.max``) and v1 (``memory.limit_in_bytes``)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            files = ("memory.max", "memory.current", "inactive_file")
            roots = [Path("/sys/fs/cgroup") / path.lstrip("/"), Path("/sys/fs/cgroup")]
        elif "memory" in controllers.split(","):  # v1
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            roots = [Path("/sys/fs/cgroup/memory") / path.lstrip("/"), Path("/sys/fs/cgroup/memory")]
        else:
            continue
        for root in roots:
            room = _room_in(root, *files)
            if room is not None:
                return room
    return None


def _room_in(root: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        limit_text = (root / limit_file).read_text().strip()
        if limit_text == "max" or int(limit_text) >= _UNLIMITED:
            return None
        usage = int((root / usage_file).read_text())
        inactive = 0
        for line in (root / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
        return max(0, int(limit_text) - (usage - inactive))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------
# What a call needs


def largest_map(channels: list[int], pixels: int, factor: int = 2) -> int:
    """Elements of the largest feature map of a network that runs ``channels`` (lowest resolution first) at
    ``pixels``, ``pixels · factor²``, ...; each stage also holds its predecessor's map upsampled to its size."""
    return max(
        max(c, channels[i - 1] if i else 0) * pixels * factor ** (2 * i) for i, c in enumerate(channels)
    )


def generator_bytes(gan: Any, batch: int, height: int, width: int) -> int:
    """Activations of the generator for ``batch`` latents of ``height`` × ``width`` latent pixels."""
    from txt2img.unet import UNetGenerator

    config = gan.config
    element = torch.finfo(gan.dtype).bits // 8
    if isinstance(gan, UNetGenerator):
        channels = list(config.block_out_channels)
        n = len(channels)
        pixels = [height * width // 4**i for i in range(n)]  # highest resolution first
        layers = config.per_block("layers_per_block")
        skips = channels[0] * pixels[0] + sum((layers[i] + 1) * c * pixels[i] for i, c in enumerate(channels))
        up_inputs = max(2 * c * p for c, p in zip(channels, pixels))  # features concatenated with a skip
        return batch * element * (skips + ACTIVATION_FACTOR * up_inputs)
    factor = gan.size_factor
    pixels = (height // factor) * (width // factor)
    return batch * element * ACTIVATION_FACTOR * largest_map(list(config.channels), pixels)


def decoder_bytes(vae: Any, batch: int, height: int, width: int) -> int:
    """Activations of the decoder for ``batch`` latents of ``height`` × ``width``, under its slicing and tiling."""
    from txt2img.vae_tiny import TinyVAEDecoder

    config = vae.config
    if vae.tiling is not None:
        height, width = min(height, vae.tiling.tile_size), min(width, vae.tiling.tile_size)
    if vae.slicing:
        batch = 1
    if isinstance(vae, TinyVAEDecoder):
        channels, factor = list(config.decoder_block_out_channels), config.upsampling_scaling_factor
    else:
        channels, factor = list(reversed(config.block_out_channels)), 2
    element = torch.finfo(vae.dtype).bits // 8
    return batch * element * ACTIVATION_FACTOR * largest_map(channels, height * width, factor)


def call_bytes(pipe: Txt2ImgPipeline, batch: int, height: int, width: int, output_type: str) -> int:
    """Estimated bytes a call of ``batch`` images of ``height`` × ``width`` pixels allocates at its peak."""
    f = pipe.vae.scale_factor
    h, w = height // f, width // f
    text = pipe.text_encoder
    features = getattr(text.model.config, "hidden_size", None) or 1024  # transformers configs may lack it
    embeds = batch * text.max_length * (features + 1) * torch.finfo(pipe.dtype).bits // 8
    networks = generator_bytes(pipe.gan, batch, h, w)
    images = batch * pipe.vae.config.latent_channels * h * w * 4
    if output_type != "latent":
        networks = max(networks, decoder_bytes(pipe.vae, batch, h, w))
        # float32 copies: decoded, in [0, 1], as numpy; for PIL also the scaled and rounded ones and 8-bit copies
        images = batch * 3 * height * width * (3 * 4 + (2 * 4 + 2 if output_type == "pil" else 0))
    offloaded = 0
    offloader = pipe._offloader
    if offloader is not None and offloader.execution_device.type != "cpu" and not offloader.sequential:
        offloaded = max(_weight_bytes(c) for c in pipe.components.values())  # the awake component's weights
    return embeds + networks + images + offloaded


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# ---------------------------------------------------------------------------------------------------------
# The check


def check_limit(limit: object) -> MemoryLimit:
    """Validate a memory limit: ``"auto"``, ``None`` or a positive number of bytes."""
    if limit is None or limit == "auto":
        return limit
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return limit
    raise ValueError(f'The memory limit must be "auto", None or a positive number of bytes, not {limit!r}.')


def check_call(
    pipe: Txt2ImgPipeline, batch: int, height: int, width: int, output_type: str, limit: MemoryLimit
) -> None:
    """Raise :class:`InsufficientMemoryError` if the call's estimate exceeds ``limit`` (``"auto"``: the
    memory available on the execution device now)."""
    if limit is None:
        return
    device = pipe.device
    if limit == "auto":
        available = available_memory(device)
        if available is None:
            return
        where = f"available on {device.type.upper() if device.type != 'cpu' else 'this machine'}"
    else:
        available, where = limit, "allowed by pipe.set_memory_limit"
    needed = call_bytes(pipe, batch, height, width, output_type)
    if needed <= available:
        return
    advice = ["fewer images per call", "a smaller height or width"]
    if output_type != "latent":
        smaller = {
            "pipe.vae.enable_slicing()": not pipe.vae.slicing and batch > 1,
            "pipe.vae.enable_tiling()": pipe.vae.tiling is None,
        }
        advice += [knob for knob, helps in smaller.items() if helps]
    raise InsufficientMemoryError(
        f"This call would need about {format_bytes(needed)} for {batch} image(s) of {height}×{width} pixels, "
        f"but {format_bytes(available)} is {where}: refused before starting, as it would exhaust memory. "
        f"Try {', '.join(advice[:-1])} or {advice[-1]}; or change the limit with "
        "pipe.set_memory_limit(bytes), or None to switch the check off."
    )


def format_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # not reached
