"""The UNet generator against diffusers' ``UNet2DConditionModel``: same outputs on seeded random weights in
several small configurations, and the same state-dict keys and shapes at full size (built on the meta device)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel

from txt2img import GANGenerator
from txt2img.unet import UNetGenerator

# Each configuration exercises different options of the Stable Diffusion 1.x / 2.x family.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1-like": {
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 24,
        "attention_head_dim": (2, 4),
        "norm_num_groups": 8,
        "sample_size": 16,
    },
    "sd2-like, no mid block, only-cross-attention, upcast": {
        "block_out_channels": (16, 32, 32),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 24,
        "attention_head_dim": (2, 4, 4),
        "use_linear_projection": True,
        "only_cross_attention": (True, False, False),
        "transformer_layers_per_block": (1, 2, 1),
        "upcast_attention": True,
        "mid_block_type": None,
        "norm_num_groups": 8,
        "sample_size": 8,
    },
    "time-embedding options, scale-shift resnets": {
        "block_out_channels": (16, 32),
        "layers_per_block": (1, 2),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": (24, 24),
        "attention_head_dim": 2,
        "resnet_time_scale_shift": "scale_shift",
        "time_embedding_dim": 48,
        "timestep_post_act": "silu",
        "time_embedding_act_fn": "silu",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "mid_block_scale_factor": 1.414,
        "conv_in_kernel": 1,
        "conv_out_kernel": 1,
        "norm_num_groups": 8,
        "sample_size": 8,
    },
}

# The real configurations (diffusers defaults plus these keys).
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
SD21_UNET = {  # SD 2.1-base and SD-Turbo
    "sample_size": 64,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_unet_equals_diffusers(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**SMALL_CONFIGS[name]).eval()
    reference.save_pretrained(tmp_path)
    ours = GANGenerator.from_pretrained(tmp_path)  # the public loader picks the UNet architecture
    assert isinstance(ours, UNetGenerator)

    sample = torch.randn(2, 4, 12, 10)  # 10 is not a multiple of 4: skips set the upsampled sizes
    context = torch.randn(2, 7, 24)
    for timestep in (999.0, torch.tensor(499), torch.tensor([3.0, 700.0])):
        with torch.no_grad():
            expected = reference(sample, timestep, context).sample
            actual = ours(sample, timestep, context)
        assert actual.shape == expected.shape
        assert (actual - expected).abs().max().item() < 1e-4, (name, timestep)


@pytest.mark.parametrize("overrides", [SD15_UNET, SD21_UNET], ids=["sd-1.5", "sd-2.1/sd-turbo"])
def test_full_size_unet_keys_and_shapes_equal_diffusers(overrides: dict[str, Any]) -> None:
    with torch.device("meta"):
        reference = UNet2DConditionModel(**overrides)
        config = UNetGenerator.config_from_dict(dict(reference.config))
        ours = UNetGenerator(config)  # type: ignore[arg-type]
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert actual == expected
    assert len(actual) > 600  # the full network, not an empty shell


def test_unet_round_trips_through_txt2img_layout(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = UNet2DConditionModel(**SMALL_CONFIGS["sd1-like"]).eval()
    reference.save_pretrained(tmp_path / "diffusers")
    ours = GANGenerator.from_pretrained(tmp_path / "diffusers")
    ours.save_pretrained(tmp_path / "ours")
    again = GANGenerator.from_pretrained(tmp_path / "ours")
    assert isinstance(again, UNetGenerator)
    assert again.scheduler == ours.scheduler
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 24)
    with torch.no_grad():
        assert torch.equal(ours(sample, 999, context), again(sample, 999, context))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("addition_embed_type", "text_time", "SDXL"),
        ("class_embed_type", "timestep", "class_embed_type"),
        ("time_cond_proj_dim", 256, "time_cond_proj_dim"),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"], "SimpleCrossAttnDownBlock2D"),
    ],
)
def test_unsupported_unet_options_are_refused_by_name(key: str, value: Any, message: str) -> None:
    data = {"_class_name": "UNet2DConditionModel", **SMALL_CONFIGS["sd1-like"], key: value}
    with pytest.raises(ValueError, match=message):
        UNetGenerator.config_from_dict(data, source="unet/config.json")
