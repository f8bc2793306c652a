"""The training wing: each loop runs a few steps on tiny settings, its losses move, its outputs reload."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from txt2img import TextEncoder, Txt2ImgPipeline, VAEDecoder, VAEEncoder
from txt2img.gan import GANConfig, GANGenerator
from txt2img.training import shapes
from txt2img.training.checkpoint import load_checkpoint, read_extra, save_checkpoint
from txt2img.training.clip import (
    CLIPTrainingConfig,
    LatentCLIP,
    WordHead,
    build_text_encoder,
    build_word_tokenizer,
    clip_loss,
    contrastive_loss,
    train_latent_clip,
)
from txt2img.training.gan_training import (
    GANTrainingConfig,
    GANTrainingState,
    ProjectionDiscriminator,
    TrainingDiverged,
    augment,
    d_hinge_loss,
    discriminator_loss,
    g_hinge_loss,
    learning_rate_scale,
    make_state,
    r1_penalty,
    train_gan,
)
from txt2img.training.recipe import ShapesRecipe, image_batches, run, vocabulary
from txt2img.training.stages import changed_settings
from txt2img.training.vae_training import (
    VAETrainingConfig,
    decoder_loss,
    kl_divergence,
    object_mask,
    train_vae,
    vae_loss,
)
from txt2img.vae import VAEConfig


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole recipe on tiny settings (a few seconds)."""
    out = tmp_path_factory.mktemp("run")
    run(ShapesRecipe.tiny(), out, progress=False)
    return out


def test_recipe_writes_a_loadable_pipeline_and_its_by_products(tiny_run: Path) -> None:
    pipe = Txt2ImgPipeline.from_pretrained(tiny_run / "model")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a large red circle in the center on a blue background"],
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert VAEEncoder.from_pretrained(tiny_run / "vae_encoder").config == pipe.vae.config
    assert (tiny_run / "samples" / "final.png").is_file()
    assert sorted(p.name for p in (tiny_run / "samples").glob("step-*.png")) == [
        "step-000010.png",
        "step-000020.png",
    ]
    assert set(json.loads((tiny_run / "timings.json").read_text())) == {"vae", "pool", "text_encoder", "gan"}


def test_recipe_model_card_carries_the_runs_own_evaluation(tiny_run: Path) -> None:
    evaluation = json.loads((tiny_run / "evaluation.json").read_text())
    assert evaluation["num_images"] == ShapesRecipe.tiny().eval_images
    card = (tiny_run / "model" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: txt2img" in card and "license: apache-2.0" in card
    assert f"| shape | {evaluation['seen']['shape']:.3f} | {evaluation['held_out']['shape']:.3f} |" in card
    assert "purple triangle" in card  # the held-out pairs are named


def test_recipe_model_card_says_how_often_the_gan_went_back() -> None:
    from txt2img.training.attributes import ATTRIBUTE_NAMES
    from txt2img.training.evaluate import ALL, EvalReport
    from txt2img.training.recipe import model_card

    scores = dict.fromkeys([*ATTRIBUTE_NAMES, ALL], 1.0)
    report = EvalReport(seen=scores, held_out=scores, variety=1.0, images_per_second=1.0, num_images=1)
    timings = {"vae": 1.0, "gan": 2.0}
    assert "went back" not in model_card(ShapesRecipe(), timings, report)["training"]
    training = model_card(ShapesRecipe(), timings, report, rollbacks=2)["training"]
    # The recipe halves the discriminator's rate at each rollback: 1e-3 → 2.5e-4 after two.
    assert "diverged and went back 2 times (rollback_every 100), and trained on with the" in training
    assert "discriminator's learning rate at 0.00025." in training


def test_recipe_is_deterministic_for_a_seed(tiny_run: Path, tmp_path: Path) -> None:
    recipe = ShapesRecipe.tiny()
    recipe.gan_training.steps = 10  # the same run, stopped earlier: its VAE stage must be identical
    run(recipe, tmp_path, progress=False)
    first = VAEDecoder.from_pretrained(tiny_run / "vae").state_dict()
    second = VAEDecoder.from_pretrained(tmp_path / "vae").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_word_tokenizer_round_trips_through_text_encoder(tmp_path: Path) -> None:
    encoder = build_text_encoder(vocabulary(), ShapesRecipe.tiny().text)
    encoder.save_pretrained(tmp_path / "te")
    loaded = TextEncoder.from_pretrained(tmp_path / "te")
    prompt = "a small red circle in the top left corner on a blue background"
    ids, mask, _ = encoder.tokenizer([prompt])
    assert torch.equal(loaded.tokenizer([prompt])[0], ids)
    assert int(mask.sum()) == len(prompt.split()) + 2  # one token per word, plus start and end
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode(prompt).pooled, encoder.encode(prompt).pooled, rtol=0, atol=0
        )
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "te")(prompt).input_ids == ids[0][mask[0].bool()].tolist()


def test_word_tokenizer_knows_every_caption_word() -> None:
    tokenizer = build_word_tokenizer(vocabulary(), 20)
    ids, _, _ = tokenizer(["in the top left corner, an orange triangle on a white background"])
    assert tokenizer.token_id("unk_token") not in ids[0].tolist()


def test_vae_loss_default_is_l1_plus_l2_of_a_posterior_sample() -> None:
    config = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)
    torch.manual_seed(0)
    encoder, decoder = VAEEncoder(config), VAEDecoder(config)
    images = next(image_batches(np.random.default_rng(1), 4))
    torch.manual_seed(1)
    loss, _ = vae_loss(images, encoder, decoder, VAETrainingConfig(kl_weight=1e-3))
    torch.manual_seed(1)
    mean, logvar = encoder.encode(images)
    recon = decoder._decode_raw(mean + torch.randn_like(mean) * torch.exp(0.5 * logvar))
    expected = (
        (recon - images).abs().mean() + (recon - images).square().mean() + 1e-3 * kl_divergence(mean, logvar)
    )
    torch.testing.assert_close(loss, expected)


def test_object_mask_marks_the_shape_and_not_the_background() -> None:
    images, _, specs = shapes.sample_batch(np.random.default_rng(2), 8)
    mask = object_mask(images)
    assert mask.shape == (8, 1, 64, 64)
    for image_mask, spec in zip(mask, specs):
        area = float(image_mask.sum())
        assert 0.3 * spec.side**2 < area < 1.2 * spec.side**2  # a triangle fills half its box, a square all


