"""Speed of the embedded default model on this machine: images/s at batch 1 and 64, and the CLI's wall time.

    python benchmarks/embedded_model.py [--runs 5]

Prints a markdown table. Each figure is the median of ``--runs`` timed runs after one warm-up; the CLI is
timed as a fresh process from start to written PNG.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from txt2img import DEFAULT_MODEL, Txt2ImgPipeline

PROMPT = "a large red circle in the top left corner on a blue background"


def images_per_second(pipe: Txt2ImgPipeline, batch: int, runs: int) -> float:
    generators = [torch.Generator().manual_seed(i) for i in range(batch)]
    pipe([PROMPT] * batch, generator=generators, output_type="np")  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        pipe([PROMPT] * batch, generator=generators, output_type="np")
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def cli_seconds(runs: int) -> float:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs + 1):
            start = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "txt2img",
                    PROMPT,
                    "-o",
                    str(Path(tmp) / "out.png"),
                    "--seed",
                    str(i),
                    "--quiet",
                ],
                check=True,
                capture_output=True,
            )
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first run warms the file cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    pipe = Txt2ImgPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    rows = [
        ("images/s, batch 1", f"{images_per_second(pipe, 1, args.runs):.0f}"),
        ("images/s, batch 64", f"{images_per_second(pipe, 64, args.runs):.0f}"),
        ("CLI, start to written PNG", f"{cli_seconds(args.runs):.2f} s"),
    ]
    print(
        f"Embedded model, float32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}\n"
    )
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
