"""``pipe.compile()``: regional torch.compile of the repeated blocks, same images, clear refusals."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny import make_pipeline
from txt2img import compiling
from txt2img.clip_text import CLIPEncoderLayer
from txt2img.gan import SynthesisBlock
from txt2img.layers import ResnetBlock

#: Inductor compiles CPU kernels as C++; without a compiler, compile() refuses (tested below) and these skip.
needs_cpp_compiler = pytest.mark.skipif(
    compiling.find_cpp_compiler() is None, reason="no C++ compiler on the PATH"
)


def images(pipe, seed: int = 0) -> np.ndarray:
    return pipe(
        ["a red circle", "a blue square"],
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


@needs_cpp_compiler
def test_compiled_pipeline_gives_the_eager_images_and_fills_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    pipe = make_pipeline(tmp_path / "pipe")
    keys = list(pipe.gan.state_dict())
    eager = images(pipe)
    blocks = [
        m for c in pipe.components.values() for m in c.modules() if isinstance(m, compiling.REPEATED_BLOCKS)
    ]
    assert {type(m) for m in blocks} == {CLIPEncoderLayer, SynthesisBlock, ResnetBlock}

    cache = tmp_path / "inductor-cache"
    assert pipe.compile(cache_dir=cache) is pipe and pipe.compiled
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache.resolve())
    assert all(m._compiled_call_impl is not None for m in blocks)  # every block, each in place
    assert list(pipe.gan.state_dict()) == keys  # saving and loading see the same keys
    compiled = images(pipe)
    np.testing.assert_allclose(compiled, eager, atol=2e-5)
    np.testing.assert_allclose(images(pipe, seed=1), images(pipe, seed=1), atol=0)  # deterministic
    assert any(cache.rglob("*.py")) or any(cache.rglob("*.so"))  # compiled code kept for later processes


def test_compile_blocks_counts_each_block_once() -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    assert compiling.compile_blocks(layer) == 0
    block = ResnetBlock(8, 8, norm_groups=4)
    outer = torch.nn.Sequential(block, torch.nn.Sequential(ResnetBlock(8, 16, norm_groups=4)))
    assert compiling.compile_blocks(outer) == 2


@needs_cpp_compiler
def test_compile_refuses_a_bad_mode_and_offloading(tmp_path: Path) -> None:
    pipe = make_pipeline(tmp_path / "pipe")
    with pytest.raises(ValueError, match="mode='fastest' is not one of"):
        pipe.compile(mode="fastest")
    pipe.enable_model_cpu_offload()
    with pytest.raises(RuntimeError, match="disable_offload"):
        pipe.compile()
    pipe.disable_offload()
    pipe.compile()
    with pytest.raises(RuntimeError, match="without compiling"):
        pipe.enable_model_cpu_offload()


def test_compile_without_a_cpp_compiler_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, clang++ or c++ here
    monkeypatch.delenv("CXX", raising=False)
    pipe = make_pipeline(tmp_path / "pipe")
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        pipe.compile()
    assert not pipe.compiled
