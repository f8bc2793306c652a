"""The recipe that makes the embedded default model from nothing: Shapes-64 data, then a VAE, a text encoder
and a GAN, each trained on the CPU in turn, then saved as an ordinary ``Txt2ImgPipeline`` folder.

    python -m txt2img.training shapes --out DIR [--seed 0]

Stages and what each one hands on:
1. VAE: 64 × 64 images ↔ 32 × 32 × 8 latents; fitted ``shift_factor``/``scaling_factor``.
2. Latent pool: ``pool_size`` renderings (held-out pairs excluded) encoded once to scaled latents.
3. Text encoder: a word-level CLIP text model trained against a latent-image encoder on the pool, with a
   bag-of-words loss that keeps each word readable from the pooled vector.
4. GAN: the native generator trained on the pool with the frozen text encoder (``gan_training``).
5. Save: text encoder + EMA generator + VAE decoder as a pipeline folder (``DIR/model``), the VAE encoder
   beside it (``DIR/vae_encoder``), sample grids in ``DIR/samples``.

Under ``torchrun --nproc_per_node N -m txt2img.training shapes --out DIR`` every training stage runs data
parallel: each process draws its own batches (``distributed.rank_entropy``), gradients are averaged, and
rank 0 alone writes into ``DIR``, which every process must see (a shared file system across machines).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from txt2img import distributed
from txt2img.gan import GANConfig, GANGenerator
from txt2img.images import to_numpy, to_uint8, to_unit_range
from txt2img.pipeline import Txt2ImgPipeline
from txt2img.text_encoder import TextEncoder
from txt2img.training import shapes
from txt2img.training.baseline import (
    BaselineTrainingConfig,
    TextToLatentGaussian,
    baseline_generator,
    train_baseline,
)
from txt2img.training.checkpoint import read_extra
from txt2img.training.clip import (
    CLIPTrainingConfig,
    LatentCLIP,
    TextEncoderShape,
    build_text_encoder,
    train_latent_clip,
)
from txt2img.training.evaluate import EvalReport, evaluate, pipeline_generator
from txt2img.training.gan_training import GANTrainingConfig, make_state, train_gan
from txt2img.training.vae_training import VAETrainingConfig, train_vae
from txt2img.utils import make_image_grid
from txt2img.vae import VAEConfig, VAEDecoder, VAEEncoder, scale_latents

SAMPLE_PROMPTS = (
    "a large red circle in the top left corner on a blue background",
    "a small yellow triangle in the center on a black background",
    "a large white square at the bottom on a green background",
    "a small blue circle on the right on a yellow background",
    "a large green triangle in the bottom right corner on a purple background",
    "a small black square at the top on an orange background",
    "a large purple triangle on the left on a white background",  # held out
    "a small orange circle in the top right corner on a red background",  # held out
)


@dataclasses.dataclass
class ShapesRecipe:
    """Every setting of a training run; the defaults make the shipped model.

    Args:
        seed: Seeds every stage.
        pool_size: Renderings encoded once for the text-encoder and GAN stages.
        vae_batch_size: Images per VAE step (rendered fresh each step).
        eval_images: Images per split (seen, held-out) of the evaluation written into the model card.
        clip_batch_size: Pairs per contrastive step.
        vae: Shape of the autoencoder.
        text: Shape of the text encoder.
        gan: Shape of the generator (its text sizes follow ``text``).
        vae_training: The autoencoder's optimisation settings.
        clip_training: The text encoder's optimisation settings.
        gan_training: The generator's optimisation settings.
    """

    seed: int = 0
    pool_size: int = 20_000
    vae_batch_size: int = 16
    eval_images: int = 600
    clip_batch_size: int = 256
    vae: VAEConfig = dataclasses.field(
        default_factory=lambda: VAEConfig(
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
            latent_channels=8,
            mid_block_add_attention=False,
        )
    )
    text: TextEncoderShape = dataclasses.field(default_factory=TextEncoderShape)
    gan: GANConfig = dataclasses.field(
        default_factory=lambda: GANConfig(
            z_dim=64, w_dim=256, channels=(256, 128, 64, 32), attention=(True, True, False, False)
        )
    )
    vae_training: VAETrainingConfig = dataclasses.field(
        default_factory=lambda: VAETrainingConfig(
            steps=3000,
            lr=1e-3,
            sample_posterior=False,
            object_weight=4.0,
            decoder_steps=2000,
            decoder_lr=1e-3,
            decoder_object_weight=8.0,
        )
    )
    clip_training: CLIPTrainingConfig = dataclasses.field(
        default_factory=lambda: CLIPTrainingConfig(steps=600, word_weight=1.0)
    )
    gan_training: GANTrainingConfig = dataclasses.field(
        default_factory=lambda: GANTrainingConfig(
            steps=3500,
            discriminator_width=32,
            hard_negative_fraction=0.75,
            r1_gamma=0.4,
            r1_every=16,
            channels_last=True,
        )
    )

    def generator_config(self) -> GANConfig:
        """``gan`` sized for this recipe's VAE latents and text encoder."""
        return dataclasses.replace(
            self.gan,
            latent_channels=self.vae.latent_channels,
            text_dim=self.text.hidden_size,
            pooled_dim=self.text.hidden_size,
        )

    @classmethod
    def tiny(cls, seed: int = 0) -> ShapesRecipe:
        """A few steps of every stage on small networks: for tests and smoke runs (about a minute)."""
        return cls(
            seed=seed,
            pool_size=256,
            vae_batch_size=8,
            clip_batch_size=32,
            eval_images=16,
            vae=VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=64),
            text=TextEncoderShape(hidden_size=32, layers=1, heads=2),
            gan=GANConfig(
                z_dim=16,
                w_dim=32,
                channels=(32, 16, 16, 8),
                attention=(True, False, False, False),
                attention_heads=2,
            ),
            vae_training=VAETrainingConfig(steps=20, decoder_steps=5),
            clip_training=CLIPTrainingConfig(steps=20, word_weight=1.0),
            gan_training=GANTrainingConfig(
                steps=20, batch_size=16, sample_every=10, checkpoint_every=10, discriminator_width=16
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def vocabulary() -> list[str]:
    """Every word a Shapes-64 caption can use."""
    words = {"a", "an", "on", "background", *shapes.SHAPES, *shapes.SIZES, *shapes.PALETTE}
    for phrase in shapes.POSITIONS:
        words.update(phrase.split())
    words.add(",")
    return sorted(words)


def image_batches(rng: np.random.Generator, batch_size: int) -> Iterator[torch.Tensor]:
    """Fresh training renderings (B, 3, 64, 64) in [-1, 1], held-out pairs excluded."""
    while True:
        yield shapes.sample_batch(rng, batch_size)[0]


@dataclasses.dataclass
class LatentPool:
    """Renderings encoded once: ``latents`` (N, C, S, S) scaled, and the ``specs`` they were drawn from."""

    latents: torch.Tensor
    specs: list[shapes.ShapeSpec]

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Random (latents, captions) batches; each caption is freshly varied around its image."""
        while True:
            index = rng.integers(len(self.specs), size=batch_size)
            yield (
                self.latents[torch.from_numpy(index)],
                [shapes.varied_caption(self.specs[i], rng) for i in index],
            )


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
def encode_pool(
    encoder: VAEEncoder, rng: np.random.Generator, size: int, batch_size: int = 256
) -> LatentPool:
    """Render ``size`` training images and encode them to scaled latents (posterior means)."""
    latents, specs = [], []
    for start in range(0, size, batch_size):
        images, _, batch_specs = shapes.sample_batch(rng, min(batch_size, size - start))
        latents.append(encode_latents(encoder, images))
        specs.extend(batch_specs)
    return LatentPool(torch.cat(latents).contiguous(), specs)


@torch.no_grad()
def encode_latents(encoder: VAEEncoder, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] → the scaled latents the later stages train on: the posterior means,
    shifted and scaled by the encoder's fitted factors (B, C, H/f, W/f)."""
    mean, _ = encoder.encode(images.contiguous(memory_format=torch.channels_last))
    return scale_latents(mean, encoder.config.scaling_factor, encoder.config.shift_factor)


def model_card(
    recipe: ShapesRecipe,
    timings: dict[str, float],
    report: EvalReport,
    *,
    resumed_at: int | None = None,
    rollbacks: int = 0,
) -> dict[str, Any]:
    """The model card of a recipe's pipeline: its data, its training and its evaluation.

    Args:
        recipe: The run's settings.
        timings: Seconds per stage, the GAN's over every run that trained it.
        report: The run's evaluation.
        resumed_at: The GAN step the last run resumed from (``--resume``), if it did.
        rollbacks: The times the GAN stage went back after a divergence (``GANTrainingState.rollbacks``).
    """
    total = sum(timings.values())
    steps = recipe.gan_training.steps
    command = f"python -m txt2img.training shapes --out DIR --seed {recipe.seed}"
    if steps != ShapesRecipe().gan_training.steps:
        command += f" --gan-steps {steps}"
    history = (  # how the GAN stage went: resumed, rolled back
        f" Trained in more than one run: the last resumed at GAN step {resumed_at}." if resumed_at else ""
    )
    if rollbacks:
        history += (
            f" The GAN stage diverged and went back {rollbacks} time{'s' if rollbacks > 1 else ''} "
            f"(rollback_every {recipe.gan_training.rollback_every})."
        )
    words = ", with a bag-of-words loss on its pooled vector" if recipe.clip_training.word_weight > 0 else ""
    return {
        "license": "apache-2.0",
        "datasets": ["Shapes-64 (procedural, txt2img.training.shapes)"],
        "tags": ["shapes-64", "gan"],
        "description": (
            "A 64 × 64 text-to-image GAN trained from scratch on Shapes-64: one circle, square or triangle, "
            "small or large, in one of 8 colours, at one of 9 places, on a plain background of another colour."
        ),
        "example_prompt": SAMPLE_PROMPTS[0],
        "training": (
            f"`{command}` (txt2img.training.recipe): "
            f"a KL-VAE ({recipe.vae_training.steps} steps, then {recipe.vae_training.decoder_steps} of the "
            "decoder alone), a word-level CLIP text encoder "
            f"({recipe.clip_training.steps} steps{words}), then the GAN ({recipe.gan_training.steps} steps of "
            f"{recipe.gan_training.batch_size}); the EMA generator is the one saved. Held-out (colour, shape) "
            f"pairs never seen in training: {', '.join(' '.join(pair) for pair in sorted(shapes.HELD_OUT))}. "
            f"{total:.0f} s on the CPU of the training machine "
            f"({', '.join(f'{stage} {seconds:.0f} s' for stage, seconds in timings.items())}).{history}"
        ),
        "evaluation": (
            "Fraction of images whose attributes, read back from the pixels, match the prompt "
            f"(`python -m txt2img.training.evaluate MODEL --num-images {report.num_images}`):\n\n"
            + report.to_markdown()
        ),
    }


VAE_SETTINGS = ("seed", "vae", "vae_batch_size", "vae_training")  # what made a saved VAE stage


def changed_settings(saved: dict[str, Any], recipe: ShapesRecipe, *, gan_resumed: bool) -> list[str]:
    """The settings of ``recipe`` that differ from a run's saved ``recipe.json`` and matter to a resume: those
    of the VAE stage, and with a GAN checkpoint to continue every training setting but the GAN's steps.

    Args:
        saved: The run's ``recipe.json``.
        recipe: The settings the run is resumed with.
        gan_resumed: Whether the GAN continues from a checkpoint (else only the VAE stage is reloaded).

    Returns:
        The names of the changed settings, in the order of ``recipe.json``.
    """
    current = json.loads(json.dumps(recipe.to_dict()))  # tuples as lists, as in the file
    names = [name for name in current if name != "eval_images"] if gan_resumed else list(VAE_SETTINGS)

    def value(settings: dict[str, Any], name: str) -> Any:
        found, kind = settings.get(name), type(getattr(recipe, name))
        if not (isinstance(found, dict) and dataclasses.is_dataclass(kind)):
            return found
        # A setting the file lacks, from a version before it existed, counts as its default: what that
        # version did.
        defaults = json.loads(json.dumps(dataclasses.asdict(kind())))
        return {
            key: v for key, v in {**defaults, **found}.items() if (name, key) != ("gan_training", "steps")
        }

    return [name for name in names if value(saved, name) != value(current, name)]


def run(recipe: ShapesRecipe, out: str | Path, *, progress: bool = True, resume: bool = False) -> Path:
    """Train every stage and save the pipeline.

    Args:
        recipe: The settings.
        out: Output folder (created).
        progress: Show tqdm bars.
        resume: Continue the GAN stage from ``out/checkpoint`` (earlier stages are reloaded from ``out``).

    Returns:
        The saved pipeline folder, ``out/model``.

    Raises:
        ValueError: resuming from a checkpoint past ``recipe.gan_training.steps``; resuming a run whose
            ``recipe.json`` has other settings for the stages it would reload (``changed_settings``).
    """
    out = Path(out)
    resumed_at = None  # the GAN step a resumed run starts from
    if resume and (out / "checkpoint").is_dir():
        resumed_at = int(read_extra(out / "checkpoint")["step"])
        if resumed_at > recipe.gan_training.steps:
            raise ValueError(
                f"{out / 'checkpoint'} is at GAN step {resumed_at}, past the {recipe.gan_training.steps} steps "
                f"asked for: ask for {resumed_at} or more (--gan-steps), or start the run in another folder."
            )
    reloaded = resume and (out / "vae_encoder").is_dir()  # the VAE stage is loaded, not trained
    if reloaded and (out / "recipe.json").is_file():
        saved = json.loads((out / "recipe.json").read_text())
        changed = changed_settings(saved, recipe, gan_resumed=resumed_at is not None)
        if changed:
            raise ValueError(
                f"{out / 'recipe.json'} was written with other settings ({', '.join(changed)}) than this run's: "
                "resuming would pair the stages saved there with ones trained differently. Resume with the "
                "settings (and txt2img version) that started the run, or start the run in another folder."
            )
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    timings: dict[str, float] = {}
    # A resumed run reloads the VAE: its time is the one the first run recorded.
    earlier = (
        json.loads((out / "timings.json").read_text()) if resume and (out / "timings.json").is_file() else {}
    )
    main = distributed.is_main_process()  # rank 0 alone writes under torchrun
    if main:
        (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))

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
            image_batches(rng, recipe.vae_batch_size),
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
    pool = encode_pool(encoder, np.random.default_rng([recipe.seed, 2]), recipe.pool_size)
    timings["pool"] = time.perf_counter() - start

    # 3. Text encoder
    start = time.perf_counter()
    text_encoder = build_text_encoder(vocabulary(), recipe.text, seed=recipe.seed)
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
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    state = make_state(
        GANGenerator(recipe.generator_config()),
        recipe.gan_training,
        size=pool.latents.shape[-1],
        image_size=pool.latents.shape[-1] * decoder.scale_factor,
        image_channels=decoder.config.out_channels,
    )
    if resume and (out / "checkpoint").is_dir():
        state.load(out / "checkpoint")
    sample_noise = torch.randn(
        len(SAMPLE_PROMPTS) * 4,
        state.generator.config.z_dim,
        generator=torch.Generator().manual_seed(recipe.seed),
    )

    def write_samples(generator: GANGenerator, path: Path) -> None:
        write_sample_grid(generator, text_encoder, decoder, SAMPLE_PROMPTS, sample_noise, path)

    rng = np.random.default_rng(distributed.rank_entropy([recipe.seed, 4]))
    batches = pool.batches(rng, recipe.gan_training.batch_size)
    negative_rng = np.random.default_rng(distributed.rank_entropy([recipe.seed, 6]))
    state = train_gan(
        state,
        recipe.gan_training,
        batches,
        clip,
        seed=recipe.seed,
        out_dir=out,
        sample_fn=write_samples,
        negative_captions=lambda captions: [shapes.swap_shape(c, negative_rng) for c in captions],
        decode=decoder.eval().requires_grad_(False).decode,
        progress=progress,
    )
    timings["gan"] = state.seconds  # over every run that trained this GAN, resumed ones included

    # 5. Save, with a model card that says how the model was made and how well it follows prompts
    if not main:
        return out / "model"
    pipe = Txt2ImgPipeline(text_encoder.eval(), state.generator_ema.eval(), decoder.eval())
    write_samples(state.generator_ema, out / "samples" / "final.png")
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    pipe.set_progress_bar_config(disable=True)
    report = evaluate(pipeline_generator(pipe), num_images=recipe.eval_images, seed=recipe.seed)
    (out / "evaluation.json").write_text(json.dumps(report.to_dict(), indent=2))
    pipe.set_progress_bar_config(disable=False)
    pipe.save_pretrained(
        out / "model",
        model_card=model_card(recipe, timings, report, resumed_at=resumed_at, rollbacks=state.rollbacks),
        overwrite_model_card=True,
    )
    return out / "model"