@pytest.mark.parametrize(("sample_posterior", "object_weight"), [(False, 0.0), (True, 4.0), (False, 4.0)])
def test_vae_training_options_reduce_the_loss(sample_posterior: bool, object_weight: float) -> None:
    config = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)
    training = VAETrainingConfig(
        steps=30, lr=3e-3, sample_posterior=sample_posterior, object_weight=object_weight
    )
    images = next(image_batches(np.random.default_rng(1), 8))
    torch.manual_seed(0)
    with torch.no_grad():
        before, _ = vae_loss(images, VAEEncoder(config), VAEDecoder(config), training)
    encoder, decoder = train_vae(config, training, image_batches(np.random.default_rng(0), 8), progress=False)
    with torch.no_grad():
        after, _ = vae_loss(images, encoder, decoder, training)
    assert after < 0.8 * before


def test_vae_training_reduces_the_loss() -> None:
    config = VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)
    batches = image_batches(np.random.default_rng(0), 8)
    images = next(image_batches(np.random.default_rng(1), 8))
    torch.manual_seed(0)
    before, _ = vae_loss(images, VAEEncoder(config), VAEDecoder(config), VAETrainingConfig())
    encoder, decoder = train_vae(config, VAETrainingConfig(steps=40, lr=3e-3), batches, progress=False)
    with torch.no_grad():
        after, _ = vae_loss(images, encoder, decoder, VAETrainingConfig())
    assert after < 0.7 * before
    with torch.no_grad():  # the fitted scaling gives latents of about zero mean and unit variance
        latents = encoder.sample(images)
    assert abs(float(latents.mean())) < 0.5 and 0.5 < float(latents.std()) < 2.0


def test_decoder_steps_train_the_decoder_alone() -> None:
    config = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)
    joint = VAETrainingConfig(steps=20, lr=3e-3, sample_posterior=False)
    finetuned = dataclasses.replace(joint, decoder_steps=30, decoder_lr=3e-3, decoder_object_weight=4.0)
    images = next(image_batches(np.random.default_rng(1), 8))
    trained = {}
    for name, training in (("joint", joint), ("finetuned", finetuned)):
        torch.manual_seed(0)
        trained[name] = train_vae(
            config, training, image_batches(np.random.default_rng(0), 8), progress=False
        )
    (encoder_a, decoder_a), (encoder_b, decoder_b) = trained["joint"], trained["finetuned"]
    for key, value in encoder_a.state_dict().items():  # the latent space is the joint training's
        torch.testing.assert_close(encoder_b.state_dict()[key], value, rtol=0, atol=0)
    assert all(p.requires_grad for p in encoder_b.parameters())  # the encoder is handed back trainable
    with torch.no_grad():
        before, _ = decoder_loss(images, encoder_a, decoder_a, finetuned)
        after, _ = decoder_loss(images, encoder_b, decoder_b, finetuned)
    assert after < 0.9 * before


def test_clip_training_aligns_text_and_latents(tiny_run: Path) -> None:
    del tiny_run  # the recipe's own run covers the loop; here: the loss itself
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert contrastive_loss(text, text, torch.tensor(4.0)) < contrastive_loss(
        text, text.roll(1, 0), torch.tensor(4.0)
    )


def test_clip_word_head_reads_which_words_a_caption_holds() -> None:
    recipe = ShapesRecipe.tiny()
    encoder = build_text_encoder(vocabulary(), recipe.text)
    head = WordHead(encoder)
    caption = "A small green square, at the top on a black background"
    input_ids, mask = encoder.tokenize([caption, "a red circle"])
    targets = head.targets(input_ids, mask)
    vocab = encoder.tokenizer.backend.get_vocab()
    expected = torch.zeros(2, len(vocab))
    for row, text in enumerate([caption, "a red circle"]):
        for word in text.lower().replace(",", " , ").split():
            expected[row, vocab[word]] = 1.0
    torch.testing.assert_close(targets, expected)  # each word once, no [BOS], [EOS] or [PAD]


def test_clip_training_with_the_word_loss_makes_words_readable_from_the_pooled_vector() -> None:
    recipe = ShapesRecipe.tiny()
    rng = np.random.default_rng(0)
    captions = [shapes.canonical_caption(shapes.sample_spec(rng)) for _ in range(8)]

    def batches():
        while True:
            yield torch.randn(16, 4, 32, 32), [captions[i] for i in rng.integers(8, size=16)]

    heads: list[WordHead] = []
    original = WordHead.__init__

    def keep(self: WordHead, text_encoder: TextEncoder) -> None:
        original(self, text_encoder)
        heads.append(self)

    torch.manual_seed(0)
    clip = LatentCLIP(build_text_encoder(vocabulary(), recipe.text), 4, 32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WordHead, "__init__", keep)
        train_latent_clip(
            clip, CLIPTrainingConfig(steps=60, lr=1e-2, word_weight=1.0), batches(), progress=False
        )
    (head,) = heads
    with torch.no_grad():
        input_ids, mask = clip.text_encoder.tokenize(captions)
        logits = head(clip.text_encoder.encode(captions).pooled)
    # Better than the best guess that ignores the caption (each word's frequency): the head reads the words.
    targets = head.targets(input_ids, mask)
    frequency = targets.mean(0, keepdim=True).clamp(1e-4, 1 - 1e-4).expand_as(targets)
    blind = torch.nn.functional.binary_cross_entropy(frequency, targets)
    assert torch.nn.functional.binary_cross_entropy_with_logits(logits, targets) < 0.8 * blind
    # and the loss is part of clip_loss, with its weight
    latents = torch.randn(4, 4, 32, 32)
    with torch.no_grad():
        plain = clip_loss(clip, latents, captions[:4])
        weighted = clip_loss(clip, latents, captions[:4], word_head=head, word_weight=2.0)
        words = torch.nn.functional.binary_cross_entropy_with_logits(logits[:4], targets[:4])
    torch.testing.assert_close(weighted - plain, 2.0 * words)


