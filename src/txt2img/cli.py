"""The ``txt2img`` command: a prompt in, PNG files out.

    txt2img "a red circle on a blue background" -o out.png --seed 0
    txt2img --from-png out.png -o again.png        # the same image again, from the parameters in out.png
    txt2img batch prompts.txt --out images         # a file of prompts, one PNG per image (txt2img.batch)

Each PNG carries the prompt, seed, size, steps and model in a ``parameters`` text chunk
(``txt2img.utils.read_png_metadata`` reads it back). Exit status: 0 written, 1 the model or generation
failed, 2 bad arguments.

``batch`` is a command only when a file argument follows it (``txt2img batch FILE ...``) or help is asked
(``txt2img batch --help``): every other use of the word was, and stays, a prompt (``txt2img batch -o
b.png`` draws "batch"), and ``txt2img batch FILE`` was an error before, so no command that worked changes
meaning. One entry point also keeps ``python -m txt2img batch`` and ``torchrun -m txt2img batch`` working.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from txt2img.pipeline import Txt2ImgPipeline

EMBEDDED_MODEL_MISSING = (
    "the embedded default model is missing from this installation ({path}). Reinstall txt2img, or pass "
    "--model NAME_OR_PATH: a Hugging Face Hub repo id or a local folder saved with Txt2ImgPipeline.save_pretrained."
)


BATCH_COMMAND = "batch"


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    """``--dtype``, the same for generating and for batch runs."""
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32, float16, bfloat16 or auto (default: auto: float32 on CPUs, bfloat16 or float16 on GPUs)",
    )


def add_compile_option(parser: argparse.ArgumentParser) -> None:
    """``--compile``, the same for generating and for batch runs."""
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the networks' repeated blocks before generating (pipe.compile()): the first run "
        "at a size compiles, seconds on a GPU, up to a minute on a small CPU; later runs reuse Inductor's "
        "cache. Pays for many images, not for one",
    )


def compile_pipeline(pipe: Txt2ImgPipeline, args: argparse.Namespace) -> bool:
    """``pipe.compile()`` when ``--compile`` was given; False (with the reason printed) when it cannot run."""
    if not args.compile:
        return True
    try:
        pipe.compile()
    except (RuntimeError, ValueError) as error:
        print(f"txt2img: error: --compile: {error}", file=sys.stderr)
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="txt2img",
        description="Generate images from a text prompt.",
        epilog="Many prompts: txt2img batch PROMPTS --out DIR (see txt2img batch --help).",
    )
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
    add_dtype_option(parser)
    add_compile_option(parser)
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


def is_batch_command(argv: list[str]) -> bool:
    """True for ``txt2img batch FILE ...`` and ``txt2img batch --help``; ``batch`` alone or followed by an
    option is a prompt."""
    return (
        len(argv) > 1
        and argv[0] == BATCH_COMMAND
        and (not argv[1].startswith("-") or argv[1] in ("-h", "--help"))
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if is_batch_command(argv):
        return batch_main(argv[1:])
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
    if not compile_pipeline(pipe, args):
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


# ---------------------------------------------------------------------------------------------------------
# txt2img batch


def build_batch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="txt2img batch",
        description="Generate one PNG per (prompt, image) from a file of prompts, with a manifest. A rerun "
        "makes only the images still missing; under torchrun the prompts are shared among the processes.",
        epilog="Seeds: image j of prompt i gets the first 63 bits of sha256(f'{seed},{i},{j}'), or S + j "
        "for a JSONL prompt with its own seed S. Several processes: torchrun --nproc_per_node N -m txt2img "
        "batch PROMPTS --out DIR ...",
    )
    parser.add_argument(
        "prompts",
        help='a text file, one prompt a line, or a .jsonl file of {"prompt": ..., "seed": ..., '
        '"num_images": ...} objects (seed and num_images optional); blank lines are skipped',
    )
    parser.add_argument(
        "--out", required=True, help="output folder: DIR/0000/0000000-00.png, ..., DIR/manifest.jsonl"
    )
    parser.add_argument("--model", help="Hub repo id or local pipeline folder (default: the embedded model)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (default: 0)")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    parser.add_argument("--steps", type=int, default=1, help="generator passes (default: 1)")
    parser.add_argument(
        "--device",
        default=None,
        help="cpu (default), cuda (under torchrun: each process its own GPU, cuda:LOCAL_RANK), cuda:1, mps",
    )
    add_dtype_option(parser)
    add_compile_option(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and done")
    return parser


def batch_main(argv: list[str]) -> int:
    """``txt2img batch PROMPTS --out DIR ...``; returns the exit status."""
    import torch

    from txt2img import DEFAULT_MODEL, distributed, logs
    from txt2img.batch import generate_batch, read_prompts

    parser = build_batch_parser()
    args = parser.parse_args(argv)
    for name in ("num_images", "batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be in [0, 2**63), got {args.seed}")
    try:
        prompts = read_prompts(args.prompts)
    except (OSError, ValueError) as error:
        parser.error(f"{args.prompts}: {error}" if isinstance(error, OSError) else str(error))
    model = args.model or DEFAULT_MODEL
    if args.model is None and not Path(DEFAULT_MODEL, "model_index.json").is_file():
        print(f"txt2img: error: {EMBEDDED_MODEL_MISSING.format(path=DEFAULT_MODEL)}", file=sys.stderr)
        return 1
    logger = logging.getLogger(logs.LOGGER_NAME)
    level = logger.level
    if args.verbose:
        logs.set_verbosity("info")
    try:
        with logs.progress_bars_off() if args.quiet else contextlib.nullcontext():
            from txt2img.pipeline import Txt2ImgPipeline

            try:
                device = distributed.local_device(args.device)
                pipe = Txt2ImgPipeline.from_pretrained(model, device=device, dtype=args.dtype)
            except (OSError, ValueError) as error:
                print(f"txt2img: error: could not load the model {model!r}: {error}", file=sys.stderr)
                return 1
            if not compile_pipeline(pipe, args):
                return 1
            try:
                result = generate_batch(
                    pipe,
                    prompts,
                    args.out,
                    num_images=args.num_images,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    height=args.height,
                    width=args.width,
                    num_inference_steps=args.steps,
                    progress=not args.quiet,
                )
            except (ValueError, TypeError, OSError, FloatingPointError, torch.OutOfMemoryError) as error:
                print(f"txt2img: error: {error}", file=sys.stderr)
                return 1
    finally:
        logger.setLevel(level)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: once, from rank 0
        print(f"{result.manifest} ({result.total} images)")
    return 0
