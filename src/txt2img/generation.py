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
