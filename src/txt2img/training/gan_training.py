"""Training the native ``GANGenerator`` in a VAE's latent space.

The recipe, with where each part comes from:
- a discriminator conditioned on the text by projection (Miyato & Koyama 2018): logit = ψ(φ(x)) + ⟨e(t), φ(x)⟩,
  optionally with every layer spectrally normalised (Miyato et al. 2018), which bounds how far one step can
  move its logits: without it, an Adam step moves each weight by up to about ``lr_d``, which in the recipe is
  16% of the initial RMS of its widest layer (8,192 inputs) and 3–4% of its convs', and the losses of the
  generator and the discriminator can swing in a growing oscillation until they diverge;
- the hinge loss (Lim & Ye 2017), and real images under *mismatched* captions as extra fakes, so the
  discriminator checks the text, not only realism (GigaGAN's matching-aware loss, Kang et al. 2023 §3.3);
- the R1 penalty on real data (Mescheder et al. 2018), applied lazily every ``r1_every`` steps (StyleGAN2);
- differentiable augmentation of reals and fakes alike (Zhao et al. 2020), limited to what keeps a caption
  true: shifts of at most ``augment_shift`` latent pixels and additive noise;
- a text–latent similarity loss for the generator from the frozen latent CLIP (GigaGAN's CLIP loss);
- optionally (``pixel_weight`` > 0), a second projection discriminator on images decoded by the frozen VAE
  decoder, for a sub-batch of each step: it judges what the latent one cannot weigh, the pixels a small
  error in the latent changes (a square's corners), and its gradient reaches the generator through the
  decoder;
- an exponential moving average of the generator's weights: the EMA weights are the ones shipped;
- rollbacks: an in-memory copy of the state every ``rollback_every`` steps, to go back to, with other noise,
  when a loss diverges: a blow-up set off by an unlucky stretch of noise need not recur from the state before
  it; settings that blow up every few hundred steps do, unless the discriminator's learning rate comes down
  too (``rollback_lr_d_scale``; docs/training.md).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from txt2img import distributed
from txt2img.gan import GANGenerator
from txt2img.training.checkpoint import load_checkpoint, save_checkpoint
from txt2img.training.clip import LatentCLIP, contrastive_loss, same_captions

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class GANTrainingConfig:
    """Args:
    steps: Optimizer steps of each network.
    batch_size: Images per step.
    lr_g: Generator learning rate (its layers use equalised learning rates).
    lr_d: Discriminator learning rate.
    lr_decay_steps: Over the last this many of ``steps``, both learning rates fall linearly toward zero
        (``learning_rate_scale``; 0: constant). The schedule depends on ``steps``: with decay on, a run's
        step-N networks differ from those of a run stopped at N.
    r1_gamma: Weight γ of the R1 penalty γ/2 ‖∇D(x)‖².
    r1_every: Apply R1 every this many steps (scaled up to match).
    mismatch_weight: Weight of real images with mismatched captions as fakes.
    hard_negative_fraction: Share of those mismatched captions made by ``train_gan``'s ``negative_captions``
        (for example the caption with one word changed) instead of another image's caption.
    clip_weight: Weight of the generator's text–latent contrastive loss.
    ema_half_life: EMA half-life in images.
    augment_p: Probability of shifting each sample (reals and fakes alike).
    augment_shift: Largest shift in latent pixels.
    augment_noise: Std of the noise added to every discriminator input.
    discriminator_width: Channels of the discriminator's first stage (doubled at each of its two stages).
    discriminator_pool_first_from: The discriminator's blocks from this index on pool before their widening
        conv, which then runs at half the side (``DiscriminatorBlock``, ``pool_first``); None: none do. A
        recipe GAN step takes about 23% less time with 0 and 11% less with 1
        (``benchmarks/gan_training_step.py``); None in the recipe, where 0 cost shape accuracy and a run with
        1 diverged (docs/training.md).
    discriminator_spectral_norm: Spectrally normalise the weights of every layer of the discriminators
        (Miyato et al. 2018, as in the projection discriminator's paper): each layer's largest singular value
        held at 1, estimated by one power iteration a forward pass, so that no step can raise the logits'
        scale much. Off: plain weights, which an Adam step moves by up to about ``lr_d`` each, a large step
        for a wide layer's small weights (module docstring).
    pixel_weight: Weight of the pixel-space discriminator's adversarial loss in the generator's (0: no such
        discriminator, and no decoding during training). Its own loss is added with the same weight, which
        Adam's scale-free steps make immaterial to it.
    pixel_batch: Samples of each step decoded for the pixel-space discriminator: the first of the batch,
        whose mismatched captions are the hard negatives first.
    pixel_discriminator_width: Channels of the pixel-space discriminator's first stage (doubled at each of
        its three stages).
    sample_every: Write a sample grid every this many steps (0: never).
    checkpoint_every: Write a checkpoint every this many steps (0: never).
    channels_last: Train the networks (the state's, and the latent CLIP's image encoder) and their batches in
        the channels-last memory format: the same values up to float rounding, about 6% less time a step on
        CPU (``benchmarks/gan_training_step.py``). Off by default; the recipe turns it on, with R1 every 16
        steps at ``r1_gamma=0.4``: with the default R1 settings the rounding alone tipped a seed-0 run into
        divergence (docs/training.md).
    divergence_limit: A loss is diverging when it is not finite or its magnitude exceeds this (0: only
        non-finite losses count); the step is then not taken, and the run goes back (``rollback_every``)
        or stops with ``TrainingDiverged``. Runs of the recipe have kept their losses within about ±35, with
        spikes: one recovered from 4,139; runs that passed 10⁶ had not recovered 150 and 290 steps later,
        and one (the recipe's seed 1) passed 10⁴ within eight steps.
    rollback_every: Keep an in-memory copy of the training state (networks and optimizers) where training
        starts and every this many steps, the latest two; when a loss diverges, restore the older copy
        (from a multiple of ``rollback_every`` on, 1 to 2 × ``rollback_every`` steps back) and train on from
        there with other noise (``noise_seeds``), up to ``max_rollbacks`` times (0: no copies, and a
        divergence stops the run). A run that never diverges draws and computes exactly what it would
        without copies. The copies hold twice the networks and their Adam moments in memory.
    max_rollbacks: The most times a run (resumed ones included) goes back; the next divergence stops it.
    rollback_lr_d_scale: After each rollback the discriminator's learning rate is multiplied by this: a run
        that has gone back ``n`` times trains it at ``lr_d * rollback_lr_d_scale ** n`` (1: the same rate,
        other noise only). Settings that blow up every few hundred steps on a machine need the lower rate,
        where other noise alone only delays the next divergence (docs/training.md, "Rollbacks that lower the
        discriminator's rate").
    """

    steps: int = 3000
    batch_size: int = 64
    lr_g: float = 2e-3
    lr_d: float = 1e-3
    lr_decay_steps: int = 0
    r1_gamma: float = 0.1
    r1_every: int = 4
    mismatch_weight: float = 1.0
    hard_negative_fraction: float = 0.0
    clip_weight: float = 1.0
    ema_half_life: float = 10_000.0
    augment_p: float = 0.5
    augment_shift: int = 1
    augment_noise: float = 0.05
    discriminator_width: int = 64
    discriminator_pool_first_from: int | None = None
    discriminator_spectral_norm: bool = False
    pixel_weight: float = 0.0
    pixel_batch: int = 16
    pixel_discriminator_width: int = 16
    sample_every: int = 500
    checkpoint_every: int = 500
    channels_last: bool = False
    divergence_limit: float = 100_000.0
    rollback_every: int = 100
    max_rollbacks: int = 3
    rollback_lr_d_scale: float = 1.0


# ---------------------------------------------------------------------------------------------------------
# Discriminator


class DiscriminatorBlock(nn.Module):
    """Two 3×3 convs, the second widening, with a residual 1×1 path, and ×½ average pooling.
    (B, C_in, H, W) → (B, C_out, H/2, W/2).

    Args:
        in_channels: C_in.
        out_channels: C_out.
        pool_first: Pool before the widening conv and the 1×1 path, so that they run at the halved side (as
            StyleGAN2's strided convs do): a quarter of their arithmetic, but the widening conv no longer sees
            the input at its full resolution. Else pool after both.
    """

    def __init__(self, in_channels: int, out_channels: int, pool_first: bool = False) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool_first = pool_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv0(F.leaky_relu(x, 0.2)), 0.2)
        if self.pool_first:
            return (self.conv1(F.avg_pool2d(h, 2)) + self.skip(F.avg_pool2d(x, 2))) / 2**0.5
        return F.avg_pool2d(self.conv1(h) + self.skip(x), 2) / 2**0.5


class ProjectionDiscriminator(nn.Module):
    """Latents or images (B, C, S, S) and pooled text (B, text_dim) → one logit per sample (B,).

    Pooled text of shape (K, B, text_dim) scores each sample under K captions at the cost of one pass over
    the inputs (the text enters only at the end) → logits (K, B).

    ``stages`` blocks each halve the side and double the channels (``width`` first). The final features keep
    their spatial layout (flattened, not pooled), so the discriminator can check where things are as well as
    what they are.

    Args:
        latent_channels: Channels C of its input (latents, or images for a pixel-space discriminator).
        text_dim: Size of the pooled text embedding.
        size: Side S of its input; divisible by ``2**stages``.
        width: Channels of the first stage.
        features: Size of the final feature vector the text is projected onto.
        stages: Downsampling blocks.
        pool_first_from: The blocks from this index on (0: all) pool before their widening conv
            (``DiscriminatorBlock(pool_first=True)``); None: none do.
        spectral_norm: Spectrally normalise every conv and linear layer's weight
            (``torch.nn.utils.parametrizations.spectral_norm``).

    Raises:
        ValueError: ``size`` not divisible by ``2**stages``.
    """

    def __init__(
        self,
        latent_channels: int,
        text_dim: int,
        size: int,
        width: int = 64,
        features: int = 256,
        stages: int = 2,
        pool_first_from: int | None = None,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        if size % 2**stages:
            raise ValueError(
                f"ProjectionDiscriminator: an input side of {size} is not divisible by 2**stages = {2**stages}; "
                "give a side that is, or fewer stages."
            )
        self.input_shape = (latent_channels, size, size)
        self.from_latent = nn.Conv2d(latent_channels, width, 1)
        self.blocks = nn.Sequential(
            *(
                DiscriminatorBlock(
                    width * 2**i,
                    width * 2 ** (i + 1),
                    pool_first=pool_first_from is not None and i >= pool_first_from,
                )
                for i in range(stages)
            )
        )
        self.to_features = nn.Linear(width * 2**stages * (size // 2**stages) ** 2, features)
        self.out = nn.Linear(features, 1)
        self.embed_text = nn.Linear(text_dim, features)
        if spectral_norm:
            for layer in [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]:
                nn.utils.parametrizations.spectral_norm(layer)

    def forward(self, latents: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.from_latent(latents)).flatten(1)
        h = F.leaky_relu(self.to_features(F.leaky_relu(h, 0.2)), 0.2)  # (B, features)
        return self.out(h).squeeze(1) + (self.embed_text(pooled) * h).sum(-1)


# ---------------------------------------------------------------------------------------------------------
# Losses and augmentation (pure functions)


def d_hinge_loss(
    real: torch.Tensor, fake: torch.Tensor, mismatched: torch.Tensor, mismatch_weight: float
) -> torch.Tensor:
    """Hinge loss of the discriminator: reals above +1; fakes and mismatched reals below -1."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean() + mismatch_weight * F.relu(1 + mismatched).mean()


def discriminator_loss(
    run: Callable[..., torch.Tensor],
    d: ProjectionDiscriminator,
    real: torch.Tensor,
    fake: torch.Tensor,
    pooled: torch.Tensor,
    mismatched: torch.Tensor,
    augment_fn: Callable[[torch.Tensor], torch.Tensor],
    training: GANTrainingConfig,
    *,
    r1: bool,
) -> torch.Tensor:
    """One discriminator's loss: the hinge loss on augmented reals, fakes (detached) and reals under
    mismatched captions, plus, when ``r1``, the lazy R1 penalty on a separate pass over reals. The reals
    are scored under their true and their mismatched captions in one pass; the fakes take a second (two
    passes hold smaller activations than one concatenated batch).

    Args:
        run: Calls the discriminator: ``run(d, inputs, pooled)`` (``d`` itself, or its data-parallel wrapper).
        d: The discriminator.
        real: Real inputs (B, C, S, S).
        fake: Generated inputs (B, C, S, S); detached here.
        pooled: Pooled text of the true captions (B, text_dim).
        mismatched: Pooled text of mismatched captions (B, text_dim).
        augment_fn: The differentiable augmentation applied to every input.
        training: Supplies ``mismatch_weight``, ``r1_gamma`` and ``r1_every``.
        r1: Whether this step adds the R1 penalty (scaled by ``r1_every``).

    Returns:
        The scalar loss.
    """
    real_logits, mismatched_logits = run(d, augment_fn(real), torch.stack([pooled, mismatched]))
    loss = d_hinge_loss(
        real_logits,
        run(d, augment_fn(fake.detach()), pooled),
        mismatched_logits,
        training.mismatch_weight,
    )
    if r1:
        real_in = augment_fn(real).detach().requires_grad_(True)
        penalty = r1_penalty(run(d, real_in, pooled), real_in)
        loss = loss + training.r1_gamma / 2 * penalty * training.r1_every
    return loss


def g_hinge_loss(fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the generator: raise the discriminator's logits on fakes."""
    return -fake.mean()


def r1_penalty(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """‖∇ₓ D(x)‖², averaged over the batch, for ``inputs`` that require grad."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.square().sum(dim=(1, 2, 3)).mean()


def augment(
    x: torch.Tensor, generator: torch.Generator, *, p: float, max_shift: int, noise: float
) -> torch.Tensor:
    """Differentiable augmentation that keeps captions true: each sample shifted by up to ``max_shift``
    pixels with probability ``p`` (edges replicated), then Gaussian noise of std ``noise``. (B, C, H, W)."""
    b, _, h, w = x.shape
    if max_shift > 0 and p > 0:
        shifts = torch.randint(-max_shift, max_shift + 1, (2, b), generator=generator)
        shifts = shifts * (torch.rand(b, generator=generator) < p)
        padded = F.pad(x, (max_shift,) * 4, mode="replicate")
        rows = (torch.arange(h)[None, :] + max_shift - shifts[0][:, None]).to(x.device)  # (B, H)
        cols = (torch.arange(w)[None, :] + max_shift - shifts[1][:, None]).to(x.device)  # (B, W)
        index = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    return x


def learning_rate_scale(step: int, steps: int, decay_steps: int) -> float:
    """The factor on the learning rates at 0-based ``step`` of ``steps``: 1, then over the last
    ``decay_steps`` steps linearly down to ``1 / decay_steps`` at the final step (1 throughout when
    ``decay_steps`` is 0)."""
    if decay_steps <= 0:
        return 1.0
    return min(1.0, (steps - step) / decay_steps)


def discriminator_learning_rate(training: GANTrainingConfig, rollbacks: int) -> float:
    """The discriminator's learning rate after ``rollbacks`` rollbacks (before any decay): ``lr_d`` times
    ``rollback_lr_d_scale`` per rollback."""
    return training.lr_d * training.rollback_lr_d_scale**rollbacks


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · model, for parameters and buffers."""
    for e, m in zip(ema.parameters(), model.parameters()):
        e.lerp_(m, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


# ---------------------------------------------------------------------------------------------------------
# The loop


class TrainingDiverged(RuntimeError):
    """A loss of the GAN stage left the range ``GANTrainingConfig.divergence_limit`` allows.

    Args:
        message: What happened and what to do.
        summary: The step and the losses alone (the message, when not given).
    """

    def __init__(self, message: str, summary: str = "") -> None:
        super().__init__(message)
        self.summary = summary or message


def check_divergence(
    losses: dict[str, torch.Tensor], step: int, limit: float, checkpoint: str
) -> dict[str, float]:
    """Raise ``TrainingDiverged`` if a loss is not finite or, with ``limit`` > 0, above ``limit`` in magnitude,
    here or (under ``torchrun``) on any other rank.

    Args:
        losses: Scalar losses by name.
        step: The step being taken (1-based), for the message.
        limit: ``GANTrainingConfig.divergence_limit``.
        checkpoint: Where the last good state is, for the message.

    Returns:
        The losses as floats (for the progress bar).
    """
    values = {name: value.item() for name, value in losses.items()}
    bad = {name: v for name, v in values.items() if not math.isfinite(v) or (limit > 0 and abs(v) > limit)}
    if distributed.any_rank(bool(bad)):  # under torchrun every rank stops, not only the one that diverged
        shown = ", ".join(f"{name} = {v:.4g}" for name, v in bad.items()) or "a loss of another rank"
        summary = f"GAN training diverged at step {step}: {shown} (divergence_limit {limit:g})."
        raise TrainingDiverged(
            f"{summary} The step was not completed, and {checkpoint}. Start again with a lower "
            "discriminator learning rate (lr_d), spectral normalisation of the discriminators "
            "(discriminator_spectral_norm) if it was off, rollbacks (rollback_every) or another seed; or resume "
            "from the checkpoint, if one was written, with lower learning rates or rollbacks.",
            summary,
        )
    return values


def noise_seeds(seed: int, step: int, rollbacks: int) -> tuple[int, int]:
    """The seeds of the generator's noise (torch's global generator) and of the augmentation when training
    (re)starts at ``step`` after ``rollbacks`` rollbacks: ``rank_seed(seed) + step`` and one more at first,
    and another pair, a million apart, after each rollback, so that a run that goes back does not draw the
    noise it diverged with again."""
    base = distributed.rank_seed(seed) + step + 1_000_003 * rollbacks
    return base, base + 1


@dataclasses.dataclass
class TrainingSnapshot:
    """An in-memory copy of a ``GANTrainingState``'s networks and optimizers at ``step``
    (``GANTrainingState.snapshot``, ``restore``)."""

    step: int
    modules: dict[str, dict[str, torch.Tensor]]
    optimizers: dict[str, dict]


@dataclasses.dataclass
class GANTrainingState:
    """What a training run holds: the networks, their optimizers, the step reached and the seconds it took.

    ``opt_d`` steps both discriminators; ``pixel_discriminator`` is ``None`` unless ``pixel_weight`` > 0.
    ``seconds`` counts the training loop's time over every run that led here, resumed ones included, and
    ``rollbacks`` the times it went back after a divergence (``GANTrainingConfig.rollback_every``).
    """

    generator: GANGenerator
    generator_ema: GANGenerator
    discriminator: ProjectionDiscriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    step: int = 0
    pixel_discriminator: ProjectionDiscriminator | None = None
    seconds: float = 0.0
    rollbacks: int = 0

    def save(self, folder: str | os.PathLike) -> None:
        save_checkpoint(
            folder,
            modules=self._modules(),
            optimizers=self._optimizers(),
            extra={"step": self.step, "seconds": self.seconds, "rollbacks": self.rollbacks},
        )

    def load(self, folder: str | os.PathLike) -> None:
        extra = load_checkpoint(folder, modules=self._modules(), optimizers=self._optimizers())
        self.step = int(extra["step"])
        self.seconds = float(extra.get("seconds", 0.0))  # older checkpoints did not count them
        self.rollbacks = int(extra.get("rollbacks", 0))  # nor these

    def snapshot(self) -> TrainingSnapshot:
        """A copy of the networks' and optimizers' states at this step, in memory."""
        return TrainingSnapshot(
            self.step,
            {name: copy.deepcopy(module.state_dict()) for name, module in self._modules().items()},
            {name: copy.deepcopy(optimizer.state_dict()) for name, optimizer in self._optimizers().items()},
        )

    def restore(self, snapshot: TrainingSnapshot) -> None:
        """Put the networks, optimizers and step back to ``snapshot``'s (which stays usable: copied in)."""
        for name, module in self._modules().items():
            module.load_state_dict(snapshot.modules[name])
        for name, optimizer in self._optimizers().items():
            # Copied: the optimizer would otherwise keep the snapshot's tensors as its state, and update them.
            optimizer.load_state_dict(copy.deepcopy(snapshot.optimizers[name]))
        self.step = snapshot.step

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"g": self.opt_g, "d": self.opt_d}

    def _modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {
            "generator": self.generator,
            "generator_ema": self.generator_ema,
            "discriminator": self.discriminator,
        }
        if self.pixel_discriminator is not None:
            modules["pixel_discriminator"] = self.pixel_discriminator
        return modules


def make_state(
    generator: GANGenerator,
    training: GANTrainingConfig,
    *,
    size: int,
    image_size: int | None = None,
    image_channels: int = 3,
) -> GANTrainingState:
    """Fresh networks and optimizers around ``generator`` (Adam, β = (0, 0.99), as StyleGAN2).

    Args:
        generator: The generator to train.
        training: Hyper-parameters (the discriminators' widths, learning rates, ``pixel_weight``).
        size: Side of the latents, in latent pixels.
        image_size: Side of the decoded images; required when ``training.pixel_weight`` > 0.
        image_channels: Channels of the decoded images.

    Returns:
        The state at step 0.

    Raises:
        ValueError: ``training.pixel_weight`` > 0 without ``image_size``.
    """
    config = generator.config
    discriminator = ProjectionDiscriminator(
        config.latent_channels,
        config.pooled_dim,
        size,
        width=training.discriminator_width,
        pool_first_from=training.discriminator_pool_first_from,
        spectral_norm=training.discriminator_spectral_norm,
    )
    pixel_discriminator = None
    if training.pixel_weight > 0:
        if image_size is None:
            raise ValueError(
                f"GANTrainingConfig.pixel_weight is {training.pixel_weight}, but make_state got no image_size "
                "for the pixel-space discriminator: pass the decoded images' side, or set pixel_weight to 0."
            )
        pixel_discriminator = ProjectionDiscriminator(
            image_channels,
            config.pooled_dim,
            image_size,
            width=training.pixel_discriminator_width,
            stages=3,
            spectral_norm=training.discriminator_spectral_norm,
        ).train()
    d_parameters = [*discriminator.parameters()]
    if pixel_discriminator is not None:
        d_parameters += pixel_discriminator.parameters()
    return GANTrainingState(
        generator=generator.train(),
        generator_ema=copy.deepcopy(generator).eval().requires_grad_(False),
        discriminator=discriminator.train(),
        opt_g=torch.optim.Adam(generator.parameters(), lr=training.lr_g, betas=(0.0, 0.99)),
        opt_d=torch.optim.Adam(d_parameters, lr=training.lr_d, betas=(0.0, 0.99)),
        pixel_discriminator=pixel_discriminator,
    )


@dataclasses.dataclass
class _PixelParts:
    """What the pixel-space discriminator's updates need (``pixel_weight`` > 0)."""

    discriminator: ProjectionDiscriminator
    run: Callable[..., torch.Tensor]  # the discriminator itself, or its data-parallel wrapper
    decode: Callable[[torch.Tensor], torch.Tensor]


def _pixel_parts(
    state: GANTrainingState,
    training: GANTrainingConfig,
    decode: Callable[[torch.Tensor], torch.Tensor] | None,
) -> _PixelParts | None:
    """The pixel discriminator's parts when ``training.pixel_weight`` > 0, else ``None``; a ValueError
    that names what is missing when the state or ``decode`` cannot provide them."""
    if training.pixel_weight <= 0:
        return None
    pixel_d = state.pixel_discriminator
    if pixel_d is None or decode is None or training.pixel_batch < 1:
        missing = [
            *(["no decode function"] if decode is None else []),
            *(["a state without a pixel discriminator"] if pixel_d is None else []),
            *([f"pixel_batch {training.pixel_batch}"] if training.pixel_batch < 1 else []),
        ]
        raise ValueError(
            f"GANTrainingConfig.pixel_weight is {training.pixel_weight}, but train_gan got "
            f"{' and '.join(missing)}: pass the frozen VAE decoder's decode, a state made by make_state "
            "with this config and a pixel_batch of 1 or more, or set pixel_weight to 0."
        )
    return _PixelParts(pixel_d, distributed.data_parallel(pixel_d), decode)


@torch.no_grad()
def mismatched_text(
    clip: LatentCLIP,
    pooled: torch.Tensor,
    captions: list[str],
    hard_count: int,
    negative_captions: Callable[[list[str]], list[str]] | None,
) -> torch.Tensor:
    """Pooled text of captions that do not match their images (B, text_dim): for the first ``hard_count``
    images their ``negative_captions`` (hard negatives), for the rest the previous image's caption."""
    mismatched = pooled.roll(1, dims=0)
    if hard_count and negative_captions is not None:
        hard = clip.text_encoder.encode(negative_captions(captions[:hard_count])).pooled
        mismatched = torch.cat([hard, mismatched[hard.shape[0] :]])
    return mismatched


def pixel_discriminator_loss(
    pixels: _PixelParts,
    real: torch.Tensor,
    fake: torch.Tensor,
    pooled: torch.Tensor,
    mismatched: torch.Tensor,
    augment_fn: Callable[..., torch.Tensor],
    training: GANTrainingConfig,
    *,
    r1: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    """The pixel discriminator's loss on the first ``pixel_batch`` samples, decoded: reals without
    gradients, fakes with them (kept for the generator's update). Image shifts span as many image pixels as
    one latent pixel does.

    Args:
        pixels: The pixel discriminator's parts.
        real, fake: Scaled latents (B, C, S, S).
        pooled, mismatched: Pooled text of the true and the mismatched captions (B, text_dim).
        augment_fn: The latents' augmentation, ``augment_fn(x, factor)`` for images ``factor`` times larger.
        training: Supplies ``pixel_batch`` and the loss settings.
        r1: Whether this step adds the R1 penalty.

    Returns:
        The loss; and the decoded fakes (n, image_channels, H, W) with the images' augmentation, for
        ``generator_losses``.
    """
    n = training.pixel_batch
    with torch.no_grad():
        real_px = pixels.decode(real[:n])
    fake_px = pixels.decode(fake[:n])
    expected = pixels.discriminator.input_shape
    if real_px.shape[1:] != expected:
        raise ValueError(
            f"train_gan: decode returned images of shape {tuple(real_px.shape[1:])}, but the pixel "
            f"discriminator was made for {expected}: pass make_state the decoder's image size and channels."
        )
    aug_px = functools.partial(augment_fn, factor=real_px.shape[-1] // real.shape[-1])
    loss = discriminator_loss(
        pixels.run,
        pixels.discriminator,
        real_px,
        fake_px,
        pooled[:n],
        mismatched[:n],
        aug_px,
        training,
        r1=r1,
    )
    return loss, (fake_px, aug_px)


def generator_losses(
    discriminators: tuple[ProjectionDiscriminator, ProjectionDiscriminator | None],
    fake: torch.Tensor,
    pooled: torch.Tensor,
    captions: list[str],
    clip: LatentCLIP,
    clip_text: torch.Tensor,
    augment_fn: Callable[[torch.Tensor], torch.Tensor],
    training: GANTrainingConfig,
    pixel_fake: tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator's loss: fool the (updated) discriminators, and match the text under the frozen latent
    CLIP. The discriminators are frozen while it is built (its graph holds no gradients of theirs) and
    trainable again when this returns or raises.

    Args:
        discriminators: The latent discriminator, and the pixel one or ``None``.
        fake: Generated latents (B, C, S, S), with gradients to the generator.
        pooled: Pooled text of their captions (B, text_dim).
        captions: Their captions (to tell repeated ones apart in the contrastive loss).
        clip: The frozen latent CLIP.
        clip_text: Its normalised text embeddings of ``captions`` (B, embed_dim).
        augment_fn: The latents' augmentation.
        training: Supplies ``clip_weight`` and ``pixel_weight``.
        pixel_fake: The decoded fakes and their augmentation, when the pixel discriminator is on.

    Returns:
        The total loss, and its parts by name (``g``, ``clip``, and ``g_px`` with the pixel discriminator).
    """
    d, pixel_d = discriminators
    frozen = [net for net in discriminators if net is not None]
    for net in frozen:
        net.requires_grad_(False)
    try:
        losses = {
            "g": g_hinge_loss(d(augment_fn(fake), pooled)),
            "clip": contrastive_loss(
                clip_text, clip.embed_latents(fake), clip.logit_scale, same_captions(captions)
            ),
        }
        total = losses["g"] + training.clip_weight * losses["clip"]
        if pixel_d is not None and pixel_fake is not None:
            fake_px, aug_px = pixel_fake
            losses["g_px"] = g_hinge_loss(pixel_d(aug_px(fake_px), pooled[: fake_px.shape[0]]))
            total = total + training.pixel_weight * losses["g_px"]
    finally:
        for net in frozen:
            net.requires_grad_(True)
    return total, losses


def write_outputs(
    state: GANTrainingState,
    training: GANTrainingConfig,
    out: Path,
    sample_fn: Callable[[GANGenerator, Path], None] | None,
) -> bool:
    """After a step: a sample grid every ``sample_every`` steps, a checkpoint every ``checkpoint_every``.

    Returns:
        Whether a checkpoint was written.
    """
    if sample_fn is not None and training.sample_every and state.step % training.sample_every == 0:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        sample_fn(state.generator_ema, out / "samples" / f"step-{state.step:06d}.png")
    if training.checkpoint_every and state.step % training.checkpoint_every == 0:
        state.save(out / "checkpoint")
        return True
    return False


def train_gan(
    state: GANTrainingState,
    training: GANTrainingConfig,
    batches: Iterator[tuple[torch.Tensor, list[str]]],
    clip: LatentCLIP,
    *,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    sample_fn: Callable[[GANGenerator, Path], None] | None = None,
    negative_captions: Callable[[list[str]], list[str]] | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> GANTrainingState:
    """Train until ``training.steps``, resuming from ``state.step``.

    Under ``torchrun`` (a process group initialised) each process trains on its own ``batches`` and noise,
    the networks' gradients are averaged by DistributedDataParallel, and rank 0 alone writes checkpoints
    and samples; the batch size is per process.

    Args:
        state: Networks and optimizers (``make_state``, possibly loaded from a checkpoint).
        training: Hyper-parameters.
        batches: An endless iterator of (scaled latents (B, C, S, S), captions).
        clip: The frozen latent CLIP; its text encoder also conditions the generator.
        seed: Seed of the noise and augmentation draws (``noise_seeds``: offset by the step when resuming,
            after a rollback, and by ``distributed.rank_seed`` on ranks other than 0).
        out_dir: Where checkpoints (``checkpoint/``) and sample grids (``samples/``) go.
        sample_fn: Writes a sample grid for the EMA generator into the given PNG path.
        negative_captions: Captions that must not match their images, one per caption given; required when
            ``training.hard_negative_fraction`` > 0 (the recipe's: ``shapes.swap_shape``).
        decode: The frozen VAE decoder: scaled latents (B, C, S, S) → images (B, image_channels, H, W) in
            [-1, 1], with gradients to its input; required when ``training.pixel_weight`` > 0 (the recipe's:
            ``VAEDecoder.decode``).
        progress: Show a tqdm bar with the running losses.

    Returns:
        ``state``, trained.

    Raises:
        ValueError: hard negatives asked for without ``negative_captions``; ``pixel_weight`` > 0 without
            ``decode``, with a state that has no pixel discriminator or with ``pixel_batch`` < 1; ``decode``
            returning images of another shape than the pixel discriminator was made for.
        TrainingDiverged: a loss not finite, or beyond ``training.divergence_limit``, with no rollback left
            (``rollback_every``, ``max_rollbacks``); ``state.step`` is the last step completed, and no
            checkpoint is written after it.
    """
    if training.hard_negative_fraction > 0 and negative_captions is None:
        raise ValueError(
            f"GANTrainingConfig.hard_negative_fraction is {training.hard_negative_fraction}, but train_gan got "
            "no negative_captions function to make the hard negatives: pass one, or set the fraction to 0."
        )
    pixels = _pixel_parts(state, training, decode)
    hard_count = round(training.batch_size * training.hard_negative_fraction)
    rng = torch.Generator()  # the augmentation's; the generator's noise comes from torch's global generator

    def reseed() -> None:
        """Seed the noise and the augmentation for the step training (re)starts at (``noise_seeds``)."""
        noise_seed, augment_seed = noise_seeds(seed, state.step, state.rollbacks)
        torch.manual_seed(noise_seed)
        rng.manual_seed(augment_seed)

    reseed()
    out = Path(out_dir) if out_dir is not None and distributed.is_main_process() else None
    g, d = state.generator, state.discriminator
    memory_format = torch.channels_last if training.channels_last else torch.contiguous_format
    for net in (g, state.generator_ema, d, state.pixel_discriminator, clip):
        if net is not None:
            net.to(memory_format=memory_format)  # type: ignore[call-overload]  # (torch's stubs lack it)
    run_g, run_d = distributed.data_parallel(g), distributed.data_parallel(d)  # plain calls in one process
    progress = progress and distributed.is_main_process()
    decay = 0.5 ** (training.batch_size / training.ema_half_life)
    saved = out / "checkpoint" if out is not None else None
    last_checkpoint = (
        f"{saved} holds the last checkpoint" if saved and saved.is_dir() else "no checkpoint has been written"
    )

    def aug(x: torch.Tensor, factor: int = 1) -> torch.Tensor:
        """Augment latents, or images ``factor`` times their side (shifts by as many latent pixels)."""
        return augment(
            x,
            rng,
            p=training.augment_p,
            max_shift=training.augment_shift * factor,
            noise=training.augment_noise,
        )

    def take_step(step: int) -> dict[str, float]:
        """One update of the discriminators, then of the generator; returns the losses (``check_divergence``
        raises before an update whose losses diverge)."""
        scale = learning_rate_scale(step, training.steps, training.lr_decay_steps)
        lr_d = discriminator_learning_rate(training, state.rollbacks)
        for optimizer, lr in ((state.opt_d, lr_d), (state.opt_g, training.lr_g)):
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
        real, captions = next(batches)
        real = real.contiguous(memory_format=memory_format)
        with torch.no_grad():
            text = clip.text_encoder.encode(captions)
            clip_text = F.normalize(clip.text_projection(text.pooled), dim=-1)
        z = torch.randn(real.shape[0], g.config.z_dim)
        # One generator pass serves both updates: detached for the discriminators', kept for its own.
        fake = run_g(g.generate, z, text)

        # 1. Discriminators: reals up, fakes and mismatched reals down, R1 every r1_every steps.
        mismatched = mismatched_text(clip, text.pooled, captions, hard_count, negative_captions)
        r1 = training.r1_every > 0 and step % training.r1_every == 0
        loss_d = discriminator_loss(run_d, d, real, fake, text.pooled, mismatched, aug, training, r1=r1)
        pixel_fake = None
        if pixels is not None:
            loss_px, pixel_fake = pixel_discriminator_loss(
                pixels, real, fake, text.pooled, mismatched, aug, training, r1=r1
            )
            loss_d = loss_d + training.pixel_weight * loss_px
        check_divergence({"d": loss_d}, step + 1, training.divergence_limit, last_checkpoint)
        state.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        state.opt_d.step()

        # 2. Generator.
        loss_g, losses = generator_losses(
            (d, state.pixel_discriminator),
            fake,
            text.pooled,
            captions,
            clip,
            clip_text,
            aug,
            training,
            pixel_fake=pixel_fake,
        )
        values = check_divergence(
            {"d": loss_d, **losses}, step + 1, training.divergence_limit, last_checkpoint
        )
        state.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        state.opt_g.step()
        return values

    start, seconds_before = time.perf_counter(), state.seconds
    snapshots: collections.deque[TrainingSnapshot] = collections.deque(maxlen=2)
    bar = tqdm(total=training.steps, initial=state.step, desc="gan", disable=not progress)
    while state.step < training.steps:
        step = state.step
        # A copy where this call starts (a resumed run's step too), then every rollback_every steps.
        if training.rollback_every > 0 and (
            not snapshots or (step % training.rollback_every == 0 and snapshots[-1].step != step)
        ):
            snapshots.append(state.snapshot())
        try:
            values = take_step(step)
        except TrainingDiverged as error:
            if not snapshots or state.rollbacks >= training.max_rollbacks:
                if snapshots:
                    raise TrainingDiverged(
                        f"{error} It had gone back {state.rollbacks} times already (max_rollbacks).",
                        error.summary,
                    ) from error
                raise
            # Back to the older copy, far enough before the losses began to climb; the newer one may not be.
            older = snapshots[0]
            snapshots.clear()
            snapshots.append(older)
            state.restore(older)
            state.rollbacks += 1
            reseed()
            if distributed.is_main_process():
                logger.warning(
                    "%s Went back to step %d, to train on with other noise and the discriminator's learning "
                    "rate at %.3g (rollback %d of at most %d).",
                    error.summary,
                    state.step,
                    discriminator_learning_rate(training, state.rollbacks),
                    state.rollbacks,
                    training.max_rollbacks,
                )
            bar.n = state.step
            bar.refresh()
            continue

        # 3. EMA, progress, samples and checkpoints.
        update_ema(state.generator_ema, g, decay)
        state.step = step + 1
        state.seconds = seconds_before + time.perf_counter() - start
        bar.update(1)
        bar.set_postfix({name: f"{value:.3f}" for name, value in values.items()})
        if out is not None and write_outputs(state, training, out, sample_fn):
            last_checkpoint = f"{saved} holds step {state.step}"
    bar.close()
    return state
