"""Training a model on your own captioned images: the Shapes-64 recipe's stages on a folder.

    python -m txt2img.training folder --data DIR --out OUT [--size 64] [--seed 0] [--resume]

The folder is read by :class:`~txt2img.training.folder_data.ImageFolderDataset` (``metadata.jsonl``, or a
``.txt`` caption beside each image). Stages, the recipe's (``stages.train_stages``):

1. VAE: ``size`` × ``size`` images ↔ (``size``/2)² × 8 latents, trained on random batches of the folder's
   images; its ``shift_factor``/``scaling_factor`` fitted.
2. Latent pool: every image encoded once (all images are held in memory: 48 KiB each at 64 × 64).
3. Text encoder: a word-level CLIP text model over the captions' words, trained against a latent-image
   encoder on the pool, with the bag-of-words loss; then frozen.
4. GAN: the native generator trained on the pool; each mismatched caption the discriminator must reject is
   drawn from the folder's captions other than the image's own. A checkpoint every 500 steps in
   ``OUT/checkpoint``, which ``--resume`` continues from.
5. Save: text encoder + EMA generator + VAE decoder as a pipeline folder (``OUT/model``), the VAE beside it
   (``OUT/vae_encoder``, ``OUT/vae``), sample grids of the first captions in ``OUT/samples``.

Nothing evaluates prompt fidelity here: the attribute reader knows Shapes-64 only. Look at the sample grids.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from txt2img import distributed
from txt2img.gan import GANConfig
from txt2img.training.clip import CLIPTrainingConfig, TextEncoderShape, split_words
from txt2img.training.folder_data import ImageFolderDataset
from txt2img.training.gan_training import GANTrainingConfig
from txt2img.training.recipe import ShapesRecipe
from txt2img.training.stages import RunData, encode_latents, save_model, train_stages, training_history
from txt2img.training.vae_training import VAETrainingConfig
from txt2img.vae import VAEConfig, VAEEncoder

logger = logging.getLogger(__name__)

MAX_TOKENS = 77  # the longest prompt the text encoder reads, BOS and EOS included (CLIP's)

# What a folder run changes in the Shapes-64 recipe's settings, because the recipe relies on its data there:
# the extra weight on object pixels needs a plain background; the shape-swapped mismatched captions need
# Shapes-64 captions (here every mismatched caption is another of the folder's captions, never the image's
# own); with the recipe's discriminator rate a seed-1 run diverged on one machine and every run tried on
# another, where half of it went through for two seeds (docs/training.md, "A steadier discriminator").
FOR_FOLDERS: dict[str, dict[str, Any]] = {
    "vae_training": {"object_weight": 0.0, "decoder_object_weight": 0.0},
    "gan_training": {"hard_negative_fraction": 1.0, "lr_d": 5e-4},
}
SHARED = (
    "vae_batch_size",
    "clip_batch_size",
    "vae",
    "text",
    "gan",
    "vae_training",
    "clip_training",
    "gan_training",
)


def adapted(shapes: ShapesRecipe, name: str) -> Any:
    """A Shapes-64 recipe's setting ``name`` (one of ``SHARED``) with the changes ``FOR_FOLDERS`` lists."""
    value = getattr(shapes, name)
    return dataclasses.replace(value, **FOR_FOLDERS[name]) if name in FOR_FOLDERS else value


