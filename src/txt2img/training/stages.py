"""The stages every training run goes through in turn, whatever its data: the one sequence that both the
Shapes-64 recipe (``recipe.run``) and a run on a folder of images (``folder_recipe.train_folder``) train by.

1. VAE: trained on the data's image batches (or, when resuming, reloaded from ``OUT/vae_encoder`` and
   ``OUT/vae``); saved there at once.
2. Latent pool: the data's images encoded once to scaled latents, with their captions.
3. Text encoder: a word-level CLIP text model over the data's vocabulary, trained against a latent-image
   encoder on the pool, then frozen.
4. GAN: the native generator trained on the pool, checkpointed to ``OUT/checkpoint`` (resumable).

``train_stages`` returns what they made; ``save_model`` writes the pipeline folder. What differs between
runs (their batches, pool, vocabulary, mismatched captions, sample prompts) comes in a ``RunData``; their
settings come in a recipe (``StageSettings``: ``ShapesRecipe`` and ``FolderRecipe`` both are one).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from txt2img import distributed
from txt2img.gan import GANConfig, GANGenerator
from txt2img.images import to_numpy, to_uint8, to_unit_range
from txt2img.pipeline import Txt2ImgPipeline
from txt2img.text_encoder import TextEncoder
from txt2img.training.checkpoint import read_extra
from txt2img.training.clip import (
    CLIPTrainingConfig,
    LatentCLIP,
    TextEncoderShape,
    build_text_encoder,
    train_latent_clip,
)
from txt2img.training.gan_training import (
    GANTrainingConfig,
    GANTrainingState,
    discriminator_learning_rate,
    make_state,
    train_gan,
)
from txt2img.training.vae_training import VAETrainingConfig, train_vae
from txt2img.utils import make_image_grid
from txt2img.vae import VAEConfig, VAEDecoder, VAEEncoder, scale_latents


class StageSettings(Protocol):
    """The settings the stages read: what ``ShapesRecipe`` and ``FolderRecipe`` have in common."""

    seed: int
    vae_batch_size: int
    clip_batch_size: int
    vae: VAEConfig
    text: TextEncoderShape
    vae_training: VAETrainingConfig
    clip_training: CLIPTrainingConfig
    gan_training: GANTrainingConfig

    def generator_config(self) -> GANConfig: ...

    def to_dict(self) -> dict[str, Any]: ...


class Pool(Protocol):
    """Training latents encoded once, and the captioned batches drawn from them."""

    latents: torch.Tensor  # (N, C, S, S), scaled

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Endless random (latents (B, C, S, S), B captions) batches."""
        ...


@dataclasses.dataclass
class RunData:
    """What a run's data gives the stages.

    Args:
        image_batches: ``(rng, batch_size)`` → endless training images (B, 3, H, W) in [-1, 1], for the VAE.
        encode_pool: The trained VAE encoder → the latent pool.
        vocabulary: Every word the captions use: the text encoder's tokens.
        text: Shape of the text encoder (``max_length`` long enough for the longest caption).
        negative_captions: ``rng`` → ``train_gan``'s ``negative_captions``: a mismatched caption for each
            caption of a batch.
        sample_prompts: The rows of the sample grids.
        settings: Entries written into ``recipe.json`` before the recipe's own (a folder run: ``data``).
        vae_settings: The names in ``recipe.json`` that made the VAE stage: a resume that would reload it
            refuses a change to any of them.
    """

    image_batches: Callable[[np.random.Generator, int], Iterator[torch.Tensor]]
    encode_pool: Callable[[VAEEncoder], Pool]
    vocabulary: list[str]
    text: TextEncoderShape
    negative_captions: Callable[[np.random.Generator], Callable[[list[str]], list[str]]]
    sample_prompts: Sequence[str]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    vae_settings: tuple[str, ...] = ("seed", "vae", "vae_batch_size", "vae_training")


