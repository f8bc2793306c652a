"""What keeping a convolution's weight packed for oneDNN is worth, by map size: Stable Diffusion's UNet's 3 × 3
convolutions at batch 1, each timed with the weight reordered on every call (``F.conv2d``) and packed once
(``txt2img.packed_weights.Conv2d``), alternately in one process. The numbers in docs/speed.md and in
``txt2img.packed_weights`` come from:

    python benchmarks/packed_conv.py --runs 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from compare_diffusers import header  # benchmarks/, on sys.path

from txt2img import packed_weights

# (channels, map side): the UNet's 3 × 3 convolutions at 512 × 512, from its smallest map to its largest
LAYERS = ((1280, 8), (1280, 16), (640, 32), (320, 64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed calls per setting (default 7)")
    parser.add_argument("--tiny", action="store_true", help="small layers: a smoke run")
    args = parser.parse_args()
    layers = ((32, 8), (16, 16)) if args.tiny else LAYERS
    rows = []
    for channels, side in layers:
        torch.manual_seed(0)
        conv = packed_weights.Conv2d(channels, channels, 3, padding=1).to(memory_format=torch.channels_last)
        x = torch.randn(1, channels, side, side).to(memory_format=torch.channels_last)
        times: dict[bool, list[float]] = {False: [], True: []}
        saved = packed_weights.MAX_PIXELS
        packed_weights.MAX_PIXELS = side * side  # this layer packs whatever the library's bound
        with torch.inference_mode():
            for run in range(-1, args.runs):
                for packed in (False, True):
                    packed_weights.set_cpu_weight_packing(packed)
                    start = time.perf_counter()
                    conv(x)
                    if run >= 0:
                        times[packed].append(time.perf_counter() - start)
        packed_weights.MAX_PIXELS = saved
        packed_weights.set_cpu_weight_packing(None)
        off, on = (statistics.median(times[p]) * 1000 for p in (False, True))
        gflop = 2 * side * side * channels * channels * 9 / 1e9
        rows.append(f"| {channels} | {side} × {side} | {gflop:.2f} | {off:.2f} | {on:.2f} | {on / off:.2f} |")
    print(header())
    print(f"\n### 3 × 3 convolutions, batch 1, float32 (median of {args.runs} calls, ms)\n")
    print("| channels | map | GFLOP | reordered every call | packed once | packed / reordered |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
