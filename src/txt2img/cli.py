"""The ``txt2img`` command: a prompt in, PNG files out.

    txt2img "a red circle on a blue background" -o out.png --seed 0
    txt2img --from-png out.png -o again.png        # the same image again, from the parameters in out.png

Each PNG carries the prompt, seed, size, steps and model in a ``parameters`` text chunk
(``txt2img.utils.read_png_metadata`` reads it back). Exit status: 0 written, 1 the model or generation
failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import secrets
import sys
from pathlib import Path

EMBEDDED_MODEL_MISSING = (
    "the embedded default model is missing from this installation ({path}). Reinstall txt2img, or pass "
    "--model NAME_OR_PATH: a Hugging Face Hub repo id or a local folder saved with Txt2ImgPipeline.save_pretrained."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txt2img", description="Generate images from a text prompt.")
    parser.add_argument(
        "prompt", nargs="?", help="what to draw, e.g. 'a red circle on a blue background' (or use --from-png)"
    )
    parser.add_argument(
        "-o",
        "--output",
        default="out.png",
        help="PNG file to write (default: out.png); with --num-images N > 1, files NAME-0.png ... "
        "NAME-(N-1).png; a name with {i} is a pattern for the image index, e.g. 'cat-{i:02d}.png'",
    )
    parser.add_argument(
        "--from-png",
        metavar="FILE",
        help="make an image again from the parameters in a PNG file written by txt2img (or another tool "
        "that writes the 'parameters' text chunk); other options given override the file's values",
    )
    parser.add_argument(
        "--model",
        help="Hub repo id or local pipeline folder, txt2img's or a diffusers "
        "StableDiffusionPipeline such as stabilityai/sd-turbo (default: the embedded Shapes-64 model)",
    )
    parser.add_argument(
        "--seed", type=int, help="seed of the first image; image i uses seed + i (default: random)"
    )
    parser.add_argument("--num-images", type=int, help="how many images (default: 1)")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    parser.add_argument(
        "--steps",
        type=int,
        help="generator passes: 1 (default); 2-4 refine with one-step UNet models such as stabilityai/sd-turbo",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
    parser.add_argument("--dtype", default=None, help="float32, float16, bfloat16 or auto (default: float32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and saved")
    return parser


def apply_png_parameters(parser: argparse.ArgumentParser, args: argparse.Namespace) -> float:
    """Fill the options not given on the command line from the ``--from-png`` file; returns its
    truncation psi (1 without a file)."""
    from txt2img.utils import model_location, read_png_metadata

    if args.from_png is None:
        return 1.0
    try:
        params = read_png_metadata(args.from_png)
    except (OSError, ValueError) as error:
        parser.error(f"--from-png {args.from_png}: cannot read it ({error})")
    if params is None:
        parser.error(
            f"--from-png {args.from_png}: the file has no 'parameters' text chunk, so there is nothing to "
            "make again (it was not written by txt2img, or its metadata was removed)"
        )
    if args.prompt is None:
        args.prompt = params.prompt
    if args.seed is None:
        if params.seed is None:
            parser.error(
                f"--from-png {args.from_png}: the file records no seed, so its image cannot be made again "
                "exactly; pass --seed N to make a new one with its other settings"
            )
        args.seed = params.seed
    for name in ("height", "width", "steps"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(params, name))
    if args.model is None and params.model is not None:
        args.model = model_location(params.model)
    return params.truncation_psi


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    truncation_psi = apply_png_parameters(parser, args)
    args.num_images = 1 if args.num_images is None else args.num_images
    args.steps = 1 if args.steps is None else args.steps
    if args.num_images < 1:
        parser.error(f"--num-images must be at least 1, got {args.num_images}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.prompt is None or not args.prompt.strip():
        parser.error("the prompt is empty: say what to draw (or pass --from-png FILE)")

    from txt2img import DEFAULT_MODEL, logs
    from txt2img.utils import output_paths

    try:
        paths = output_paths(args.output, args.num_images)
    except ValueError as error:
        parser.error(f"-o {args.output}: {error}")
    if args.from_png is not None and any(p.resolve() == Path(args.from_png).resolve() for p in paths):
        parser.error(f"-o {args.output} would overwrite the --from-png file: choose another output name")
    model = args.model or DEFAULT_MODEL
    if args.model is None and not Path(DEFAULT_MODEL, "model_index.json").is_file():
        print(f"txt2img: error: {EMBEDDED_MODEL_MISSING.format(path=DEFAULT_MODEL)}", file=sys.stderr)
        return 1
    logger = logging.getLogger(logs.LOGGER_NAME)
    level = logger.level  # restored after, for callers of main() in a running program
    if args.verbose:
        logs.set_verbosity("info")
    try:
        with logs.progress_bars_off() if args.quiet else contextlib.nullcontext():
            return generate(args, model, truncation_psi)
    finally:
        logger.setLevel(level)


def generate(args: argparse.Namespace, model: str, truncation_psi: float) -> int:
    """Load the model, generate and write the images; returns the exit status."""
    import torch

    from txt2img.generation import seeded_generators
    from txt2img.pipeline import Txt2ImgPipeline

    try:
        pipe = Txt2ImgPipeline.from_pretrained(model, device=args.device, dtype=args.dtype)
    except (OSError, ValueError) as error:
        print(f"txt2img: error: could not load the model {model!r}: {error}", file=sys.stderr)
        return 1
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    try:
        output = pipe(
            args.prompt,
            num_images_per_prompt=args.num_images,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            truncation_psi=truncation_psi,
            generator=seeded_generators([seed + i for i in range(args.num_images)]),
        )
    except (ValueError, TypeError, FloatingPointError, torch.OutOfMemoryError) as error:
        print(f"txt2img: error: {error}", file=sys.stderr)
        return 1
    try:
        written = output.save(args.output)
    except OSError as error:
        print(f"txt2img: error: could not write {args.output}: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0
