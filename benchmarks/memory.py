"""Peak memory of one generation per memory knob, on this machine's CPU (resident set size).

    python benchmarks/memory.py [--size 512] [--batch 1] [--model DIR]

Without ``--model`` it uses a pipeline of SD-Turbo's architecture and sizes with random weights
(``benchmarks/sd_turbo_random.py``, built once into the temporary folder). Each knob runs in a fresh process:
load, apply the knob, generate once to warm up, reset the peak (Linux ``/proc/self/clear_refs``), generate
again. It reports the resident memory before the timed call, the peak during it, the peak of the whole process
(loading and warm-up included) and the timed call's wall time. A knob ``NAME@B`` runs at batch ``B``. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

KNOBS = {
    "none": "everything in memory, float32",
    "no_packing": "float32, convolution weights not kept packed (set_cpu_weight_packing(False))",
    "bfloat16": "dtype=torch.bfloat16: weights stored in bfloat16, computed in float32",
    "model_offload": "pipe.enable_model_cpu_offload(): components rest on disk, one in memory at a time",
    "sequential_offload": "pipe.enable_sequential_cpu_offload(): one layer in memory at a time",
    "attention_slicing": 'pipe.enable_attention_slicing("max")',
    "vae_tiling": "pipe.vae.enable_tiling(tile_size=32, overlap=8): 256-pixel tiles",
    "model_offload+bfloat16+vae_tiling": "model offload + bfloat16 storage + VAE tiling (32, 8)",
    "none@2": "batch 2, everything in memory",
    "vae_slicing@2": "batch 2, pipe.vae.enable_slicing()",
}


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(knob: str, model: str, size: int, batch: int) -> dict[str, float]:
    import torch

    from txt2img import Txt2ImgPipeline, packed_weights

    knob, _, batch_text = knob.partition("@")
    batch = int(batch_text or batch)
    pipe = Txt2ImgPipeline.from_pretrained(model, dtype=torch.bfloat16 if "bfloat16" in knob else None)
    pipe.set_progress_bar_config(disable=True)
    if knob == "no_packing":
        packed_weights.set_cpu_weight_packing(False)
    if "model_offload" in knob:
        pipe.enable_model_cpu_offload()
    if knob == "sequential_offload":
        pipe.enable_sequential_cpu_offload()
    if knob == "attention_slicing":
        pipe.enable_attention_slicing("max")
    if knob == "vae_slicing":
        pipe.vae.enable_slicing()
    if "vae_tiling" in knob:
        pipe.vae.enable_tiling(tile_size=32, overlap=8)
    prompts = ["a photo of a cat"] * batch
    # warm-up
    pipe(prompts, height=size, width=size, generator=torch.Generator().manual_seed(0), output_type="np")
    process_peak_before = status_mib("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current resident size
    before = status_mib("VmRSS")
    start = time.perf_counter()
    prompts = ["a photo of a dog"] * batch  # another prompt: the text encoder runs again (no cache hit)
    pipe(prompts, height=size, width=size, generator=torch.Generator().manual_seed(1), output_type="np")
    seconds = time.perf_counter() - start
    call_peak = status_mib("VmHWM")
    return {
        "before": before,
        "call_peak": call_peak,
        "process_peak": max(process_peak_before, call_peak),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--model", help="a pipeline folder (default: SD-Turbo's architecture, random weights)"
    )
    parser.add_argument(
        "--knobs", default=",".join(KNOBS), help="comma-separated subset of: " + ", ".join(KNOBS)
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.size, args.batch)))
        return
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from sd_turbo_random import sd_turbo_random

        args.model = str(sd_turbo_random())
    import torch

    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"model {args.model}; {args.size}×{args.size}, batch {args.batch}; {time.strftime('%Y-%m-%d')}\n"
    )
    print(
        "| knob | RSS before the call (MiB) | peak during the call (MiB) | peak of the process (MiB) | call time (s) |"
    )
    print("|---|---|---|---|---|")
    for knob in args.knobs.split(","):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                knob,
                "--model",
                args.model,
                "--size",
                str(args.size),
                "--batch",
                str(args.batch),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            print(f"| {KNOBS[knob]} | failed: {done.stderr.strip().splitlines()[-1]} | | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"| {KNOBS[knob]} | {r['before']:,.0f} | {r['call_peak']:,.0f} | {r['process_peak']:,.0f} | {r['seconds']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