@dataclasses.dataclass
class TrainedRun:
    """What the stages made.

    Args:
        text_encoder: The frozen text encoder.
        decoder: The VAE decoder.
        state: The GAN's training state (``state.generator_ema`` is the generator to ship).
        timings: Seconds per stage (``vae``, ``pool``, ``text_encoder``, ``gan``); a reloaded VAE's and a
            resumed GAN's include the earlier runs'.
        resumed_at: The GAN step this run resumed from, if it did.
        write_samples: ``(generator, path)`` → a sample grid of the data's prompts, the noise fixed per run.
    """

    text_encoder: TextEncoder
    decoder: VAEDecoder
    state: GANTrainingState
    timings: dict[str, float]
    resumed_at: int | None
    write_samples: Callable[[GANGenerator, Path], None]

    def pipeline(self) -> Txt2ImgPipeline:
        """Text encoder + EMA generator + VAE decoder, in eval mode."""
        return Txt2ImgPipeline(self.text_encoder.eval(), self.state.generator_ema.eval(), self.decoder.eval())


@torch.no_grad()
def write_sample_grid(
    generator: GANGenerator,
    text_encoder: TextEncoder,
    decoder: VAEDecoder,
    prompts: Sequence[str],
    noise: torch.Tensor,
    path: Path,
) -> None:
    """Write a PNG grid of the generator's images: a row per prompt, a column per noise vector.

    Args:
        generator: The generator (the EMA one, in training).
        text_encoder: Its text encoder.
        decoder: The VAE decoder of its latents.
        prompts: P prompts.
        noise: (P × K, z_dim): K noise vectors per prompt, the prompt's first.
        path: The PNG to write (its folder is created if need be).
    """
    columns = len(noise) // len(prompts)
    latents = generator.generate(noise, text_encoder.encode([p for p in prompts for _ in range(columns)]))
    images = to_uint8(to_numpy(to_unit_range(decoder.decode(latents))))
    grid = make_image_grid([Image.fromarray(image) for image in images], rows=len(prompts), cols=columns)
    path.parent.mkdir(parents=True, exist_ok=True)  # also when training wrote no grid (sample_every=0)
    grid.save(path)


@torch.no_grad()
def encode_latents(encoder: VAEEncoder, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] → the scaled latents the later stages train on: the posterior means,
    shifted and scaled by the encoder's fitted factors (B, C, H/f, W/f)."""
    mean, _ = encoder.encode(images.contiguous(memory_format=torch.channels_last))
    return scale_latents(mean, encoder.config.scaling_factor, encoder.config.shift_factor)


def changed_settings(
    saved: dict[str, Any],
    recipe: StageSettings,
    *,
    gan_resumed: bool,
    extra: dict[str, Any] | None = None,
    vae_settings: Sequence[str] = RunData.vae_settings,
) -> list[str]:
    """The settings that differ between a run's saved ``recipe.json`` and the ones it is resumed with, among
    those that matter to a resume: the VAE stage's, and with a GAN checkpoint to continue every training
    setting but the GAN's steps.

    Args:
        saved: The run's ``recipe.json``.
        recipe: The settings the run is resumed with.
        gan_resumed: Whether the GAN continues from a checkpoint (else only the VAE stage is reloaded).
        extra: Entries of ``recipe.json`` beside the recipe's (``RunData.settings``).
        vae_settings: The names that made the VAE stage (``RunData.vae_settings``).

    Returns:
        The names of the changed settings, in the order of ``recipe.json``.
    """
    current = json.loads(json.dumps({**(extra or {}), **recipe.to_dict()}))  # tuples as lists, as in the file
    names = [name for name in current if name != "eval_images"] if gan_resumed else list(vae_settings)

    def value(settings: dict[str, Any], name: str) -> Any:
        found, kind = settings.get(name), type(getattr(recipe, name, None))
        if not (isinstance(found, dict) and dataclasses.is_dataclass(kind)):
            return found
        # A setting the file lacks, from a version before it existed, counts as its default: what that
        # version did.
        defaults = json.loads(json.dumps(dataclasses.asdict(kind())))
        return {
            key: v for key, v in {**defaults, **found}.items() if (name, key) != ("gan_training", "steps")
        }

    return [name for name in names if value(saved, name) != value(current, name)]


