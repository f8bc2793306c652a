"""Convolution weights kept in oneDNN's layout: same results as ``F.conv2d``, packed only where they should be,
and repacked when the weight changes."""

from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny import make_pipeline
from txt2img import memory, packed_weights
from txt2img.packed_weights import Conv2d, WeightPack, cpu_weight_packing, set_cpu_weight_packing
from txt2img.precision import set_compute_dtype


@pytest.fixture(autouse=True)
def _restore_switches() -> Iterator[None]:
    yield
    set_cpu_weight_packing(None)
    packed_weights._broken = False


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def make_conv(**kwargs: int | bool) -> Conv2d:
    torch.manual_seed(0)
    return Conv2d(**{"in_channels": 8, "out_channels": 12, "kernel_size": 3, "padding": 1, **kwargs})


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"stride": 2}, {"kernel_size": 1, "padding": 0}, {"groups": 4}, {"bias": False}],
    ids=["3x3", "stride-2", "1x1", "groups", "no-bias"],
)
@pytest.mark.parametrize("batch", [1, 2])
def test_packed_conv_equals_f_conv2d_and_is_used(kwargs: dict[str, int | bool], batch: int) -> None:
    conv = make_conv(**kwargs)
    x = channels_last(torch.randn(batch, 8, 9, 7))
    with torch.inference_mode():
        actual = conv(x)
        expected = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert conv.weight_pack.tensor is not None, "the packed path did not run"
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_a_changed_weight_is_packed_again() -> None:
    conv = make_conv()
    x = channels_last(torch.randn(1, 8, 6, 6))
    with torch.inference_mode():
        conv(x)
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    with torch.inference_mode():
        actual = conv(x)
    torch.testing.assert_close(actual, F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-5)


def test_a_new_input_size_is_packed_for_that_size() -> None:
    conv = make_conv()
    with torch.inference_mode():
        for side in (4, 10):
            x = channels_last(torch.randn(1, 8, side, side))
            torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
            assert conv.weight_pack.key is not None and conv.weight_pack.key[3] == tuple(x.shape)


@pytest.mark.parametrize(
    "case", ["training", "contiguous input", "switched off", "float64", "large map", "large batch"]
)
def test_the_plain_path_where_packing_does_not_apply(case: str) -> None:
    conv = make_conv()
    x = channels_last(torch.randn(1, 8, 6, 6))
    if case == "contiguous input":
        x = x.contiguous()
    if case == "switched off":
        set_cpu_weight_packing(False)
    if case == "float64":
        conv, x = conv.double(), x.double()
    if case == "large map":  # 17 × 16 pixels: more than MAX_PIXELS
        x = channels_last(torch.randn(1, 8, 17, 16))
    if case == "large batch":  # 8 images of 6 × 6: 288 pixels in all
        x = channels_last(torch.randn(8, 8, 6, 6))
    if case == "training":
        out = conv(x)
        out.sum().backward()
        assert conv.weight.grad is not None
    else:
        with torch.inference_mode():
            out = conv(x)
    assert conv.weight_pack.tensor is None
    torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TXT2IMG_CPU_PACK_WEIGHTS", "0")
    assert not cpu_weight_packing()
    monkeypatch.setenv("TXT2IMG_CPU_PACK_WEIGHTS", "yes")
    with pytest.raises(ValueError, match="TXT2IMG_CPU_PACK_WEIGHTS must be 0 or 1; got 'yes'"):
        cpu_weight_packing()
    set_cpu_weight_packing(True)  # the call wins over the environment
    assert cpu_weight_packing()


