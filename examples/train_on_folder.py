"""Train a small txt2img model on a folder of captioned images, on the CPU.

    python examples/train_on_folder.py [FOLDER] [--out runs/folder] [--size 64]
        [--vae-steps 200] [--clip-steps 100] [--gan-steps 300] [--seed 0]

FOLDER holds images and their captions as ``txt2img.training.folder_data.ImageFolderDataset`` reads them: a
``metadata.jsonl`` with one ``{"file_name": "0001.png", "text": "a red circle"}`` per line, or a ``.txt``
caption beside each image. Without FOLDER the script first writes one, OUT/data: 256 Shapes-64 pictures
with their captions, so that it runs as it is.

It runs ``txt2img.training.folder_recipe.train_folder``, the code behind ``python -m txt2img.training folder``
(docs/training.md, "Your own images"): a VAE on the images, a text encoder against the VAE's latents, then
the GAN generator in that latent space, saved as an ordinary pipeline folder. Here on the recipe's tiny
networks and few steps, to finish in about a minute on an idle 2-core CPU: expect blurry colour fields. The
command's defaults are the embedded model's recipe: 3,000 VAE steps and 2,000 of its decoder alone, 600
text-encoder and 3,500 GAN steps, on larger networks; for that model they took 65 minutes on a 2-core CPU.

Writes OUT/model (``Txt2ImgPipeline.from_pretrained("OUT/model")`` loads it) and OUT/samples.png, beside the
run's own OUT/samples/final.png, OUT/vae_encoder, OUT/vae, OUT/checkpoint, recipe.json and timings.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from txt2img import Txt2ImgPipeline
from txt2img.training import shapes
from txt2img.training.folder_data import ImageFolderDataset
from txt2img.training.folder_recipe import FolderRecipe, train_folder
from txt2img.utils import make_image_grid


def write_example_folder(folder: Path, count: int, seed: int) -> Path:
    """``count`` Shapes-64 renderings as PNG files, captioned in ``metadata.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    images, captions, _ = shapes.sample_batch(np.random.default_rng(seed), count)  # (N, 3, 64, 64) in [-1, 1]
    pixels = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for i, (image, caption) in enumerate(zip(pixels, captions)):
            Image.fromarray(image).save(folder / f"{i:04d}.png")
            metadata.write(json.dumps({"file_name": f"{i:04d}.png", "text": caption}) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", help="images with captions (default: write an example folder)")
    parser.add_argument("--out", default="runs/folder", help="output folder (default: runs/folder)")
    parser.add_argument(
        "--size", type=int, default=64, help="image side in pixels, a multiple of 16 (default: 64)"
    )
    parser.add_argument("--vae-steps", type=int, default=200)
    parser.add_argument("--clip-steps", type=int, default=100)
    parser.add_argument("--gan-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:  # the recipe's tiny networks, with this script's steps
        recipe = FolderRecipe.tiny(args.seed, args.size)
    except ValueError as error:
        parser.error(str(error))
    recipe.vae_training = dataclasses.replace(recipe.vae_training, steps=args.vae_steps, decoder_steps=0)
    recipe.clip_training = dataclasses.replace(recipe.clip_training, steps=args.clip_steps)
    recipe.gan_training = dataclasses.replace(recipe.gan_training, steps=args.gan_steps, sample_every=0)
    out = Path(args.out)
    folder = Path(args.folder) if args.folder else write_example_folder(out / "data", 256, args.seed)
    start = time.perf_counter()

    # 1. Train every stage (the folder is checked first, so a broken one fails before any training)
    model = train_folder(recipe, folder, out)

    # 2. Load the saved pipeline back and draw samples: a row per prompt, two seeds
    pipe = Txt2ImgPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    captions = [caption for _, caption in ImageFolderDataset(folder).items]
    prompts = list(dict.fromkeys(captions))[:4]
    samples = pipe(prompts, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).images
    make_image_grid(samples, rows=len(prompts), cols=2).save(out / "samples.png")
    print(f"wrote {model} and {out / 'samples.png'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
