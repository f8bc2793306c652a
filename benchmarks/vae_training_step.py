"""Seconds per VAE training step of the shapes recipe, with and without the middle block's self-attention.

The autoencoder's middle block, at the latents' resolution (32 × 32 for the recipe), can hold a self-attention
layer over all of its pixels (``VAEConfig.mid_block_add_attention``; the recipe turns it off). This times both
kinds of VAE step the recipe takes, on the recipe's networks and batch of fresh renderings: a joint step
(encoder and decoder, ``vae_loss``) and a decoder-only step (the frozen encoder's latents, ``decoder_loss``).
Each setting gets its own networks and a warm-up; then the settings take turns, ``--steps`` steps each,
``--rounds`` times, and the table gives each one's median. The numbers in docs/training.md come from:

    python benchmarks/vae_training_step.py
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from txt2img.training.recipe import ShapesRecipe, image_batches
from txt2img.training.vae_training import decoder_loss, vae_loss
from txt2img.vae import VAEDecoder, VAEEncoder

KINDS = {"joint": vae_loss, "decoder only": decoder_loss}
SETTINGS = [(kind, attention) for kind in KINDS for attention in (True, False)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="steps per turn")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each setting")
    parser.add_argument("--tiny", action="store_true", help="the tiny recipe's networks (a smoke test)")
    args = parser.parse_args()

    recipe = ShapesRecipe.tiny() if args.tiny else ShapesRecipe()
    batches = image_batches(np.random.default_rng(0), recipe.vae_batch_size)
    images = [next(batches).contiguous(memory_format=torch.channels_last) for _ in range(4)]

    def make_step(kind: str, attention: bool) -> Callable[[int], float]:
        """A function that trains this setting's own networks for n steps and returns seconds per step."""
        config = dataclasses.replace(recipe.vae, mid_block_add_attention=attention)
        torch.manual_seed(0)
        encoder, decoder = VAEEncoder(config).train(), VAEDecoder(config).train()
        for model in (encoder, decoder):
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # as train_vae does
        if kind == "decoder only":
            encoder.eval()
        trained = (encoder, decoder) if kind == "joint" else (decoder,)
        optimizer = torch.optim.AdamW([p for m in trained for p in m.parameters()], lr=1e-4)
        loss_fn = KINDS[kind]

        def train(n: int) -> float:
            start = time.perf_counter()
            for i in range(n):
                loss, _ = loss_fn(images[i % len(images)], encoder, decoder, recipe.vae_training)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return (time.perf_counter() - start) / n

        return train

    steps = {setting: make_step(*setting) for setting in SETTINGS}
    for train in steps.values():
        train(3)  # warm-up
    times: dict[tuple[str, bool], list[float]] = {setting: [] for setting in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            times[setting].append(steps[setting](args.steps))

    print(
        f"### VAE step, batch {recipe.vae_batch_size}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}, torch {torch.__version__}"
    )
    print()
    print("| step | mid-block attention | s per step (median) | vs with attention |")
    print("|---|---|---|---|")
    for kind, attention in SETTINGS:
        median = statistics.median(times[kind, attention])
        base = statistics.median(times[kind, True])
        print(f"| {kind} | {attention} | {median:.3f} | {median / base:.2f}× |")


if __name__ == "__main__":
    main()
