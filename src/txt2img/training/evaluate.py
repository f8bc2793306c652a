"""Prompt-following evaluation on Shapes-64 (``shared/spec/shapes-64.md``).

A model is any ``generate(prompts, seeds)`` callable returning uint8 images (B, 64, 64, 3); the same
evaluation therefore serves the GAN pipeline (:func:`pipeline_generator`) and any baseline. It asks for
canonical prompts of seen and of held-out (colour, shape) combinations, reads every image back with
:func:`~txt2img.training.attributes.read_attributes`, and reports the fraction matching the prompt per
attribute and for all five at once, plus variety across seeds and throughput; and, per object (size, colour
and shape), how often the shape came out right.

    python -m txt2img.training.evaluate MODEL [--num-images N] [--seed S] [--json PATH] [--by-object]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from txt2img.generation import seeded_generators
from txt2img.images import to_uint8
from txt2img.training.attributes import ATTRIBUTE_NAMES, parse_caption, read_attributes
from txt2img.training.shapes import IMAGE_SIZE, canonical_caption, sample_spec

if TYPE_CHECKING:
    from txt2img.pipeline import Txt2ImgPipeline

Generate = Callable[[list[str], list[int]], np.ndarray]  # (prompts, seeds) → uint8 (B, 64, 64, 3)
ALL = "all five"
ObjectShapes = dict[str, float]  # {"images": count asked for, "shape": fraction with the right shape}


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent random stream per purpose, all determined by ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=stream))


def canonical_prompts(n: int, seed: int, held_out: bool) -> list[str]:
    """Canonical captions drawn deterministically, for evaluation.

    Args:
        n: Number of prompts.
        seed: Seed of the draw.
        held_out: Draw from the held-out (colour, shape) combinations instead of the seen ones.

    Returns:
        ``n`` canonical captions.
    """
    rng = _rng(seed, 0, int(held_out))
    return [canonical_caption(sample_spec(rng, held_out="only" if held_out else "exclude")) for _ in range(n)]


@dataclass
class EvalReport:
    """What :func:`evaluate` measured.

    Attributes:
        seen: Fraction of images matching their prompt, per attribute and for ``"all five"``, on prompts
            of (colour, shape) combinations seen in training.
        held_out: Likewise on the held-out combinations.
        variety: Mean absolute pixel difference (0–255 scale) between images of one prompt under
            different seeds; ``None`` when not measured. 0 means the seed changes nothing.
        images_per_second: Throughput of the ``generate`` callable over all its calls.
        num_images: Images generated per split (seen, held-out).
        shape_by_object: Per split (``"seen"``, ``"held_out"``) and object (``"small green square"``):
            the images asked for and the fraction with the right shape, to show which objects fail.
    """

    seen: dict[str, float]
    held_out: dict[str, float]
    variety: float | None
    images_per_second: float
    num_images: int
    shape_by_object: dict[str, dict[str, ObjectShapes]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable data."""
        return asdict(self)

    def to_markdown(self, by_object: bool = False) -> str:
        """A Markdown table of accuracy (rows: attributes and all five; columns: seen, held-out), then
        variety and speed; with ``by_object``, then a table of shape accuracy per object, worst first."""
        lines = [
            f"| attribute ({self.num_images} images each) | seen | held-out |",
            "|---|---|---|",
            *(f"| {r} | {self.seen[r]:.3f} | {self.held_out[r]:.3f} |" for r in (*ATTRIBUTE_NAMES, ALL)),
            "",
            "variety (mean |Δ| between seeds, 0–255): "
            + ("not measured" if self.variety is None else f"{self.variety:.2f}"),
            f"speed: {self.images_per_second:.1f} images/s",
        ]
        if by_object:
            rows = [
                (counts["shape"], obj, split.replace("_", "-"), counts["images"])
                for split, objects in self.shape_by_object.items()
                for obj, counts in objects.items()
            ]
            lines += ["", "| object | split | images | shape right |", "|---|---|---|---|"]
            lines += [f"| {obj} | {split} | {n} | {right:.3f} |" for right, obj, split, n in sorted(rows)]
        return "\n".join(lines)


