"""The pipeline's call: determinism, batches, output types, threads, argument checks, save → load."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from txt2img import Txt2ImgPipeline, Txt2ImgPipelineOutput


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def np_images(pipe: Txt2ImgPipeline, prompt, **kwargs) -> np.ndarray:
    return pipe(prompt, output_type="np", **kwargs).images


def test_default_call_returns_pil_images_of_native_size(pipe: Txt2ImgPipeline) -> None:
    out = pipe("a red circle", generator=gen(0))
    assert isinstance(out, Txt2ImgPipelineOutput)
    assert len(out.images) == 1
    image = out.images[0]
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB" and image.size == (32, 32)


def test_output_types_agree(pipe: Txt2ImgPipeline) -> None:
    prompt = ["a red circle", "a blue square"]
    as_np = np_images(pipe, prompt, generator=gen(0))
    as_pt = pipe(prompt, generator=gen(0), output_type="pt").images
    as_pil = pipe(prompt, generator=gen(0), output_type="pil").images
    latents = pipe(prompt, generator=gen(0), output_type="latent").images
    assert as_np.shape == (2, 32, 32, 3) and as_np.dtype == np.float32
    assert as_np.min() >= 0.0 and as_np.max() <= 1.0
    assert as_pt.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(as_pt.permute(0, 2, 3, 1).numpy(), as_np)
    np.testing.assert_array_equal(
        np.stack([np.asarray(im) for im in as_pil]), (as_np * 255).round().astype(np.uint8)
    )
    assert latents.shape == (2, 4, 16, 16)
    with torch.no_grad():
        decoded = (pipe.vae.decode(latents) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decoded, as_pt)


def test_return_dict_false_gives_a_tuple(pipe: Txt2ImgPipeline) -> None:
    (images,) = pipe("a", generator=gen(0), output_type="np", return_dict=False)
    np.testing.assert_array_equal(images, np_images(pipe, "a", generator=gen(0)))


def test_same_seed_same_image_different_seed_different_image(pipe: Txt2ImgPipeline) -> None:
    a = np_images(pipe, "a red circle", generator=gen(0))
    b = np_images(pipe, "a red circle", generator=gen(0))
    c = np_images(pipe, "a red circle", generator=gen(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_noise_is_drawn_on_the_cpu_from_the_callers_generator(pipe: Txt2ImgPipeline) -> None:
    noise = torch.randn(pipe.gan.noise_shape(1, 16, 16), generator=gen(5))
    np.testing.assert_array_equal(np_images(pipe, "a", generator=gen(5)), np_images(pipe, "a", latents=noise))


def test_image_i_of_a_batch_equals_its_seed_alone(pipe: Txt2ImgPipeline) -> None:
    prompts = ["a red circle", "a blue square", "a green triangle"]
    batch = np_images(pipe, prompts, generator=[gen(10), gen(11), gen(12)])
    for i, prompt in enumerate(prompts):
        alone = np_images(pipe, prompt, generator=gen(10 + i))
        np.testing.assert_allclose(batch[i], alone[0], atol=1e-5)


def test_num_images_per_prompt_repeats_each_prompt(pipe: Txt2ImgPipeline) -> None:
    images = np_images(pipe, ["a", "b"], num_images_per_prompt=2, generator=[gen(s) for s in range(4)])
    assert images.shape[0] == 4
    np.testing.assert_allclose(images[2], np_images(pipe, "b", generator=gen(2))[0], atol=1e-5)
    assert np.abs(images[0] - images[1]).max() > 1e-3  # same prompt, different noise


def test_prompt_embeds_skip_the_text_encoder(pipe: Txt2ImgPipeline) -> None:
    with torch.no_grad():
        embeds = pipe.encode_prompt(["a red circle"])
    np.testing.assert_array_equal(
        np_images(pipe, None, prompt_embeds=embeds, generator=gen(3)),
        np_images(pipe, "a red circle", generator=gen(3)),
    )


def test_height_and_width_change_the_size(pipe: Txt2ImgPipeline) -> None:
    assert np_images(pipe, "a", height=16, width=48, generator=gen(0)).shape == (1, 16, 48, 3)


def test_concurrent_calls_equal_serial_calls(pipe: Txt2ImgPipeline) -> None:
    prompts = [f"prompt {i}" for i in range(8)]
    serial = [
        np_images(pipe, p, generator=gen(i), num_images_per_prompt=1 + i % 2) for i, p in enumerate(prompts)
    ]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = np_images(pipe, prompts[i], generator=gen(i), num_images_per_prompt=1 + i % 2)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i, expected in enumerate(serial):
        np.testing.assert_array_equal(results[i], expected)


def test_progress_bar_can_be_switched_off(pipe: Txt2ImgPipeline, capsys, monkeypatch) -> None:
    pipe.set_progress_bar_config(disable=False)
    try:
        pipe("a", generator=gen(0))
        assert "txt2img" in capsys.readouterr().err
        monkeypatch.setenv("TXT2IMG_DISABLE_PROGRESS_BAR", "1")
        pipe("a", generator=gen(0))
        assert capsys.readouterr().err == ""
    finally:
        pipe.set_progress_bar_config(disable=True)
    pipe("a", generator=gen(0))
    assert capsys.readouterr().err == ""


def test_components_device_dtype(pipe: Txt2ImgPipeline) -> None:
    assert set(pipe.components) == {"text_encoder", "gan", "vae"}
    assert pipe.components["vae"] is pipe.vae
    assert pipe.device == torch.device("cpu")
    assert pipe.dtype == torch.float32


def test_to_casts_every_component(tmp_path: Path, saved_pipeline: Path) -> None:
    local = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    assert local.to(dtype="bfloat16") is local
    for component in local.components.values():
        assert {p.dtype for p in component.parameters()} == {torch.bfloat16}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            local.to("cuda")


# -- save / load ------------------------------------------------------------------------------------------


def test_pipeline_save_load_is_bit_exact(pipe: Txt2ImgPipeline, saved_pipeline: Path) -> None:
    loaded = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    for name, component in pipe.components.items():
        a, b = component.state_dict(), loaded.components[name].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    np.testing.assert_array_equal(
        np_images(pipe, "a red circle", generator=gen(0)), np_images(loaded, "a red circle", generator=gen(0))
    )


def test_saved_layout_and_model_card(saved_pipeline: Path) -> None:
    import json

    index = json.loads((saved_pipeline / "model_index.json").read_text())
    assert index["_class_name"] == "Txt2ImgPipeline"
    assert index["gan"] == ["txt2img", "GANGenerator"]
    assert index["vae"] == ["txt2img", "VAEDecoder"]
    assert index["text_encoder"] == ["txt2img", "TextEncoder"]
    for name, weights in [
        ("gan", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ]:
        assert (saved_pipeline / name / "config.json").is_file()
        assert (saved_pipeline / name / weights).is_file()
    card = (saved_pipeline / "README.md").read_text()
    front_matter = card.split("---")[1]
    assert "library_name: txt2img" in front_matter
    assert "pipeline_tag: text-to-image" in front_matter


def test_components_passed_as_keywords_replace_loaded_ones(saved_pipeline: Path) -> None:
    from tiny import make_vae

    other_vae = make_vae(seed=7)
    loaded = Txt2ImgPipeline.from_pretrained(saved_pipeline, vae=other_vae)
    assert loaded.vae is other_vae
    with pytest.raises(ValueError, match="Unknown components"):
        Txt2ImgPipeline.from_pretrained(saved_pipeline, unet=other_vae)


def test_component_replaced_even_when_its_folder_is_missing(saved_pipeline: Path, tmp_path: Path) -> None:
    import shutil

    from tiny import make_vae

    copy = tmp_path / "copy"
    shutil.copytree(saved_pipeline, copy)
    shutil.rmtree(copy / "vae")
    assert Txt2ImgPipeline.from_pretrained(copy, vae=make_vae()).vae is not None


# -- bad arguments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prompt": []}, ValueError, "empty list"),
        ({"prompt": None}, ValueError, "exactly one"),
        ({"prompt": 3}, TypeError, "string"),
        ({"prompt": ["a", 3]}, TypeError, "int"),
        ({"prompt": "a", "height": 30}, ValueError, "multiple of this model's factor 4: try 28 or 32"),
        ({"prompt": "a", "width": 0}, ValueError, "positive integer"),
        ({"prompt": "a", "height": -8}, ValueError, "positive integer"),
        ({"prompt": "a", "num_images_per_prompt": 0}, ValueError, "num_images_per_prompt"),
        ({"prompt": "a", "num_images_per_prompt": -1}, ValueError, "num_images_per_prompt"),
        ({"prompt": "a", "num_images_per_prompt": 1.5}, ValueError, "num_images_per_prompt"),
        ({"prompt": ["a", "b"], "generator": [torch.Generator()]}, ValueError, "1 generators for 2 images"),
        ({"prompt": "a", "generator": [torch.Generator()] * 3}, ValueError, "3 generators for 1 images"),
        ({"prompt": "a", "generator": 0}, TypeError, "torch.Generator"),
        ({"prompt": "a", "output_type": "jpeg"}, ValueError, "output_type"),
        ({"prompt": "a", "latents": torch.randn(1, 3)}, ValueError, "shape"),
        ({"prompt": "a", "truncation_psi": float("nan")}, ValueError, "truncation_psi"),
    ],
)
def test_bad_arguments_are_clear_errors(pipe: Txt2ImgPipeline, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        pipe(**kwargs)
