"""Training the KL autoencoder (Rombach et al. 2022, §3): reconstruction plus a small KL term, then
optionally the decoder alone on the frozen encoder's latents (as Stability AI fine-tuned Stable Diffusion's
decoder): the latent space stays the same, the decoded pictures get sharper.

After training, ``shift_factor`` is set to the mean and ``scaling_factor`` to 1 / std of the latents (Stable
Diffusion set the scale the same way; SD3 added the shift), so the generator works on latents of zero mean
and unit variance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from txt2img import distributed
from txt2img.vae import VAEConfig, VAEDecoder, VAEEncoder


@dataclasses.dataclass
class VAETrainingConfig:
    """Args:
    steps: Optimizer steps.
    lr: AdamW learning rate (cosine-decayed to 10%).
    kl_weight: Weight of the KL divergence to N(0, 1) against the per-pixel reconstruction loss.
    sample_posterior: Decode a sample of the posterior (the usual VAE); ``False`` decodes its mean.
    object_weight: Extra weight of the reconstruction loss on object pixels (``object_mask``): 0 weighs all
        pixels alike; 4 weighs object pixels 5×. For scenes on a plain background, such as Shapes-64, whose
        small shapes otherwise blur: with 4 and the posterior mean, the recipe's autoencoder (3,000 steps, 4
        latent channels) gave back the right shape for 92.7% of 600 renderings, against 88.5% with the
        defaults.
    decoder_steps: Optimizer steps of the decoder alone after the joint training, on the frozen encoder's
        posterior means, with the reconstruction loss weighted by ``decoder_object_weight`` (0: none). The
        encoder does not change, so the latents the later stages learn from keep their meaning. In the
        Shapes-64 recipe (then with 4 latent channels), 2,000 steps at 1e-3 with ``decoder_object_weight=8``
        raised the right shapes in 600 reconstructions from 91.5% to 94.8%.
    decoder_lr: AdamW learning rate of those steps (cosine-decayed to 10%).
    decoder_object_weight: ``object_weight`` of those steps.
    """

    steps: int = 1500
    lr: float = 2e-3
    kl_weight: float = 1e-5
    sample_posterior: bool = True
    object_weight: float = 0.0
    decoder_steps: int = 0
    decoder_lr: float = 5e-4
    decoder_object_weight: float = 0.0


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, 1)), averaged over all elements."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def object_mask(images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → (B, 1, H, W) float: 1 where a pixel differs from the image's top-left pixel
    (taken as the background) by more than ``threshold``, summed over the channels."""
    background = images[:, :, :1, :1]
    return ((images - background).abs().sum(1, keepdim=True) > threshold).to(images.dtype)


def reconstruction_loss(
    recon: torch.Tensor, images: torch.Tensor, object_weight: float = 0.0
) -> torch.Tensor:
    """L1 + L2 in [-1, 1] pixels, each pixel weighted 1 + ``object_weight`` × ``object_mask``."""
    if object_weight == 0.0:
        return F.l1_loss(recon, images) + F.mse_loss(recon, images)
    weight = 1.0 + object_weight * object_mask(images)
    error = recon - images
    return (error.abs() * weight).mean() + (error.square() * weight).mean()


def vae_loss(
    images: torch.Tensor, encoder: VAEEncoder, decoder: VAEDecoder, training: VAETrainingConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction of a posterior sample (or of its mean), plus ``kl_weight`` × KL."""
    mean, logvar = encoder.encode(images)
    raw = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if training.sample_posterior else mean
    recon = decoder._decode_raw(raw)
    rec = reconstruction_loss(recon, images, training.object_weight)
    kl = kl_divergence(mean, logvar)
    return rec + training.kl_weight * kl, {"rec": rec.item(), "kl": kl.item()}


def decoder_loss(
    images: torch.Tensor, encoder: VAEEncoder, decoder: VAEDecoder, training: VAETrainingConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction of the frozen encoder's posterior mean: the loss of the decoder-only steps."""
    with torch.no_grad():
        mean, _ = encoder.encode(images)
    rec = reconstruction_loss(decoder._decode_raw(mean), images, training.decoder_object_weight)
    return rec, {"rec": rec.item()}


def _optimize(
    trained: Sequence[nn.Module],
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    batches: Iterator[torch.Tensor],
    *,
    steps: int,
    lr: float,
    desc: str,
    progress: bool,
) -> None:
    """``steps`` AdamW steps (cosine-decayed to 10% of ``lr``) of ``trained`` on ``loss_fn(images)``."""
    params = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr * 0.1)
    run = distributed.data_parallel(*trained)  # a plain call in one process
    bar = tqdm(range(steps), desc=desc, disable=not progress or not distributed.is_main_process())
    for _ in bar:
        images = next(batches).contiguous(memory_format=torch.channels_last)
        loss, logs = run(loss_fn, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix({name: f"{value:.4f}" for name, value in logs.items()})


def train_vae(
    config: VAEConfig,
    training: VAETrainingConfig,
    batches: Iterator[torch.Tensor],
    *,
    seed: int = 0,
    progress: bool = True,
) -> tuple[VAEEncoder, VAEDecoder]:
    """Train an encoder and decoder on image batches (B, 3, H, W) in [-1, 1].

    Under ``torchrun`` each process trains on its own ``batches``, gradients are averaged by
    DistributedDataParallel, and the fitted factors are rank 0's. ``training.decoder_steps`` then train
    the decoder alone.

    Returns:
        ``(encoder, decoder)`` in eval mode, both with the fitted ``scaling_factor`` in their config.
    """
    torch.manual_seed(distributed.rank_seed(seed))
    encoder, decoder = VAEEncoder(config).train(), VAEDecoder(config).train()
    for model in (encoder, decoder):
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (torch's stubs lack it)
    _optimize(
        (encoder, decoder),
        lambda images: vae_loss(images, encoder, decoder, training),
        batches,
        steps=training.steps,
        lr=training.lr,
        desc="vae",
        progress=progress,
    )
    encoder.eval()  # frozen from here on: decoder_loss encodes without gradients
    if training.decoder_steps > 0:
        _optimize(
            (decoder,),
            lambda images: decoder_loss(images, encoder, decoder, training),
            batches,
            steps=training.decoder_steps,
            lr=training.decoder_lr,
            desc="vae decoder",
            progress=progress,
        )
    decoder.eval()
    with torch.no_grad():
        sample = torch.cat([encoder.encode(next(batches))[0] for _ in range(8)])
    scaling_factor, shift_factor = distributed.broadcast_from_main(
        [float(1.0 / sample.std()), float(sample.mean())]
    )
    fitted = dataclasses.replace(config, scaling_factor=scaling_factor, shift_factor=shift_factor)
    encoder.config = fitted
    decoder.config = fitted
    return encoder, decoder