class _TimedGenerate:
    """Calls ``generate`` in batches, checks its output, and adds up the time spent in it."""

    def __init__(self, generate: Generate, batch_size: int) -> None:
        self.generate = generate
        self.batch_size = batch_size
        self.seconds = 0.0
        self.images = 0

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        batches = []
        for start in range(0, len(prompts), self.batch_size):
            batch_prompts = list(prompts[start : start + self.batch_size])
            batch_seeds = [int(s) for s in seeds[start : start + self.batch_size]]
            began = time.perf_counter()
            images = np.asarray(self.generate(batch_prompts, batch_seeds))
            self.seconds += time.perf_counter() - began
            expected = (len(batch_prompts), IMAGE_SIZE, IMAGE_SIZE, 3)
            if images.shape != expected or images.dtype != np.uint8:
                raise ValueError(
                    f"generate() must return uint8 images of shape {expected}; got {images.dtype} "
                    f"{images.shape}. Shapes-64 is read at 64 × 64: generate at that size (or resize) "
                    "and convert to 0–255 uint8."
                )
            batches.append(images)
            self.images += len(batch_prompts)
        return np.concatenate(batches)


def _accuracy(prompts: list[str], images: np.ndarray) -> tuple[dict[str, float], dict[str, ObjectShapes]]:
    """Fraction right per attribute and for all five; and per object, the images and fraction of right shapes."""
    hits = np.zeros((len(prompts), len(ATTRIBUTE_NAMES)), dtype=bool)  # (N, 5)
    objects = []
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        wanted, read = parse_caption(prompt), read_attributes(image).as_dict()
        hits[i] = [read[name] == wanted[name] for name in ATTRIBUTE_NAMES]
        objects.append(f"{wanted['size']} {wanted['color']} {wanted['shape']}")
    result = {name: float(hits[:, j].mean()) for j, name in enumerate(ATTRIBUTE_NAMES)}
    result[ALL] = float(hits.all(axis=1).mean())
    names, index = np.unique(objects, return_inverse=True)  # sorted objects; each image's object
    images_per_object = np.bincount(index)
    right_per_object = np.bincount(index, weights=hits[:, ATTRIBUTE_NAMES.index("shape")])
    by_object: dict[str, ObjectShapes] = {
        str(name): {"images": int(n), "shape": float(right / n)}
        for name, n, right in zip(names, images_per_object, right_per_object)
    }
    return result, by_object


def _variety(timed: _TimedGenerate, prompts: list[str], seeds: np.ndarray) -> float:
    """Mean |Δ| (0–255) between the images of each prompt over every pair of seeds."""
    k = len(seeds) // len(prompts)
    images = timed([p for p in prompts for _ in range(k)], list(seeds)).astype(np.float32)
    images = images.reshape(len(prompts), k, -1)  # (P, K, H * W * 3)
    pairs = [np.abs(images[:, i] - images[:, j]).mean() for i, j in itertools.combinations(range(k), 2)]
    return float(np.mean(pairs))


