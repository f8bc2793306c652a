"""Generation math as small pure functions: noise drawing and seeds. Tested without building any model."""

from __future__ import annotations

import torch

GeneratorArg = torch.Generator | list[torch.Generator] | None


def draw_noise(
    shape: tuple[int, ...],
    generator: GeneratorArg,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise of ``shape``, drawn as diffusers' ``randn_tensor`` draws it.

    A CPU generator (or none) draws on the CPU, then the noise moves to ``device``, so one seed gives the
    same noise on every device. A list of generators draws one sample each, so image ``i`` of a batch
    equals image 0 of a call made with ``generator[i]`` alone.

    Args:
        shape: (B, ...) noise shape.
        generator: ``None``, one generator, or one per sample (length B).
        device: Where the noise goes.
        dtype: Dtype to draw in.

    Returns:
        Noise of ``shape`` on ``device``.
    """
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(
                f"Got {len(generator)} generators for a batch of {shape[0]} images: pass one per image."
            )
        samples = [
            torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device)
            for g in generator
        ]
        return torch.cat(samples, dim=0)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per seed."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def reproducible_seeds(generator: GeneratorArg, batch_size: int) -> list[int | None]:
    """The seed of each image's noise, where a fresh generator of that seed alone would draw it again.

    Call before drawing. A list of generators gives one seed each; one shared generator gives the first
    image's seed (the later images' noise comes from no seed of their own). A generator that has already
    drawn, or no generator at all, gives ``None``.
    """
    if isinstance(generator, list) and len(generator) > 1:
        return [_fresh_seed(g) for g in generator]
    first = generator[0] if isinstance(generator, list) else generator
    if first is None:
        return [None] * batch_size
    return [_fresh_seed(first)] + [None] * (batch_size - 1)


def _fresh_seed(generator: torch.Generator) -> int | None:
    """``generator``'s seed if it has drawn nothing since it was seeded, else ``None``."""
    if not isinstance(generator, torch.Generator):  # refused with a clear error when the noise is drawn
        return None
    seed = generator.initial_seed()
    fresh = torch.Generator(device=generator.device).manual_seed(seed)
    return seed if torch.equal(fresh.get_state(), generator.get_state()) else None
