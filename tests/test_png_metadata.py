"""Generation parameters in PNG files: the "parameters" text, ``output.save``, ``read_png_metadata`` and
``txt2img --from-png``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from txt2img import Txt2ImgPipeline, Txt2ImgPipelineOutput, __version__
from txt2img.cli import main
from txt2img.generation import reproducible_seeds
from txt2img.utils import EMBEDDED_MODEL_NAME, GenerationParameters, read_png_metadata, save_png

# ---------------------------------------------------------------------------------------------------------
# The text


def test_text_has_the_prompt_then_the_pairs() -> None:
    params = GenerationParameters(
        "a red circle", seed=0, width=64, height=48, steps=1, model="org/m", version="v"
    )
    assert params.to_text() == "a red circle\nSteps: 1, Seed: 0, Size: 64x48, Model: org/m, Version: v"


@pytest.mark.parametrize(
    "params",
    [
        GenerationParameters(
            "a red circle", seed=3, width=64, height=64, steps=1, model="m", version="txt2img 0.1.0"
        ),
        GenerationParameters(
            'a circle, red: "big"\nsecond line',
            seed=2**31 - 1,
            width=512,
            height=256,
            steps=4,
            model='C:\\models\\a, "b"',
            truncation_psi=0.7,
            version="txt2img 0.1.0",
            extra={"Sampler": "Euler a", "Note": "x: y, z"},
        ),
        GenerationParameters("", steps=1, width=8, height=8, version="v"),
    ],
)
def test_text_round_trips(params: GenerationParameters) -> None:
    assert GenerationParameters.from_text(params.to_text()) == params


def test_reads_another_tools_parameters() -> None:
    text = (
        "masterpiece, a cat\n"
        "Negative prompt: blurry, ugly\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: abc123, Model: v1-5, "
        'Lora hashes: "a: 1, b: 2", Version: v1.6.0'
    )
    params = GenerationParameters.from_text(text)
    assert (params.prompt, params.steps, params.seed, params.width, params.height) == (
        "masterpiece, a cat",
        20,
        1234,
        512,
        768,
    )
    assert params.model == "v1-5" and params.version == "v1.6.0"
    assert params.extra == {
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Model hash": "abc123",
        "Lora hashes": "a: 1, b: 2",
        "Negative prompt": "blurry, ugly",
    }


def test_text_without_pairs_is_all_prompt() -> None:
    assert GenerationParameters.from_text("a cat\non a mat") == GenerationParameters("a cat\non a mat")


@pytest.mark.parametrize(
    ("line", "key"), [("Steps: x, Seed: 1, Size: 2x2", "Steps"), ("Steps: 1, Seed: 1, Size: big", "Size")]
)
def test_malformed_numbers_name_the_key(line: str, key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}' value"):
        GenerationParameters.from_text(f"a cat\n{line}")


def test_read_png_metadata_without_a_chunk_or_image(tmp_path: Path) -> None:
    Image.new("RGB", (2, 2)).save(tmp_path / "plain.png")
    assert read_png_metadata(tmp_path / "plain.png") is None
    (tmp_path / "not.png").write_text("hello")
    with pytest.raises(OSError):
        read_png_metadata(tmp_path / "not.png")


# ---------------------------------------------------------------------------------------------------------
# Seeds and the pipeline output


def test_reproducible_seeds() -> None:
    fresh = [torch.Generator().manual_seed(s) for s in (5, 6)]
    assert reproducible_seeds(fresh, 2) == [5, 6]
    assert reproducible_seeds(torch.Generator().manual_seed(7), 3) == [7, None, None]
    assert reproducible_seeds([torch.Generator().manual_seed(7)], 2) == [7, None]
    assert reproducible_seeds(None, 2) == [None, None]
    used = torch.Generator().manual_seed(8)
    torch.randn(1, generator=used)
    assert reproducible_seeds(used, 1) == [None]


def test_output_carries_parameters_and_saves_them(saved_pipeline: Path, tmp_path: Path) -> None:
    pipe = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in (11, 12)]
    output = pipe(["a red circle", "a blue square"], generator=generators, height=32, width=64)
    assert [(p.prompt, p.seed, p.width, p.height, p.steps) for p in output.parameters or []] == [
        ("a red circle", 11, 64, 32, 1),
        ("a blue square", 12, 64, 32, 1),
    ]
    paths = output.save(tmp_path / "sub" / "img-{i}.png")
    assert paths == [tmp_path / "sub" / "img-0.png", tmp_path / "sub" / "img-1.png"]
    for image, params, path in zip(output.images, output.parameters or [], paths, strict=True):
        with Image.open(path) as written:
            np.testing.assert_array_equal(np.asarray(written), np.asarray(image))
        assert read_png_metadata(path) == params
        assert params.model == str(saved_pipeline) and params.version == f"txt2img {__version__}"


def test_save_without_metadata_and_from_other_output_types(pipe: Txt2ImgPipeline, tmp_path: Path) -> None:
    def run(output_type: str) -> Txt2ImgPipelineOutput:
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type=output_type)

    pil = run("pil")
    (reference,) = pil.save(tmp_path / "pil.png")
    assert (
        read_png_metadata(reference) is not None and read_png_metadata(reference).model is None
    )  # built in memory
    for output_type in ("np", "pt"):
        (path,) = run(output_type).save(tmp_path / f"{output_type}.png", metadata=False)
        assert read_png_metadata(path) is None
        with Image.open(path) as a, Image.open(reference) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="latents, not images"):
        run("latent").save(tmp_path / "latent.png")


def test_prompt_embeds_call_has_no_parameters(pipe: Txt2ImgPipeline) -> None:
    output = pipe(
        prompt_embeds=pipe.encode_prompt("a red circle"), generator=torch.Generator().manual_seed(0)
    )
    assert output.parameters is None


def test_jupyter_shows_a_grid(pipe: Txt2ImgPipeline) -> None:
    output = pipe("a red circle", num_images_per_prompt=4, generator=torch.Generator().manual_seed(0))
    with Image.open(io.BytesIO(output._repr_png_() or b"")) as shown:
        assert shown.size == (64, 64)  # 2 × 2 images of 32 × 32
        np.testing.assert_array_equal(np.asarray(shown)[32:, :32], np.asarray(output.images[2]))
    latent = pipe("a red circle", output_type="latent", generator=torch.Generator().manual_seed(0))
    assert latent._repr_png_() is None


# ---------------------------------------------------------------------------------------------------------
# txt2img --from-png


def test_from_png_makes_the_embedded_models_image_again_byte_for_byte(tmp_path: Path, capsys) -> None:
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    prompt = "a large red circle in the top left corner on a blue background"
    assert main([prompt, "-o", str(first), "--seed", "5", "--quiet"]) == 0
    params = read_png_metadata(first)
    assert params is not None
    assert (params.prompt, params.seed, params.model) == (prompt, 5, EMBEDDED_MODEL_NAME)
    assert main(["--from-png", str(first), "-o", str(again), "--quiet"]) == 0
    assert capsys.readouterr().out.split() == [str(first), str(again)]
    assert again.read_bytes() == first.read_bytes()


def test_from_png_keeps_size_and_takes_overrides(saved_pipeline: Path, tmp_path: Path) -> None:
    first = tmp_path / "first.png"
    model = ["--model", str(saved_pipeline), "--quiet"]
    assert (
        main(["a red circle", "-o", str(first), "--seed", "1", "--height", "64", "--width", "32", *model])
        == 0
    )
    assert main(["--from-png", str(first), "-o", str(tmp_path / "same.png"), "--quiet"]) == 0
    assert (tmp_path / "same.png").read_bytes() == first.read_bytes()
    assert main(["--from-png", str(first), "-o", str(tmp_path / "other.png"), "--seed", "2", "--quiet"]) == 0
    other = read_png_metadata(tmp_path / "other.png")
    assert other is not None and (other.seed, other.width, other.height, other.prompt) == (
        2,
        32,
        64,
        "a red circle",
    )


def test_from_png_errors(tmp_path: Path, capsys) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (2, 2)).save(plain)
    no_seed = tmp_path / "no-seed.png"
    params = GenerationParameters("a red circle", steps=1, width=64, height=64, model=EMBEDDED_MODEL_NAME)
    save_png(Image.new("RGB", (2, 2)), no_seed, params)
    cases = [
        (["--from-png", str(tmp_path / "missing.png")], "cannot read it"),
        (["--from-png", str(plain)], "no 'parameters' text chunk"),
        (["--from-png", str(no_seed)], "records no seed"),
        (
            ["--from-png", str(no_seed), "--seed", "1", "-o", str(no_seed)],
            "would overwrite the --from-png file",
        ),
        (["a red circle", "-o", str(tmp_path / "x.jpg")], "does not end in .png"),
        ([], "the prompt is empty"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err, argv
