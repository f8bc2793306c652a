"""Training a model on your own captioned images: the Shapes-64 recipe's stages on a folder.

    python -m txt2img.training folder --data DIR --out OUT [--size 64] [--seed 0]

The folder is read by :class:`~txt2img.training.folder_data.ImageFolderDataset` (``metadata.jsonl``, or a
``.txt`` caption beside each image). Stages, as in ``recipe.run``:

1. VAE: ``size`` × ``size`` images ↔ (``size``/2)² × 8 latents, trained on random batches of the folder's
   images; its ``shift_factor``/``scaling_factor`` fitted.
2. Latent pool: every image encoded once (all images are held in memory: 48 KiB each at 64 × 64).
3. Text encoder: a word-level CLIP text model over the captions' words, trained against a latent-image
   encoder on the pool, with the bag-of-words loss; then frozen.
4. GAN: the native generator trained on the pool; the mismatched captions the discriminator must reject are
   other images' captions (there is no shape to swap in users' captions).
5. Save: text encoder + EMA generator + VAE decoder as a pipeline folder (``OUT/model``), the VAE encoder
   beside it (``OUT/vae_encoder``), sample grids of the first captions in ``OUT/samples``.

Nothing evaluates prompt fidelity here: the attribute reader knows Shapes-64 only. Look at the sample grids.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from txt2img import distributed
from txt2img.gan import GANConfig, GANGenerator
from txt2img.pipeline import Txt2ImgPipeline
from txt2img.training.clip import (
    CLIPTrainingConfig,
    LatentCLIP,
    TextEncoderShape,
    build_text_encoder,
    train_latent_clip,
)
from txt2img.training.folder_data import ImageFolderDataset
from txt2img.training.gan_training import GANTrainingConfig, make_state, train_gan
from txt2img.training.recipe import ShapesRecipe, write_sample_grid
from txt2img.training.vae_training import VAETrainingConfig, train_vae
from txt2img.vae import VAEConfig, VAEEncoder, scale_latents

logger = logging.getLogger(__name__)

MAX_TOKENS = 77  # the longest prompt the text encoder reads, BOS and EOS included (CLIP's)


@dataclasses.dataclass
class FolderRecipe:
    """Every setting of a run on a folder; the defaults are the Shapes-64 recipe's where they carry over.

    They differ where the Shapes-64 recipe relies on its data: no extra weight on object pixels (which needs
    a plain background), no shape-swapped captions, and half the discriminator's learning rate, which held
    on every machine tried (docs/training.md, "A steadier discriminator").

    Args:
        seed: Seeds every stage.
        size: Side of the square images trained on and generated, in px; a multiple of 16. Images are resized
            so the shorter side is ``size``, then centre-cropped.
        vae_batch_size: Images per VAE step.
        clip_batch_size: Pairs per contrastive step.
        vae: Shape of the autoencoder (its ``sample_size`` follows ``size``).
        text: Shape of the text encoder (its ``max_length`` follows the longest caption, up to 77 tokens).
        gan: Shape of the generator (its text sizes follow ``text``, its ``const_size`` follows ``size``).
        vae_training: The autoencoder's optimisation settings.
        clip_training: The text encoder's optimisation settings.
        gan_training: The generator's optimisation settings.
    """

    seed: int = 0
    size: int = 64
    vae_batch_size: int = ShapesRecipe.vae_batch_size
    clip_batch_size: int = ShapesRecipe.clip_batch_size
    vae: VAEConfig = dataclasses.field(default_factory=lambda: ShapesRecipe().vae)
    text: TextEncoderShape = dataclasses.field(default_factory=TextEncoderShape)
    gan: GANConfig = dataclasses.field(default_factory=lambda: ShapesRecipe().gan)
    vae_training: VAETrainingConfig = dataclasses.field(
        default_factory=lambda: for_folders(ShapesRecipe())[0]
    )
    clip_training: CLIPTrainingConfig = dataclasses.field(
        default_factory=lambda: ShapesRecipe().clip_training
    )
    gan_training: GANTrainingConfig = dataclasses.field(
        default_factory=lambda: for_folders(ShapesRecipe())[1]
    )

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 16:
            raise ValueError(
                f"FolderRecipe: size {self.size} is not a multiple of 16 (the VAE halves it and the generator "
                "doubles a constant three times): use 32, 64, 128, ..."
            )

    @classmethod
    def tiny(cls, seed: int = 0, size: int = 64) -> FolderRecipe:
        """A few steps of every stage on small networks, as ``ShapesRecipe.tiny``: for tests and smoke runs
        (seconds)."""
        shapes = ShapesRecipe.tiny(seed)
        vae_training, gan_training = for_folders(shapes)
        return cls(
            seed=seed,
            size=size,
            vae_batch_size=shapes.vae_batch_size,
            clip_batch_size=shapes.clip_batch_size,
            vae=shapes.vae,
            text=shapes.text,
            gan=shapes.gan,
            vae_training=vae_training,
            clip_training=shapes.clip_training,
            gan_training=gan_training,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def for_folders(recipe: ShapesRecipe) -> tuple[VAETrainingConfig, GANTrainingConfig]:
    """A Shapes-64 recipe's VAE and GAN training settings for users' images: no extra weight on object
    pixels, no shape-swapped captions, half the discriminator's learning rate."""
    vae_training = dataclasses.replace(recipe.vae_training, object_weight=0.0, decoder_object_weight=0.0)
    gan_training = dataclasses.replace(
        recipe.gan_training, hard_negative_fraction=0.0, lr_d=recipe.gan_training.lr_d / 2
    )
    return vae_training, gan_training


