"""Generate images for many prompts, in batches, each image with a seed of its own.

    python examples/batch_generate.py [PROMPTS.txt] [--out images] [--num-images 2] [--batch-size 16]
        [--seed 0] [--model NAME_OR_PATH] [--grid]

PROMPTS.txt holds one prompt per line (blank lines and lines starting with # are skipped); without it, a few
prompts for the embedded model are used. Image j of prompt i gets the seed SEED + i * NUM_IMAGES + j and a
generator of its own, so the batch it landed in does not change it: generating it alone with that seed gives
the same image (to float rounding), e.g. ``txt2img --from-png images/00003.png -o again.png``.

Writes OUT/00000.png, OUT/00001.png, ... (each carrying its prompt, seed, size, steps and model), OUT/index.jsonl
(one line per image: file, prompt, seed) and, with --grid, OUT/grid.png (a row per prompt).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from txt2img import DEFAULT_MODEL, Txt2ImgPipeline
from txt2img.utils import make_image_grid, save_png

EXAMPLE_PROMPTS = [
    "a large red circle in the top left corner on a blue background",
    "a small yellow triangle in the center on a black background",
    "a large white square at the bottom on a green background",
    "a small blue circle on the right on a yellow background",
    "a large green triangle in the bottom right corner on a purple background",
]


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and ``#`` comments skipped."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="?", type=Path, help="a text file, one prompt per line")
    parser.add_argument("--out", type=Path, default=Path("images"), help="output folder (default: images)")
    parser.add_argument("--num-images", type=int, default=2, help="images per prompt (default: 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (default: 0)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="Hub repo id or folder (default: the embedded model)"
    )
    parser.add_argument("--grid", action="store_true", help="also write OUT/grid.png, a row per prompt")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        parser.error("--num-images and --batch-size must be at least 1")
    prompts = read_prompts(args.prompts) if args.prompts else EXAMPLE_PROMPTS
    if not prompts:
        parser.error(f"{args.prompts} holds no prompts")

    # Every image of the run, in order: (prompt, seed).
    jobs = [
        (p, args.seed + i * args.num_images + j)
        for i, p in enumerate(prompts)
        for j in range(args.num_images)
    ]
    pipe = Txt2ImgPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    images = []
    start = time.perf_counter()
    with open(args.out / "index.jsonl", "w", encoding="utf-8") as index:
        for first in range(0, len(jobs), args.batch_size):
            batch = jobs[first : first + args.batch_size]
            output = pipe(
                [prompt for prompt, _ in batch],
                generator=[torch.Generator().manual_seed(seed) for _, seed in batch],  # one per image
            )
            # output.parameters[k] holds image k's prompt, seed, size, steps and model.
            for k, (image, parameters) in enumerate(zip(output.images, output.parameters)):
                path = save_png(image, args.out / f"{first + k:05d}.png", parameters)
                index.write(
                    json.dumps({"file": path.name, "prompt": parameters.prompt, "seed": parameters.seed})
                    + "\n"
                )
            images += output.images
    seconds = time.perf_counter() - start
    if args.grid:
        make_image_grid(images, rows=len(prompts), cols=args.num_images).save(args.out / "grid.png")
    print(f"wrote {len(jobs)} images to {args.out}/ in {seconds:.1f} s ({len(jobs) / seconds:.0f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
