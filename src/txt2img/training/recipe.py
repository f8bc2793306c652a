"""The recipe that makes the embedded default model from nothing: Shapes-64 data, then a VAE, a text encoder
and a GAN, each trained on the CPU in turn, then saved as an ordinary ``Txt2ImgPipeline`` folder.

    python -m txt2img.training shapes --out DIR [--seed 0]

Stages and what each one hands on (``stages.train_stages``, the sequence a folder run trains by too):
1. VAE: 64 × 64 images ↔ 32 × 32 × 8 latents; fitted ``shift_factor``/``scaling_factor``.
2. Latent pool: ``pool_size`` renderings (held-out pairs excluded) encoded once to scaled latents.
3. Text encoder: a word-level CLIP text model trained against a latent-image encoder on the pool, with a
   bag-of-words loss that keeps each word readable from the pooled vector.
4. GAN: the native generator trained on the pool with the frozen text encoder (``gan_training``).
5. Evaluate and save: the model's prompt fidelity (``DIR/evaluation.json``, repeated in its model card); text
   encoder + EMA generator + VAE decoder as a pipeline folder (``DIR/model``), the VAE encoder beside it
   (``DIR/vae_encoder``), sample grids in ``DIR/samples``.

Under ``torchrun --nproc_per_node N -m txt2img.training shapes --out DIR`` every training stage runs data
parallel: each process draws its own batches (``distributed.rank_entropy``), gradients are averaged, and
rank 0 alone writes into ``DIR``, which every process must see (a shared file system across machines).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from txt2img import distributed
from txt2img.gan import GANConfig
from txt2img.pipeline import Txt2ImgPipeline
from txt2img.training import shapes
from txt2img.training.baseline import (
    BaselineTrainingConfig,
    TextToLatentGaussian,
    baseline_generator,
    train_baseline,
)
from txt2img.training.clip import CLIPTrainingConfig, TextEncoderShape
from txt2img.training.evaluate import EvalReport, evaluate, pipeline_generator
from txt2img.training.gan_training import GANTrainingConfig
from txt2img.training.stages import RunData, encode_latents, save_model, train_stages, training_history
from txt2img.training.vae_training import VAETrainingConfig
from txt2img.vae import VAEConfig, VAEEncoder

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
            rollback_lr_d_scale=0.5,
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
    history = training_history(resumed_at, rollbacks, recipe.gan_training)
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


def shapes_data(recipe: ShapesRecipe) -> RunData:
    """Shapes-64 as the stages' data: fresh renderings for the VAE, a pool of ``recipe.pool_size`` encoded
    renderings whose captions vary at every draw, and shape-swapped captions as the mismatched ones."""
    return RunData(
        image_batches=image_batches,
        encode_pool=lambda encoder: encode_pool(
            encoder, np.random.default_rng([recipe.seed, 2]), recipe.pool_size
        ),
        vocabulary=vocabulary(),
        text=recipe.text,
        negative_captions=lambda rng: lambda captions: [shapes.swap_shape(c, rng) for c in captions],
        sample_prompts=SAMPLE_PROMPTS,
    )


def run(recipe: ShapesRecipe, out: str | Path, *, progress: bool = True, resume: bool = False) -> Path:
    """Train every stage on Shapes-64 (``stages.train_stages``), evaluate the model and save the pipeline.

    Args:
        recipe: The settings.
        out: Output folder (created).
        progress: Show tqdm bars.
        resume: Continue the GAN stage from ``out/checkpoint`` (earlier stages are reloaded from ``out``).

    Returns:
        The saved pipeline folder, ``out/model``.

    Raises:
        ValueError: resuming from a checkpoint past ``recipe.gan_training.steps``; resuming a run whose
            ``recipe.json`` has other settings for the stages it would reload (``stages.changed_settings``).
        TrainingDiverged: the GAN stage diverged past its rollbacks.
    """
    trained = train_stages(recipe, shapes_data(recipe), out, progress=progress, resume=resume)
    out = Path(out)
    if not distributed.is_main_process():  # rank 0 alone evaluates and writes under torchrun
        return out / "model"

    # 5. Evaluate, then save with a model card that says how the model was made and how well it follows prompts
    pipe = trained.pipeline()
    pipe.set_progress_bar_config(disable=True)
    report = evaluate(pipeline_generator(pipe), num_images=recipe.eval_images, seed=recipe.seed)
    (out / "evaluation.json").write_text(json.dumps(report.to_dict(), indent=2))
    pipe.set_progress_bar_config(disable=False)
    card = model_card(
        recipe, trained.timings, report, resumed_at=trained.resumed_at, rollbacks=trained.state.rollbacks
    )
    return save_model(trained, out, card)


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
