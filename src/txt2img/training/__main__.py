"""``python -m txt2img.training shapes --out DIR``: reproduce the embedded default model from scratch.

``python -m txt2img.training folder --data DIR --out OUT [--resume]``: train a model on a folder of captioned
images.

Also under ``torchrun --nproc_per_node N -m txt2img.training shapes --out DIR``: data parallel on N processes
(see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time


def add_run_options(command: argparse.ArgumentParser) -> None:
    """The options of a training run, the same for ``shapes`` and ``folder``."""
    command.add_argument("--out", required=True, help="output folder; the pipeline goes to OUT/model")
    command.add_argument("--seed", type=int, default=0, help="seeds every stage (default 0)")
    command.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    command.add_argument(
        "--gan-steps",
        type=int,
        default=None,
        help="steps of the GAN stage (default: the recipe's, 3,500); with --resume, trains a finished run on",
    )
    command.add_argument("--tiny", action="store_true", help="a few steps on small networks (a smoke test)")
    command.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m txt2img.training", description="Train txt2img models.")
    commands = parser.add_subparsers(dest="command", required=True)
    shapes = commands.add_parser("shapes", help="train the Shapes-64 model that txt2img embeds")
    add_run_options(shapes)
    baseline = commands.add_parser(
        "baseline",
        help="train the text-conditional VAE path on a finished run's data and compare it with the run's GAN",
    )
    baseline.add_argument("--run", required=True, help="the folder of a finished 'shapes' run")
    baseline.add_argument(
        "--num-images", type=int, default=600, help="evaluation images per split (default 600)"
    )
    baseline.add_argument("--quiet", action="store_true", help="no progress bars")
    folder = commands.add_parser(
        "folder",
        help="train a model on your own captioned images (metadata.jsonl, or .txt captions beside them)",
    )
    folder.add_argument("--data", required=True, help="the folder of images and captions")
    folder.add_argument(
        "--size", type=int, default=64, help="image side in px, a multiple of 16 (default 64)"
    )
    add_run_options(folder)
    args = parser.parse_args(argv)
    if getattr(args, "gan_steps", None) is not None and args.gan_steps < 1:
        parser.error(f"--gan-steps must be 1 or more, got {args.gan_steps}")

    from txt2img import allocator, distributed
    from txt2img.training.folder_recipe import FolderRecipe, train_folder
    from txt2img.training.gan_training import TrainingDiverged
    from txt2img.training.recipe import ShapesRecipe, compare_with_baseline, run

    # The recipe trains on CPUs: gloo carries its gradients (one process alone joins no group).
    with distributed.process_group("gloo"):
        main = distributed.is_main_process()
        progress = not args.quiet and main
        if args.command == "baseline":
            table = compare_with_baseline(args.run, num_images=args.num_images, progress=progress)
            if main:
                print(table)
            return 0
        start = time.perf_counter()
        try:
            recipe: ShapesRecipe | FolderRecipe
            if args.command == "folder":
                recipe = (
                    FolderRecipe.tiny(args.seed, args.size)
                    if args.tiny
                    else FolderRecipe(args.seed, args.size)
                )
            else:
                recipe = ShapesRecipe.tiny(args.seed) if args.tiny else ShapesRecipe(seed=args.seed)
            if args.gan_steps is not None:
                recipe.gan_training = dataclasses.replace(recipe.gan_training, steps=args.gan_steps)
            with allocator.reuse_freed_memory():  # every step frees and allocates the same buffers: about 10%
                if isinstance(recipe, FolderRecipe):
                    model = train_folder(recipe, args.data, args.out, progress=progress, resume=args.resume)
                else:
                    model = run(recipe, args.out, progress=progress, resume=args.resume)
        except (TrainingDiverged, ValueError, OSError) as error:
            print(f"python -m txt2img.training: error: {error}", file=sys.stderr)
            # The message's advice is train_gan's; this command resumes only with the settings a run began with.
            if isinstance(error, TrainingDiverged):
                print(
                    "python -m txt2img.training: --resume continues a run only with the settings it started "
                    "with; for another seed or other settings, start again with another --out folder (other "
                    "settings than the command's: from Python, with train_folder or recipe.run).",
                    file=sys.stderr,
                )
            return 1
        if main:
            print(f"wrote {model} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
