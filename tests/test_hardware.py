"""Varied hardware: model and sequential offloading on a CPU machine (components rest on disk), the dtype policy
and attention slicing through the pipeline.

Placement is checked from inside the forward passes: a recording hook sees, while each component runs, where
every component's weights are. Peak memory is measured in subprocesses (VmHWM after resetting it)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from txt2img import Txt2ImgPipeline, packed_weights
from txt2img.offload import read_safetensors_mmap, write_safetensors
from txt2img.packed_weights import Conv2d

PROMPTS = ["a red cat", "two dogs"]


def images(pipe: Txt2ImgPipeline, seed: int = 0, n: int = 1) -> np.ndarray:
    output = pipe(
        PROMPTS, num_images_per_prompt=n, generator=torch.Generator().manual_seed(seed), output_type="np"
    )
    return output.images  # type: ignore[return-value]


def awake(module: nn.Module) -> int:
    """How many of ``module``'s weights are materialised (not meta)."""
    return sum(1 for t in (*module.parameters(), *module.buffers()) if t.device.type != "meta")


@pytest.fixture
def offloaded(saved_pipeline: Path) -> Txt2ImgPipeline:
    pipe = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def expected(pipe: Txt2ImgPipeline) -> tuple[np.ndarray, np.ndarray]:
    return images(pipe), images(pipe, seed=1, n=2)


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offloaded_pipeline_gives_the_same_images_call_after_call(
    offloaded: Txt2ImgPipeline, expected: tuple[np.ndarray, np.ndarray], mode: str
) -> None:
    enable = getattr(offloaded, f"enable_{mode}_cpu_offload")
    enable()
    enable()  # idempotent: the hooks are replaced, not doubled
    assert len(offloaded.gan._forward_pre_hooks) == (
        1 if mode == "model" else len(offloaded.gan._forward_pre_hooks)
    )
    hooks_after_two = sum(len(m._forward_pre_hooks) for m in offloaded.gan.modules())
    enable()
    assert sum(len(m._forward_pre_hooks) for m in offloaded.gan.modules()) == hooks_after_two

    for _ in range(3):
        assert np.array_equal(images(offloaded), expected[0])
    assert np.array_equal(images(offloaded, seed=1, n=2), expected[1])
    assert all(awake(c) == 0 for c in offloaded.components.values())  # everything rests between calls


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offloaded_pipeline_under_threads(
    offloaded: Txt2ImgPipeline, expected: tuple[np.ndarray, np.ndarray], mode: str
) -> None:
    getattr(offloaded, f"enable_{mode}_cpu_offload")()
    results: list[np.ndarray | None] = [None] * 8
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = images(offloaded, seed=1, n=2)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and all(not t.is_alive() for t in threads)
    assert all(np.array_equal(r, expected[1]) for r in results)


