"""Seconds per GAN training step of the shapes recipe under its speed settings, alternating in one process.

Each row is one combination of ``GANTrainingConfig.r1_every`` (the lazy R1 penalty every 4 or every 16 steps),
``GANTrainingConfig.channels_last`` (the networks in the channels-last memory format or not),
``GANTrainingConfig.discriminator_pool_first_from`` (which of the discriminator's blocks pool before their
widening conv: none, all, or the second only), ``GANTrainingConfig.discriminator_spectral_norm`` (every
discriminator layer spectrally normalised, one power iteration a pass) and the generator's last stage (the
recipe's ``GANConfig.channels``, or with the last, full-resolution stage twice as wide), trained on the
recipe's networks and batch size with random latents in place of the latent pool, at a hundredth of the
recipe's learning rates (on random latents its own rates can diverge within 50 steps; the arithmetic of a step
is the same at any rate). ``--batch-size`` times every row at another batch size.
Each setting gets its own networks and a warm-up; then the settings take turns, ``--steps`` steps each,
``--rounds`` times, and the table gives each one's median. The numbers in docs/training.md come from:

    python benchmarks/gan_training_step.py
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import platform
import statistics
import time
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from txt2img.gan import GANGenerator
from txt2img.training import shapes
from txt2img.training.clip import LatentCLIP, build_text_encoder
from txt2img.training.gan_training import GANTrainingConfig, GANTrainingState, make_state, train_gan
from txt2img.training.recipe import ShapesRecipe, vocabulary


class Setting(NamedTuple):
    """One row of the table: ``GANTrainingConfig`` fields, and whether the generator's last stage is doubled."""

    r1_every: int
    channels_last: bool
    pool_first_from: int | None
    spectral_norm: bool
    wide_last_stage: bool


# the one-pass recipe's step first, the recipe's fourth
SETTINGS = [
    Setting(4, False, None, False, False),
    Setting(16, False, None, False, False),
    Setting(4, True, None, False, False),
    Setting(16, True, None, False, False),
    Setting(16, True, 0, False, False),
    Setting(16, True, 1, False, False),
    Setting(16, True, None, True, False),
    Setting(16, True, None, False, True),
    Setting(16, True, 1, False, True),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=16, help="steps per turn (a multiple of 16 keeps R1 fair)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="turns of each setting")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per step (default: the recipe's, 64)"
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny recipe's networks (a smoke test)")
    args = parser.parse_args()

    recipe = ShapesRecipe.tiny() if args.tiny else ShapesRecipe()
    side = recipe.vae.sample_size // recipe.vae.scale_factor  # latent side
    clip = LatentCLIP(build_text_encoder(vocabulary(), recipe.text), recipe.vae.latent_channels, side)
    clip.eval().requires_grad_(False)
    gan = recipe.generator_config()
    if args.batch_size is not None:
        recipe.gan_training = dataclasses.replace(recipe.gan_training, batch_size=args.batch_size)
    batch = recipe.gan_training.batch_size
    captions = [shapes.sample_batch(np.random.default_rng(i), batch)[1] for i in range(4)]

    def batches() -> Iterator[tuple[torch.Tensor, list[str]]]:
        generator = torch.Generator().manual_seed(0)
        for i in itertools.count():
            yield (
                torch.randn(batch, recipe.vae.latent_channels, side, side, generator=generator),
                captions[i % 4],
            )

    negatives = np.random.default_rng(1)

    def generator_channels(wide_last_stage: bool) -> tuple[int, ...]:
        """The recipe's generator channels, the last (full-resolution) stage doubled if ``wide_last_stage``."""
        channels = gan.channels
        return (*channels[:-1], channels[-1] * 2) if wide_last_stage else channels

    def settings(setting: Setting) -> GANTrainingConfig:
        return dataclasses.replace(
            recipe.gan_training,
            r1_every=setting.r1_every,
            channels_last=setting.channels_last,
            discriminator_pool_first_from=setting.pool_first_from,
            discriminator_spectral_norm=setting.spectral_norm,
            lr_g=recipe.gan_training.lr_g / 100,  # random latents can make the recipe's rates diverge;
            lr_d=recipe.gan_training.lr_d / 100,  # a step's arithmetic does not depend on them
        )

    def train(state: GANTrainingState, setting: Setting, steps: int) -> float:
        training = dataclasses.replace(
            settings(setting),
            steps=state.step + steps,
            sample_every=0,
            checkpoint_every=0,
        )
        start = time.perf_counter()
        train_gan(
            state,
            training,
            batches(),
            clip,
            negative_captions=lambda c: [shapes.swap_shape(x, negatives) for x in c],
            progress=False,
        )
        return (time.perf_counter() - start) / steps

    states = {}
    for setting in SETTINGS:
        torch.manual_seed(0)
        generator = GANGenerator(
            dataclasses.replace(gan, channels=generator_channels(setting.wide_last_stage))
        )
        states[setting] = make_state(generator, settings(setting), size=side)
        train(states[setting], setting, 4)  # warm-up
    times: dict[Setting, list[float]] = {setting: [] for setting in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            times[setting].append(train(states[setting], setting, args.steps))

    print(
        f"### GAN step, batch {batch}, {torch.get_num_threads()} threads, {platform.machine()}, torch {torch.__version__}"
    )
    print()
    print(
        "| r1_every | channels_last | discriminator_pool_first_from | discriminator_spectral_norm "
        "| generator channels | s per step (median) | vs the first row |"
    )
    print("|---|---|---|---|---|---|---|")
    base = statistics.median(times[SETTINGS[0]])
    for (r1_every, channels_last, pool_first_from, spectral_norm, wide), seconds in times.items():
        median = statistics.median(seconds)
        print(
            f"| {r1_every} | {channels_last} | {pool_first_from} | {spectral_norm} "
            f"| {generator_channels(wide)} | {median:.3f} | {median / base:.2f}× |"
        )


if __name__ == "__main__":
    main()
