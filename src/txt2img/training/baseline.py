"""The text-conditional VAE path: a baseline for the GAN, on identical data, VAE and text encoder.

pooled text embedding → mean and log-variance of the latents → a reparameterised sample → ``VAEDecoder``.
It is trained by maximum likelihood of the real latents under that Gaussian (the Gaussian negative
log-likelihood), on the same latent pool as the GAN, and measured by the same evaluation, so the docs can
compare the two paths in prompt fidelity, variety and speed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from txt2img import distributed
from txt2img.images import to_numpy, to_uint8, to_unit_range
from txt2img.text_encoder import TextEncoder
from txt2img.training.evaluate import Generate
from txt2img.vae_tiling import DecodeTiling


class TextToLatentGaussian(nn.Module):
    """Pooled text (B, P) → mean and log-variance of scaled latents, each (B, C, S, S).

    A linear layer to a 4 × 4 map, then ×2 upsampling convolution stages up to S.
    """

    def __init__(self, pooled_dim: int, latent_channels: int, size: int, width: int = 128) -> None:
        super().__init__()
        self.width = width
        self.start = nn.Linear(pooled_dim, width * 16)
        stages = []
        side = 4
        while side < size:
            stages += [
                nn.Upsample(scale_factor=2.0, mode="nearest"),
                nn.Conv2d(width, width, 3, padding=1),
                nn.SiLU(),
            ]
            side *= 2
        self.stages = nn.Sequential(*stages)
        self.out = nn.Conv2d(width, 2 * latent_channels, 3, padding=1)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.silu(self.start(pooled)).view(-1, self.width, 4, 4)
        mean, logvar = self.out(self.stages(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-10.0, 4.0)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """−log N(x; mean, exp(logvar)) per element, up to a constant, averaged."""
    return 0.5 * ((x - mean).square() * torch.exp(-logvar) + logvar).mean()


@dataclasses.dataclass
class BaselineTrainingConfig:
    """Args:
    steps: Optimizer steps.
    batch_size: Latents per step.
    lr: AdamW learning rate.
    """

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3


def train_baseline(
    model: TextToLatentGaussian,
    text_encoder: TextEncoder,
    training: BaselineTrainingConfig,
    batches: Iterator[tuple[torch.Tensor, list[str]]],
    *,
    seed: int = 0,
    progress: bool = True,
) -> TextToLatentGaussian:
    """Fit ``model`` to (scaled latents, captions) batches with the frozen ``text_encoder`` (under ``torchrun``:
    each process on its own batches, gradients averaged by DistributedDataParallel)."""
    torch.manual_seed(distributed.rank_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr)
    run = distributed.data_parallel(model)  # a plain call in one process
    bar = tqdm(
        range(training.steps),
        desc="baseline (text-conditional VAE)",
        disable=not progress or not distributed.is_main_process(),
    )
    model.train()
    for _ in bar:
        latents, captions = next(batches)
        with torch.no_grad():
            pooled = text_encoder.encode(captions).pooled
        loss = gaussian_nll(latents, *run(model, pooled))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(nll=f"{loss.item():.3f}")
    return model.eval()


def baseline_generator(
    model: TextToLatentGaussian, text_encoder: TextEncoder, decoder: DecodeTiling
) -> Generate:
    """Adapt the baseline to the evaluation's ``generate(prompts, seeds)`` → uint8 (B, 64, 64, 3)."""

    @torch.inference_mode()
    def generate(prompts: list[str], seeds: list[int]) -> np.ndarray:
        mean, logvar = model(text_encoder.encode(prompts).pooled)
        noise = torch.cat(
            [torch.randn((1, *mean.shape[1:]), generator=torch.Generator().manual_seed(s)) for s in seeds]
        )
        images = decoder.decode(mean + torch.exp(0.5 * logvar) * noise)
        return to_uint8(to_numpy(to_unit_range(images)))

    return generate
