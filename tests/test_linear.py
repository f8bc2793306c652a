"""Linear layers as oneDNN 1 × 1 convolutions: same results as ``F.linear``, used only where they should be."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from txt2img import linear
from txt2img.linear import MIN_ROWS, Linear, conv1x1_linear, cpu_linear_backend, set_cpu_linear_backend


@pytest.fixture(autouse=True)
def _restore_backend() -> Iterator[None]:
    yield
    set_cpu_linear_backend(None)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("shape", [(64, 24), (2, 77, 24), (3, 2, 40, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv1x1_linear_equals_f_linear(shape: tuple[int, ...], bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    weight = torch.randn(40, 24, generator=generator)
    b = torch.randn(40, generator=generator) if bias else None
    actual = conv1x1_linear(x, weight, b)
    assert actual.shape == (*shape[:-1], 40)
    assert actual.is_contiguous()
    assert relative_error(actual, F.linear(x, weight, b)) < 1e-5


def test_conv1x1_linear_on_a_non_contiguous_input() -> None:
    x = torch.randn(24, 2, 100).transpose(0, 2)  # (100, 2, 24), not contiguous
    weight = torch.randn(8, 24)
    assert relative_error(conv1x1_linear(x, weight, None), F.linear(x, weight)) < 1e-5


def spy_on_conv(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = linear.conv1x1_linear

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.shape[-2])
        return real(x, weight, bias)

    monkeypatch.setattr(linear, "conv1x1_linear", spy)
    return calls


def test_linear_takes_the_convolution_only_for_large_float32_inference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = spy_on_conv(monkeypatch)
    set_cpu_linear_backend("onednn")
    layer = Linear(256, 512)  # MIN_ROWS rows of it: MIN_MACS multiply-adds
    many, few = torch.randn(1, MIN_ROWS, 256), torch.randn(1, MIN_ROWS - 1, 256)
    with torch.inference_mode():
        out = layer(many)
        assert calls == [MIN_ROWS]
        assert relative_error(out, F.linear(many, layer.weight, layer.bias)) < 1e-5
        assert torch.equal(layer(few), F.linear(few, layer.weight, layer.bias))  # too few rows
        small, rows = Linear(16, 8), torch.randn(1024, 16)  # many rows, but a small product
        assert torch.equal(small(rows), F.linear(rows, small.weight, small.bias))
        wide = Linear(256, 512).double()  # float64: not the convolution's dtype
        assert torch.equal(wide(many.double()), F.linear(many.double(), wide.weight, wide.bias))
    out = layer(many)  # autograd on: training always uses F.linear
    assert torch.equal(out, F.linear(many, layer.weight, layer.bias))
    assert calls == [MIN_ROWS]


def test_blas_backend_is_f_linear_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_on_conv(monkeypatch)
    set_cpu_linear_backend("blas")
    layer, x = Linear(16, 8), torch.randn(4, 64, 16)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert calls == []
    assert cpu_linear_backend() == "blas"


def test_state_dict_is_that_of_nn_linear() -> None:
    reference = torch.nn.Linear(16, 8)
    layer = Linear(16, 8)
    layer.load_state_dict(reference.state_dict(), strict=True)
    assert list(layer.state_dict()) == ["weight", "bias"]


def test_auto_picks_a_backend_and_keeps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    probes: list[bool] = []

    def probe() -> bool:
        probes.append(True)
        return True

    monkeypatch.setattr(linear, "probe_onednn_faster", probe)
    monkeypatch.delenv("TXT2IMG_CPU_LINEAR", raising=False)
    set_cpu_linear_backend("auto")
    assert cpu_linear_backend() == "onednn"
    assert cpu_linear_backend() == "onednn"
    assert probes == [True]  # timed once per process, not per call


def test_the_real_probe_answers() -> None:
    assert isinstance(linear.probe_onednn_faster(rows=64, features=32, runs=1), bool)


def test_environment_variable_and_bad_names(monkeypatch: pytest.MonkeyPatch) -> None:
    set_cpu_linear_backend(None)
    monkeypatch.setenv("TXT2IMG_CPU_LINEAR", "blas")
    assert cpu_linear_backend() == "blas"
    set_cpu_linear_backend("onednn")  # an explicit choice wins over the variable
    assert cpu_linear_backend() == "onednn"
    set_cpu_linear_backend(None)
    monkeypatch.setenv("TXT2IMG_CPU_LINEAR", "mkl")
    with pytest.raises(ValueError, match="TXT2IMG_CPU_LINEAR must be one of auto, onednn, blas; got 'mkl'"):
        cpu_linear_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        set_cpu_linear_backend("fast")  # type: ignore[arg-type]