def test_gan_steps_move_the_losses_and_checkpoint_resumes(tmp_path: Path) -> None:
    recipe = ShapesRecipe.tiny()
    encoder = build_text_encoder(vocabulary(), recipe.text)
    clip = LatentCLIP(encoder, 4, 32).eval().requires_grad_(False)
    gan_config = dataclasses.replace(recipe.gan, text_dim=32, pooled_dim=32)
    torch.manual_seed(0)
    training = GANTrainingConfig(steps=6, batch_size=8, sample_every=0, checkpoint_every=3)
    state = make_state(GANGenerator(gan_config), training, size=32)
    latents = torch.randn(32, 4, 32, 32)
    red = "a large red circle in the center on a blue background"
    green = "a small green square at the top on a black background"
    captions = [red] * 16 + [green] * 16

    def batches():
        rng = np.random.default_rng(0)
        while True:
            i = rng.integers(32, size=8)
            yield latents[torch.from_numpy(i)], [captions[j] for j in i]

    before = {k: v.clone() for k, v in state.generator.state_dict().items()}
    ema_before = {k: v.clone() for k, v in state.generator_ema.state_dict().items()}
    train_gan(state, training, batches(), clip, out_dir=tmp_path, progress=False)
    assert state.step == 6
    changed = [k for k, v in state.generator.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and any(
        not torch.equal(v, ema_before[k]) for k, v in state.generator_ema.state_dict().items()
    )
    # resume: a fresh state loads the step-6 checkpoint and equals the trained one
    fresh = make_state(GANGenerator(gan_config), training, size=32)
    fresh.load(tmp_path / "checkpoint")
    assert fresh.step == 6
    for k, v in state.discriminator.state_dict().items():
        assert torch.equal(fresh.discriminator.state_dict()[k], v)
    loaded, trained = fresh.opt_g.state_dict()["state"], state.opt_g.state_dict()["state"]
    assert loaded.keys() == trained.keys()
    for index in trained:
        assert torch.equal(loaded[index]["exp_avg"], trained[index]["exp_avg"])
    training.steps = 8
    train_gan(fresh, training, batches(), clip, progress=False)
    assert fresh.step == 8


def small_gan() -> tuple[LatentCLIP, GANConfig]:
    """A frozen latent CLIP and a generator config for 16 × 16 latents of 4 channels, on tiny settings."""
    recipe = ShapesRecipe.tiny()
    clip = LatentCLIP(build_text_encoder(vocabulary(), recipe.text), 4, 16).eval().requires_grad_(False)
    gan_config = dataclasses.replace(
        recipe.gan, text_dim=32, pooled_dim=32, channels=(32, 16, 8), attention=(True, False, False)
    )
    return clip, gan_config


SMALL_CAPTIONS = ["a small red circle at the top on a blue background", "a large green square on black"] * 2


def small_batches() -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Seeded random latents (4, 4, 16, 16) for ``small_gan``'s networks, under ``SMALL_CAPTIONS``."""
    generator = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(4, 4, 16, 16, generator=generator), SMALL_CAPTIONS


def test_gan_step_of_a_longer_run_equals_a_run_that_stops_there(tmp_path: Path) -> None:
    # The shipped model is an early checkpoint of a longer run: nothing drawn may depend on the total steps.
    clip, gan_config = small_gan()

    def train(steps: int, out: Path) -> tuple[GANTrainingState, dict[str, dict[str, torch.Tensor]]]:
        snapshots = {}

        def snapshot(generator: GANGenerator, path: Path) -> None:
            snapshots[path.stem] = {k: v.clone() for k, v in generator.state_dict().items()}

        torch.manual_seed(0)
        training = GANTrainingConfig(steps=steps, batch_size=4, sample_every=2, checkpoint_every=0)
        state = make_state(GANGenerator(gan_config), training, size=16)
        train_gan(state, training, small_batches(), clip, out_dir=out, sample_fn=snapshot, progress=False)
        return state, snapshots

    short, _ = train(2, tmp_path / "short")
    _, snapshots = train(4, tmp_path / "long")
    assert snapshots.keys() == {"step-000002", "step-000004"}
    for name, value in short.generator_ema.state_dict().items():
        assert torch.equal(snapshots["step-000002"][name], value), name
    assert any(not torch.equal(snapshots["step-000004"][k], v) for k, v in snapshots["step-000002"].items())


def test_gan_learning_rates_fall_linearly_over_the_last_steps_and_resume_on_schedule(tmp_path: Path) -> None:
    clip, gan_config = small_gan()

    def record(state: GANTrainingState) -> list[tuple[float, float]]:
        """The (generator, discriminator) learning rates of each optimizer step the state takes."""
        used: list[tuple[float, float]] = []
        step_g = state.opt_g.step

        def step(*args, **kwargs):
            used.append((state.opt_g.param_groups[0]["lr"], state.opt_d.param_groups[0]["lr"]))
            return step_g(*args, **kwargs)

        state.opt_g.step = step  # type: ignore[method-assign]
        return used

    torch.manual_seed(0)
    training = GANTrainingConfig(
        steps=5, batch_size=4, lr_g=2e-3, lr_d=1e-3, lr_decay_steps=3, sample_every=0, checkpoint_every=3
    )
    state = make_state(GANGenerator(gan_config), training, size=16)
    used = record(state)
    train_gan(state, training, small_batches(), clip, out_dir=tmp_path, progress=False)
    factors = [1.0, 1.0, 1.0, 2 / 3, 1 / 3]  # the last three steps: 3/3, 2/3, 1/3 of the learning rates
    np.testing.assert_allclose(used, [(2e-3 * f, 1e-3 * f) for f in factors], rtol=1e-12)
    # A run resumed from the step-3 checkpoint goes on down the same schedule.
    resumed = make_state(GANGenerator(gan_config), training, size=16)
    resumed.load(tmp_path / "checkpoint")
    assert resumed.step == 3
    used = record(resumed)
    train_gan(resumed, training, small_batches(), clip, progress=False)
    np.testing.assert_allclose(used, [(2e-3 * f, 1e-3 * f) for f in factors[3:]], rtol=1e-12)
    assert [learning_rate_scale(step, 5, 0) for step in range(5)] == [1.0] * 5


@pytest.mark.parametrize("channels_last", [False, True])
def test_gan_channels_last_switch_sets_the_networks_memory_format_and_keeps_their_values(
    channels_last: bool,
) -> None:
    clip, gan_config = small_gan()
    torch.manual_seed(0)
    training = GANTrainingConfig(
        steps=2, batch_size=4, sample_every=0, checkpoint_every=0, channels_last=channels_last
    )
    state = make_state(GANGenerator(gan_config), training, size=16)
    train_gan(state, training, small_batches(), clip, progress=False)
    nets = (state.generator, state.generator_ema, state.discriminator, clip)
    weights = [
        m.weight
        for net in nets
        for m in net.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
    ]
    expected = torch.channels_last if channels_last else torch.contiguous_format
    assert weights and all(w.is_contiguous(memory_format=expected) for w in weights)
    # The format changes the layout, not what the networks compute.
    z = torch.randn(4, gan_config.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        text = clip.text_encoder.encode(SMALL_CAPTIONS)
        outputs = []
        for memory_format in (expected, torch.contiguous_format if channels_last else torch.channels_last):
            for net in nets:
                net.to(memory_format=memory_format)
            fake = state.generator_ema.generate(z, text)
            outputs.append((fake, state.discriminator(fake, text.pooled), clip.embed_latents(fake)))
    for first, second in zip(*outputs):
        torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-5)


def test_gan_divergence_stops_the_run_before_its_step(tmp_path: Path) -> None:
    clip, gan_config = small_gan()
    caption = "a small red circle at the top on a blue background"

    def batches():
        generator = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(4, 4, 16, 16, generator=generator), [caption] * 4

    # A loss beyond the limit: the run stops at its first step, before any network changes.
    torch.manual_seed(0)
    # Without rollbacks (rollback_every=0), the first divergence stops the run.
    training = GANTrainingConfig(
        steps=3, batch_size=4, checkpoint_every=0, divergence_limit=1e-6, rollback_every=0
    )
    state = make_state(GANGenerator(gan_config), training, size=16)
    before = {k: v.clone() for k, v in state.discriminator.state_dict().items()}
    with pytest.raises(TrainingDiverged, match=r"diverged at step 1: d = .*no checkpoint has been written"):
        train_gan(state, training, batches(), clip, progress=False)
    assert state.step == 0
    assert all(torch.equal(v, before[k]) for k, v in state.discriminator.state_dict().items())

    # A healthy run with the default limit trains and checkpoints; a generator that then makes NaNs stops
    # it at the next step, and the message points at the checkpoint, which keeps the good state.
    training = GANTrainingConfig(steps=2, batch_size=4, checkpoint_every=2, sample_every=0)
    state = make_state(GANGenerator(gan_config), training, size=16)
    train_gan(state, training, batches(), clip, out_dir=tmp_path, progress=False)
    assert state.step == 2
    with torch.no_grad():
        state.generator.to_latent.bias.fill_(float("nan"))
    training.steps = 4
    with pytest.raises(TrainingDiverged, match=r"step 3: d = nan.*holds the last checkpoint"):
        train_gan(state, training, batches(), clip, out_dir=tmp_path, progress=False)
    assert state.step == 2
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["extra"]["step"] == 2


def test_gan_divergence_of_the_generator_loss_leaves_the_discriminator_trainable(monkeypatch) -> None:
    from txt2img.training import gan_training

    clip, gan_config = small_gan()
    training = GANTrainingConfig(steps=1, batch_size=4, checkpoint_every=0, rollback_every=0)
    state = make_state(GANGenerator(gan_config), training, size=16)
    batches = iter([(torch.randn(4, 4, 16, 16), ["a small red circle at the top on a blue background"] * 4)])
    monkeypatch.setattr(gan_training, "g_hinge_loss", lambda fake: fake.mean() * 0 + 1e9)
    with pytest.raises(TrainingDiverged, match=r"step 1: g = 1e\+09"):
        train_gan(state, training, batches, clip, progress=False)
    assert state.step == 0
    assert all(p.requires_grad for p in state.discriminator.parameters())


def same_tensors(first: object, second: object) -> bool:
    """Whether two nested state dicts (dicts, lists, tensors, numbers) hold equal values."""
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(same_tensors(first[k], second[k]) for k in first)
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        return len(first) == len(second) and all(same_tensors(a, b) for a, b in zip(first, second))
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return torch.equal(first, second)
    return first == second


def test_gan_snapshot_restores_the_state_and_is_not_changed_by_training_on() -> None:
    clip, gan_config = small_gan()
    training = GANTrainingConfig(steps=2, batch_size=4, checkpoint_every=0, sample_every=0)
    torch.manual_seed(0)
    state = make_state(GANGenerator(gan_config), training, size=16)
    train_gan(state, training, small_batches(), clip, progress=False)  # so that Adam has moments to copy
    snapshot = state.snapshot()
    kept = copy.deepcopy(snapshot)
    training.steps = 4
    train_gan(state, training, small_batches(), clip, progress=False)
    assert not same_tensors(state.generator.state_dict(), kept.modules["generator"])

    state.restore(snapshot)
    assert state.step == 2
    assert same_tensors({k: m.state_dict() for k, m in state._modules().items()}, kept.modules)
    assert same_tensors({"g": state.opt_g.state_dict(), "d": state.opt_d.state_dict()}, kept.optimizers)
    # Training on from the restored state leaves the snapshot as it was: it can be restored again.
    train_gan(state, training, small_batches(), clip, progress=False)
    assert same_tensors(snapshot.modules, kept.modules) and same_tensors(snapshot.optimizers, kept.optimizers)


def test_noise_seeds_are_the_earlier_ones_until_a_rollback() -> None:
    from txt2img.training.gan_training import noise_seeds

    # Without rollbacks, the seeds runs have always drawn with (seed + step, and one more): unchanged draws.
    assert noise_seeds(7, 100, 0) == (107, 108)
    # After a rollback, seeds no step of the run's first attempt uses.
    firsts = {s for step in range(10_000) for s in noise_seeds(7, step, 0)}
    assert not firsts & set(noise_seeds(7, 100, 1)) and noise_seeds(7, 100, 1) != noise_seeds(7, 100, 2)


def spiking_generator_loss(monkeypatch, spikes: Callable[[int], bool]) -> list[int]:
    """Make the generator's hinge loss 10⁹ on the calls (1-based) ``spikes`` picks; returns the call log."""
    from txt2img.training import gan_training

    calls: list[int] = []
    hinge = gan_training.g_hinge_loss

    def loss(fake: torch.Tensor) -> torch.Tensor:
        calls.append(len(calls) + 1)
        return hinge(fake) + (1e9 if spikes(len(calls)) else 0.0)

    monkeypatch.setattr(gan_training, "g_hinge_loss", loss)
    return calls


def test_gan_copies_for_rollbacks_change_nothing_in_a_run_that_does_not_diverge() -> None:
    clip, gan_config = small_gan()
    weights = []
    for rollback_every in (0, 2):
        training = GANTrainingConfig(
            steps=5, batch_size=4, checkpoint_every=0, sample_every=0, rollback_every=rollback_every
        )
        torch.manual_seed(0)
        state = make_state(GANGenerator(gan_config), training, size=16)
        train_gan(state, training, small_batches(), clip, progress=False)
        weights.append(state.generator_ema.state_dict())
    assert same_tensors(*weights)


def test_gan_rollback_goes_back_and_trains_on_with_other_noise(monkeypatch, caplog) -> None:
    from txt2img.training import gan_training

    calls = spiking_generator_loss(monkeypatch, lambda call: call == 6)  # the step-6 update, once
    seeds: list[tuple[int, int, int]] = []
    noise_seeds = gan_training.noise_seeds

    def recorded(seed: int, step: int, rollbacks: int) -> tuple[int, int]:
        seeds.append((seed, step, rollbacks))
        return noise_seeds(seed, step, rollbacks)

    monkeypatch.setattr(gan_training, "noise_seeds", recorded)
    clip, gan_config = small_gan()
    training = GANTrainingConfig(steps=8, batch_size=4, checkpoint_every=0, sample_every=0, rollback_every=2)
    torch.manual_seed(0)
    state = make_state(GANGenerator(gan_config), training, size=16)
    with caplog.at_level(logging.WARNING, logger="txt2img"):
        train_gan(state, training, small_batches(), clip, seed=3, progress=False)
    # Copies at steps 2 and 4 when step 6 diverged: back to the older, step 2, with the noise of rollback 1.
    assert "diverged at step 6: g = 1e+09" in caplog.text and "Went back to step 2" in caplog.text
    assert seeds == [(3, 0, 0), (3, 2, 1)]
    assert state.step == 8 and state.rollbacks == 1
    assert len(calls) == 6 + 6  # steps 1 to 6 (the 6th diverged), then steps 3 to 8 again
    assert all(torch.isfinite(p).all() for p in state.generator.parameters())


def test_gan_rollback_lowers_the_discriminators_learning_rate_when_asked(monkeypatch, caplog) -> None:
    clip, gan_config = small_gan()
    rates = {}
    for scale in (1.0, 0.5):
        monkeypatch.undo()
        spiking_generator_loss(monkeypatch, lambda call: call == 4)  # the step-4 update, once
        training = GANTrainingConfig(
            steps=6,
            batch_size=4,
            lr_d=1e-3,
            lr_g=2e-3,
            checkpoint_every=0,
            sample_every=0,
            rollback_every=2,
            rollback_lr_d_scale=scale,
        )
        torch.manual_seed(0)
        state = make_state(GANGenerator(gan_config), training, size=16)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="txt2img"):
            train_gan(state, training, small_batches(), clip, progress=False)
        assert state.rollbacks == 1 and "Went back to step 0" in caplog.text
        rates[scale] = (state.opt_d.param_groups[0]["lr"], state.opt_g.param_groups[0]["lr"], caplog.text)
    assert rates[1.0][:2] == (1e-3, 2e-3) and "learning rate at 0.001 " in rates[1.0][2]
    # Half the discriminator's rate after the rollback; the generator's unchanged.
    assert rates[0.5][:2] == (5e-4, 2e-3) and "learning rate at 0.0005 " in rates[0.5][2]


