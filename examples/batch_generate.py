"""Generate images for many prompts, in batches, with a seed per image that makes it again.

    python examples/batch_generate.py [PROMPTS] [--out images] [--num-images 2] [--batch-size 16]
        [--seed 0] [--model NAME_OR_PATH]

This is ``txt2img batch PROMPTS --out images ...`` from Python (``txt2img.batch.generate_batch``; see
docs/distributed.md for running it on several processes). PROMPTS is a text file, one prompt a line, or a
``.jsonl`` file, one ``{"prompt": ..., "seed": ..., "num_images": ...}`` a line; without it, a few prompts
for the embedded model are used.

Writes OUT/0000/0000000-00.png, ... (a PNG per image, carrying its prompt, seed, size, steps and model, so
``txt2img --from-png FILE`` makes it again), OUT/manifest.jsonl (a line per image) and OUT/batch.json (the
run's settings), then OUT/grid.png, a row per prompt (the first 8). Run it again and it makes only what is
missing: here, nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from txt2img import DEFAULT_MODEL, Txt2ImgPipeline
from txt2img.batch import generate_batch
from txt2img.utils import make_image_grid

EXAMPLE_PROMPTS = [
    "a large red circle in the top left corner on a blue background",
    "a small yellow triangle in the center on a black background",
    "a large white square at the bottom on a green background",
    "a small blue circle on the right on a yellow background",
    "a large green triangle in the bottom right corner on a purple background",
]
GRID_ROWS = 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="?", help="a prompts file (.txt or .jsonl)")
    parser.add_argument("--out", type=Path, default=Path("images"), help="output folder (default: images)")
    parser.add_argument("--num-images", type=int, default=2, help="images per prompt (default: 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (default: 0)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="Hub repo id or folder (default: the embedded model)"
    )
    args = parser.parse_args(argv)

    pipe = Txt2ImgPipeline.from_pretrained(args.model)
    run = {"num_images": args.num_images, "batch_size": args.batch_size, "seed": args.seed}
    result = generate_batch(pipe, args.prompts or EXAMPLE_PROMPTS, args.out, **run)
    print(f"{result.written} images made, {result.skipped} already there, in {result.seconds:.1f} s")

    # The manifest lists every image of the run in order, prompt by prompt: a grid row per prompt (the
    # first GRID_ROWS prompts; rows of prompts with fewer images are filled with black).
    manifest = [json.loads(line) for line in result.manifest.read_text(encoding="utf-8").splitlines()]
    rows: dict[int, list[Image.Image]] = {}
    for entry in manifest:
        if entry["prompt_index"] < GRID_ROWS:
            with Image.open(args.out / entry["file"]) as image:
                rows.setdefault(entry["prompt_index"], []).append(image.convert("RGB"))
    width = max(len(row) for row in rows.values())
    blank = Image.new("RGB", rows[0][0].size)
    cells = [image for row in rows.values() for image in row + [blank] * (width - len(row))]
    make_image_grid(cells, rows=len(rows), cols=width).save(args.out / "grid.png")

    # Nothing is made twice: a second run into the same folder finds every file in place.
    again = generate_batch(pipe, args.prompts or EXAMPLE_PROMPTS, args.out, progress=False, **run)
    print(f"run again: {again.written} images made, {again.skipped} already there")
    print(f"wrote {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