def split_words(caption: str) -> list[str]:
    """A caption's words as the word-level tokenizer splits them: NFKC-normalised, lower-cased, split on
    whitespace and punctuation (``"A red circle."`` → ``["a", "red", "circle", "."]``); one token each."""
    from tokenizers import normalizers, pre_tokenizers

    normalized = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]).normalize_str(caption)
    return [word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(normalized)]


def caption_words(captions: list[str]) -> list[str]:
    """The distinct words of captions (``split_words``), sorted: the text encoder's vocabulary."""
    return sorted({word for caption in captions for word in split_words(caption)})


def fit_captions(captions: list[str], max_words: int) -> list[str]:
    """Captions cut to their first ``max_words`` words, so that the text encoder reads them whole; a cut one
    is its words joined by spaces, which the tokenizer splits into the same tokens. A warning says how many
    were cut (the text encoder would otherwise warn about each, at every training step)."""
    fitted = []
    for caption in captions:
        words = split_words(caption)
        fitted.append(caption if len(words) <= max_words else " ".join(words[:max_words]))
    cut = sum(a is not b for a, b in zip(fitted, captions))
    if cut:
        logger.warning(
            "%d of the %d captions are longer than the text encoder's %d words; training reads the first %d "
            "words of each.",
            cut,
            len(captions),
            max_words,
            max_words,
        )
    return fitted


def load_images(data: ImageFolderDataset) -> tuple[torch.Tensor, list[str]]:
    """Every image of the folder, (N, 3, size, size) float32 in [-1, 1], and its N captions."""
    images, captions = zip(*(data[i] for i in range(len(data))))
    return torch.stack(images), list(captions)


def image_batches(images: torch.Tensor, rng: np.random.Generator, batch_size: int) -> Iterator[torch.Tensor]:
    """Random batches (B, 3, size, size) of ``images``, drawn with replacement."""
    while True:
        yield images[torch.from_numpy(rng.integers(len(images), size=batch_size))]