def test_gan_resumed_run_keeps_the_discriminators_rate_its_rollbacks_lowered(tmp_path: Path) -> None:
    clip, gan_config = small_gan()
    training = GANTrainingConfig(
        steps=1, batch_size=4, lr_d=1e-3, checkpoint_every=0, sample_every=0, rollback_lr_d_scale=0.5
    )
    state = make_state(GANGenerator(gan_config), training, size=16)
    state.rollbacks = 2  # as a checkpoint of a run that went back twice loads it
    train_gan(state, training, small_batches(), clip, progress=False)
    assert state.opt_d.param_groups[0]["lr"] == 1e-3 * 0.25


def test_gan_rollback_of_a_resumed_run_goes_back_to_where_it_resumed(monkeypatch, caplog) -> None:
    clip, gan_config = small_gan()
    training = GANTrainingConfig(steps=3, batch_size=4, checkpoint_every=0, sample_every=0)
    torch.manual_seed(0)
    state = make_state(GANGenerator(gan_config), training, size=16)
    train_gan(state, training, small_batches(), clip, progress=False)
    calls = spiking_generator_loss(monkeypatch, lambda call: call == 2)  # step 5, the second of this call
    training.steps = 6  # rollback_every 100: no multiple of it ahead, so only the copy at step 3
    with caplog.at_level(logging.WARNING, logger="txt2img"):
        train_gan(state, training, small_batches(), clip, progress=False)
    assert "diverged at step 5" in caplog.text and "Went back to step 3" in caplog.text
    assert state.step == 6 and state.rollbacks == 1 and len(calls) == 2 + 3