def check_resume(out: Path, recipe: StageSettings, data: RunData, *, resume: bool) -> int | None:
    """Before anything trains: the GAN step a resumed run continues from (``None``: none), after checking
    that the run in ``out`` can be resumed with these settings.

    Raises:
        ValueError: a checkpoint past ``recipe.gan_training.steps``; a ``recipe.json`` with other settings for
            the stages a resume would reload (``changed_settings``).
    """
    resumed_at = None
    if resume and (out / "checkpoint").is_dir():
        resumed_at = int(read_extra(out / "checkpoint")["step"])
        if resumed_at > recipe.gan_training.steps:
            raise ValueError(
                f"{out / 'checkpoint'} is at GAN step {resumed_at}, past the {recipe.gan_training.steps} steps "
                f"asked for: ask for {resumed_at} or more (--gan-steps), or start the run in another folder."
            )
    if resume and (out / "vae_encoder").is_dir() and (out / "recipe.json").is_file():
        saved = json.loads((out / "recipe.json").read_text())
        changed = changed_settings(
            saved,
            recipe,
            gan_resumed=resumed_at is not None,
            extra=data.settings,
            vae_settings=data.vae_settings,
        )
        if changed:
            data_changed = [name for name in changed if name in data.settings]
            raise ValueError(
                f"{out / 'recipe.json'} was written with other settings ({', '.join(changed)}) than this run's: "
                "resuming would pair the stages saved there with ones trained differently. Resume with the "
                "settings (and txt2img version) that started the run, or start the run in another folder."
                + (
                    f" ({', '.join(data_changed)}: the training data is not what the run began with.)"
                    if data_changed
                    else ""
                )
            )
    return resumed_at