def test_model_offload_wakes_one_component_at_a_time(offloaded: Txt2ImgPipeline) -> None:
    offloaded.enable_model_cpu_offload()
    seen: dict[str, dict[str, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: object) -> None:
            seen.setdefault(name, {k: awake(c) for k, c in offloaded.components.items()})

        return hook

    for name, component in offloaded.components.items():
        component.register_forward_pre_hook(record(name))  # after the offload hook: sees the woken state
    images(offloaded)

    total = {k: sum(1 for _ in (*c.parameters(), *c.buffers())) for k, c in offloaded.components.items()}
    for running, state in seen.items():
        assert state[running] == total[running]  # all of the running component is there ...
        assert all(state[other] == 0 for other in state if other != running)  # ... and nothing else
    assert set(seen) == {"text_encoder", "gan", "vae"}


def test_sequential_offload_wakes_one_layer_at_a_time(offloaded: Txt2ImgPipeline) -> None:
    offloaded.enable_sequential_cpu_offload()
    largest_awake = 0

    def record(module: nn.Module, args: object) -> None:
        nonlocal largest_awake
        own = sum(1 for t in (*module._parameters.values(), *module._buffers.values()) if t is not None)
        everything = sum(awake(c) for c in offloaded.components.values())
        largest_awake = max(largest_awake, everything - own)

    for module in offloaded.vae.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(record)
    images(offloaded)
    # While a convolution runs, at most its enclosing weighted modules (none here) besides itself are awake.
    assert largest_awake == 0


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offloading_packs_no_weights_and_turning_it_off_packs_again(
    offloaded: Txt2ImgPipeline, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packed_weights, "MAX_PIXELS", 64 * 64)  # every map of the tiny decoder
    packs = [m.weight_pack for m in offloaded.vae.modules() if isinstance(m, Conv2d)]
    assert packs
    images(offloaded)  # in memory: the decoder's convolutions keep their weights packed
    assert all(pack.tensor is not None for pack in packs)
    getattr(offloaded, f"enable_{mode}_cpu_offload")()
    assert all(pack.tensor is None for pack in packs)  # what was packed is dropped
    images(offloaded)
    assert all(pack.tensor is None for pack in packs)  # weights woken from disk are not packed
    offloaded.disable_offload()
    images(offloaded)
    assert all(pack.tensor is not None for pack in packs)


def test_to_is_refused_after_sequential_offload_and_turns_model_offload_off(
    offloaded: Txt2ImgPipeline, expected
) -> None:
    offloaded.enable_sequential_cpu_offload()
    with pytest.raises(RuntimeError, match="disable_offload"):
        offloaded.to("cpu")
    offloaded.enable_model_cpu_offload()
    with pytest.warns(UserWarning, match="turns model CPU offload off"):
        offloaded.to("cpu")
    assert all(
        awake(c) == sum(1 for _ in (*c.parameters(), *c.buffers())) for c in offloaded.components.values()
    )
    assert np.array_equal(images(offloaded), expected[0])
    offloaded.enable_model_cpu_offload()
    offloaded.disable_offload()
    assert np.array_equal(images(offloaded), expected[0])


def test_offload_files_keep_channels_last_and_map_without_copy(tmp_path: Path) -> None:
    conv = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    tensors = {
        "conv": conv,
        "vector": torch.randn(5),
        "half": torch.randn(3, 2).half(),
        "empty": torch.zeros(0),
    }
    write_safetensors(tmp_path / "t.safetensors", tensors)
    back = read_safetensors_mmap(tmp_path / "t.safetensors")
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor) and back[name].dtype == tensor.dtype
    assert back["conv"].is_contiguous(memory_format=torch.channels_last)
    from safetensors.torch import load_file  # the files are ordinary safetensors files

    assert torch.equal(load_file(tmp_path / "t.safetensors")["vector"], tensors["vector"])


# ---------------------------------------------------------------------------------------------------------
# Peak memory, in fresh processes

PEAK_SCRIPT = r"""
import json, sys, torch
from txt2img import GANConfig, GANGenerator, Txt2ImgPipeline, VAEConfig, VAEDecoder
sys.path.insert(0, {tests!r})
from tiny import make_text_encoder
from pathlib import Path

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

torch.manual_seed(0)
text = make_text_encoder(Path({tmp!r}))
gan = GANGenerator(GANConfig(z_dim=8, w_dim=16, text_dim=32, pooled_dim=32, channels=(1024, 1024, 512, 64), attention=(False,) * 4, attention_heads=2))
vae = VAEDecoder(VAEConfig(block_out_channels=(64, 256, 640), layers_per_block=1, norm_num_groups=8, sample_size=32))
pipe = Txt2ImgPipeline(text.eval(), gan.eval(), vae.eval())
pipe.set_progress_bar_config(disable=True)
sizes = {{k: sum(t.numel() * t.element_size() for t in c.parameters()) / 2**20 for k, c in pipe.components.items()}}
if {mode!r} != "none":
    getattr(pipe, "enable_{mode}_cpu_offload")()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident size
before = hwm_mib()
pipe("a red cat", height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np")
print(json.dumps({{"sizes": sizes, "before": before, "peak": hwm_mib()}}))
"""


def peak_of_call(mode: str, tmp_path: Path) -> dict:  # type: ignore[type-arg]
    code = PEAK_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path / mode), mode=mode)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_model_offload_to_disk_lowers_the_peak_memory_of_a_call(tmp_path: Path) -> None:
    plain, offloaded = peak_of_call("none", tmp_path), peak_of_call("model", tmp_path)
    weights = sum(plain["sizes"].values())
    largest = max(plain["sizes"].values())
    assert weights > 200 and largest < 0.6 * weights  # a pipeline where offloading can show
    # Without offload the weights are resident throughout; with it, only about the largest component is.
    assert offloaded["before"] < plain["before"] - 0.8 * weights
    assert offloaded["peak"] < plain["peak"] - 0.8 * (weights - largest)


