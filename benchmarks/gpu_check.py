"""GPU checks of the memory knobs and the half-precision paths, on a CUDA machine (never in CI).

    python benchmarks/gpu_check.py [--size 512] [--model DIR]

Uses a pipeline of SD-Turbo's architecture and sizes with random weights (``benchmarks/sd_turbo_random.py``)
unless ``--model`` is given. For each knob: the peak GPU memory of one call (``torch.cuda.max_memory_allocated``),
its time, and where the weights were during each component's forward pass (model offload: only the running
component on the GPU; sequential offload: none resident between layers). Then float16 and bfloat16 outputs
against float32. Prints markdown tables; exits 1 if a placement check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

PROMPT = "a photo of a cat"


def on_gpu(module: nn.Module) -> int:
    return sum(1 for t in (*module.parameters(), *module.buffers()) if t.device.type == "cuda")


def run(pipe, size: int) -> tuple[np.ndarray, float, float]:  # type: ignore[no-untyped-def]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = pipe(
        PROMPT, height=size, width=size, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    torch.cuda.synchronize()
    return images, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA GPU here: this script checks the GPU paths and has nothing to do on a CPU machine.")
        return 0
    from txt2img import Txt2ImgPipeline

    if args.model is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from sd_turbo_random import sd_turbo_random

        args.model = str(sd_turbo_random())
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.size}×{args.size}, {time.strftime('%Y-%m-%d')}\n"
    )
    failures = []

    print("| knob (float16) | peak GPU memory (MiB) | call time (s) | placement |")
    print("|---|---|---|---|")
    reference = None
    for knob in (
        "none",
        "model_offload",
        "sequential_offload",
        "attention_slicing",
        "vae_slicing",
        "vae_tiling",
    ):
        pipe = Txt2ImgPipeline.from_pretrained(
            args.model, dtype=torch.float16, device=None if "offload" in knob else "cuda"
        )
        pipe.set_progress_bar_config(disable=True)
        seen: dict[str, dict[str, int]] = {}
        if knob == "model_offload":
            pipe.enable_model_cpu_offload("cuda")
        elif knob == "sequential_offload":
            pipe.enable_sequential_cpu_offload("cuda")
        elif knob == "attention_slicing":
            pipe.enable_attention_slicing("max")
        elif knob == "vae_slicing":
            pipe.vae.enable_slicing()
        elif knob == "vae_tiling":
            pipe.vae.enable_tiling()
        components = pipe.components
        for name, component in components.items():

            def record(
                module: nn.Module,
                inputs: object,
                name: str = name,
                seen: dict = seen,  # type: ignore[type-arg]
                components: dict = components,  # type: ignore[type-arg]
            ) -> None:
                seen.setdefault(name, {k: on_gpu(c) for k, c in components.items()})

            component.register_forward_pre_hook(record)
        run(pipe, args.size)  # warm-up
        images, seconds, peak = run(pipe, args.size)
        placement = "-"
        if knob == "model_offload":
            ok = all(
                state[other] == 0 for running, state in seen.items() for other in state if other != running
            )
            ok = ok and all(state[running] > 0 for running, state in seen.items())
            ok = ok and all(on_gpu(c) == 0 for c in pipe.components.values())
            placement = "only the running component on the GPU" if ok else f"WRONG: {seen}"
        elif knob == "sequential_offload":
            ok = all(on_gpu(c) == 0 for c in pipe.components.values())
            placement = "nothing left on the GPU after the call" if ok else "WRONG: weights left on the GPU"
        else:
            ok = True
        if not ok:
            failures.append(knob)
        if reference is None:
            reference = images
        difference = float(np.abs(images - reference).max())
        print(
            f"| {knob} | {peak:,.0f} | {seconds:.3f} | {placement}; max diff to 'none' {difference:.2e} |",
            flush=True,
        )
        del pipe
        torch.cuda.empty_cache()

    print(
        "\n| dtype | call time (s) | peak GPU memory (MiB) | max abs diff to float32 (images in [0, 1]) | finite |"
    )
    print("|---|---|---|---|---|")
    outputs = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        pipe = Txt2ImgPipeline.from_pretrained(args.model, dtype=dtype, device="cuda")
        pipe.set_progress_bar_config(disable=True)
        run(pipe, args.size)
        images, seconds, peak = run(pipe, args.size)
        outputs[dtype] = images
        difference = float(np.abs(images - outputs[torch.float32]).max())
        print(
            f"| {str(dtype).removeprefix('torch.')} | {seconds:.3f} | {peak:,.0f} | {difference:.2e} | {bool(np.isfinite(images).all())} |",
            flush=True,
        )
        del pipe
        torch.cuda.empty_cache()
    if failures:
        print(f"\nPlacement checks failed: {failures}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
