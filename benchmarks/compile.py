"""What ``pipe.compile()`` (regional ``torch.compile``, ``txt2img.compiling``) costs and gains, per component
and end to end, on the SD-Turbo-size random-weight pipeline of ``compare_diffusers.py``.

For each component, and for the whole call (prompt → ``np`` image): the eager and the compiled median and
the largest difference between their outputs; the first call after ``pipe.compile()``, which compiles; and
the first call of a new process that loads, compiles and calls the same pipeline with Inductor's cache warm
(``--cache-dir``): the compile cost a later process pays. The numbers in docs/speed.md come from:

    python benchmarks/compile.py --size 512 --runs 3

On a GPU: ``python benchmarks/compile.py --device cuda --dtype float16 --size 512 --runs 5``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from compare_diffusers import (  # benchmarks/, on sys.path
    build_folder,
    components,
    count_flops,
    generate,
    header,
    median_seconds,
    peak_flops,
)

from txt2img import Txt2ImgPipeline


def load(tiny: bool, device: str, dtype: str) -> Txt2ImgPipeline:
    pipe = Txt2ImgPipeline.from_pretrained(build_folder(tiny), device=device, dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def first_call_seconds(pipe: Txt2ImgPipeline, size: int) -> float:
    start = time.perf_counter()
    generate(pipe, 1, size, "first")
    return time.perf_counter() - start


def as_array(output: object) -> np.ndarray:
    tensor = output if isinstance(output, torch.Tensor) else output.last_hidden_state  # type: ignore[attr-defined]
    return tensor.float().cpu().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per setting (default 3)")
    parser.add_argument("--tiny", action="store_true", help="tiny configuration: a smoke run")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="Inductor's cache folder (default: a new temporary one)"
    )
    parser.add_argument(
        "--device", default="cpu", help="where the pipeline runs: cpu (default), cuda, cuda:1"
    )
    parser.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="default float32"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the second process
    args = parser.parse_args()
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="txt2img-compile-"))
    pipe = load(args.tiny, args.device, args.dtype)
    device, dtype = pipe.device, pipe.dtype
    if args.child:  # print only the first compiled call's seconds
        pipe.compile(cache_dir=cache_dir)
        print(f"{first_call_seconds(pipe, args.size):.3f}")
        return

    peak = max(peak_flops(args.runs, device, dtype, args.tiny).values())
    calls = components(pipe, None, args.size)
    flops = {name: count_flops(call) for name, call in calls.items()}
    with torch.inference_mode():
        eager = {
            name: (median_seconds(call, args.runs, device), as_array(call())) for name, call in calls.items()
        }
    eager["end to end"] = (
        median_seconds(lambda: generate(pipe, 1, args.size, 0), args.runs, device),
        generate(pipe, 1, args.size, "check"),
    )

    pipe.compile(cache_dir=cache_dir)
    first = first_call_seconds(pipe, args.size)  # compiles every block at this size
    rows = []
    with torch.inference_mode():
        for name, call in calls.items():
            # its warm-up call compiles what the pipeline's did not
            seconds = median_seconds(call, args.runs, device)
            rows.append((name, seconds, float(np.abs(as_array(call()) - eager[name][1]).max())))
    seconds = median_seconds(lambda: generate(pipe, 1, args.size, 0), args.runs, device)
    image = generate(pipe, 1, args.size, "check")
    rows.append(("end to end", seconds, float(np.abs(image - eager["end to end"][1]).max())))
    child = subprocess.run(
        [sys.executable, __file__, "--child", "--size", str(args.size), "--cache-dir", str(cache_dir)]
        + ["--device", args.device, "--dtype", args.dtype]
        + (["--tiny"] if args.tiny else []),
        capture_output=True,
        text=True,
        check=True,
    )
    later_first = float(child.stdout.strip().splitlines()[-1])

    print(header(device, dtype))
    print(f"\n### `pipe.compile()` at {args.size}², batch 1 (median of {args.runs} runs, seconds)\n")
    print(
        "| timed | eager | compiled | compiled / eager | max difference | GFLOP | compiled GFLOP/s | of peak |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for name, compiled_s, diff in rows:
        eager_s = eager[name][0]
        rate = (
            f"{flops[name] / compiled_s / 1e9:.0f} | {flops[name] / compiled_s / peak:.0%}"
            if name in flops
            else "|"
        )
        work = f"{flops[name] / 1e9:.4g}" if name in flops else ""
        print(
            f"| {name} | {eager_s:.3f} | {compiled_s:.3f} | {compiled_s / eager_s:.2f} | {diff:.1e} | {work} | "
            f"{rate} |"
        )
    print(
        f"\nPeak: {peak / 1e9:.0f} GFLOP/s (the faster of a large matmul and a 3 × 3 convolution, this run)."
    )
    print(
        f"\nFirst call after `pipe.compile()` (it compiles): {first:.1f} s. In a new process with Inductor's "
        f"cache warm, the first call: {later_first:.1f} s. Eager call: {eager['end to end'][0]:.3f} s."
    )


if __name__ == "__main__":
    main()
