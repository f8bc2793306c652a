"""Generation math as pure functions, tested without any model."""

from __future__ import annotations

import pytest
import torch

from txt2img.gan import normalize_2nd_moment, truncate
from txt2img.generation import draw_noise, seeded_generators
from txt2img.images import numpy_to_pil, to_unit_range
from txt2img.vae import scale_latents, unscale_latents

CPU = torch.device("cpu")


def test_draw_noise_matches_torch_randn_for_one_generator() -> None:
    noise = draw_noise((2, 3), torch.Generator().manual_seed(0), device=CPU, dtype=torch.float32)
    torch.testing.assert_close(
        noise, torch.randn((2, 3), generator=torch.Generator().manual_seed(0)), rtol=0, atol=0
    )


def test_draw_noise_with_a_generator_list_draws_each_sample_alone() -> None:
    noise = draw_noise((3, 4), seeded_generators([5, 6, 7]), device=CPU, dtype=torch.float32)
    for i, seed in enumerate([5, 6, 7]):
        expected = torch.randn((1, 4), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(noise[i : i + 1], expected, rtol=0, atol=0)


def test_draw_noise_rejects_a_generator_list_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        draw_noise((3, 4), seeded_generators([1, 2]), device=CPU, dtype=torch.float32)


def test_latent_scaling_round_trips() -> None:
    raw = torch.randn(2, 4, 3, 3)
    for shift in (None, 0.1159):
        scaled = scale_latents(raw, 0.3611, shift)
        torch.testing.assert_close(unscale_latents(scaled, 0.3611, shift), raw)
    torch.testing.assert_close(scale_latents(raw, 0.5, None), raw * 0.5)


def test_truncate_interpolates_toward_the_center() -> None:
    w, center = torch.tensor([[2.0, 4.0]]), torch.tensor([[0.0, 2.0]])
    torch.testing.assert_close(truncate(w, center, 0.5), torch.tensor([[1.0, 3.0]]))
    assert truncate(w, center, 1.0) is w


def test_normalize_2nd_moment_gives_unit_rms() -> None:
    x = normalize_2nd_moment(torch.randn(4, 16) * 7)
    torch.testing.assert_close(x.square().mean(1), torch.ones(4))


def test_unit_range_and_pil_conversion() -> None:
    images = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    unit = to_unit_range(images)
    assert unit[0, 0, 0].tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    pil = numpy_to_pil(unit.permute(0, 2, 3, 1).numpy())[0]
    assert [pil.getpixel((x, 0))[0] for x in range(5)] == [0, 0, 128, 255, 255]
