"""The shared convolutional layers: the transposed upsampling convolution equals upsample-then-convolve."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from txt2img.layers import Upsample, transposed_upsample_weights


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("channels", "height", "width"), [(3, 5, 7), (16, 8, 8), (8, 1, 2), (4, 64, 66), (3, 65, 64)]
)
def test_upsample_equals_nearest_upsampling_then_the_convolution(
    channels: int, height: int, width: int, channels_last: bool
) -> None:
    torch.manual_seed(0)
    layer = Upsample(channels)
    x = torch.randn(2, channels, height, width)
    if channels_last:
        layer.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    conv = layer.conv
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, conv.bias, padding=1)
    actual = layer(x)
    assert actual.shape == expected.shape == (2, channels, 2 * height, 2 * width)
    assert (actual - expected).abs().max().item() < 1e-5


def test_upsample_to_another_size_and_gradients() -> None:
    torch.manual_seed(1)
    layer = Upsample(4)
    x = torch.randn(1, 4, 64, 64, requires_grad=True)  # large enough for the transposed path
    odd = layer(x, (127, 130))  # the UNet's skip sizes need not be twice the input
    assert torch.allclose(
        odd, layer.conv._conv_forward(F.interpolate(x, size=(127, 130)), layer.conv.weight, layer.conv.bias)
    )
    layer(x).sum().backward()  # the transposed path is differentiable (the VAE trains through it)
    reference = x.detach().clone().requires_grad_(True)
    F.conv2d(
        F.interpolate(reference, scale_factor=2.0), layer.conv.weight, layer.conv.bias, padding=1
    ).sum().backward()
    assert torch.allclose(x.grad, reference.grad, atol=1e-5)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (3, 5), (6, 4)])
def test_transposed_kernel_on_small_maps(height: int, width: int) -> None:
    """The kernel identity itself, on maps the layer would send to the plain path: borders included."""
    torch.manual_seed(2)
    weight, x = torch.randn(5, 3, 3, 3), torch.randn(2, 3, height, width)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, padding=1)
    actual = F.conv_transpose2d(x, transposed_upsample_weights(weight), stride=2, padding=1)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < 1e-5
