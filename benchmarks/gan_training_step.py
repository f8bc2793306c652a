"""Seconds per GAN training step of the shapes recipe under its speed settings, alternating in one process.

Each row is one combination of ``GANTrainingConfig.r1_every`` (the lazy R1 penalty every 4 or every 16 steps)
and ``GANTrainingConfig.channels_last`` (the networks in the channels-last memory format or not), trained on
the recipe's networks and batch size with random latents in place of the latent pool. Each setting gets its
own networks and a warm-up; then the settings take turns, ``--steps`` steps each, ``--rounds`` times, and the
table gives each one's median. The numbers in docs/training.md come from:

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

import numpy as np
import torch

from txt2img.gan import GANGenerator
from txt2img.training import shapes
from txt2img.training.clip import LatentCLIP, build_text_encoder
from txt2img.training.gan_training import GANTrainingState, make_state, train_gan
from txt2img.training.recipe import ShapesRecipe, vocabulary

SETTINGS = [(4, False), (16, False), (4, True), (16, True)]  # (r1_every, channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=16, help="steps per turn (a multiple of 16 keeps R1 fair)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="turns of each setting")
    parser.add_argument("--tiny", action="store_true", help="the tiny recipe's networks (a smoke test)")
    args = parser.parse_args()

    recipe = ShapesRecipe.tiny() if args.tiny else ShapesRecipe()
    side = recipe.vae.sample_size // recipe.vae.scale_factor  # latent side
    clip = LatentCLIP(build_text_encoder(vocabulary(), recipe.text), recipe.vae.latent_channels, side)
    clip.eval().requires_grad_(False)
    gan = recipe.generator_config()
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

    def train(state: GANTrainingState, r1_every: int, channels_last: bool, steps: int) -> float:
        training = dataclasses.replace(
            recipe.gan_training,
            steps=state.step + steps,
            r1_every=r1_every,
            channels_last=channels_last,
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
    for r1_every, channels_last in SETTINGS:
        torch.manual_seed(0)
        states[r1_every, channels_last] = make_state(GANGenerator(gan), recipe.gan_training, size=side)
        train(states[r1_every, channels_last], r1_every, channels_last, 4)  # warm-up
    times: dict[tuple[int, bool], list[float]] = {setting: [] for setting in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            times[setting].append(train(states[setting], *setting, args.steps))

    print(
        f"### GAN step, batch {batch}, {torch.get_num_threads()} threads, {platform.machine()}, torch {torch.__version__}"
    )
    print()
    print("| r1_every | channels_last | s per step (median) | vs r1_every=4, channels_last=False |")
    print("|---|---|---|---|")
    base = statistics.median(times[SETTINGS[0]])
    for (r1_every, channels_last), seconds in times.items():
        median = statistics.median(seconds)
        print(f"| {r1_every} | {channels_last} | {median:.3f} | {median / base:.2f}× |")


if __name__ == "__main__":
    main()
