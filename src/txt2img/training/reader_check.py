"""How well the attribute reader reads ground truth, clean and slightly perturbed, before it judges a model.

Generated images are never exact renderings: their edges are a little soft and their flat colours carry a
grey level or two of noise. A reader fit to judge them must read renderings so perturbed as well as clean
ones. This draws Shapes-64 renderings of seen and held-out pairs, applies each perturbation (a Gaussian blur
of the image plane, then Gaussian pixel noise, rounded to uint8), and prints per perturbation the fraction of
right shapes for each (size, shape) and of images right in all five attributes.

    python -m txt2img.training.reader_check [--num-images N] [--seed S]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from txt2img.training.attributes import read_attributes
from txt2img.training.shapes import SHAPES, SIZES, render_batch, sample_spec

# (blur σ in px, noise σ in grey levels 0–255): one grey level is invisible; 8 is plain to see.
PERTURBATIONS = ((0.0, 0.0), (0.0, 1.0), (0.0, 2.0), (0.0, 4.0), (0.0, 8.0), (0.6, 2.0), (1.0, 4.0))


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur over height and width, edges repeated: float (B, H, W, C) → float (B, H, W, C)."""
    taps = np.arange(-3, 4)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(images, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="edge")
    height, width = images.shape[1:3]
    rows = sum(k * padded[:, i : i + height] for i, k in enumerate(kernel))
    return sum(k * rows[:, :, i : i + width] for i, k in enumerate(kernel))


def perturb(
    images: np.ndarray, blur_sigma: float, noise_sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """uint8 (B, H, W, 3) → uint8: blurred (σ in px; 0: not), then Gaussian noise (σ in grey levels), rounded."""
    pixels = images.astype(np.float64)
    if blur_sigma:
        pixels = blur(pixels, blur_sigma)
    if noise_sigma:
        pixels = pixels + rng.normal(0.0, noise_sigma, pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def reader_accuracy(
    num_images: int, blur_sigma: float, noise_sigma: float, seed: int = 0
) -> dict[str, float]:
    """The reader on perturbed renderings, a third of them of held-out pairs.

    Args:
        num_images: Renderings drawn.
        blur_sigma: Blur σ in px (0: none).
        noise_sigma: Pixel noise σ in grey levels (0: none).
        seed: Seed of the draw and of the noise.

    Returns:
        The fraction of right shapes per ``"{size} {shape}"`` and, under ``"all five"``, of images right in
        every attribute.
    """
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, held_out="only" if i % 3 == 0 else "exclude") for i in range(num_images)]
    images = perturb(render_batch(specs), blur_sigma, noise_sigma, rng)
    right: dict[str, list[bool]] = {f"{size} {shape}": [] for size in SIZES for shape in SHAPES}
    all_five = []
    for image, spec in zip(images, specs, strict=True):
        reading = read_attributes(image)
        right[f"{spec.size} {spec.shape}"].append(reading.shape == spec.shape)
        all_five.append(reading.as_dict() == spec.attributes)
    accuracy = {name: float(np.mean(r)) if r else float("nan") for name, r in right.items()}
    return {**accuracy, "all five": float(np.mean(all_five))}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reader's accuracy under each of ``PERTURBATIONS`` as a Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m txt2img.training.reader_check", description=__doc__)
    parser.add_argument(
        "--num-images", type=int, default=3000, help="renderings per perturbation (default 3000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw and the noise (default 0)")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num-images must be 1 or more, got {args.num_images}")
    rows = [(b, n, reader_accuracy(args.num_images, b, n, args.seed)) for b, n in PERTURBATIONS]
    names = list(rows[0][2])
    print(f"| blur σ (px) | noise σ (0–255) | {' | '.join(names)} |")
    print("|---|---|" + "---|" * len(names))
    for b, n, accuracy in rows:
        print(f"| {b:g} | {n:g} | " + " | ".join(f"{accuracy[name]:.3f}" for name in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
