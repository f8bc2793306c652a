"""Opt-in ``torch.compile`` of a pipeline's networks, block by block ("regional" compilation).

A pipeline's time goes to a few block types repeated many times: ResNet blocks (UNet, VAE decoder), the
UNet's transformer blocks, the CLIP text encoder's layers, the GAN's synthesis blocks and TAESD's blocks.
``compile_blocks`` compiles each such block in place (``nn.Module.compile``: same parameters, same
state-dict keys) and leaves the glue around them eager. That compiles far less code than whole networks
would: blocks of one type and shape share their compiled code, because PyTorch (≥ 2.5) treats a block's
weights as inputs of the compiled graph rather than constants baked into it.

The first call at each new input shape compiles (seconds on a GPU, up to minutes on a small CPU); later
calls run the compiled code. Inductor keeps what it compiled in its cache folder, ``TORCHINDUCTOR_CACHE_DIR``
(default ``<temp dir>/torchinductor_<user>``), so a later process with the same model and shapes loads the
compiled code instead of compiling again. ``set_cache_dir`` moves that folder somewhere lasting.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from txt2img.clip_text import CLIPEncoderLayer
from txt2img.gan import SynthesisBlock
from txt2img.layers import ResnetBlock
from txt2img.unet import TransformerBlock
from txt2img.vae_tiny import TinyBlock

#: The block types ``compile_blocks`` compiles; a block nested in another one is compiled with it.
REPEATED_BLOCKS: tuple[type[nn.Module], ...] = (
    CLIPEncoderLayer,
    ResnetBlock,
    TransformerBlock,
    SynthesisBlock,
    TinyBlock,
)
#: ``mode`` values ``torch.compile`` accepts.
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CPP_COMPILERS = ("g++", "clang++", "c++")
#: Compiled versions Dynamo may keep per block type (its default, 8, is fewer than the distinct shapes of
#: Stable Diffusion's ResNet blocks; past it the remaining blocks would silently run uncompiled).
RECOMPILE_LIMIT = 64


def check_compile_supported(device: torch.device, mode: str | None = None) -> None:
    """Raise a clear error where ``torch.compile`` cannot run, instead of a failure deep in the first call.

    Args:
        device: Where the compiled code will run.
        mode: The ``torch.compile`` mode asked for.

    Raises:
        ValueError: If ``mode`` is not one of ``COMPILE_MODES``.
        RuntimeError: If this Python has no TorchDynamo support, or ``device`` is the CPU and no C++ compiler
            (``$CXX``, ``g++``, ``clang++`` or ``c++``) is on the ``PATH``: Inductor compiles CPU kernels as C++.
    """
    _check_mode(mode)
    import torch._dynamo  # about a second to import: only when compiling

    if not torch._dynamo.is_dynamo_supported():
        raise RuntimeError(
            "torch.compile does not support this Python version with the installed torch; run the pipeline "
            "without pipe.compile(), or use a Python version torch.compile supports."
        )
    if device.type == "cpu" and find_cpp_compiler() is None:
        raise RuntimeError(
            f"torch.compile on the CPU needs a C++ compiler, and none of {', '.join(_cpp_candidates())} is on the "
            "PATH. Install one (for example `apt install g++`), set CXX to its path, or run the pipeline without "
            "pipe.compile()."
        )


def _check_mode(mode: str | None) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode={mode!r} is not one of torch.compile's modes {COMPILE_MODES}.")


def _cpp_candidates() -> tuple[str, ...]:
    return (os.environ["CXX"],) if os.environ.get("CXX") else CPP_COMPILERS


def find_cpp_compiler() -> str | None:
    """The C++ compiler Inductor would find: ``$CXX`` if set, else the first of ``CPP_COMPILERS`` on the
    ``PATH``; ``None`` if there is none."""
    return next((path for name in _cpp_candidates() if (path := shutil.which(name))), None)


def set_cache_dir(path: str | os.PathLike[str]) -> Path:
    """Keep Inductor's compiled code in ``path`` (created), for this process and the ones it starts.

    Set it before the first compiled call: it sets ``TORCHINDUCTOR_CACHE_DIR``, which Inductor reads when it
    first compiles.

    Args:
        path: A folder; ``~`` is expanded.

    Returns:
        The folder, absolute.
    """
    folder = Path(path).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def compile_blocks(module: nn.Module, *, mode: str | None = None, dynamic: bool | None = False) -> int:
    """Compile, in place, every ``REPEATED_BLOCKS`` block inside ``module`` (``module`` itself included).

    Args:
        module: A network; its parameters and state-dict keys stay as they are.
        mode: ``torch.compile``'s mode: ``None`` (its default), ``"reduce-overhead"`` (CUDA graphs on a GPU),
            ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``.
        dynamic: ``torch.compile``'s ``dynamic``: ``False`` (the default) compiles one version per input shape,
            the fastest code for the few sizes a pipeline is called at; ``None`` lets PyTorch generalise
            over sizes after the second one.

    Returns:
        The number of blocks compiled (0 when ``module`` has none).

    Raises:
        ValueError: If ``mode`` is not one of ``COMPILE_MODES``.

    Dynamo's ``recompile_limit`` is raised to at least ``RECOMPILE_LIMIT`` for the process.
    """
    _check_mode(mode)
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return _compile_in_place(module, mode, dynamic)


def _compile_in_place(module: nn.Module, mode: str | None, dynamic: bool | None) -> int:
    if isinstance(module, REPEATED_BLOCKS):
        module.compile(mode=mode, dynamic=dynamic)
        return 1
    return sum(_compile_in_place(child, mode, dynamic) for child in module.children())