# ---------------------------------------------------------------------------------------------------------
# dtype policy


def test_half_precision_on_the_cpu_is_stored_half_and_computed_in_float32(
    saved_pipeline: Path, expected
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the notice is a log line, not a warning that breaks callers
        half = Txt2ImgPipeline.from_pretrained(saved_pipeline, dtype=torch.float16)
    half.set_progress_bar_config(disable=True)
    assert next(half.gan.parameters()).dtype == torch.float16  # storage
    assert half.dtype == torch.float32 and half.vae.dtype == torch.float32  # compute
    result = images(half)
    assert result.dtype == np.float32
    assert np.abs(result - expected[0]).max() < 0.05  # only the weights were rounded
    half.enable_model_cpu_offload()  # offload and compute hooks work together
    assert np.array_equal(images(half), result)


def test_auto_dtype_is_float32_on_the_cpu(saved_pipeline: Path) -> None:
    for dtype in (None, "auto"):
        pipe = Txt2ImgPipeline.from_pretrained(saved_pipeline, dtype=dtype)
        assert next(pipe.gan.parameters()).dtype == torch.float32 and pipe.dtype == torch.float32


@torch.no_grad()
def test_a_decoder_overflowing_in_half_precision_retries_in_float32(
    saved_pipeline: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipe = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    # Weights within float16's range whose product is not: outputs beyond 65504, fine in float32.
    pipe.vae.decoder.conv_norm_out.weight.mul_(1e3)
    pipe.vae.decoder.conv_out.weight.mul_(1e2)
    latents = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="latent").images
    reference = pipe.vae(latents)  # float32
    assert torch.isfinite(reference).all() and reference.abs().max() > 1e5

    pipe.vae.half()  # a decoder computing in float16 (as on a GPU)
    assert not torch.isfinite(pipe.vae(latents.half())).all()
    with caplog.at_level(logging.WARNING, logger="txt2img"):
        decoded = pipe.decode_latents(latents)
    assert "The decoder overflowed in torch.float16; decoding again in float32" in caplog.text
    assert decoded.dtype == torch.float32
    assert ((decoded - reference).abs() / reference.abs().max()).max() < 1e-2  # float16-rounded weights
    assert pipe.vae.dtype == torch.float16  # the component itself was not changed


def test_non_finite_latents_raise_instead_of_a_black_image(pipe: Txt2ImgPipeline) -> None:
    latents = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="latent").images
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        pipe.decode_latents(latents * float("nan"))


# ---------------------------------------------------------------------------------------------------------
# Attention slicing through the pipeline


def test_attention_slicing_through_the_pipeline(offloaded: Txt2ImgPipeline, expected) -> None:
    from txt2img.attention import Attention

    attentions = [m for c in offloaded.components.values() for m in c.modules() if isinstance(m, Attention)]
    assert attentions
    offloaded.enable_attention_slicing(3)
    assert all(m.slice_size == 3 for m in attentions)
    assert np.abs(images(offloaded) - expected[0]).max() < 1e-5
    offloaded.enable_attention_slicing()
    assert all(m.slice_size == "auto" for m in attentions)
    offloaded.disable_attention_slicing()
    assert all(m.slice_size is None for m in attentions)
    with pytest.raises(ValueError, match="slice_size"):
        offloaded.enable_attention_slicing(0)


# ---------------------------------------------------------------------------------------------------------
# The prompt cache


def test_an_encoded_prompt_is_not_encoded_again_until_the_weights_change(saved_pipeline: Path) -> None:
    pipe = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    calls = []
    pipe.text_encoder.model.register_forward_hook(lambda *args: calls.append(1))
    with torch.inference_mode():
        first = pipe.text_encoder.encode(PROMPTS)
        again = pipe.text_encoder.encode(list(PROMPTS))
        assert again is first and len(calls) == 1  # served from the cache
        pipe.text_encoder.encode(PROMPTS[:1])
        assert len(calls) == 2  # other tokens: encoded
    with torch.no_grad():
        next(pipe.text_encoder.model.parameters()).mul_(1.5)  # weights changed in place
        changed = pipe.text_encoder.encode(PROMPTS)
    assert len(calls) == 3 and not torch.equal(changed.hidden_states, first.hidden_states)
    pipe.text_encoder.encode(PROMPTS)  # with gradients on (training): never cached
    pipe.text_encoder.encode(PROMPTS)
    assert len(calls) == 5
