"""End to end against diffusers: a Stable Diffusion pipeline with seeded random weights is saved in the diffusers
layout, loaded by ``Txt2ImgPipeline.from_pretrained``, and both libraries generate from the same prompt and
seed. Each supported scheduler type at 1 and 2 steps, with a KL decoder and with a tiny (TAESD) decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tiny import write_clip_vocab
from txt2img import Txt2ImgPipeline
from txt2img.unet import UNetGenerator
from txt2img.vae import VAEDecoder
from txt2img.vae_tiny import TinyVAEDecoder

TOLERANCE = 2e-3
PROMPTS = ["a red circle", "two blue squares on a green field"]
SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "lcm": LCMScheduler,
    "ddpm": DDPMScheduler,
}
SD_SCHEDULER = {  # Stable Diffusion's noise schedule with the one-step models' trailing timesteps
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


def build_components(
    vae_kind: str, *, hidden_act: str = "quick_gelu", pad_token: str = "<|endoftext|>"
) -> dict[str, Any]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
        sample_size=8,
    )
    if vae_kind == "kl":
        vae: torch.nn.Module = AutoencoderKL(
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=64,
        )
    else:
        vae = AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
        )
    text_config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return {"unet": unet, "vae": vae, "text_config": text_config, "pad_token": pad_token}


def save_diffusers_pipeline(
    folder: Path, parts: dict[str, Any], scheduler: str, *, legacy_tokenizer: bool = False
) -> StableDiffusionPipeline:
    """Save a diffusers pipeline of ``parts`` to ``folder/model``; ``legacy_tokenizer`` keeps only the
    ``vocab.json`` + ``merges.txt`` files that the published Stable Diffusion repos hold, no ``tokenizer.json``."""
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(parts["text_config"]).eval()
    vocab, merges = write_clip_vocab(folder / "vocab")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77, pad_token=parts["pad_token"])
    pipe = StableDiffusionPipeline(
        vae=parts["vae"].eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=parts["unet"].eval(),
        scheduler=SCHEDULERS[scheduler].from_config(SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "model")
    if legacy_tokenizer:
        (folder / "model" / "tokenizer" / "tokenizer.json").unlink()
        for path in (vocab, merges):
            (folder / "model" / "tokenizer" / path.name).write_bytes(path.read_bytes())
    return pipe


def run_both(
    reference: StableDiffusionPipeline, ours: Txt2ImgPipeline, steps: int, output_type: str, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
    expected = reference(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(7),
        output_type=output_type,
        **kwargs,
    ).images
    actual = ours(
        PROMPTS,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(7),
        output_type=output_type,
    ).images
    return np.asarray(expected), np.asarray(actual)


@pytest.fixture(scope="module", params=["kl", "tiny"])
def components(request: pytest.FixtureRequest) -> dict[str, Any]:
    parts = build_components(request.param)
    parts["kind"] = request.param
    return parts


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_pipeline_equals_diffusers(
    components: dict[str, Any], scheduler: str, steps: int, tmp_path: Path
) -> None:
    reference = save_diffusers_pipeline(tmp_path, components, scheduler)
    ours = Txt2ImgPipeline.from_pretrained(tmp_path / "model")
    ours.set_progress_bar_config(disable=True)
    assert isinstance(ours.gan, UNetGenerator)
    assert isinstance(ours.vae, VAEDecoder if components["kind"] == "kl" else TinyVAEDecoder)
    assert ours.gan.scheduler.kind == SCHEDULERS[scheduler].__name__

    for output_type in ("latent", "np"):
        expected, actual = run_both(reference, ours, steps, output_type)
        assert actual.shape == expected.shape
        assert np.abs(actual - expected).max() < TOLERANCE, (scheduler, steps, output_type)
    assert expected.shape == (2, 64, 64, 3)
    assert expected.std() > 0.01  # a real image, not a constant


def test_sd2_text_encoder_and_clip_skip_equal_diffusers(tmp_path: Path) -> None:
    """Stable Diffusion 2's text tower: gelu activations and '!' padding; and clip_skip."""
    parts = build_components("kl", hidden_act="gelu", pad_token="!")
    reference = save_diffusers_pipeline(tmp_path, parts, "euler", legacy_tokenizer=True)
    ours = Txt2ImgPipeline.from_pretrained(tmp_path / "model")
    ours.set_progress_bar_config(disable=True)
    expected, actual = run_both(reference, ours, 1, "latent")
    assert np.abs(actual - expected).max() < TOLERANCE

    ours.text_encoder.config.clip_skip = 1
    # diffusers reaches the final norm as text_encoder.text_model.final_layer_norm, which transformers 5 moved
    # to the model itself: point the old name at it (without registering a submodule cycle).
    if not hasattr(reference.text_encoder, "text_model"):
        object.__setattr__(reference.text_encoder, "text_model", reference.text_encoder)
    skipped_expected, skipped_actual = run_both(reference, ours, 1, "latent", clip_skip=1)
    assert np.abs(skipped_actual - skipped_expected).max() < TOLERANCE
    assert np.abs(skipped_expected - expected).max() > 1e-3  # clip_skip changes the result


def test_swapped_decoder_and_txt2img_layout_round_trip(tmp_path: Path) -> None:
    """A diffusers pipeline with its KL decoder swapped for a tiny one, then saved in txt2img's layout."""
    kl_parts = build_components("kl")
    reference = save_diffusers_pipeline(tmp_path / "kl", kl_parts, "euler")
    tiny = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()
    tiny.save_pretrained(tmp_path / "taesd")
    reference.vae = tiny

    ours = Txt2ImgPipeline.from_pretrained(
        tmp_path / "kl" / "model", vae=VAEDecoder.from_pretrained(tmp_path / "taesd")
    )
    ours.set_progress_bar_config(disable=True)
    expected, actual = run_both(reference, ours, 1, "np")
    assert np.abs(actual - expected).max() < TOLERANCE

    ours.save_pretrained(tmp_path / "saved")
    again = Txt2ImgPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    assert isinstance(again.gan, UNetGenerator) and isinstance(again.vae, TinyVAEDecoder)
    _, reloaded = run_both(reference, again, 1, "np")
    assert np.array_equal(reloaded, actual)