@dataclasses.dataclass
class FolderRecipe:
    """Every setting of a run on a folder: the Shapes-64 recipe's, changed only where it relies on its data
    (``FOR_FOLDERS``: no extra weight on object pixels, mismatched captions drawn from the folder's other
    captions, half the discriminator's learning rate).

    Args:
        seed: Seeds every stage.
        size: Side of the square images trained on and generated, in px. Images are resized so the shorter
            side is ``size``, then centre-cropped. With the default networks a multiple of 16.
        vae_batch_size: Images per VAE step.
        clip_batch_size: Pairs per contrastive step.
        vae: Shape of the autoencoder (its ``sample_size`` is set to ``size``).
        text: Shape of the text encoder (its ``max_length`` grows to the longest caption, up to 77 tokens).
        gan: Shape of the generator (its latent channels, text sizes and ``const_size`` are set to fit).
        vae_training: The autoencoder's optimisation settings.
        clip_training: The text encoder's optimisation settings.
        gan_training: The generator's optimisation settings.

    Raises:
        ValueError: ``size`` that the networks cannot halve and double back to.
    """

    seed: int = 0
    size: int = 64
    vae_batch_size: int = ShapesRecipe.vae_batch_size
    clip_batch_size: int = ShapesRecipe.clip_batch_size
    vae: VAEConfig = dataclasses.field(default_factory=lambda: adapted(ShapesRecipe(), "vae"))
    text: TextEncoderShape = dataclasses.field(default_factory=lambda: adapted(ShapesRecipe(), "text"))
    gan: GANConfig = dataclasses.field(default_factory=lambda: adapted(ShapesRecipe(), "gan"))
    vae_training: VAETrainingConfig = dataclasses.field(
        default_factory=lambda: adapted(ShapesRecipe(), "vae_training")
    )
    clip_training: CLIPTrainingConfig = dataclasses.field(
        default_factory=lambda: adapted(ShapesRecipe(), "clip_training")
    )
    gan_training: GANTrainingConfig = dataclasses.field(
        default_factory=lambda: adapted(ShapesRecipe(), "gan_training")
    )

    def __post_init__(self) -> None:
        vae_factor = 2 ** (len(self.vae.block_out_channels) - 1)
        gan_factor = 2 ** (len(self.gan.channels) - 1)
        step = vae_factor * max(gan_factor, 4)  # the discriminator halves the latents twice
        if self.size < step or self.size % step:
            raise ValueError(
                f"FolderRecipe: size {self.size} is not a multiple of {step}: the VAE divides it by {vae_factor}, "
                f"and the generator doubles a constant up to that side by {gan_factor}. Use "
                f"{', '.join(str(step * k) for k in (2, 4, 8))}, ..."
            )
        latent_side = self.size // vae_factor
        self.vae = dataclasses.replace(self.vae, sample_size=self.size)
        self.gan = dataclasses.replace(
            self.gan,
            latent_channels=self.vae.latent_channels,
            text_dim=self.text.hidden_size,
            pooled_dim=self.text.hidden_size,
            const_size=latent_side // gan_factor,
        )

    @classmethod
    def tiny(cls, seed: int = 0, size: int = 64) -> FolderRecipe:
        """``ShapesRecipe.tiny``'s few steps on small networks, changed as ``FOR_FOLDERS`` says: for tests and
        smoke runs (seconds)."""
        shapes = ShapesRecipe.tiny(seed)
        return cls(seed, size, **{name: adapted(shapes, name) for name in SHARED})

    def generator_config(self) -> GANConfig:
        """``gan``, already sized for the VAE's latents and the text encoder (``__post_init__``)."""
        return self.gan

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Data


def read_folder(data: str | Path, size: int) -> tuple[torch.Tensor, list[str], str]:
    """Every image of the folder, (N, 3, size, size) float32 in [-1, 1], its N captions, and the digest of
    what was read (``ImageFolderDataset.read_all``), each file read once.

    Raises:
        OSError: ``data`` is not a folder, or an image cannot be read.
        ValueError: no captioned images; a caption missing, malformed or empty; one caption for every image
            (text conditioning needs two or more).
    """
    dataset = ImageFolderDataset(data, size=size)
    empty = [path for path, caption in dataset.items if not caption]
    if empty:
        raise ValueError(
            f"{len(empty)} of the {len(dataset)} images in {data} have an empty caption (the first: {empty[0]}): "
            "write what each shows, or remove them."
        )
    if len({caption for _, caption in dataset.items}) < 2:
        raise ValueError(
            f"Every image in {data} has the same caption: a text-to-image model learns from captions that "
            "differ; give each image one that says what it shows."
        )
    return dataset.read_all()


def caption_words(captions: list[str]) -> list[str]:
    """The distinct words of captions (``split_words``), sorted: the text encoder's vocabulary."""
    return sorted({word for caption in captions for word in split_words(caption)})