def train_stages(
    recipe: StageSettings, data: RunData, out: str | Path, *, progress: bool = True, resume: bool = False
) -> TrainedRun:
    """Train the VAE, the text encoder and the GAN in turn on ``data``, writing into ``out`` as they go:
    ``recipe.json``, ``timings.json``, ``vae_encoder/``, ``vae/``, ``checkpoint/``, ``samples/``.

    Args:
        recipe: The settings.
        data: The run's data.
        out: Output folder (created).
        progress: Show tqdm bars.
        resume: Continue the GAN stage from ``out/checkpoint`` (the VAE is reloaded from ``out``, the text
            encoder retrained to the same weights).

    Returns:
        What the stages made; nothing of it is saved as a pipeline yet (``save_model``).

    Raises:
        ValueError: as ``check_resume``, before anything is written.
        TrainingDiverged: the GAN stage diverged past its rollbacks (``train_gan``).
    """
    out = Path(out)
    resumed_at = check_resume(out, recipe, data, resume=resume)
    reloaded = resume and (out / "vae_encoder").is_dir()  # the VAE stage is loaded, not trained
    main = distributed.is_main_process()  # rank 0 alone writes under torchrun
    if main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    timings: dict[str, float] = {}
    # A resumed run reloads the VAE: its time is the one the first run recorded.
    earlier = (
        json.loads((out / "timings.json").read_text()) if resume and (out / "timings.json").is_file() else {}
    )
    if main:
        (out / "recipe.json").write_text(json.dumps({**data.settings, **recipe.to_dict()}, indent=2))

    # 1. VAE
    start = time.perf_counter()
    if reloaded:
        encoder = VAEEncoder.from_pretrained(out / "vae_encoder")
        decoder = VAEDecoder.from_pretrained(out / "vae")
    else:
        rng = np.random.default_rng(distributed.rank_entropy([recipe.seed, 1]))
        encoder, decoder = train_vae(
            recipe.vae,
            recipe.vae_training,
            data.image_batches(rng, recipe.vae_batch_size),
            seed=recipe.seed,
            progress=progress,
        )
        if main:
            encoder.save_pretrained(out / "vae_encoder")
            decoder.save_pretrained(out / "vae")
    timings["vae"] = earlier.get("vae", 0.0) if reloaded else time.perf_counter() - start
    if main:  # now, so that a run stopped in a later stage and resumed still knows it
        (out / "timings.json").write_text(json.dumps(timings, indent=2))

    # 2. Latent pool
    start = time.perf_counter()
    pool = data.encode_pool(encoder)
    timings["pool"] = time.perf_counter() - start

    # 3. Text encoder
    start = time.perf_counter()
    text_encoder = build_text_encoder(data.vocabulary, data.text, seed=recipe.seed)
    clip = LatentCLIP(text_encoder, recipe.vae.latent_channels, pool.latents.shape[-1])
    rng = np.random.default_rng(distributed.rank_entropy([recipe.seed, 3]))
    clip = train_latent_clip(
        clip,
        recipe.clip_training,
        pool.batches(rng, recipe.clip_batch_size),
        seed=recipe.seed,
        progress=progress,
    )
    timings["text_encoder"] = time.perf_counter() - start

    # 4. GAN
    torch.manual_seed(recipe.seed)
    state = make_state(
        GANGenerator(recipe.generator_config()),
        recipe.gan_training,
        size=pool.latents.shape[-1],
        image_size=pool.latents.shape[-1] * decoder.scale_factor,
        image_channels=decoder.config.out_channels,
    )
    if resumed_at is not None:
        state.load(out / "checkpoint")
    prompts = list(data.sample_prompts)
    sample_noise = torch.randn(
        len(prompts) * 4, state.generator.config.z_dim, generator=torch.Generator().manual_seed(recipe.seed)
    )

    def write_samples(generator: GANGenerator, path: Path) -> None:
        write_sample_grid(generator, text_encoder, decoder, prompts, sample_noise, path)

    rng = np.random.default_rng(distributed.rank_entropy([recipe.seed, 4]))
    negative_rng = np.random.default_rng(distributed.rank_entropy([recipe.seed, 6]))
    state = train_gan(
        state,
        recipe.gan_training,
        pool.batches(rng, recipe.gan_training.batch_size),
        clip,
        seed=recipe.seed,
        out_dir=out,
        sample_fn=write_samples,
        negative_captions=data.negative_captions(negative_rng),
        decode=decoder.eval().requires_grad_(False).decode,
        progress=progress,
    )
    timings["gan"] = state.seconds  # over every run that trained this GAN, resumed ones included
    return TrainedRun(text_encoder, decoder, state, timings, resumed_at, write_samples)


def save_model(run: TrainedRun, out: str | Path, model_card: dict[str, Any]) -> Path:
    """Save a trained run's pipeline as ``out/model`` with its model card, and beside it the final sample
    grid (``out/samples/final.png``) and the stages' times (``out/timings.json``).

    Returns:
        The saved pipeline folder, ``out/model``.
    """
    out = Path(out)
    run.write_samples(run.state.generator_ema, out / "samples" / "final.png")
    (out / "timings.json").write_text(json.dumps(run.timings, indent=2))
    run.pipeline().save_pretrained(out / "model", model_card=model_card, overwrite_model_card=True)
    return out / "model"


def training_history(resumed_at: int | None, rollbacks: int, training: GANTrainingConfig) -> str:
    """The model card's sentence on how the GAN stage went: resumed, gone back after a divergence ("" if
    neither)."""
    history = (
        f" Trained in more than one run: the last resumed at GAN step {resumed_at}." if resumed_at else ""
    )
    if rollbacks:
        history += (
            f" The GAN stage diverged and went back {rollbacks} time{'s' if rollbacks > 1 else ''} "
            f"(rollback_every {training.rollback_every})"
        )
        if training.rollback_lr_d_scale != 1:
            rate = discriminator_learning_rate(training, rollbacks)
            history += f", and trained on with the discriminator's learning rate at {rate:.3g}"
        history += "."
    return history
