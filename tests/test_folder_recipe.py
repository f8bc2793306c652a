"""Training on a folder of captioned images: the command, what it writes, and its errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from txt2img import Txt2ImgPipeline, VAEDecoder
from txt2img.training import __main__ as command
from txt2img.training import shapes
from txt2img.training.checkpoint import read_extra
from txt2img.training.clip import build_word_tokenizer, split_words
from txt2img.training.folder_recipe import FolderRecipe, caption_words, fit_captions, other_captions
from txt2img.training.recipe import ShapesRecipe

SIZE = 32


LONG = " ".join(["a red circle on a blue background"] * 4)  # 28 words, no punctuation: 28 tokens


def write_folder(folder: Path, count: int = 12) -> list[str]:
    """Shapes-64 renderings with a ``.txt`` caption beside each (capitalised, with a full stop); the last
    caption is ``LONG``."""
    folder.mkdir()
    images, captions, _ = shapes.sample_batch(np.random.default_rng(0), count, canonical=True)
    pixels = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    written = []
    for i, (image, caption) in enumerate(zip(pixels, captions)):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
        written.append(LONG if i == count - 1 else caption.capitalize() + ".")
        (folder / f"{i:02d}.txt").write_text(written[-1])
    return written


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("folder")
    captions = write_folder(root / "data")
    argv = ["folder", "--data", str(root / "data"), "--out", str(root / "run"), "--size", str(SIZE)]
    assert command.main([*argv, "--tiny", "--quiet"]) == 0
    return root / "run", captions


def test_folder_command_writes_a_pipeline_that_draws_at_the_folders_size(folder_run) -> None:
    out, captions = folder_run
    pipe = Txt2ImgPipeline.from_pretrained(out / "model")
    image = pipe(captions[0], generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (SIZE, SIZE)
    assert pipe.vae.config.sample_size == SIZE
    assert pipe.text_encoder.max_length == len(LONG.split()) + 2  # the longest caption, BOS and EOS
    # Every word of every caption is in the tokenizer's vocabulary: no unknown tokens.
    ids, mask = pipe.text_encoder.tokenize(captions)
    unknown = pipe.text_encoder.tokenizer.token_id("unk_token")
    assert not (ids[mask.bool()] == unknown).any()
    # A sample grid: a row per distinct caption (at most 8), a column per seed (4).
    with Image.open(out / "samples" / "final.png") as grid:
        assert grid.size == (4 * SIZE, 8 * SIZE)
    assert set(json.loads((out / "timings.json").read_text())) == {"vae", "pool", "text_encoder", "gan"}
    assert json.loads((out / "recipe.json").read_text())["size"] == SIZE
    card = (out / "model" / "README.md").read_text()
    assert "trained from scratch on 12 captioned images" in card
    assert "python -m txt2img.training folder --data" in card


def test_folder_run_is_deterministic_for_a_seed(folder_run, tmp_path: Path) -> None:
    out, _ = folder_run
    argv = ["folder", "--data", str(out.parent / "data"), "--out", str(tmp_path), "--size", str(SIZE)]
    assert command.main([*argv, "--tiny", "--quiet"]) == 0
    first = VAEDecoder.from_pretrained(out / "model" / "vae").state_dict()
    again = VAEDecoder.from_pretrained(tmp_path / "model" / "vae").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    first_gan = Txt2ImgPipeline.from_pretrained(out / "model").gan.state_dict()
    again_gan = Txt2ImgPipeline.from_pretrained(tmp_path / "model").gan.state_dict()
    assert all(torch.equal(first_gan[k], again_gan[k]) for k in first_gan)


def test_caption_words_are_the_tokens_of_the_tokenizer_built_from_them() -> None:
    captions = ["A red Circle, on blue.", "a  red square!?", "Ünïcode ＦＵＬＬＷＩＤＴＨ"]
    words = caption_words(captions)
    assert words == sorted(set(words)) and "," in words and "circle" in words and "!?" in words
    tokenizer = build_word_tokenizer(words, max_length=16)
    for caption in captions:  # the tokenizer splits each caption into these words, and knows every one
        encoding = tokenizer.backend.encode(caption)
        assert encoding.tokens[1 : 1 + len(split_words(caption))] == split_words(caption)
        assert "[UNK]" not in encoding.tokens


def test_folder_recipe_is_the_shapes_recipe_but_where_it_relies_on_its_data() -> None:
    folder, shapes_recipe = FolderRecipe(), ShapesRecipe()
    assert shapes_recipe.vae_training.object_weight > 0 and folder.vae_training.object_weight == 0
    assert folder.vae_training.decoder_object_weight == 0
    assert folder.gan_training.lr_d == shapes_recipe.gan_training.lr_d / 2
    assert folder.gan_training.hard_negative_fraction == 1.0  # every mismatched caption another image's
    unchanged = (
        "checkpoint_every",
        "steps",
        "batch_size",
        "lr_g",
        "r1_gamma",
        "r1_every",
        "discriminator_width",
        "channels_last",
    )
    for name in unchanged:
        assert getattr(folder.gan_training, name) == getattr(shapes_recipe.gan_training, name), name
    assert folder.vae_training.steps == shapes_recipe.vae_training.steps
    assert folder.clip_training == shapes_recipe.clip_training
    assert folder.gan.channels == shapes_recipe.gan.channels
    assert folder.vae.block_out_channels == shapes_recipe.vae.block_out_channels
    # Sizes follow --size: the VAE's, and the generator's constant (latent side / 8).
    assert FolderRecipe(size=128).vae.sample_size == 128
    assert FolderRecipe(size=128).gan.const_size == 128 // 2 // 8


def test_mismatched_captions_are_never_the_images_own() -> None:
    captions = ["a", "b", "b", "c", "a"]
    negatives = other_captions(captions, np.random.default_rng(0))
    batch = ["a", "b", "c"] * 200
    drawn = negatives(batch)
    assert all(own != other for own, other in zip(batch, drawn))
    assert {other for own, other in zip(batch, drawn) if own == "a"} == {"b", "c"}  # both others drawn


@pytest.mark.parametrize("size", [40, 8, 0])
def test_folder_recipe_refuses_a_size_it_cannot_train(size: int) -> None:
    with pytest.raises(ValueError, match=f"size {size} is not a multiple of 16"):
        FolderRecipe(size=size)


def test_folder_command_reports_bad_input_without_a_traceback(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert command.main(["folder", "--data", str(tmp_path / "missing"), "--out", str(out), "--quiet"]) == 1
    assert f"error: {tmp_path / 'missing'} is not a folder of images" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert command.main(["folder", "--data", str(tmp_path / "empty"), "--out", str(out), "--quiet"]) == 1
    assert "is empty for training" in capsys.readouterr().err
    write_folder(tmp_path / "data", count=2)
    assert command.main(["folder", "--data", str(tmp_path / "data"), "--out", str(out), "--size", "40"]) == 1
    assert "size 40 is not a multiple of 16" in capsys.readouterr().err
    assert not out.exists()  # nothing written for a run that could not start
    (tmp_path / "data" / "01.txt").write_text("  ")
    assert command.main(["folder", "--data", str(tmp_path / "data"), "--out", str(out), "--tiny"]) == 1
    assert f"1 of the 2 images in {tmp_path / 'data'} have an empty caption" in capsys.readouterr().err
    (tmp_path / "data" / "01.txt").write_text((tmp_path / "data" / "00.txt").read_text())
    assert command.main(["folder", "--data", str(tmp_path / "data"), "--out", str(out), "--tiny"]) == 1
    assert "has the same caption" in capsys.readouterr().err
    assert not out.exists()


def test_long_captions_are_cut_once_to_what_the_text_encoder_reads(caplog) -> None:
    long = "a red circle, " * 40  # 160 tokens
    with caplog.at_level(logging.WARNING, logger="txt2img.training.folder_recipe"):
        fitted = fit_captions(["a blue square", long], max_tokens=75)
    assert fitted[0] == "a blue square"  # a caption that fits is kept as written
    assert split_words(fitted[1]) == split_words(long)[:75]
    assert "1 of the 2 captions are longer than the text encoder's 75 tokens" in caplog.text


def test_an_unreadable_image_stops_the_run_before_anything_is_written(tmp_path: Path, capsys) -> None:
    write_folder(tmp_path / "data", count=3)
    (tmp_path / "data" / "01.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    assert command.main(["folder", "--data", str(tmp_path / "data"), "--out", str(out), "--tiny"]) == 1
    assert f"Cannot read the image {tmp_path / 'data' / '01.png'}" in capsys.readouterr().err
    assert not out.exists()


def test_folder_command_reports_a_diverged_run_with_what_to_do(monkeypatch, capsys, tmp_path: Path) -> None:
    from txt2img.training import folder_recipe
    from txt2img.training.gan_training import TrainingDiverged

    def diverge(*args, **kwargs):
        raise TrainingDiverged("GAN training diverged at step 7: d = 1e+05")

    monkeypatch.setattr(folder_recipe, "train_folder", diverge)
    argv = ["folder", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--quiet"]
    assert command.main(argv) == 1
    err = capsys.readouterr().err
    assert "error: GAN training diverged at step 7" in err
    assert "--resume continues a run only with the settings it started with" in err


def test_folder_command_trains_a_finished_run_on_from_its_checkpoint(
    folder_run, tmp_path: Path, capsys
) -> None:
    first, captions = folder_run
    out = tmp_path / "run"
    shutil.copytree(first, out)  # a finished run: its checkpoint is at the tiny recipe's step 20
    assert read_extra(out / "checkpoint")["step"] == 20
    argv = ["folder", "--data", str(first.parent / "data"), "--out", str(out), "--size", str(SIZE), "--tiny"]
    assert command.main([*argv, "--resume", "--gan-steps", "30", "--quiet"]) == 0
    assert read_extra(out / "checkpoint")["step"] == 30
    # The VAE was reloaded, and the text encoder retrained to the same weights: only the GAN trained on.
    before, after = (
        Txt2ImgPipeline.from_pretrained(first / "model"),
        Txt2ImgPipeline.from_pretrained(out / "model"),
    )
    for name in ("vae", "text_encoder"):
        old, new = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert all(torch.equal(old[k], new[k]) for k in old), name
    old_gan, new_gan = before.gan.state_dict(), after.gan.state_dict()
    assert not all(torch.equal(old_gan[k], new_gan[k]) for k in old_gan)
    card = (out / "model" / "README.md").read_text()
    assert "--gan-steps 30" in card and "the last resumed at GAN step 20" in card
    after(captions[0], generator=torch.Generator().manual_seed(0))  # still a working pipeline


def test_folder_resume_refuses_another_folder_or_size_before_training(
    folder_run, tmp_path: Path, capsys
) -> None:
    first, _ = folder_run
    out = tmp_path / "run"
    shutil.copytree(first, out)
    checkpoint = (out / "checkpoint" / "tensors.safetensors").read_bytes()
    write_folder(tmp_path / "other")  # the same images and captions, in another folder
    argv = ["folder", "--out", str(out), "--tiny", "--quiet", "--resume", "--gan-steps", "30"]
    assert command.main([*argv, "--data", str(tmp_path / "other"), "--size", str(SIZE)]) == 1
    assert "recipe.json was written with other settings (data)" in capsys.readouterr().err
    assert command.main([*argv, "--data", str(first.parent / "data"), "--size", str(2 * SIZE)]) == 1
    assert "recipe.json was written with other settings (size, vae" in capsys.readouterr().err
    assert (out / "checkpoint" / "tensors.safetensors").read_bytes() == checkpoint  # nothing trained


def test_folder_resume_refuses_a_folder_whose_images_or_captions_changed(
    folder_run, tmp_path: Path, capsys
) -> None:
    first, _ = folder_run
    out, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(first, out)
    shutil.copytree(first.parent / "data", data)
    settings = json.loads((out / "recipe.json").read_text())
    (out / "recipe.json").write_text(json.dumps({**settings, "data": str(data.resolve())}))  # began on data
    # (Unchanged contents pass: test_folder_command_trains_a_finished_run_on_from_its_checkpoint.)
    argv = [
        "folder",
        "--data",
        str(data),
        "--out",
        str(out),
        "--size",
        str(SIZE),
        "--tiny",
        "--quiet",
        "--resume",
    ]
    (data / "03.txt").write_text("A small red circle on a white background.")
    assert command.main(argv) == 1
    error = capsys.readouterr().err
    assert "other settings (data_digest)" in error and "training data is not what the run began" in error
    (data / "03.txt").write_text((first.parent / "data" / "03.txt").read_text())
    Image.new("RGB", (64, 64), "white").save(data / "05.png")  # the caption back, an image changed
    assert command.main(argv) == 1
    assert "other settings (data_digest)" in capsys.readouterr().err
    assert (out / "checkpoint" / "tensors.safetensors").read_bytes() == (
        first / "checkpoint" / "tensors.safetensors"
    ).read_bytes()  # nothing trained