def fit_captions(captions: list[str], max_tokens: int) -> list[str]:
    """Captions cut to their first ``max_tokens`` tokens (words and punctuation marks, ``split_words``), so
    that the text encoder reads them whole; a cut one is its tokens joined by spaces, which the tokenizer
    splits the same way. One warning says how many were cut (the text encoder would otherwise warn about each,
    at every training step)."""
    fitted = []
    for caption in captions:
        words = split_words(caption)
        fitted.append(caption if len(words) <= max_tokens else " ".join(words[:max_tokens]))
    cut = sum(a is not b for a, b in zip(fitted, captions))
    if cut:
        logger.warning(
            "%d of the %d captions are longer than the text encoder's %d tokens; training reads the first %d "
            "tokens (words and punctuation marks) of each.",
            cut,
            len(captions),
            max_tokens,
            max_tokens,
        )
    return fitted


def random_batches(images: torch.Tensor, rng: np.random.Generator, batch_size: int) -> Iterator[torch.Tensor]:
    """Random batches (B, 3, size, size) of ``images``, drawn with replacement."""
    while True:
        yield images[torch.from_numpy(rng.integers(len(images), size=batch_size))]


@dataclasses.dataclass
class CaptionedPool:
    """A folder's images encoded once: ``latents`` (N, C, S, S) scaled, and their N ``captions``."""

    latents: torch.Tensor
    captions: list[str]

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Random (latents, captions) batches, drawn with replacement."""
        while True:
            index = rng.integers(len(self.captions), size=batch_size)
            yield self.latents[torch.from_numpy(index)], [self.captions[i] for i in index]


def other_captions(captions: list[str], rng: np.random.Generator) -> Callable[[list[str]], list[str]]:
    """``train_gan``'s ``negative_captions`` for a folder: for each caption, one of the folder's distinct
    captions other than it, drawn uniformly. Needs two or more distinct captions."""
    distinct = sorted(set(captions))
    position = {caption: i for i, caption in enumerate(distinct)}

    def negatives(batch: list[str]) -> list[str]:
        drawn = rng.integers(len(distinct) - 1, size=len(batch))
        return [distinct[j + (j >= position[c])] for c, j in zip(batch, drawn)]  # skip the caption's own

    return negatives


def folder_data(
    recipe: FolderRecipe, data: str | Path, images: torch.Tensor, captions: list[str], digest: str
) -> RunData:
    """A folder as the stages' data: random batches of its images for the VAE, every image encoded once with
    its caption for the pool, the folder's other captions as the mismatched ones, its first distinct captions
    (8 at most) as the sample grids' rows. ``recipe.json`` records the folder (resolved) and ``digest``, its
    contents' as read (``read_folder``): a resume on another folder, or on one whose images or captions have
    changed, is refused."""

    def encode_pool(encoder: VAEEncoder) -> CaptionedPool:
        latents = torch.cat([encode_latents(encoder, batch) for batch in images.split(256)])
        return CaptionedPool(latents.contiguous(), captions)

    longest = max(len(split_words(caption)) for caption in captions)
    return RunData(
        image_batches=lambda rng, batch_size: random_batches(images, rng, batch_size),
        encode_pool=encode_pool,
        vocabulary=caption_words(captions),
        text=dataclasses.replace(recipe.text, max_length=max(recipe.text.max_length, longest + 2)),
        negative_captions=lambda rng: other_captions(captions, rng),
        sample_prompts=list(dict.fromkeys(captions))[:8],
        settings={"data": str(Path(data).resolve()), "data_digest": digest},
        vae_settings=("data", "data_digest", "seed", "size", "vae", "vae_batch_size", "vae_training"),
    )


# ---------------------------------------------------------------------------------------------------------
# The run


def train_folder(
    recipe: FolderRecipe, data: str | Path, out: str | Path, *, progress: bool = True, resume: bool = False
) -> Path:
    """Train every stage on a folder of captioned images (``stages.train_stages``) and save the pipeline.

    Args:
        recipe: The settings.
        data: The folder (``metadata.jsonl`` with ``file_name`` and ``text``, or ``.txt`` captions beside
            the images).
        out: Output folder (created): ``model/``, ``vae_encoder/``, ``vae/``, ``checkpoint/``, ``samples/``,
            ``recipe.json``, ``timings.json``.
        progress: Show tqdm bars.
        resume: Continue the GAN stage from ``out/checkpoint`` (the VAE is reloaded from ``out``, the text
            encoder retrained to the same weights); with a larger ``recipe.gan_training.steps``, train a
            finished run on.

    Returns:
        The saved pipeline folder, ``out/model``.

    Raises:
        OSError: ``data`` is not a folder, or an image cannot be read.
        ValueError: as ``read_folder``; resuming from a checkpoint past ``recipe.gan_training.steps``, or with
            other settings or another folder than the run began with. All before anything is written.
        TrainingDiverged: the GAN stage diverged past its rollbacks (``train_gan``).
    """
    # Every image read, every caption checked, first.
    images, captions, digest = read_folder(data, recipe.size)
    captions = fit_captions(captions, MAX_TOKENS - 2)  # BOS and EOS take two tokens
    trained = train_stages(
        recipe, folder_data(recipe, data, images, captions, digest), out, progress=progress, resume=resume
    )
    out = Path(out)
    if not distributed.is_main_process():  # rank 0 alone writes under torchrun
        return out / "model"
    card = model_card(
        recipe,
        data,
        captions,
        trained.timings,
        resumed_at=trained.resumed_at,
        rollbacks=trained.state.rollbacks,
    )
    return save_model(trained, out, card)


def training_command(recipe: FolderRecipe, data: str | Path) -> str:
    """The command that trains ``recipe`` on ``data``, or, for settings no command gives, what to call."""
    command = (
        f"python -m txt2img.training folder --data {data} --out DIR --size {recipe.size} --seed {recipe.seed}"
    )
    for flag, base in (
        ("", FolderRecipe(recipe.seed, recipe.size)),
        (" --tiny", FolderRecipe.tiny(recipe.seed, recipe.size)),
    ):
        same_but_steps = dataclasses.replace(
            recipe, gan_training=dataclasses.replace(recipe.gan_training, steps=base.gan_training.steps)
        )
        if same_but_steps == base:
            steps = recipe.gan_training.steps
            return command + flag + (f" --gan-steps {steps}" if steps != base.gan_training.steps else "")
    return (
        f"txt2img.training.folder_recipe.train_folder with the settings of the run's recipe.json, on {data}"
    )


def model_card(
    recipe: FolderRecipe,
    data: str | Path,
    captions: list[str],
    timings: dict[str, float],
    *,
    resumed_at: int | None = None,
    rollbacks: int = 0,
) -> dict[str, Any]:
    """The model card of a folder run.

    Args:
        recipe: The run's settings.
        data: The folder it trained on.
        captions: The folder's captions, one per image.
        timings: Seconds per stage, the GAN's over every run that trained it.
        resumed_at: The GAN step the last run resumed from (``--resume``), if it did.
        rollbacks: The times the GAN stage went back after a divergence.

    Returns:
        The card's fields (``ModelCard``).
    """
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items())
    return {
        "tags": ["gan"],
        "datasets": [Path(data).resolve().name],
        "example_prompt": captions[0],
        "description": (
            f"A {recipe.size} × {recipe.size} text-to-image GAN trained from scratch on {len(captions)} "
            "captioned images."
        ),
        "training": (
            f"`{training_command(recipe, data)}` (txt2img.training.folder_recipe): a KL-VAE "
            f"({recipe.vae_training.steps} steps, then {recipe.vae_training.decoder_steps} of the decoder alone), "
            f"a word-level CLIP text encoder ({recipe.clip_training.steps} steps), then the GAN "
            f"({recipe.gan_training.steps} steps of {recipe.gan_training.batch_size}); the EMA generator is the "
            f"one saved. {sum(timings.values()):.0f} s on the CPU of the training machine ({stages})."
            + training_history(resumed_at, rollbacks, recipe.gan_training)
        ),
    }
