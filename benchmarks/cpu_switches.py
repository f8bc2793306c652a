"""What each CPU speed switch of txt2img is worth: on and off alternately in one process, same weights.

- ``txt2img.linear``: linear layers as oneDNN 1 × 1 convolutions (``"onednn"``) or ``F.linear`` (``"blas"``),
  timed on the text encoder and the UNet alone;
- ``txt2img.packed_weights``: the weights of convolutions on small maps kept in oneDNN's layout between calls
  or reordered on every call, timed on the text encoder, the UNet and the VAE decoder alone (the linear
  layers' rows with packing off, so that each row shows one switch), and the memory the packed copies add;
- ``txt2img.allocator``: freed memory reused within a call or not, timed end to end (prompt → ``np`` image).

Uses the SD-Turbo-size random-weight pipeline of ``compare_diffusers.py`` (built once, cached). The numbers
in docs/speed.md come from:

    python benchmarks/cpu_switches.py --size 512 --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from compare_diffusers import build_folder, components, generate, header  # benchmarks/, on sys.path
from memory import status_mib

from txt2img import Txt2ImgPipeline, allocator, linear, packed_weights


def alternate(
    switch: Callable[[Any], None], settings: list[Any], fn: Callable[[int], Any], runs: int
) -> list[float]:
    """Median seconds of ``fn`` under each setting, alternating settings run by run after a warm-up each."""
    times: dict[Any, list[float]] = {setting: [] for setting in settings}
    for run in range(-1, runs):
        for setting in settings:
            switch(setting)
            start = time.perf_counter()
            fn(run)
            if run >= 0:
                times[setting].append(time.perf_counter() - start)
    return [statistics.median(times[setting]) for setting in settings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per setting (default 3)")
    parser.add_argument("--tiny", action="store_true", help="tiny configuration: a smoke run in seconds")
    args = parser.parse_args()
    pipe = Txt2ImgPipeline.from_pretrained(build_folder(args.tiny))
    pipe.set_progress_bar_config(disable=True)
    calls = components(pipe, None, args.size)
    rows = []
    with torch.inference_mode():
        packed_weights.set_cpu_weight_packing(False)  # the linear layers' own effect first
        for name in ("text encoder", "UNet"):
            call = calls[name]
            off, on = alternate(
                linear.set_cpu_linear_backend, ["blas", "onednn"], lambda _, c=call: c(), args.runs
            )
            rows.append(
                f"| linear layers as oneDNN convolutions | {name} | {off:.3f} | {on:.3f} | {on / off:.2f} |"
            )
        linear.set_cpu_linear_backend(None)
        unpacked_mib = status_mib("VmRSS")
        for name in ("text encoder", "UNet", "VAE decoder"):
            call = calls[name]
            off, on = alternate(
                packed_weights.set_cpu_weight_packing, [False, True], lambda _, c=call: c(), args.runs
            )
            rows.append(
                f"| weights kept packed for oneDNN | {name} | {off:.3f} | {on:.3f} | {on / off:.2f} |"
            )
    packed_weights.set_cpu_weight_packing(None)
    packed_mib = status_mib("VmRSS") - unpacked_mib
    off, on = alternate(
        allocator.set_memory_reuse, [False, True], lambda run: generate(pipe, 1, args.size, run), args.runs
    )
    rows.append(f"| freed memory reused within a call | end to end | {off:.3f} | {on:.3f} | {on / off:.2f} |")
    allocator.set_memory_reuse(None)
    print(header())
    print(f"\n### txt2img's CPU switches at {args.size}², batch 1 (median of {args.runs} runs, seconds)\n")
    print("| switch | timed | off | on | on / off |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nResident memory added by the packed weights of the three components: {packed_mib:.0f} MiB")


if __name__ == "__main__":
    main()
