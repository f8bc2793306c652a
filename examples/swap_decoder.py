"""Swap a pipeline's KL decoder for a tiny TAESD-style decoder, offline.

    python examples/swap_decoder.py [--out swap-decoder] [--steps 300] [--seed 0]

TAESD (madebyollin/taesd) is a tiny decoder distilled from Stable Diffusion's KL decoder: it maps the same
latents to nearly the same images at a fraction of the cost. For the Hub models that is one line,

    pipe = Txt2ImgPipeline.from_pretrained("stabilityai/sd-turbo", vae=VAEDecoder.from_pretrained("madebyollin/taesd"))

The embedded model has a latent space of its own, so this script makes its TAESD the way TAESD was made:
it builds a ``TinyVAEDecoder`` for those latents and distils it from the embedded KL decoder on latents the
generator produces. Then it swaps it in, saves the new pipeline and loads it back. It writes, under OUT:

    tiny_vae/       the distilled decoder (config.json + safetensors; VAEDecoder.from_pretrained loads it)
    pipeline/       the embedded model with the tiny decoder, as a pipeline folder
    kl.png          four images with the KL decoder
    tiny.png        the same prompts and seeds with the tiny decoder
    report.json     the decoders' difference before and after distillation, and their decode times
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from txt2img import DEFAULT_MODEL, TinyVAEConfig, TinyVAEDecoder, Txt2ImgPipeline, VAEDecoder
from txt2img.utils import make_image_grid

PROMPTS = [
    "a large red circle in the top left corner on a blue background",
    "a small yellow triangle in the center on a black background",
    "a large white square at the bottom on a green background",
    "a small blue circle on the right on a yellow background",
]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle"]


def training_prompts(count: int, generator: torch.Generator) -> list[str]:
    """Random prompts of the embedded model's form, so the latents cover what it generates."""
    prompts = []
    for _ in range(count):
        colour, background = (COLOURS[i] for i in torch.randperm(len(COLOURS), generator=generator)[:2])
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=generator))]
        size = "large" if torch.rand(1, generator=generator) < 0.5 else "small"
        prompts.append(f"a {size} {colour} {shape} on a {background} background")
    return prompts


def tiny_decoder_for(vae: VAEDecoder, width: int = 16) -> TinyVAEDecoder:
    """A TinyVAEDecoder that reads ``vae``'s latents: same channels, latent scaling and pixel factor."""
    stages = vae.scale_factor.bit_length()  # one stage per 2x upsampling, plus the first
    config = TinyVAEConfig(
        latent_channels=vae.config.latent_channels,
        decoder_block_out_channels=(width,) * stages,
        num_decoder_blocks=(1,) * stages,
        scaling_factor=vae.config.scaling_factor,
        shift_factor=vae.config.shift_factor,
        sample_size=vae.config.sample_size,
    )
    return TinyVAEDecoder(config)


def mean_difference(tiny: TinyVAEDecoder, latents: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean absolute difference of the two decoders' images, in [-1, 1] pixel units."""
    with torch.no_grad():
        return (tiny.decode(latents) - targets).abs().mean().item()


def decode_seconds(decoder: VAEDecoder | TinyVAEDecoder, latents: torch.Tensor, repeats: int = 5) -> float:
    with torch.inference_mode():
        decoder.decode(latents)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            decoder.decode(latents)
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="swap-decoder", help="output folder (default: swap-decoder)")
    parser.add_argument("--steps", type=int, default=300, help="distillation steps (default: 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(args.seed)

    # 1. The embedded pipeline, and a pool of its latents with what its KL decoder makes of them
    pipe = Txt2ImgPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    rng = torch.Generator().manual_seed(args.seed)
    latents = torch.cat(
        [pipe(training_prompts(64, rng), generator=rng, output_type="latent").images for _ in range(4)]
    ).clone()  # (256, C, h, w); clone: tensors made under inference mode cannot be used for training
    with torch.no_grad():
        targets = pipe.vae.decode(latents)  # (256, 3, H, W) in [-1, 1]
    held_out = slice(0, 32)  # measured on, never trained on

    # 2. Distil: the tiny decoder learns to give the KL decoder's images for the same latents
    tiny = tiny_decoder_for(pipe.vae)
    before = mean_difference(tiny, latents[held_out], targets[held_out])
    optimizer = torch.optim.Adam(tiny.parameters(), lr=2e-3)
    for step in range(args.steps):
        index = torch.randint(32, len(latents), (16,), generator=rng)
        loss = F.l1_loss(tiny.decode(latents[index]), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step}: L1 {loss.item():.4f}")
    tiny.eval()
    after = mean_difference(tiny, latents[held_out], targets[held_out])
    tiny.save_pretrained(out / "tiny_vae")

    # 3. Swap it in: a component passed to from_pretrained replaces the one in the folder
    # VAEDecoder.from_pretrained reads the folder's config and returns the class it names: a TinyVAEDecoder.
    vae = VAEDecoder.from_pretrained(out / "tiny_vae")
    swapped = Txt2ImgPipeline.from_pretrained(DEFAULT_MODEL, vae=vae)
    swapped.save_pretrained(out / "pipeline")
    swapped = Txt2ImgPipeline.from_pretrained(out / "pipeline")  # loads as a whole, tiny decoder included
    swapped.set_progress_bar_config(disable=True)
    assert isinstance(swapped.vae, TinyVAEDecoder)

    # 4. The same prompts and seeds through both decoders
    for name, pipeline in (("kl", pipe), ("tiny", swapped)):
        generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
        images = pipeline(PROMPTS, generator=generators).images
        make_image_grid(images, rows=1, cols=len(PROMPTS)).save(out / f"{name}.png")

    report = {
        "steps": args.steps,
        "mean_abs_difference_before": before,
        "mean_abs_difference_after": after,
        "decode_seconds_kl_batch_64": decode_seconds(pipe.vae, latents[:64]),
        "decode_seconds_tiny_batch_64": decode_seconds(swapped.vae, latents[:64]),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
