"""TinyVAEDecoder (TAESD's decoder) against diffusers' AutoencoderTiny: loading its folders, equal outputs,
equal parameter names and shapes at full size, and our own save → load round trip."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny

from txt2img.vae import VAEDecoder
from txt2img.vae_tiny import TinyVAEConfig, TinyVAEDecoder

# Small encoders: only the decoder is compared, but diffusers builds (and saves) both.
# Default init leaves the decoder's output nearly constant; this spreads it to unit scale.
SPREAD = 1.5
SMALL_ENCODER = {"encoder_block_out_channels": (4, 4), "num_encoder_blocks": (1, 1)}

# (AutoencoderTiny keyword arguments, latent (h, w))
DIFFUSERS_CONFIGS = {
    "relu-4-stages": (
        {**SMALL_ENCODER, "decoder_block_out_channels": (8, 8, 8, 8), "num_decoder_blocks": (1, 1, 1, 1)},
        (3, 5),
    ),
    "silu-bilinear-scaled": (
        {
            **SMALL_ENCODER,
            "decoder_block_out_channels": (12, 12, 12),
            "num_decoder_blocks": (2, 1, 2),
            "act_fn": "silu",
            "upsample_fn": "bilinear",
            "latent_channels": 3,
            "scaling_factor": 0.5,
        },
        (4, 4),
    ),
    "gelu-x3-shifted": (
        {
            **SMALL_ENCODER,
            "decoder_block_out_channels": (6, 6),
            "num_decoder_blocks": (1, 2),
            "act_fn": "GELU",
            "upsampling_scaling_factor": 3,
            "scaling_factor": 1.5,
            "shift_factor": 0.25,
        },
        (2, 3),
    ),
    "taesd-defaults": ({}, (2, 2)),
}


def save_diffusers_tiny(kwargs: dict, folder: Path, seed: int = 0) -> AutoencoderTiny:
    torch.manual_seed(seed)
    model = AutoencoderTiny(**kwargs).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(SPREAD)
    model.save_pretrained(folder)
    return model


def reference_decode(model: AutoencoderTiny, latents: torch.Tensor) -> torch.Tensor:
    """What a diffusers pipeline gets: SD divides by scaling_factor, SD3 / Flux also add shift_factor."""
    raw = latents / model.config.scaling_factor + model.config.shift_factor
    return model.decode(raw).sample


@pytest.mark.parametrize("name", DIFFUSERS_CONFIGS)
def test_decode_equals_diffusers(name: str, tmp_path: Path) -> None:
    kwargs, (h, w) = DIFFUSERS_CONFIGS[name]
    reference = save_diffusers_tiny(kwargs, tmp_path)
    ours = TinyVAEDecoder.from_pretrained(tmp_path)
    assert ours.config.scaling_factor == reference.config.scaling_factor
    assert ours.config.shift_factor == reference.config.shift_factor

    generator = torch.Generator().manual_seed(1)
    latents = 2 * torch.randn(2, ours.config.latent_channels, h, w, generator=generator)
    with torch.no_grad():
        expected = reference_decode(reference, latents)
        actual = ours.decode(latents)
    f = ours.scale_factor
    assert actual.shape == expected.shape == (2, 3, h * f, w * f)
    assert expected.std() > 0.1  # the comparison means something
    assert (actual - expected).abs().max().item() < 1e-4


def test_scaling_factor_divides_the_latents(tmp_path: Path) -> None:
    kwargs, _ = DIFFUSERS_CONFIGS["silu-bilinear-scaled"]
    reference = save_diffusers_tiny(kwargs, tmp_path)
    ours = TinyVAEDecoder.from_pretrained(tmp_path)
    latents = torch.randn(1, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unscaled = reference.decode(latents).sample  # forgetting the division gives something else
        assert (ours.decode(latents) - unscaled).abs().max() > 1e-2
        assert torch.allclose(ours.decode(latents * 0.5), unscaled, atol=1e-5)


def test_scale_factor_is_pixels_per_latent_pixel() -> None:
    assert TinyVAEDecoder(TinyVAEConfig()).scale_factor == 8
    three_stages = TinyVAEConfig(decoder_block_out_channels=(8, 8, 8), num_decoder_blocks=(1, 1, 1))
    assert three_stages.scale_factor == 4
    by_three = TinyVAEConfig(
        decoder_block_out_channels=(8, 8), num_decoder_blocks=(1, 1), upsampling_scaling_factor=3
    )
    assert by_three.scale_factor == 3


def test_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = TinyVAEConfig(
        decoder_block_out_channels=(8, 8, 8),
        num_decoder_blocks=(1, 2, 1),
        act_fn="mish",
        scaling_factor=0.7,
        shift_factor=0.1,
    )
    model = TinyVAEDecoder(config).eval()
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["_class_name"] == "TinyVAEDecoder"
    assert not any(key.startswith("encoder.") for key in model.state_dict())

    loaded = TinyVAEDecoder.from_pretrained(tmp_path)
    assert loaded.config == config
    assert model.state_dict().keys() == loaded.state_dict().keys()
    latents = torch.randn(1, 4, 3, 2)
    with torch.no_grad():
        assert torch.equal(model.decode(latents), loaded.decode(latents))


def test_full_size_parameter_names_and_shapes_equal_diffusers() -> None:
    with torch.device("meta"):
        reference = AutoencoderTiny()  # TAESD's config
        ours = TinyVAEDecoder(TinyVAEConfig())
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if k.startswith("decoder.")}
    actual = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert actual == expected
    assert (
        len(actual) == 2 + 10 * 3 * 2 + 3 + 2
    )  # conv_in, 10 blocks of 3 convs, 3 stage convs without bias, conv_out
    assert TinyVAEDecoder.checkpoint_key("encoder.layers.0.weight") is None
    assert TinyVAEDecoder.checkpoint_key("decoder.layers.0.weight") == "decoder.layers.0.weight"


def test_diffusers_config_keys_are_read_and_encoder_keys_ignored_silently(tmp_path: Path, caplog) -> None:
    kwargs, _ = DIFFUSERS_CONFIGS["gelu-x3-shifted"]
    save_diffusers_tiny(kwargs, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["_class_name"] == "AutoencoderTiny"
    with caplog.at_level(logging.WARNING):
        config = TinyVAEDecoder.config_from_dict(data)
    assert caplog.records == []
    assert config == TinyVAEConfig(
        decoder_block_out_channels=(6, 6),
        num_decoder_blocks=(1, 2),
        act_fn="GELU",
        upsampling_scaling_factor=3,
        scaling_factor=1.5,
        shift_factor=0.25,
    )


def test_null_scaling_factor_means_diffusers_default() -> None:
    assert TinyVAEDecoder.config_from_dict({"scaling_factor": None}).scaling_factor == 1.0


def test_vae_decoder_hands_tiny_folders_to_tiny_vae_decoder(tmp_path: Path) -> None:
    kwargs, _ = DIFFUSERS_CONFIGS["relu-4-stages"]
    save_diffusers_tiny(kwargs, tmp_path / "diffusers")
    TinyVAEDecoder(TinyVAEConfig(decoder_block_out_channels=(4,), num_decoder_blocks=(1,))).save_pretrained(
        tmp_path / "ours"
    )
    assert type(VAEDecoder.from_pretrained(tmp_path / "diffusers")) is TinyVAEDecoder
    assert type(VAEDecoder.from_pretrained(tmp_path / "ours")) is TinyVAEDecoder


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("act_fn", "tanh"),
        ("upsample_fn", "linear"),
        ("decoder_block_out_channels", [8, 16, 16, 16]),
        ("num_decoder_blocks", [1, 1]),
        ("upsampling_scaling_factor", 0),
        ("upsampling_scaling_factor", 2.5),
        ("latent_channels", "four"),
    ],
)
def test_unsupported_config_values_raise_naming_the_key(key: str, value: object) -> None:
    data = {"_class_name": "AutoencoderTiny", "decoder_block_out_channels": [8, 8, 8, 8], key: value}
    with pytest.raises(ValueError, match=key):
        TinyVAEDecoder.config_from_dict(data)


def test_another_class_name_is_refused(tmp_path: Path) -> None:
    TinyVAEDecoder(TinyVAEConfig(decoder_block_out_channels=(4,), num_decoder_blocks=(1,))).save_pretrained(
        tmp_path
    )
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="AutoencoderKL"):
        TinyVAEDecoder.from_pretrained(tmp_path)


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (4, 4, 4), (1, 1, 4, 4, 4)])
def test_wrong_latent_shape_raises(shape: tuple[int, ...]) -> None:
    model = TinyVAEDecoder(TinyVAEConfig(decoder_block_out_channels=(4, 4), num_decoder_blocks=(1, 1)))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        model.decode(torch.randn(shape))
