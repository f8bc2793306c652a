"""Train a small txt2img model on a folder of captioned images, on the CPU.

    python examples/train_on_folder.py [FOLDER] [--out runs/folder] [--size 64]
        [--vae-steps 200] [--clip-steps 100] [--gan-steps 300] [--seed 0]

FOLDER holds images and their captions as ``txt2img.training.folder_data.ImageFolderDataset`` reads them: a
``metadata.jsonl`` with one ``{"file_name": "0001.png", "text": "a red circle"}`` per line, or a ``.txt``
caption beside each image. Without FOLDER the script first writes one, OUT/data: 256 Shapes-64 pictures
with their captions, so that it runs as it is.

It trains the three parts in turn, as ``python -m txt2img.training shapes`` does (docs/training.md): a VAE on
the images, a text encoder against the VAE's latents, then the GAN generator in that latent space; and it
saves them as an ordinary pipeline folder. The default settings are tiny, to finish in about a minute on an
idle 2-core CPU: expect blurry colour fields. The embedded model used 3,000 VAE, 600 text-encoder and 3,500
GAN steps on larger networks (52 minutes on a 2-core CPU).

Writes OUT/model (``Txt2ImgPipeline.from_pretrained("OUT/model")`` loads it) and OUT/samples.png.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from txt2img import GANConfig, GANGenerator, Txt2ImgPipeline, VAEConfig
from txt2img.training import shapes
from txt2img.training.clip import (
    CLIPTrainingConfig,
    LatentCLIP,
    TextEncoderShape,
    build_text_encoder,
    train_latent_clip,
)
from txt2img.training.folder_data import ImageFolderDataset
from txt2img.training.gan_training import GANTrainingConfig, make_state, train_gan
from txt2img.training.vae_training import VAETrainingConfig, train_vae
from txt2img.utils import make_image_grid

BATCH_SIZE = 16


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


def caption_words(caption: str) -> list[str]:
    """The words of a caption, split as the word-level tokenizer splits them."""
    return re.findall(r"\w+|[^\w\s]+", caption.lower())


def image_batches(dataset: ImageFolderDataset, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of images (B, 3, size, size) in [-1, 1]."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, generator=generator)
    while True:
        for images, _ in loader:
            yield images


def latent_batches(
    latents: torch.Tensor, captions: list[str], generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless random (latents, captions) batches from the encoded data set."""
    while True:
        index = torch.randint(len(captions), (BATCH_SIZE,), generator=generator)
        yield latents[index], [captions[i] for i in index]


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
    if args.size % 16:
        parser.error(
            f"--size must be a multiple of 16 (the VAE halves it, the GAN upsamples 8×), got {args.size}"
        )
    out = Path(args.out)
    folder = Path(args.folder) if args.folder else write_example_folder(out / "data", 256, args.seed)
    start = time.perf_counter()

    # 1. The data: every file is checked now, so a broken folder fails before any training
    dataset = ImageFolderDataset(folder, size=args.size)
    captions = [caption for _, caption in dataset.items]
    print(f"{len(dataset)} captioned images in {folder}")
    rng = torch.Generator().manual_seed(args.seed)

    # 2. VAE: size × size × 3 images ↔ size/2 × size/2 × 4 latents
    vae_config = VAEConfig(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=args.size
    )
    encoder, decoder = train_vae(
        vae_config, VAETrainingConfig(steps=args.vae_steps), image_batches(dataset, rng), seed=args.seed
    )
    with torch.no_grad():  # encode the whole data set once: the later stages never run the encoder
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        mean, _ = encoder.encode(images)
        config = encoder.config
        latents = (mean - config.shift_factor) * config.scaling_factor  # scaled, (N, 4, size/2, size/2)
    latent_size = latents.shape[-1]
    print(f"VAE trained after {time.perf_counter() - start:.0f} s")

    # 3. Text encoder: a word-level CLIP text model over the captions' words, trained against the latents
    vocabulary = {word for caption in captions for word in caption_words(caption)}
    longest = max(len(caption_words(caption)) for caption in captions)  # + BOS and EOS, below
    shape = TextEncoderShape(hidden_size=32, layers=1, heads=2, max_length=min(longest + 2, 77))
    text_encoder = build_text_encoder(vocabulary, shape, seed=args.seed)
    clip = LatentCLIP(text_encoder, vae_config.latent_channels, latent_size)
    clip = train_latent_clip(
        clip,
        CLIPTrainingConfig(steps=args.clip_steps),
        latent_batches(latents, captions, rng),
        seed=args.seed,
    )
    print(f"text encoder trained after {time.perf_counter() - start:.0f} s")

    # 4. GAN: the generator learns to make latents that match their captions
    gan_config = GANConfig(
        latent_channels=vae_config.latent_channels,
        z_dim=16,
        w_dim=32,
        text_dim=shape.hidden_size,
        pooled_dim=shape.hidden_size,
        channels=(32, 16, 16, 8),
        attention=(True, False, False, False),
        attention_heads=2,
        const_size=latent_size // 8,
    )
    torch.manual_seed(args.seed)
    training = GANTrainingConfig(
        steps=args.gan_steps,
        batch_size=BATCH_SIZE,
        discriminator_width=16,
        sample_every=0,
        checkpoint_every=0,
    )
    state = make_state(GANGenerator(gan_config), training, size=latent_size)
    state = train_gan(state, training, latent_batches(latents, captions, rng), clip, seed=args.seed)
    print(f"GAN trained after {time.perf_counter() - start:.0f} s")

    # 5. Save an ordinary pipeline folder (the EMA generator's weights), load it back and draw samples
    trained = Txt2ImgPipeline(text_encoder.eval(), state.generator_ema.eval(), decoder.eval())
    card = {"description": f"Trained on {len(dataset)} images of {folder}.", "example_prompt": captions[0]}
    trained.save_pretrained(out / "model", model_card=card)
    pipe = Txt2ImgPipeline.from_pretrained(out / "model")
    pipe.set_progress_bar_config(disable=True)
    prompts = list(dict.fromkeys(captions))[:4]
    samples = pipe(prompts, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).images
    make_image_grid(samples, rows=len(prompts), cols=2).save(out / "samples.png")  # a row per prompt
    print(f"wrote {out / 'model'} and {out / 'samples.png'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
