"""The benchmark scripts run end to end on tiny configurations and print their tables (no timings checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from txt2img.compiling import find_cpp_compiler

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "TXT2IMG_DISABLE_PROGRESS_BAR": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_compare_diffusers_tiny_prints_every_table() -> None:
    out = run_script("compare_diffusers.py", "--tiny")
    for title in (
        "### End to end",
        "### Embedded default model",
        "### Peak float32",
        "### txt2img components",
    ):
        assert title in out
    assert "| SD VAE | 64² | 1 |" in out and "| TAESD | 64² | 1 |" in out
    assert "| 64² | UNet |" in out and "| 64² | VAE decoder |" in out


def test_compare_diffusers_runs_both_libraries_in_the_dtype_asked() -> None:
    # float16 on a CPU: slow for diffusers, computed in float32 by txt2img, but the same loading and casting
    # code as `--device cuda --dtype float16`, TAESD variant included
    out = run_script("compare_diffusers.py", "--tiny", "--dtype", "float16")
    assert "float16 on cpu" in out and "### Peak float16 FLOP/s" in out
    assert "| SD VAE | 64² | 1 |" in out and "| TAESD | 64² | 1 |" in out
    assert "| txt2img images/s |" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_compare_diffusers_refuses_a_missing_gpu_by_name() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "compare_diffusers.py"), "--tiny", "--device", "cuda"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "--device cuda: this torch sees no CUDA GPU" in result.stderr


def test_cpu_switches_tiny_prints_its_table() -> None:
    out = run_script("cpu_switches.py", "--tiny", "--size", "64", "--runs", "1")
    assert "| switch | timed | off | on | on / off |" in out
    assert "| linear layers as oneDNN convolutions | UNet |" in out
    assert "| weights kept packed for oneDNN | UNet |" in out
    assert "| freed memory reused within a call | end to end |" in out
    assert "Resident memory added by the packed weights" in out


def test_packed_conv_tiny_prints_its_table() -> None:
    out = run_script("packed_conv.py", "--tiny", "--runs", "1")
    assert "| channels | map | GFLOP | reordered every call | packed once | packed / reordered |" in out
    assert "| 32 | 8 × 8 |" in out and "| 16 | 16 × 16 |" in out


@pytest.mark.skipif(find_cpp_compiler() is None, reason="no C++ compiler for Inductor")
def test_compile_tiny_prints_its_table(tmp_path: Path) -> None:
    out = run_script("compile.py", "--tiny", "--size", "64", "--runs", "1", "--cache-dir", str(tmp_path))
    assert "| timed | eager | compiled | compiled / eager | max difference |" in out
    for timed in ("text encoder", "UNet", "VAE decoder", "end to end"):
        assert f"| {timed} |" in out
    assert "In a new process with Inductor's cache warm, the first call:" in out
    assert any(tmp_path.rglob("*.py"))  # the compiled code, kept for the second process


def test_gan_training_step_tiny_prints_a_row_per_setting() -> None:
    out = run_script("gan_training_step.py", "--tiny", "--steps", "2", "--rounds", "1")
    assert (
        "| r1_every | channels_last | discriminator_pool_first_from | discriminator_spectral_norm "
        "| generator channels | s per step (median) |" in out
    )
    recipe, wide = "(32, 16, 16, 8)", "(32, 16, 16, 16)"  # the tiny recipe's generator, last stage doubled
    for r1_every, channels_last in ((4, False), (16, False), (4, True), (16, True)):
        assert f"| {r1_every} | {channels_last} | None | False | {recipe} | " in out
    for pool_first_from in (0, 1):
        assert f"| 16 | True | {pool_first_from} | False | {recipe} | " in out
    assert f"| 16 | True | None | True | {recipe} | " in out
    for pool_first_from in (None, 1):
        assert f"| 16 | True | {pool_first_from} | False | {wide} | " in out


def test_vae_training_step_tiny_prints_a_row_per_setting() -> None:
    out = run_script("vae_training_step.py", "--tiny", "--steps", "1", "--rounds", "1")
    assert "| step | mid-block attention | s per step (median) |" in out
    for kind in ("joint", "decoder only"):
        for attention in (True, False):
            assert f"| {kind} | {attention} | " in out