def evaluate(
    generate: Generate,
    *,
    num_images: int = 600,
    seed: int = 0,
    batch_size: int = 64,
    variety_prompts: int = 16,
    variety_seeds: int = 4,
) -> EvalReport:
    """Measure how well ``generate`` follows canonical Shapes-64 prompts.

    Args:
        generate: ``(prompts, seeds) → uint8 (B, 64, 64, 3)``, one image per prompt, seeded by its seed.
        num_images: Images for seen prompts, and as many for held-out prompts.
        seed: Seed of the prompts and of the per-image seeds.
        batch_size: Prompts per ``generate`` call.
        variety_prompts: Seen prompts (the first ones of the seen split) used to measure variety; 0 skips it.
        variety_seeds: Seeds per variety prompt (at least 2); every pair of them is compared.

    Returns:
        The report.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be positive; got {num_images} and {batch_size}.")
    if variety_prompts > 0 and variety_seeds < 2:
        raise ValueError(f"variety needs at least 2 seeds per prompt; got variety_seeds={variety_seeds}.")
    timed = _TimedGenerate(generate, batch_size)
    accuracy: dict[bool, dict[str, float]] = {}
    by_object: dict[str, dict[str, ObjectShapes]] = {}
    for held_out in (False, True):
        prompts = canonical_prompts(num_images, seed, held_out)
        seeds = _rng(seed, 1, int(held_out)).integers(0, 2**31, size=num_images)
        accuracy[held_out], by_object["held_out" if held_out else "seen"] = _accuracy(
            prompts, timed(prompts, list(seeds))
        )
    variety: float | None = None
    if variety_prompts > 0:
        seeds = _rng(seed, 2).integers(0, 2**31, size=variety_prompts * variety_seeds)
        same_prompts = canonical_prompts(variety_prompts, seed, False)  # the first prompts of the seen split
        variety = _variety(timed, same_prompts, seeds)
    return EvalReport(
        seen=accuracy[False],
        held_out=accuracy[True],
        variety=variety,
        images_per_second=timed.images / max(timed.seconds, 1e-9),
        num_images=num_images,
        shape_by_object=by_object,
    )


def pipeline_generator(pipe: Txt2ImgPipeline, truncation_psi: float = 1.0) -> Generate:
    """Adapt a :class:`~txt2img.Txt2ImgPipeline` to the ``generate(prompts, seeds)`` contract.

    Args:
        pipe: The pipeline; its progress bar is turned off.
        truncation_psi: Passed to every call (1: off; GAN generators only).

    Returns:
        A callable giving uint8 (B, H, W, 3) images; image ``i`` is drawn with a ``torch.Generator``
        seeded with ``seeds[i]``.
    """
    pipe.set_progress_bar_config(disable=True)

    def generate(prompts: list[str], seeds: list[int]) -> np.ndarray:
        output = pipe(
            prompts, generator=seeded_generators(seeds), output_type="np", truncation_psi=truncation_psi
        )
        images = np.asarray(output.images)  # (B, H, W, 3) in [0, 1]
        return to_uint8(images)

    return generate


def main(argv: list[str] | None = None) -> int:
    """Command line: evaluate a saved pipeline and print the Markdown report."""
    parser = argparse.ArgumentParser(
        prog="python -m txt2img.training.evaluate", description="Evaluate a pipeline on Shapes-64 prompts."
    )
    parser.add_argument("model", help="A pipeline folder or Hub repo id (Txt2ImgPipeline.from_pretrained).")
    parser.add_argument("--num-images", type=int, default=600, help="images per split, seen and held-out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="e.g. cuda; default CPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument(
        "--by-object", action="store_true", help="also print shape accuracy per object, worst first"
    )
    parser.add_argument(
        "--truncation-psi",
        type=float,
        default=1.0,
        help="GAN generators: pull each image toward the prompt's typical one (below 1: less variety; default 1)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="evaluate the EMA generator of this GAN training checkpoint (a run's checkpoint/ folder) in place "
        "of MODEL's generator; MODEL, the same run's model/, supplies the text encoder and the decoder",
    )
    args = parser.parse_args(argv)

    from txt2img import Txt2ImgPipeline

    pipe = Txt2ImgPipeline.from_pretrained(args.model, device=args.device)
    if args.checkpoint is not None:
        from txt2img.training.checkpoint import load_checkpoint_module

        try:
            extra = load_checkpoint_module(args.checkpoint, "generator_ema", pipe.gan)
        except (OSError, ValueError) as error:
            print(f"{parser.prog}: error: --checkpoint: {error}", file=sys.stderr)
            return 1
        print(f"generator: the EMA generator of {args.checkpoint}, step {extra.get('step', '?')}")
    generate = pipeline_generator(pipe, args.truncation_psi)
    report = evaluate(generate, num_images=args.num_images, seed=args.seed, batch_size=args.batch_size)
    print(report.to_markdown(by_object=args.by_object))
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
