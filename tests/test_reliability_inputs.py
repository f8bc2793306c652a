"""Inputs to a call, good and bad: every one either generates or raises ValueError/TypeError with a message
that names the argument, before any work is done (docs/reliability.md lists them)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiny import make_pipeline
from txt2img import PromptEmbeds, Txt2ImgPipeline
from txt2img import memory as memory_module
from txt2img.memory import InsufficientMemoryError

SMALL = {"height": 8, "width": 8, "output_type": "np"}  # the tiny pipeline's smallest image: fast


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def own_pipe(tmp_path_factory: pytest.TempPathFactory) -> Txt2ImgPipeline:
    """A tiny pipeline that tests may change (memory limit, hooks): the shared one must stay as it is."""
    return make_pipeline(tmp_path_factory.mktemp("own"))


# ---------------------------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "a" * 10_000,
        "un cercle rouge, ein grüner Kreis, 赤い円, красный круг",
        "🔴 a red circle 🟦🏳️‍🌈",
        "tab\tnewline\nbell\x07escape\x1b[31m delete\x7f",
        "before\x00after",
        ("a red circle", "a blue square"),
        ["", "\x00", "🟦"],
    ],
    ids=["empty", "10000-chars", "unicode", "emoji", "control-chars", "nul", "tuple", "list-of-odd-strings"],
)
def test_any_valid_text_is_a_prompt(pipe: Txt2ImgPipeline, prompt) -> None:
    images = pipe(prompt, generator=gen(0), **SMALL).images
    count = 1 if isinstance(prompt, str) else len(prompt)
    assert images.shape == (count, 8, 8, 3)
    assert np.isfinite(images).all()


def test_a_10000_character_prompt_logs_one_short_line(pipe: Txt2ImgPipeline, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="txt2img"):
        pipe("abc " * 2_500, generator=gen(0), **SMALL)
    (record,) = [r for r in caplog.records if "longer than" in r.getMessage()]
    message = record.getMessage()
    assert len(message) < 400 and "more characters" in message


@pytest.mark.parametrize(
    ("prompt", "error", "match"),
    [
        (None, ValueError, "exactly one"),
        (5, TypeError, "not int"),
        (b"a red circle", TypeError, "not bytes"),
        ({"a red circle"}, TypeError, "not set"),
        (["a", None, 3, b"x"], TypeError, "got NoneType, bytes, int"),
        ([], ValueError, "empty list"),
        ("a\ud800b", ValueError, r"Prompt 0 is not valid Unicode: a lone surrogate '\\ud800' at character 1"),
        (["fine", "\udcff"], ValueError, "Prompt 1 is not valid Unicode"),
    ],
    ids=["none", "int", "bytes", "set", "mixed-list", "empty-list", "lone-surrogate", "surrogate-in-list"],
)
def test_what_is_not_a_prompt_is_refused_by_name(pipe: Txt2ImgPipeline, prompt, error, match) -> None:
    with pytest.raises(error, match=match):
        pipe(prompt, generator=gen(0), **SMALL)


def test_encode_prompt_refuses_what_the_tokenizer_cannot_read(pipe: Txt2ImgPipeline) -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        pipe.encode_prompt("\ud83d")


# Any code point, surrogates included (st.text()'s default leaves them out), and often the awkward ones.
ANY_CHARACTER = st.one_of(
    st.characters(exclude_categories=()),
    st.sampled_from(["\x00", "\x1b", "\ud800", "\udfff", "\u202e", "\ufeff", "\u200d", "🏳", " "]),
)
PROMPTS = st.one_of(
    st.text(ANY_CHARACTER, max_size=60),
    st.lists(
        st.one_of(st.text(ANY_CHARACTER, max_size=20), st.integers(), st.none(), st.binary(max_size=5)),
        max_size=3,
    ),
    st.integers(),
    st.none(),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=PROMPTS)
def test_fuzzed_prompts_generate_or_raise_a_clear_error(pipe: Txt2ImgPipeline, prompt) -> None:
    try:
        images = pipe(prompt, generator=gen(0), **SMALL).images
    except (ValueError, TypeError) as error:
        assert str(error), "an error without a message"
        return
    assert images.shape[0] == (1 if isinstance(prompt, str) else len(prompt))
    assert np.isfinite(images).all()


# ---------------------------------------------------------------------------------------------------------
# Sizes and counts


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"height": 30}, "height=30 is not a multiple of this model's factor 4: try 28 or 32"),
        ({"width": 2}, "width=2 is not a multiple of this model's factor 4: try 4 or 8"),
        ({"height": 0}, "height must be a positive integer"),
        ({"width": -32}, "width must be a positive integer"),
        ({"height": 32.0}, "height must be a positive integer"),
        ({"height": True}, "height must be a positive integer"),
        ({"width": "32"}, "width must be a positive integer"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive integer, got 0"),
        ({"num_images_per_prompt": -3}, "num_images_per_prompt must be a positive integer, got -3"),
        ({"num_images_per_prompt": 2.0}, "num_images_per_prompt must be a positive integer"),
        ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
        ({"truncation_psi": float("inf")}, "truncation_psi must be a finite number"),
        ({"truncation_psi": "0.7"}, "truncation_psi must be a finite number"),
    ],
)
def test_bad_sizes_and_counts_are_refused_by_name(pipe: Txt2ImgPipeline, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        pipe("a", generator=gen(0), **{**SMALL, **kwargs})


def test_numpy_integers_are_accepted_as_sizes_and_counts(pipe: Txt2ImgPipeline) -> None:
    out = pipe(
        "a", height=np.int64(8), width=np.int32(12), num_images_per_prompt=np.int64(2), output_type="np"
    )
    assert out.images.shape == (2, 8, 12, 3)


@pytest.mark.parametrize(
    ("generator", "error", "match"),
    [
        ([gen(0)], ValueError, "Got 1 generators for 2 images"),
        ([gen(0)] * 3, ValueError, "Got 3 generators for 2 images"),
        ([gen(0), 1], TypeError, "only torch.Generator"),
        (42, TypeError, "not int"),
    ],
)
def test_generators_of_the_wrong_kind_or_count(pipe: Txt2ImgPipeline, generator, error, match) -> None:
    with pytest.raises(error, match=match):
        pipe(["a", "b"], generator=generator, **SMALL)


# ---------------------------------------------------------------------------------------------------------
# Memory: refused up front, with the estimate


def test_a_size_that_would_exhaust_memory_is_refused_before_any_work(own_pipe: Txt2ImgPipeline) -> None:
    calls: list[str] = []
    hooks = [
        c.register_forward_pre_hook(lambda *a, n=n: calls.append(n)) for n, c in own_pipe.components.items()
    ]
    generator = gen(0)
    state = generator.get_state()
    try:
        with pytest.raises(
            InsufficientMemoryError, match=r"would need about [\d.]+ (TiB|PiB) .* is available"
        ) as info:
            own_pipe("a", height=2**20, width=2**20, generator=generator)
        assert isinstance(info.value, MemoryError) and isinstance(info.value, ValueError)
        assert "pipe.set_memory_limit" in str(info.value) and "enable_tiling" in str(info.value)
        with pytest.raises(InsufficientMemoryError, match="10000000 image"):
            own_pipe("a", num_images_per_prompt=10_000_000, generator=generator)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []  # nothing ran ...
    assert torch.equal(generator.get_state(), state)  # ... and no noise was drawn


def test_the_memory_limit_can_be_set_lowered_or_switched_off(own_pipe: Txt2ImgPipeline, monkeypatch) -> None:
    needed = own_pipe.memory_estimate(2, 32, 32, "np")
    assert 0 < needed < 2**30
    try:
        own_pipe.set_memory_limit(needed - 1)
        with pytest.raises(InsufficientMemoryError, match="allowed by pipe.set_memory_limit"):
            own_pipe(["a", "b"], output_type="np")
        own_pipe.set_memory_limit(needed)
        assert own_pipe(["a", "b"], output_type="np").images.shape == (2, 32, 32, 3)
        # "auto" reads what the device has: here, pretend it is almost nothing.
        monkeypatch.setattr(memory_module, "available_memory", lambda device: 1024)
        own_pipe.set_memory_limit("auto")
        with pytest.raises(InsufficientMemoryError, match=r"1\.0 KiB is available on this machine"):
            own_pipe("a", output_type="np")
        own_pipe.set_memory_limit(None)
        assert own_pipe("a", output_type="np").images.shape == (1, 32, 32, 3)
        for bad in (0, -5, 1.5, "lots", True):
            with pytest.raises(ValueError, match="memory limit"):
                own_pipe.set_memory_limit(bad)  # type: ignore[arg-type]
    finally:
        own_pipe.set_memory_limit("auto")


def test_the_estimate_follows_batch_size_and_decoder_settings(own_pipe: Txt2ImgPipeline) -> None:
    one, four = own_pipe.memory_estimate(1, 256, 256), own_pipe.memory_estimate(4, 256, 256)
    assert four == 4 * one
    # PIL images add a scaled, a rounded and two 8-bit copies of the (B, 3, H, W) float32 images.
    pil, np_ = own_pipe.memory_estimate(1, 256, 512, "pil"), own_pipe.memory_estimate(1, 256, 512, "np")
    assert pil - np_ == 3 * 256 * 512 * (2 * 4 + 2)
    try:
        own_pipe.vae.enable_slicing()
        assert own_pipe.memory_estimate(4, 256, 256) < 0.5 * four  # the decoder holds one image at a time
        own_pipe.vae.disable_slicing()
        whole = own_pipe.memory_estimate(1, 1024, 1024)
        own_pipe.vae.enable_tiling(tile_size=16, overlap=4)
        assert own_pipe.memory_estimate(1, 1024, 1024) < 0.5 * whole  # ... and one tile
    finally:
        own_pipe.vae.disable_slicing()
        own_pipe.vae.disable_tiling()


def test_available_memory_is_read_on_linux() -> None:
    available = memory_module.available_memory(torch.device("cpu"))
    if not Path("/proc/meminfo").exists():
        pytest.skip("reads /proc/meminfo on Linux")
    total = int(
        next(
            line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
        ).split()[1]
    )
    assert available is not None and 0 < available <= total * 1024


# ---------------------------------------------------------------------------------------------------------
# latents and prompt_embeds


def noise(pipe: Txt2ImgPipeline, batch: int = 1) -> torch.Tensor:
    return torch.randn(pipe.gan.noise_shape(batch, 2, 2), generator=gen(0))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda n: n[:, :3],
            ValueError,
            r"latents has shape \(1, 3\), but this call needs noise of shape \(1, 8\)",
        ),
        (lambda n: n.repeat(2, 1), ValueError, "latents has shape"),
        (lambda n: n.to(torch.int64), TypeError, "latents must be a floating-point tensor, not torch.int64"),
        (lambda n: n > 0, TypeError, "floating-point tensor, not torch.bool"),
        (lambda n: n.to("meta"), ValueError, "latents is a meta tensor"),
        (lambda n: n * float("nan"), ValueError, "latents holds NaN or infinite values"),
        (lambda n: n.tolist(), TypeError, "latents must be a torch.Tensor, not list"),
        (lambda n: n.numpy(), TypeError, "latents must be a torch.Tensor, not ndarray"),
    ],
    ids=["too-few-values", "wrong-batch", "int", "bool", "meta-device", "nan", "list", "numpy"],
)
def test_latents_of_the_wrong_shape_dtype_or_device(pipe: Txt2ImgPipeline, make, error, match) -> None:
    with pytest.raises(error, match=match):
        pipe("a", latents=make(noise(pipe)), **SMALL)


def test_latents_in_another_float_dtype_are_cast(pipe: Txt2ImgPipeline) -> None:
    latents = noise(pipe)
    as_float32 = pipe("a", latents=latents, **SMALL).images
    as_float64 = pipe("a", latents=latents.double(), **SMALL).images
    np.testing.assert_array_equal(as_float32, as_float64)  # float64 → float32 is exact for float32 values


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU, for a device other than the CPU")
def test_latents_on_another_device_are_moved(pipe: Txt2ImgPipeline) -> None:
    latents = noise(pipe)
    on_the_cpu = pipe("a", latents=latents, **SMALL).images
    np.testing.assert_array_equal(pipe("a", latents=latents.cuda(), **SMALL).images, on_the_cpu)


@pytest.fixture(scope="module")
def embeds(pipe: Txt2ImgPipeline) -> PromptEmbeds:
    with torch.no_grad():
        return pipe.encode_prompt(["a red circle", "a blue square"])


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            {"hidden_states": lambda t: t[..., :16]},
            ValueError,
            r"prompt_embeds.hidden_states has shape \(2, 16, 16\), but this pipeline needs \(2, 16, 32\)",
        ),
        ({"hidden_states": lambda t: t[0]}, ValueError, r"must have shape \(B, L, D\)"),
        (
            {"pooled": lambda t: t[:1]},
            ValueError,
            r"prompt_embeds.pooled has shape \(1, 32\), but this pipeline needs \(2, 32\)",
        ),
        ({"pooled": lambda t: t[:, :8]}, ValueError, r"prompt_embeds.pooled has shape \(2, 8\)"),
        (
            {"attention_mask": lambda t: t[:, :4]},
            ValueError,
            r"prompt_embeds.attention_mask has shape \(2, 4\)",
        ),
        (
            {"attention_mask": lambda t: t.float()},
            TypeError,
            "attention_mask must be an integer or boolean tensor",
        ),
        (
            {"hidden_states": lambda t: t.to(torch.int32)},
            TypeError,
            "hidden_states must be a floating-point tensor",
        ),
        ({"hidden_states": lambda t: t.to("meta")}, ValueError, "hidden_states is a meta tensor"),
        ({"pooled": lambda t: t / 0}, ValueError, "pooled holds NaN or infinite values"),
    ],
    ids=[
        "hidden-size",
        "hidden-2d",
        "pooled-batch",
        "pooled-size",
        "mask-length",
        "mask-float",
        "int",
        "meta",
        "inf",
    ],
)
def test_prompt_embeds_of_the_wrong_shape_dtype_or_device(
    pipe: Txt2ImgPipeline,
    embeds: PromptEmbeds,
    change,
    error,
    match,
) -> None:
    broken = dataclasses.replace(embeds, **{k: f(getattr(embeds, k)) for k, f in change.items()})
    with pytest.raises(error, match=match):
        pipe(prompt_embeds=broken, **SMALL)


def test_prompt_and_prompt_embeds_together_are_refused(pipe: Txt2ImgPipeline, embeds: PromptEmbeds) -> None:
    with pytest.raises(ValueError, match="Pass either prompt= or prompt_embeds=, exactly one of them"):
        pipe(["a red circle", "a blue square"], prompt_embeds=embeds, **SMALL)


def test_prompt_embeds_that_are_not_prompt_embeds(pipe: Txt2ImgPipeline, embeds: PromptEmbeds) -> None:
    with pytest.raises(
        TypeError, match="must be the PromptEmbeds that pipe.encode_prompt returns, not Tensor"
    ):
        pipe(prompt_embeds=embeds.hidden_states, **SMALL)  # type: ignore[arg-type]
    images = pipe(prompt_embeds=embeds, generator=[gen(0), gen(1)], **SMALL).images  # the intact ones work
    np.testing.assert_array_equal(
        images, pipe(["a red circle", "a blue square"], generator=[gen(0), gen(1)], **SMALL).images
    )