def test_gan_rollbacks_stop_at_max_rollbacks(monkeypatch) -> None:
    calls = spiking_generator_loss(monkeypatch, lambda call: call >= 3)  # from step 3 on, every time
    clip, gan_config = small_gan()
    training = GANTrainingConfig(
        steps=8, batch_size=4, checkpoint_every=0, sample_every=0, rollback_every=2, max_rollbacks=2
    )
    torch.manual_seed(0)
    state = make_state(GANGenerator(gan_config), training, size=16)
    with pytest.raises(TrainingDiverged, match=r"step 1: g = 1e\+09.*gone back 2 times already"):
        train_gan(state, training, small_batches(), clip, progress=False)
    # Step 3 diverged: back to step 0 (copies at 0 and 2); step 1 diverged twice more: back to 0, then stop.
    assert len(calls) == 5 and state.step == 0 and state.rollbacks == 2


def test_gan_checkpoint_keeps_the_rollbacks(tmp_path: Path) -> None:
    _, gan_config = small_gan()
    training = GANTrainingConfig(steps=1, batch_size=4)
    state = make_state(GANGenerator(gan_config), training, size=16)
    state.rollbacks = 2
    state.save(tmp_path / "checkpoint")
    fresh = make_state(GANGenerator(gan_config), training, size=16)
    fresh.load(tmp_path / "checkpoint")
    assert fresh.rollbacks == 2