def compare_with_baseline(
    out: str | Path,
    *,
    num_images: int = 600,
    baseline: BaselineTrainingConfig | None = None,
    progress: bool = True,
) -> str:
    """Train the text-conditional VAE path on the same data, VAE and text encoder as the run in ``out``,
    evaluate both paths the same way, and write ``out/comparison.json``.

    Returns:
        A markdown table: each path's attribute accuracies, variety and images/s.
    """
    out = Path(out)
    recipe_data = json.loads((out / "recipe.json").read_text())
    seed, pool_size = int(recipe_data["seed"]), int(recipe_data["pool_size"])
    pipe = Txt2ImgPipeline.from_pretrained(out / "model")
    pipe.set_progress_bar_config(disable=True)
    encoder = VAEEncoder.from_pretrained(out / "vae_encoder")
    pool = encode_pool(encoder, np.random.default_rng([seed, 2]), pool_size)
    torch.manual_seed(seed)
    model = TextToLatentGaussian(
        pipe.text_encoder.hidden_size, encoder.config.latent_channels, pool.latents.shape[-1]
    )
    training = baseline or BaselineTrainingConfig()
    batches = pool.batches(np.random.default_rng(distributed.rank_entropy([seed, 5])), training.batch_size)
    model = train_baseline(model, pipe.text_encoder, training, batches, seed=seed, progress=progress)
    if not distributed.is_main_process():  # rank 0 alone evaluates and writes under torchrun
        return ""
    reports = {
        "GAN (txt2img GANGenerator)": evaluate(pipeline_generator(pipe), num_images=num_images, seed=seed),
        "text-conditional VAE (baseline)": evaluate(
            baseline_generator(model, pipe.text_encoder, pipe.vae), num_images=num_images, seed=seed
        ),
    }
    (out / "comparison.json").write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2))
    return "\n\n".join(f"### {name}\n\n{report.to_markdown()}" for name, report in reports.items())
