"""Training on a folder of captioned images: the command, what it writes, and its errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from txt2img import Txt2ImgPipeline, VAEDecoder
from txt2img.training import __main__ as command
from txt2img.training import shapes
from txt2img.training.folder_recipe import FolderRecipe, caption_words, fit_captions, split_words

SIZE = 32


def write_folder(folder: Path, count: int = 12) -> list[str]:
    """Shapes-64 renderings with a ``.txt`` caption beside each (capitalised, with a full stop)."""
    folder.mkdir()
    images, captions, _ = shapes.sample_batch(np.random.default_rng(0), count, canonical=True)
    pixels = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    written = []
    for i, (image, caption) in enumerate(zip(pixels, captions)):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
        written.append(caption.capitalize() + ".")
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


def test_caption_words_split_as_the_tokenizer_does() -> None:
    assert caption_words(["A red Circle, on blue.", "a  red square"]) == [
        ",",
        ".",
        "a",
        "blue",
        "circle",
        "on",
        "red",
        "square",
    ]


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


def test_long_captions_are_cut_once_to_what_the_text_encoder_reads(caplog) -> None:
    long = "a red circle, " * 40  # 160 words
    with caplog.at_level(logging.WARNING, logger="txt2img.training.folder_recipe"):
        fitted = fit_captions(["a blue square", long], max_words=75)
    assert fitted[0] == "a blue square"  # a caption that fits is kept as written
    assert split_words(fitted[1]) == split_words(long)[:75]
    assert "1 of the 2 captions are longer than the text encoder's 75 words" in caplog.text


def test_an_unreadable_image_stops_the_run_before_anything_is_written(tmp_path: Path, capsys) -> None:
    write_folder(tmp_path / "data", count=3)
    (tmp_path / "data" / "01.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    assert command.main(["folder", "--data", str(tmp_path / "data"), "--out", str(out), "--tiny"]) == 1
    assert f"Cannot read the image {tmp_path / 'data' / '01.png'}" in capsys.readouterr().err
    assert not out.exists()