def test_no_packing_when_it_would_leave_too_little_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = make_conv()
    x = channels_last(torch.randn(1, 8, 6, 6))
    monkeypatch.setattr(memory, "available_cpu_memory", lambda: packed_weights.MIN_AVAILABLE_AFTER)
    with torch.inference_mode():
        out = conv(x)
    assert conv.weight_pack.tensor is None
    torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_copies_start_without_a_pack_and_state_dicts_are_unchanged() -> None:
    conv = make_conv()
    with torch.inference_mode():
        conv(channels_last(torch.randn(1, 8, 6, 6)))
    assert conv.weight_pack.tensor is not None
    for clone in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert clone.weight_pack.tensor is None and clone.weight_pack.key is None
        torch.testing.assert_close(clone.weight, conv.weight)
    assert list(conv.state_dict()) == ["weight", "bias"]


def test_a_build_that_cannot_pack_falls_back_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    def cannot_pack(*args: object) -> torch.Tensor:
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(WeightPack, "get", cannot_pack)
    conv = make_conv()
    x = channels_last(torch.randn(1, 8, 6, 6))
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert not cpu_weight_packing()


def test_a_wrong_input_still_raises_and_leaves_packing_on() -> None:
    conv = make_conv()
    with torch.inference_mode(), pytest.raises(RuntimeError):
        conv(channels_last(torch.randn(1, 5, 6, 6)))  # 5 channels, not 8
    assert cpu_weight_packing()


def test_a_half_precision_weight_computed_in_float32_is_not_packed() -> None:
    conv = make_conv().half()
    set_compute_dtype(conv, torch.float32)  # a float32 copy of the weight exists only during each call
    x = channels_last(torch.randn(1, 8, 6, 6))
    with torch.inference_mode():
        out = conv(x)
    assert conv.weight_pack.tensor is None
    torch.testing.assert_close(out, F.conv2d(x, conv.weight.float(), conv.bias.float(), padding=1))


@pytest.mark.parametrize("move", ["half", "to float64", "to cpu"])
def test_moving_or_casting_a_layer_drops_its_packed_copy(move: str) -> None:
    conv = make_conv()
    with torch.inference_mode():
        conv(channels_last(torch.randn(1, 8, 6, 6)))
    assert conv.weight_pack.tensor is not None
    {"half": conv.half, "to float64": lambda: conv.to(torch.float64), "to cpu": lambda: conv.to("cpu")}[
        move
    ]()
    assert conv.weight_pack.tensor is None


def test_pipeline_calls_pack_once_and_reuse_the_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packed_weights, "MAX_PIXELS", 64 * 64)  # the tiny decoder's maps: 16 × 16 and 32 × 32
    pipe = make_pipeline(tmp_path)
    convs = [m for m in pipe.vae.modules() if isinstance(m, Conv2d)]

    def call() -> np.ndarray:
        output = pipe(["a red cat"], generator=torch.Generator().manual_seed(0), output_type="np")
        return np.asarray(output.images)

    first = call()
    packed = [conv.weight_pack.tensor for conv in convs]
    assert all(tensor is not None for tensor in packed)
    second = call()
    assert all(conv.weight_pack.tensor is tensor for conv, tensor in zip(convs, packed))
    set_cpu_weight_packing(False)
    np.testing.assert_allclose(call(), first, atol=1e-5)
    np.testing.assert_array_equal(second, first)


def test_a_layer_built_in_inference_mode_packs_too() -> None:
    x = channels_last(torch.randn(1, 8, 6, 6))
    with torch.inference_mode():
        conv = make_conv()  # its weight is an inference tensor, which counts no versions
        actual = conv(x)
        assert conv.weight_pack.tensor is not None
        torch.testing.assert_close(actual, F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_threads_calling_one_layer_with_different_shapes_get_right_results() -> None:
    conv = make_conv()
    inputs = [channels_last(torch.randn(1, 8, side, side)) for side in (5, 6, 7)]
    with torch.inference_mode():
        expected = [F.conv2d(x, conv.weight, conv.bias, padding=1) for x in inputs]
    errors: list[str] = []

    def work(offset: int) -> None:
        with torch.inference_mode():
            for i in range(60):
                k = (i + offset) % len(inputs)
                if not torch.allclose(conv(inputs[k]), expected[k], atol=1e-5):
                    errors.append(f"call {i}, input {k}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