def test_training_command_reports_a_diverged_run(monkeypatch, capsys, tmp_path: Path) -> None:
    from txt2img.training import __main__ as command
    from txt2img.training import recipe

    def diverge(*args, **kwargs):
        raise TrainingDiverged("GAN training diverged at step 7: d = 1e+05")

    monkeypatch.setattr(recipe, "run", diverge)
    assert command.main(["shapes", "--out", str(tmp_path), "--tiny", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "error: GAN training diverged at step 7" in err
    assert "--resume continues a run only with the settings it started with" in err


def test_training_command_trains_a_finished_run_on(tiny_run: Path, tmp_path: Path, capsys) -> None:
    from txt2img.training import __main__ as command

    folder = tmp_path / "run"
    shutil.copytree(tiny_run, folder)  # a finished run: its checkpoint is at the tiny recipe's step 20
    argv = ["shapes", "--tiny", "--out", str(folder), "--resume", "--quiet"]
    before = (folder / "checkpoint" / "tensors.safetensors").read_bytes()
    assert command.main([*argv, "--gan-steps", "10"]) == 1
    assert "checkpoint is at GAN step 20, past the 10 steps asked for" in capsys.readouterr().err
    assert (
        folder / "checkpoint" / "tensors.safetensors"
    ).read_bytes() == before  # nothing trained or written
    # A run made with other settings (here: before the text encoder's word loss) is not resumed.
    saved = (folder / "recipe.json").read_text()
    older = json.loads(saved)
    older["clip_training"]["word_weight"] = 0.0
    (folder / "recipe.json").write_text(json.dumps(older))
    assert command.main([*argv, "--gan-steps", "30"]) == 1
    assert "recipe.json was written with other settings (clip_training)" in capsys.readouterr().err
    assert (folder / "checkpoint" / "tensors.safetensors").read_bytes() == before
    (folder / "recipe.json").write_text(saved)
    first = json.loads((folder / "timings.json").read_text())
    first_seconds = read_extra(folder / "checkpoint")["seconds"]
    assert 0 < first_seconds <= first["gan"]
    assert command.main([*argv, "--gan-steps", "30"]) == 0
    assert read_extra(folder / "checkpoint")["step"] == 30
    assert json.loads((folder / "recipe.json").read_text())["gan_training"]["steps"] == 30
    # The record covers the whole training: the VAE's time is the first run's (it was only reloaded), the
    # GAN's counts both runs; the card gives the command for 30 steps and says the run was resumed.
    again = json.loads((folder / "timings.json").read_text())
    assert again["vae"] == first["vae"] > 0
    assert again["gan"] > first_seconds
    card = (folder / "model" / "README.md").read_text()
    assert "--gan-steps 30" in card and "the last resumed at GAN step 20" in card
    with pytest.raises(SystemExit):
        command.main([*argv, "--gan-steps", "0"])
    assert "--gan-steps must be 1 or more" in capsys.readouterr().err


def test_a_resume_checks_the_settings_of_the_stages_it_reloads() -> None:
    recipe = ShapesRecipe.tiny()
    saved = json.loads(json.dumps(recipe.to_dict()))
    saved["gan_training"]["steps"] = 5  # training on for more steps is what a resume is for
    saved["eval_images"] = 99
    assert changed_settings(saved, recipe, gan_resumed=True) == []
    saved["gan_training"]["lr_g"] = 1.0
    saved["seed"] = 7
    assert changed_settings(saved, recipe, gan_resumed=True) == ["seed", "gan_training"]
    # Without a GAN checkpoint only the VAE stage is reloaded; the later ones are trained again.
    assert changed_settings(saved, recipe, gan_resumed=False) == ["seed"]
    # A run saved before a setting existed resumes when the setting is left at its default, not otherwise.
    older = json.loads(json.dumps(recipe.to_dict()))
    del older["gan_training"]["discriminator_pool_first_from"]
    assert changed_settings(older, recipe, gan_resumed=True) == []
    recipe.gan_training.discriminator_pool_first_from = 1
    assert changed_settings(older, recipe, gan_resumed=True) == ["gan_training"]


def test_evaluate_judges_a_checkpoints_ema_generator(tiny_run: Path, tmp_path: Path, capsys) -> None:
    from txt2img.training import evaluate as evaluation

    # Another generator of the model's architecture, saved both as a checkpoint's EMA generator and in a
    # model folder of its own: `evaluate MODEL --checkpoint CKPT` must judge it as that folder is judged.
    pipe = Txt2ImgPipeline.from_pretrained(tiny_run / "model")
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in pipe.gan.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    save_checkpoint(tmp_path / "ckpt", modules={"generator_ema": pipe.gan}, optimizers={}, extra={"step": 7})
    pipe.save_pretrained(tmp_path / "other")
    model = str(tiny_run / "model")
    reports = {}
    for name, argv in {
        "model": [model],
        "checkpoint": [model, "--checkpoint", str(tmp_path / "ckpt")],
        "other": [str(tmp_path / "other")],
    }.items():
        assert evaluation.main([*argv, "--num-images", "12", "--json", str(tmp_path / "report.json")]) == 0
        reports[name] = json.loads((tmp_path / "report.json").read_text())
        del reports[name]["images_per_second"]
    assert "the EMA generator of " in capsys.readouterr().out
    assert reports["checkpoint"] == reports["other"]
    assert reports["checkpoint"] != reports["model"]

    # A checkpoint without that module, or with weights of another architecture: a message, exit status 1.
    save_checkpoint(tmp_path / "d_only", modules={"discriminator": nn.Linear(2, 2)}, optimizers={}, extra={})
    small = GANGenerator(dataclasses.replace(pipe.gan.config, channels=(16, 8, 8, 8)))
    save_checkpoint(tmp_path / "small", modules={"generator_ema": small}, optimizers={}, extra={"step": 1})
    for folder, message in [
        ("d_only", r"holds the modules \['discriminator'\], not 'generator_ema'"),
        ("small", "do not fit the GANGenerator given"),
        ("missing", "is not a txt2img training checkpoint"),
    ]:
        assert evaluation.main([model, "--checkpoint", str(tmp_path / folder), "--num-images", "2"]) == 1
        assert re.search(message, capsys.readouterr().err)


def test_gan_pixel_discriminator_sees_decoded_sub_batches_and_trains_the_generator(tmp_path: Path) -> None:
    recipe = ShapesRecipe.tiny()
    encoder = build_text_encoder(vocabulary(), recipe.text)
    clip = LatentCLIP(encoder, 4, 16).eval().requires_grad_(False)
    gan_config = dataclasses.replace(
        recipe.gan, text_dim=32, pooled_dim=32, channels=(32, 16, 8), attention=(True, False, False)
    )
    training = GANTrainingConfig(
        steps=3, batch_size=8, sample_every=0, checkpoint_every=3, pixel_weight=1.0, pixel_batch=3, r1_every=2
    )
    with pytest.raises(ValueError, match="no image_size"):
        make_state(GANGenerator(gan_config), training, size=16)
    torch.manual_seed(0)
    state = make_state(GANGenerator(gan_config), training, size=16, image_size=32)
    assert state.pixel_discriminator is not None
    caption = "a large red circle in the center on a blue background"

    def batches():
        while True:
            yield torch.randn(8, 4, 16, 16), [caption] * 8

    with pytest.raises(ValueError, match="no decode function"):
        train_gan(state, training, batches(), clip, progress=False)
    plain = make_state(GANGenerator(gan_config), dataclasses.replace(training, pixel_weight=0.0), size=16)
    with pytest.raises(ValueError, match="a state without a pixel discriminator"):
        train_gan(plain, training, batches(), clip, decode=lambda x: x, progress=False)
    with pytest.raises(ValueError, match="made for"):  # images of another size than make_state was told
        train_gan(state, training, batches(), clip, decode=lambda x: torch.tanh(x[:, :3]), progress=False)
    decoded: list[tuple[int, bool]] = []
    gradients: list[torch.Tensor] = []  # what reaches the decoded fakes: only the generator's pixel loss

    def decode(latents: torch.Tensor) -> torch.Tensor:  # a fixed "decoder": 2x upsampling of 3 channels
        decoded.append((latents.shape[0], torch.is_grad_enabled()))
        images = torch.tanh(torch.nn.functional.interpolate(latents[:, :3], scale_factor=2.0))
        if images.requires_grad:
            images.register_hook(gradients.append)
        return images

    before = {k: v.clone() for k, v in state.pixel_discriminator.state_dict().items()}
    train_gan(state, training, batches(), clip, decode=decode, out_dir=tmp_path, progress=False)
    # every step decodes pixel_batch reals without gradients and pixel_batch fakes with them ...
    assert decoded == [(3, False), (3, True)] * 3
    # ... and the generator's update backpropagates through those fakes
    assert len(gradients) == 3 and all(g.shape == (3, 3, 32, 32) and g.abs().sum() > 0 for g in gradients)
    assert all(p.requires_grad for p in state.pixel_discriminator.parameters())  # unfrozen after each step
    assert all(not torch.equal(v, before[k]) for k, v in state.pixel_discriminator.state_dict().items())
    fresh = make_state(GANGenerator(gan_config), training, size=16, image_size=32)
    fresh.load(tmp_path / "checkpoint")
    assert fresh.pixel_discriminator is not None
    for k, v in state.pixel_discriminator.state_dict().items():
        assert torch.equal(fresh.pixel_discriminator.state_dict()[k], v)
    assert len(fresh.opt_d.state_dict()["state"]) == len(list(state.opt_d.param_groups[0]["params"]))
    # a run with other settings does not resume from it
    with pytest.raises(ValueError, match="holds the modules"):
        plain.load(tmp_path / "checkpoint")


def test_gan_hard_negatives_come_from_negative_captions(tmp_path: Path) -> None:
    recipe = ShapesRecipe.tiny()
    encoder = build_text_encoder(vocabulary(), recipe.text)
    clip = LatentCLIP(encoder, 4, 32).eval().requires_grad_(False)
    gan_config = dataclasses.replace(recipe.gan, text_dim=32, pooled_dim=32)
    training = GANTrainingConfig(
        steps=2, batch_size=8, sample_every=0, checkpoint_every=0, hard_negative_fraction=0.5
    )
    caption = "a large red circle in the center on a blue background"

    def batches():
        while True:
            yield torch.randn(8, 4, 32, 32), [caption] * 8

    state = make_state(GANGenerator(gan_config), training, size=32)
    with pytest.raises(ValueError, match="no negative_captions function"):
        train_gan(state, training, batches(), clip, progress=False)
    asked: list[list[str]] = []

    def negatives(captions: list[str]) -> list[str]:
        asked.append(captions)
        return [c.replace("circle", "square") for c in captions]

    train_gan(state, training, batches(), clip, negative_captions=negatives, progress=False)
    assert state.step == 2
    assert asked == [[caption] * 4] * 2  # half of each batch of 8, every step


def test_checkpoint_round_trip_and_missing_folder(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "ck", modules={"m": model}, optimizers={"o": optimizer}, extra={"step": 5})
    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.Adam(other.parameters())
    assert load_checkpoint(tmp_path / "ck", modules={"m": other}, optimizers={"o": other_opt}) == {"step": 5}
    assert torch.equal(other.weight, model.weight)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(OSError, match="not a txt2img training checkpoint"):
        load_checkpoint(tmp_path / "nothing", modules={}, optimizers={})


def test_losses_have_the_right_signs() -> None:
    good, bad = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert d_hinge_loss(good, bad, bad, 1.0) == 0
    assert d_hinge_loss(bad, good, good, 1.0) > 0
    assert g_hinge_loss(good) < g_hinge_loss(bad)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    assert r1_penalty((x * 3).sum(dim=(1, 2, 3)), x) == pytest.approx(9 * 4 * 8 * 8)
    assert kl_divergence(torch.zeros(3), torch.zeros(3)) == 0


def test_discriminator_scores_reals_under_both_captions_in_one_pass_as_two_passes_would() -> None:
    torch.manual_seed(0)
    d = ProjectionDiscriminator(4, 8, 8, width=8, features=16)
    real, fake = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    pooled, mismatched = torch.randn(3, 8), torch.randn(3, 8)
    both = d(real, torch.stack([pooled, mismatched]))
    assert both.shape == (2, 3)
    torch.testing.assert_close(both[0], d(real, pooled))
    torch.testing.assert_close(both[1], d(real, mismatched))

    training = GANTrainingConfig(mismatch_weight=0.5)
    loss = discriminator_loss(
        lambda net, *args: net(*args), d, real, fake, pooled, mismatched, lambda x: x, training, r1=False
    )
    expected = d_hinge_loss(d(real, pooled), d(fake, pooled), d(real, mismatched), 0.5)
    torch.testing.assert_close(loss, expected)


def test_discriminator_blocks_pool_first_from_the_given_index() -> None:
    from txt2img.training.gan_training import DiscriminatorBlock

    def flags(**kwargs: int) -> list[bool]:
        return [block.pool_first for block in ProjectionDiscriminator(4, 8, 8, width=8, **kwargs).blocks]

    assert flags() == [False, False]
    assert flags(pool_first_from=1) == [False, True]
    assert flags(pool_first_from=0) == [True, True]
    torch.manual_seed(0)
    after, before = DiscriminatorBlock(4, 8), DiscriminatorBlock(4, 8, pool_first=True)
    before.load_state_dict(after.state_dict())
    x = torch.randn(2, 4, 8, 8)
    assert before(x).shape == after(x).shape == (2, 8, 4, 4)
    assert not torch.allclose(before(x), after(x))  # the widening conv sees another resolution
    # The 1×1 path is linear, so it commutes with the pooling: with the widening conv silenced, the two
    # orders agree.
    for block in (after, before):
        torch.nn.init.zeros_(block.conv1.weight)
        torch.nn.init.zeros_(block.conv1.bias)
    torch.testing.assert_close(before(x), after(x))


def test_spectral_norm_holds_every_discriminator_layer_at_unit_norm_and_survives_a_checkpoint(
    tmp_path: Path,
) -> None:
    def largest_singular_values(d: ProjectionDiscriminator) -> list[float]:
        layers = [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        return [torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item() for m in layers]

    torch.manual_seed(0)
    plain = ProjectionDiscriminator(4, 8, 8, width=8, features=16)
    assert max(abs(s - 1) for s in largest_singular_values(plain)) > 0.1  # plain weights are not at 1
    normed = ProjectionDiscriminator(4, 8, 8, width=8, features=16, spectral_norm=True)
    for _ in range(30):  # one power iteration a training forward pass
        normed(torch.randn(2, 4, 8, 8), torch.randn(2, 8))
    values = largest_singular_values(normed)
    assert len(values) == 10 and values == pytest.approx([1.0] * 10, abs=0.02)

    # make_state applies it to both discriminators, and their checkpoints reload strictly.
    _, gan_config = small_gan()
    training = GANTrainingConfig(discriminator_spectral_norm=True, pixel_weight=1.0)
    state = make_state(GANGenerator(gan_config), training, size=16, image_size=32)
    assert state.pixel_discriminator is not None
    for d in (state.discriminator, state.pixel_discriminator):
        assert torch.nn.utils.parametrize.is_parametrized(d.to_features, "weight")
    state.save(tmp_path / "checkpoint")
    again = make_state(GANGenerator(gan_config), training, size=16, image_size=32)
    again.load(tmp_path / "checkpoint")
    torch.testing.assert_close(again.discriminator.to_features.weight, state.discriminator.to_features.weight)


def test_augment_shifts_by_at_most_one_pixel_and_keeps_shape() -> None:
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3, 4] = 1.0
    out = augment(x, torch.Generator().manual_seed(0), p=1.0, max_shift=1, noise=0.0)
    assert out.shape == x.shape
    peaks = [tuple(int(i) for i in torch.nonzero(o[0])[0]) for o in out]
    assert {(r - 3, c - 4) for r, c in peaks} <= {(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)}
    assert len(set(peaks)) > 1
    untouched = augment(x, torch.Generator().manual_seed(0), p=0.0, max_shift=1, noise=0.0)
    assert torch.equal(untouched, x)


def test_gan_config_text_sizes_follow_the_text_encoder(tiny_run: Path) -> None:
    config = json.loads((tiny_run / "model" / "gan" / "config.json").read_text())
    assert config["text_dim"] == config["pooled_dim"] == ShapesRecipe.tiny().text.hidden_size
    # latents of the tiny VAE (factor 2) for 64 × 64 images
    assert GANConfig.from_dict(config).sample_size == 32


def test_baseline_comparison_trains_and_evaluates_both_paths(tiny_run: Path) -> None:
    from txt2img.training.baseline import BaselineTrainingConfig
    from txt2img.training.recipe import compare_with_baseline

    table = compare_with_baseline(
        tiny_run, num_images=8, baseline=BaselineTrainingConfig(steps=5, batch_size=8), progress=False
    )
    assert "### GAN" in table and "### text-conditional VAE" in table and "all five" in table
    reports = json.loads((tiny_run / "comparison.json").read_text())
    assert len(reports) == 2
    for report in reports.values():
        assert report["num_images"] == 8 and report["images_per_second"] > 0


def test_pixel_discriminator_settings_that_cannot_work_are_refused() -> None:
    from txt2img.training.gan_training import ProjectionDiscriminator

    with pytest.raises(ValueError, match="not divisible by 2\\*\\*stages = 8"):
        ProjectionDiscriminator(3, 8, 20, stages=3)
    clip, gan_config = small_gan()
    training = GANTrainingConfig(steps=1, batch_size=4, checkpoint_every=0, pixel_weight=1.0, pixel_batch=0)
    state = make_state(GANGenerator(gan_config), training, size=16, image_size=32)
    batches = iter([(torch.randn(4, 4, 16, 16), ["a small red circle at the top on a blue background"] * 4)])
    with pytest.raises(ValueError, match="pixel_batch 0"):
        train_gan(state, training, batches, clip, decode=lambda x: x, progress=False)
    assert state.step == 0
