"""txt2img: fast text-to-image generation in one forward pass.

    >>> import torch
    >>> from txt2img import Txt2ImgPipeline
    >>> pipe = Txt2ImgPipeline.from_pretrained("org/model")  # doctest: +SKIP
    >>> image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]  # doctest: +SKIP

The public classes are imported on first use, so ``import txt2img`` is quick and pulls in neither
transformers nor huggingface_hub until they are needed.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "models", "shapes-64")
"""The embedded default model: a pipeline folder inside the package, trained on Shapes-64 (64 × 64 images of
one shape on a plain background). ``Txt2ImgPipeline.from_pretrained(DEFAULT_MODEL)`` makes no network call."""

_EXPORTS = {
    "TextEncoder": "txt2img.text_encoder",
    "TextEncoderConfig": "txt2img.text_encoder",
    "PromptEmbeds": "txt2img.text_encoder",
    "VAEDecoder": "txt2img.vae",
    "VAEEncoder": "txt2img.vae",
    "VAEConfig": "txt2img.vae",
    "TinyVAEDecoder": "txt2img.vae_tiny",
    "TinyVAEConfig": "txt2img.vae_tiny",
    "GANGenerator": "txt2img.gan",
    "GANConfig": "txt2img.gan",
    "UNetGenerator": "txt2img.unet",
    "UNetConfig": "txt2img.unet",
    "SchedulerConfig": "txt2img.schedulers",
    "Txt2ImgPipeline": "txt2img.pipeline",
    "Txt2ImgPipelineOutput": "txt2img.pipeline_output",
    "set_verbosity": "txt2img.logs",
    "get_verbosity": "txt2img.logs",
    "disable_progress_bars": "txt2img.logs",
    "enable_progress_bars": "txt2img.logs",
}

__all__ = ["__version__", "DEFAULT_MODEL", *_EXPORTS.keys()]  # noqa: PLE0604 - the keys are strings

if TYPE_CHECKING:  # what the lazy __getattr__ below gives, for type checkers and IDEs
    from txt2img.gan import GANConfig, GANGenerator  # noqa: F401
    from txt2img.logs import disable_progress_bars, enable_progress_bars, get_verbosity, set_verbosity  # noqa: F401
    from txt2img.pipeline import Txt2ImgPipeline  # noqa: F401
    from txt2img.pipeline_output import Txt2ImgPipelineOutput  # noqa: F401
    from txt2img.schedulers import SchedulerConfig  # noqa: F401
    from txt2img.text_encoder import PromptEmbeds, TextEncoder, TextEncoderConfig  # noqa: F401
    from txt2img.unet import UNetConfig, UNetGenerator  # noqa: F401
    from txt2img.vae import VAEConfig, VAEDecoder, VAEEncoder  # noqa: F401
    from txt2img.vae_tiny import TinyVAEConfig, TinyVAEDecoder  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'txt2img' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