def pool_batches(
    latents: torch.Tensor, captions: list[str], rng: np.random.Generator, batch_size: int
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Random (scaled latents (B, C, S, S), captions) batches of the pool, drawn with replacement."""
    while True:
        index = rng.integers(len(captions), size=batch_size)
        yield latents[torch.from_numpy(index)], [captions[i] for i in index]


@torch.no_grad()
def encode_images(encoder: VAEEncoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images (N, 3, size, size) → scaled latents (N, C, size/2, size/2): the posterior means."""
    config = encoder.config
    latents = [
        scale_latents(
            encoder.encode(batch.contiguous(memory_format=torch.channels_last))[0],
            config.scaling_factor,
            config.shift_factor,
        )
        for batch in images.split(batch_size)
    ]
    return torch.cat(latents).contiguous()


def train_folder(recipe: FolderRecipe, data: str | Path, out: str | Path, *, progress: bool = True) -> Path:
    """Train every stage on a folder of captioned images and save the pipeline.

    Args:
        recipe: The settings.
        data: The folder (``metadata.jsonl`` with ``file_name`` and ``text``, or ``.txt`` captions beside
            the images).
        out: Output folder (created): ``model/``, ``vae_encoder/``, ``samples/``, ``checkpoint/``,
            ``recipe.json``, ``timings.json``.
        progress: Show tqdm bars.

    Returns:
        The saved pipeline folder, ``out/model``.

    Raises:
        OSError: ``data`` is not a folder, or an image cannot be read.
        ValueError: ``data`` holds no captioned images, or a caption is missing or malformed.
    """
    # Every caption is checked and every image read before anything is written or trained.
    images, captions = load_images(ImageFolderDataset(data, size=recipe.size))
    out = Path(out)
    main = distributed.is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps({"data": str(data), **recipe.to_dict()}, indent=2))
    timings: dict[str, float] = {}

    # 1. VAE
    start = time.perf_counter()
    vae = dataclasses.replace(recipe.vae, sample_size=recipe.size)
    rng = np.random.default_rng(distributed.rank_entropy([recipe.seed, 1]))
    encoder, decoder = train_vae(
        vae,
        recipe.vae_training,
        image_batches(images, rng, recipe.vae_batch_size),
        seed=recipe.seed,
        progress=progress,
    )
    if main:
        encoder.save_pretrained(out / "vae_encoder")
    timings["vae"] = time.perf_counter() - start

    # 2. Latent pool
    start = time.perf_counter()
    latents = encode_images(encoder, images)
    timings["pool"] = time.perf_counter() - start

    # 3. Text encoder
    start = time.perf_counter()
    captions = fit_captions(captions, MAX_TOKENS - 2)  # BOS and EOS take two tokens
    longest = max(len(split_words(caption)) for caption in captions)
    text = dataclasses.replace(
        recipe.text, max_length=min(MAX_TOKENS, max(recipe.text.max_length, longest + 2))
    )
    text_encoder = build_text_encoder(caption_words(captions), text, seed=recipe.seed)
    clip = LatentCLIP(text_encoder, vae.latent_channels, latents.shape[-1])
    rng = np.random.default_rng(distributed.rank_entropy([recipe.seed, 3]))
    clip = train_latent_clip(
        clip,
        recipe.clip_training,
        pool_batches(latents, captions, rng, recipe.clip_batch_size),
        seed=recipe.seed,
        progress=progress,
    )
    timings["text_encoder"] = time.perf_counter() - start

    # 4. GAN
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    gan = dataclasses.replace(
        recipe.gan,
        latent_channels=vae.latent_channels,
        text_dim=text.hidden_size,
        pooled_dim=text.hidden_size,
        const_size=latents.shape[-1] // 2 ** (len(recipe.gan.channels) - 1),
    )
    state = make_state(GANGenerator(gan), recipe.gan_training, size=latents.shape[-1])
    prompts = list(dict.fromkeys(captions))[:8]  # the first distinct captions, 4 seeds each
    sample_noise = torch.randn(
        len(prompts) * 4, gan.z_dim, generator=torch.Generator().manual_seed(recipe.seed)
    )

    def write_samples(generator: GANGenerator, path: Path) -> None:
        write_sample_grid(generator, text_encoder, decoder, prompts, sample_noise, path)

    rng = np.random.default_rng(distributed.rank_entropy([recipe.seed, 4]))
    state = train_gan(
        state,
        recipe.gan_training,
        pool_batches(latents, captions, rng, recipe.gan_training.batch_size),
        clip,
        seed=recipe.seed,
        out_dir=out,
        sample_fn=write_samples,
        progress=progress,
    )
    timings["gan"] = state.seconds

    # 5. Save
    if not main:
        return out / "model"
    write_samples(state.generator_ema, out / "samples" / "final.png")
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    pipe = Txt2ImgPipeline(text_encoder.eval(), state.generator_ema.eval(), decoder.eval())
    pipe.save_pretrained(
        out / "model", model_card=model_card(recipe, data, captions, timings), overwrite_model_card=True
    )
    return out / "model"


def model_card(
    recipe: FolderRecipe, data: str | Path, captions: list[str], timings: dict[str, float]
) -> dict[str, Any]:
    """The model card of a folder run: its data (``captions``, one per image) and its training."""
    command = (
        f"python -m txt2img.training folder --data {data} --out DIR --size {recipe.size} --seed {recipe.seed}"
    )
    if recipe.gan_training.steps != FolderRecipe().gan_training.steps:
        command += f" --gan-steps {recipe.gan_training.steps}"
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items())
    return {
        "tags": ["gan"],
        "datasets": [Path(data).name],
        "example_prompt": captions[0],
        "description": (
            f"A {recipe.size} × {recipe.size} text-to-image GAN trained from scratch on {len(captions)} "
            "captioned images."
        ),
        "training": (
            f"`{command}` (txt2img.training.folder_recipe): a KL-VAE ({recipe.vae_training.steps} steps, then "
            f"{recipe.vae_training.decoder_steps} of the decoder alone), a word-level CLIP text encoder "
            f"({recipe.clip_training.steps} steps), then the GAN ({recipe.gan_training.steps} steps of "
            f"{recipe.gan_training.batch_size}); the EMA generator is the one saved. "
            f"{sum(timings.values()):.0f} s on the CPU of the training machine ({stages})."
        ),
    }
