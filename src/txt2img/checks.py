"""Argument checks of a pipeline call, as small functions: each raises a ``ValueError`` or ``TypeError`` that
names the argument, what was given and what would work, before the call does any work."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from txt2img.text_encoder import PromptEmbeds, check_prompt_texts


def prompt_list(prompt: Any) -> list[str]:
    """``prompt`` as a non-empty list of valid strings.

    Raises:
        TypeError: not a string or a list/tuple of strings (naming the types found).
        ValueError: an empty list, or a string that is not valid Unicode.
    """
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompt must be a string or a list of strings, not {type(prompt).__name__}.")
    if not prompts:
        raise ValueError("prompt is an empty list: pass at least one prompt.")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"Every prompt must be a string; got {', '.join(sorted(set(bad)))}.")
    check_prompt_texts(list(prompts))
    return list(prompts)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int ≥ 1 (numpy integers welcome; bools, floats and strings refused).

    Raises:
        ValueError: anything else, naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def image_side(name: str, value: Any, factor: int) -> int:
    """A height or width in pixels: a positive integer multiple of ``factor``.

    Raises:
        ValueError: naming the nearest sizes that work.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}.")
    value = int(value)
    if value % factor:
        lower = max(factor, value - value % factor)
        raise ValueError(
            f"{name}={value} is not a multiple of this model's factor {factor}: try {lower} or {lower + factor}."
        )
    return value


def finite_number(name: str, value: Any) -> float:
    """Raises ``ValueError`` unless ``value`` is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def tensor_argument(name: str, value: Any) -> torch.Tensor:
    """A floating-point tensor holding real data and only finite values.

    Raises:
        TypeError: not a tensor, or not floating point.
        ValueError: a meta tensor (no data), or NaN or infinite values.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, not {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, not {value.dtype}.")
    if value.is_meta:
        raise ValueError(f"{name} is a meta tensor, which holds no values.")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} holds NaN or infinite values.")
    return value


def latents(value: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """The caller's noise: a finite floating tensor of ``shape`` (any device; moved by the pipeline).

    Raises:
        TypeError, ValueError: naming the shape this call needs.
    """
    tensor = tensor_argument("latents", value)
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"latents has shape {tuple(tensor.shape)}, but this call needs noise of shape {shape}."
        )
    return tensor


def prompt_embeds(value: Any, hidden_dim: int | None, pooled_dim: int | None) -> PromptEmbeds:
    """Encoded prompts that the generator can take: (B, L, ``hidden_dim``) token features, (B, ``pooled_dim``)
    pooled vectors and a (B, L) mask, all finite (``None`` dims are not checked).

    Raises:
        TypeError, ValueError: naming the field and the shapes expected.
    """
    if not isinstance(value, PromptEmbeds):
        raise TypeError(
            f"prompt_embeds must be the PromptEmbeds that pipe.encode_prompt returns, not {type(value).__name__}."
        )
    hidden = tensor_argument("prompt_embeds.hidden_states", value.hidden_states)
    pooled = tensor_argument("prompt_embeds.pooled", value.pooled)
    mask = value.attention_mask
    if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            "prompt_embeds.attention_mask must be an integer or boolean tensor (1 for real tokens)."
        )
    if hidden.ndim != 3 or hidden.shape[0] == 0:
        raise ValueError(
            f"prompt_embeds.hidden_states must have shape (B, L, D), B ≥ 1; got {tuple(hidden.shape)}."
        )
    b, length, dim = hidden.shape
    wanted = {
        "hidden_states": (hidden, (b, length, hidden_dim or dim)),
        "pooled": (pooled, (b, pooled_dim or (pooled.shape[-1] if pooled.ndim else 0))),
        "attention_mask": (mask, (b, length)),
    }
    for field, (tensor, shape) in wanted.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"prompt_embeds.{field} has shape {tuple(tensor.shape)}, but this pipeline needs {shape}: "
                "encode the prompts with this pipeline's encode_prompt."
            )
    return value


def generators(generator: Any, batch: int) -> None:
    """``None``, one ``torch.Generator``, or one per image.

    Raises:
        TypeError: anything else.
        ValueError: a list of the wrong length.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, list):
        raise TypeError(
            f"generator must be a torch.Generator or a list of them, not {type(generator).__name__}."
        )
    if any(not isinstance(g, torch.Generator) for g in generator):
        raise TypeError("generator list must hold only torch.Generator objects.")
    if len(generator) != batch:
        raise ValueError(
            f"Got {len(generator)} generators for {batch} images "
            "(prompts × num_images_per_prompt): pass one generator per image, or a single one."
        )
