"""The ``txt2img`` command: a prompt in, PNG files out.

    txt2img "a red circle on a blue background" -o out.png --seed 0

Each PNG carries the prompt, seed, size and model in its text chunks (``txt2img.images.read_png_metadata``
reads them back). Exit status: 0 written, 1 the model or generation failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

EMBEDDED_MODEL_MISSING = (
    "the embedded default model is missing from this installation ({path}). Reinstall txt2img, or pass "
    "--model NAME_OR_PATH: a Hugging Face Hub repo id or a local folder saved with Txt2ImgPipeline.save_pretrained."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txt2img", description="Generate images from a text prompt.")
    parser.add_argument("prompt", help="what to draw, e.g. 'a red circle on a blue background'")
    parser.add_argument(
        "-o",
        "--output",
        default="out.png",
        help="PNG file to write (default: out.png); "
        "with --num-images N > 1, files NAME-0.png ... NAME-(N-1).png",
    )
    parser.add_argument(
        "--model",
        help="Hub repo id or local pipeline folder, txt2img's or a diffusers "
        "StableDiffusionPipeline such as stabilityai/sd-turbo (default: the embedded Shapes-64 model)",
    )
    parser.add_argument(
        "--seed", type=int, help="seed of the first image; image i uses seed + i (default: random)"
    )
    parser.add_argument("--num-images", type=int, default=1, help="how many images (default: 1)")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    parser.add_argument(
        "--steps",
        type=int,
        default=1,
        help="generator passes: 1 (default); 2-4 refine with "
        "one-step UNet models such as stabilityai/sd-turbo",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
    parser.add_argument("--dtype", default=None, help="float32, float16, bfloat16 or auto (default: float32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def output_paths(output: str, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for several."""
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num-images must be at least 1, got {args.num_images}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if not args.prompt.strip():
        parser.error("the prompt is empty: say what to draw")
    from txt2img import DEFAULT_MODEL, __version__

    model = args.model or DEFAULT_MODEL
    if args.model is None and not Path(DEFAULT_MODEL, "model_index.json").is_file():
        print(f"txt2img: error: {EMBEDDED_MODEL_MISSING.format(path=DEFAULT_MODEL)}", file=sys.stderr)
        return 1

    import torch

    from txt2img.generation import seeded_generators
    from txt2img.images import save_png
    from txt2img.pipeline import Txt2ImgPipeline

    try:
        pipe = Txt2ImgPipeline.from_pretrained(model, device=args.device, dtype=args.dtype)
    except (OSError, ValueError) as error:
        print(f"txt2img: error: could not load the model {model!r}: {error}", file=sys.stderr)
        return 1
    if args.quiet:
        pipe.set_progress_bar_config(disable=True)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    seeds = [seed + i for i in range(args.num_images)]
    try:
        images = pipe(
            args.prompt,
            num_images_per_prompt=args.num_images,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            generator=seeded_generators(seeds),
        ).images
    except (ValueError, TypeError, FloatingPointError, torch.OutOfMemoryError) as error:
        print(f"txt2img: error: {error}", file=sys.stderr)
        return 1
    for image, image_seed, path in zip(images, seeds, output_paths(args.output, len(images))):
        path.parent.mkdir(parents=True, exist_ok=True)
        params = {
            "prompt": args.prompt,
            "seed": image_seed,
            "size": f"{image.width}x{image.height}",
            "steps": args.steps,
            "model": args.model or "txt2img default (shapes-64)",
            "version": f"txt2img {__version__}",
        }
        save_png(image, path, params)
        print(path)
    return 0