# ---------------------------------------------------------------------------------------------------------
# The KL decoder and the text encoder alone


@pytest.mark.parametrize(
    "config",
    [
        {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4},
        {
            "block_out_channels": (8, 16, 16),
            "layers_per_block": 2,
            "norm_num_groups": 8,
            "scaling_factor": 0.13025,
            "mid_block_add_attention": False,
            "use_post_quant_conv": False,
        },
        {
            "block_out_channels": (8, 16),
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "shift_factor": 0.1159,
            "scaling_factor": 0.3611,
        },
    ],
    ids=["sd-like", "sdxl-like-no-mid-attention-no-post-quant-conv", "with-shift"],
)
def test_kl_decoder_equals_diffusers(config: dict[str, Any], tmp_path: Path) -> None:
    n = len(config["block_out_channels"])
    torch.manual_seed(0)
    reference = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **config
    ).eval()
    reference.save_pretrained(tmp_path)
    ours = VAEDecoder.from_pretrained(tmp_path)  # the encoder's weights in the file are skipped
    latents = torch.randn(2, 4, 8, 6)
    scaling = reference.config.scaling_factor
    raw = latents / scaling + (reference.config.shift_factor or 0.0)
    with torch.no_grad():
        expected = reference.decode(raw).sample
        actual = ours.decode(latents)
    assert (actual - expected).abs().max().item() < 1e-4
    if "scaling_factor" not in config:
        assert ours.config.scaling_factor == 0.18215  # diffusers' default when the config lacks it


def test_full_size_vae_and_text_encoder_keys_and_shapes_equal_diffusers() -> None:
    from txt2img.clip_text import CLIPTextConfig as NativeCLIPTextConfig
    from txt2img.clip_text import CLIPTextModel as NativeCLIPTextModel

    sd2_text = CLIPTextConfig(  # Stable Diffusion 2's OpenCLIP ViT-H text tower, penultimate layer kept
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=23,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=512,
    )
    with torch.device("meta"):
        for vae_config in ({}, {"scaling_factor": 0.13025, "force_upcast": True}):  # SD, SDXL
            reference = AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2,
                latent_channels=4,
                **vae_config,
            )
            ours = VAEDecoder(VAEDecoder.config_from_dict(dict(reference.config)))
            expected = {
                k: tuple(v.shape) for k, v in reference.state_dict().items() if VAEDecoder.checkpoint_key(k)
            }
            assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
            assert ours.config.scaling_factor == reference.config.scaling_factor
        text_reference = CLIPTextModel(sd2_text)
        text_ours = NativeCLIPTextModel(
            NativeCLIPTextConfig.from_transformers_dict(sd2_text.to_dict(), source="sd2")
        )
    expected = {k.removeprefix("text_model."): tuple(v.shape) for k, v in text_reference.state_dict().items()}
    expected.pop("embeddings.position_ids", None)
    assert {k: tuple(v.shape) for k, v in text_ours.state_dict().items()} == expected


# ---------------------------------------------------------------------------------------------------------
# A diffusers repo on the Hub, and the CLI


def test_diffusers_repo_from_the_hub_fetches_only_what_it_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from hub_server import serve_hub

    reference = save_diffusers_pipeline(tmp_path, build_components("tiny"), "euler", legacy_tokenizer=True)
    repo = tmp_path / "model"
    # What such repos also hold: a safety checker, precision variants, pickle weights, a second decoder.
    for extra in (
        "safety_checker/config.json",
        "feature_extractor/preprocessor_config.json",
        "vae_large/config.json",
    ):
        (repo / extra).parent.mkdir(exist_ok=True)
        (repo / extra).write_text("{}")
    (repo / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"\0" * 64)
    (repo / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle: never to be downloaded")

    with serve_hub(monkeypatch, tmp_path / "hf-home") as hub:
        hub.add_revision("org/sd-tiny", repo)
        ours = Txt2ImgPipeline.from_pretrained("org/sd-tiny")
        downloaded = hub.downloaded_files("org/sd-tiny")

    assert {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    } <= downloaded
    assert not [
        f for f in downloaded if f.startswith(("safety_checker/", "feature_extractor/", "vae_large/"))
    ]
    assert not [f for f in downloaded if f.endswith((".bin", ".fp16.safetensors"))]
    ours.set_progress_bar_config(disable=True)
    expected, actual = run_both(reference, ours, 1, "np")
    assert np.abs(actual - expected).max() < TOLERANCE


def test_cli_runs_a_diffusers_folder_with_steps(tmp_path: Path) -> None:
    from PIL import Image

    from txt2img.cli import main
    from txt2img.utils import read_png_metadata

    reference = save_diffusers_pipeline(tmp_path, build_components("kl"), "lcm")
    out = tmp_path / "out.png"
    status = main(
        [
            PROMPTS[0],
            "--model",
            str(tmp_path / "model"),
            "--steps",
            "2",
            "--seed",
            "3",
            "-o",
            str(out),
            "--quiet",
        ]
    )
    assert status == 0
    expected = reference(
        PROMPTS[0],
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images[0]
    written = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert np.abs(written - expected).max() <= 1 / 255 + TOLERANCE  # 8-bit rounding
    assert read_png_metadata(out).steps == 2
