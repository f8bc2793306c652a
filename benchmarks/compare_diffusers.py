"""txt2img against diffusers on identical weights: SD-Turbo's architecture (SD 2.1 UNet, SD VAE, SD 2 text
encoder, real sizes) with seeded random weights, one step; float32 on the CPU unless told otherwise.

Prints markdown tables: end-to-end latency and throughput (prompt → ``np`` image) of both libraries,
alternating A B A B in one process, with the SD VAE and with TAESD; the embedded default model; this machine's
peak FLOP/s; and, per txt2img component, FLOPs per image, time, FLOP/s and the fraction of that peak. The
pipelines are built once and cached under the temp dir. The CPU table in docs/speed.md comes from:

    python benchmarks/compare_diffusers.py --sizes 256,512 --batches 1,4 --runs 3

and the GPU one (both libraries in float16 on the first CUDA device) from:

    python benchmarks/compare_diffusers.py --device cuda --dtype float16 --sizes 512 --batches 1,16 --runs 5

Smoke run (tiny configurations, 64 × 64, one run): ``python benchmarks/compare_diffusers.py --tiny``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, StableDiffusionPipeline
from sd_turbo_random import CACHE, char_tokenizer, randomize  # benchmarks/, on sys.path when run as a script
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_flop_count
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import txt2img
from txt2img import DEFAULT_MODEL, TinyVAEDecoder, Txt2ImgPipeline

# Largest max abs difference of the two libraries' images in [0, 1] accepted as agreement: float32 sums in a
# different order stay far below 2e-3; in half precision each rounding is ~1e-3 and a UNet compounds them.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}
PROMPT = "a photo of a red fox in the snow"
CPU = torch.device("cpu")
KL_BLOCKS = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
FULL = {  # SD-Turbo: the SD 2.1 UNet, the SD VAE, the SD 2 (OpenCLIP ViT-H) text tower; TAESD's defaults
    "unet": {
        "sample_size": 64,
        "block_out_channels": (320, 640, 1280, 1280),
        "attention_head_dim": (5, 10, 20, 20),
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
    },
    "vae": {
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "sample_size": 512,
        **KL_BLOCKS,
    },
    "text": {
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 512,
    },
    "taesd": {},
}
TINY = {
    "unet": {
        "sample_size": 8,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
    },
    "vae": {
        "block_out_channels": (8, 16, 16, 16),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 64,
        **KL_BLOCKS,
    },
    "text": {
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
    },
    "taesd": {
        "encoder_block_out_channels": (8,) * 4,
        "decoder_block_out_channels": (8,) * 4,
        "num_encoder_blocks": (1,) * 4,
        "num_decoder_blocks": (1,) * 4,
    },
}
SD_TURBO_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
}
# FlopCounterMode has no formula for the flash-attention kernel that SDPA runs on CPUs, nor for the oneDNN
# convolution that txt2img.packed_weights calls with a packed weight: count them as SDPA and as a convolution.
CPU_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *args, out_shape=None, **kwargs: (
        sdpa_flop_count(q, k, v)
    ),
    torch.ops.mkldnn._convolution_pointwise: lambda x, w, *args, out_shape=None, **kwargs: conv_flop_count(
        list(x),
        list(w),
        list(out_shape),
        transposed=False,  # the counter passes shapes
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Building the random-weight pipeline (once; cached)


def build_folder(tiny: bool) -> Path:
    """A diffusers ``StableDiffusionPipeline`` folder with seeded random weights, plus ``taesd/`` in it."""
    folder = CACHE / ("diffusers-sd-turbo-random" + ("-tiny" if tiny else ""))
    if (folder / "model_index.json").is_file() and (folder / "taesd" / "config.json").is_file():
        return folder
    configs = TINY if tiny else FULL
    with torch.device("meta"):  # diffusers' own init of an 865 M-parameter UNet takes minutes
        unet = diffusers.UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        special = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}  # char_tokenizer's ids
        text = CLIPTextModel(CLIPTextConfig(**configs["text"], **special))
    unfinished = folder.with_name(folder.name + ".partial")
    shutil.rmtree(unfinished, ignore_errors=True)
    vocab = unfinished / "vocab"
    char_tokenizer(vocab)  # writes vocab.json and merges.txt: one token per character
    # SD 2 pads with "!"
    tokenizer = CLIPTokenizer(
        str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77, pad_token="!"
    )
    pipe = StableDiffusionPipeline(
        vae=randomize(vae, 2),
        text_encoder=randomize(text, 0),
        tokenizer=tokenizer,
        unet=randomize(unet, 1),
        scheduler=EulerDiscreteScheduler(**SD_TURBO_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(unfinished)
    torch.manual_seed(3)  # TAESD is small: default init is quick, and unlike randomize() gives a varied image
    AutoencoderTiny(**configs["taesd"]).save_pretrained(unfinished / "taesd")
    shutil.rmtree(vocab)
    shutil.rmtree(folder, ignore_errors=True)
    unfinished.rename(folder)
    return folder


def load_pair(
    folder: Path, device: torch.device, dtype: torch.dtype, **shared: Any
) -> tuple[StableDiffusionPipeline, Txt2ImgPipeline]:
    """Both libraries' pipelines from ``folder`` on ``device`` in ``dtype``; ``shared`` = already loaded
    components to reuse."""
    theirs = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, **shared.get("diffusers", {})
    )
    theirs.to(device=device, dtype=dtype)  # passed-in components too
    ours = Txt2ImgPipeline.from_pretrained(folder, dtype=dtype, device=device, **shared.get("txt2img", {}))
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    return theirs, ours


def load_taesd_pair(folder: Path, theirs: StableDiffusionPipeline, ours: Txt2ImgPipeline) -> tuple[Any, Any]:
    """The same pipelines with the TAESD decoder passed as ``vae=`` (text encoder and UNet shared)."""
    device, dtype = ours.device, ours.dtype
    taesd = TinyVAEDecoder.from_pretrained(folder / "taesd")
    taesd.to(device, dtype, memory_format=torch.channels_last)  # as Txt2ImgPipeline.from_pretrained stores it
    shared_theirs = {"unet": theirs.unet, "text_encoder": theirs.text_encoder, "tokenizer": theirs.tokenizer}
    return load_pair(
        folder,
        device,
        dtype,
        diffusers={"vae": AutoencoderTiny.from_pretrained(folder / "taesd"), **shared_theirs},
        txt2img={"vae": taesd, "gan": ours.gan, "text_encoder": ours.text_encoder},
    )


# ---------------------------------------------------------------------------------------------------------
# End-to-end latency


def prompts(batch: int, run: int | str) -> list[str]:
    """A fresh prompt per image and run, so txt2img's prompt cache never answers (diffusers has none)."""
    return [f"{PROMPT} {i} {run}" for i in range(batch)]


def generate(pipe: Any, batch: int, size: int, run: int | str) -> np.ndarray:
    extra = {"guidance_scale": 0.0} if isinstance(pipe, StableDiffusionPipeline) else {}
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompts(batch, run),
        height=size,
        width=size,
        num_inference_steps=1,
        output_type="np",
        generator=generator,
        **extra,
    ).images


def check_agreement(theirs: np.ndarray, ours: np.ndarray, what: str, tolerance: float) -> float:
    """Max abs difference of the two libraries' images; exits with status 1 if it exceeds ``tolerance``."""
    if ours.shape != theirs.shape or not (np.isfinite(ours).all() and np.isfinite(theirs).all()):
        sys.exit(f"FAIL {what}: shapes {ours.shape} vs {theirs.shape}, or non-finite values")
    diff = float(np.abs(ours - theirs).max())
    print(f"agreement {what}: max abs diff {diff:.2e} (image std {theirs.std():.3f})", file=sys.stderr)
    if diff > tolerance:
        sys.exit(f"FAIL {what}: txt2img and diffusers differ by {diff:.2e} > {tolerance} (--tolerance)")
    return diff


def alternate(calls: dict[str, Callable[[int], Any]], runs: int) -> dict[str, float]:
    """Median seconds of each call, timed A B A B … so that both see the same machine load."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for run in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call(run)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def end_to_end_rows(decoder: str, theirs: Any, ours: Any, args: argparse.Namespace) -> list[str]:
    """Per (size, batch): check that the outputs agree (the warm-up), then time both alternately. Each call
    ends with the images copied to the host, so GPU work is finished when its clock stops."""
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            what = f"{decoder} {size}² batch {batch}"
            warm_up = [generate(pipe, batch, size, "warm-up") for pipe in (theirs, ours)]
            diff = check_agreement(*warm_up, what, args.tolerance)
            calls = {
                "diffusers": partial(generate, theirs, batch, size),
                "txt2img": partial(generate, ours, batch, size),
            }
            median = alternate(calls, args.runs)
            a, b = median["diffusers"], median["txt2img"]
            rows.append(
                f"| {decoder} | {size}² | {batch} | {a:.3f} | {b:.3f} | {b / a:.2f} | "
                f"{batch / a:.3g} | {batch / b:.3g} | {diff:.1e} |"
            )
    return rows


def embedded_rows(batches: list[int], runs: int, device: torch.device, dtype: torch.dtype) -> list[str]:
    pipe = Txt2ImgPipeline.from_pretrained(DEFAULT_MODEL, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for batch in batches:
        generate(pipe, batch, 64, "warm-up")
        seconds = alternate({"txt2img": partial(generate, pipe, batch, 64)}, runs)["txt2img"]
        rows.append(f"| 64² | {batch} | {seconds * 1000:.1f} | {batch / seconds:.1f} |")
    return rows


# ---------------------------------------------------------------------------------------------------------
# FLOPs, component times and the machine's peak


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU (a no-op on the CPU, where calls return when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], runs: int, device: torch.device = CPU) -> float:
    """Median of ``runs`` timed calls after one warm-up, without autograd; on a GPU each call is timed
    until its queued work has finished."""
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(runs):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn: Callable[[], Any]) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=CPU_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def peak_flops(
    runs: int, device: torch.device = CPU, dtype: torch.dtype = torch.float32, tiny: bool = False
) -> dict[str, float]:
    """FLOP/s of a square matmul and of a 3 × 3, 256-channel convolution, channels-last, in ``dtype`` on
    ``device``. A GPU gets a larger matmul (8192²) and 16 images per convolution: the CPU's sizes leave most of
    its cores idle. ``tiny``: small kernels for a smoke run (CPUs emulate half precision ~200× slower)."""
    gpu = device.type != "cpu"
    side, images = (8192, 16) if gpu else (2048, 1)
    pixels = 128
    if tiny:
        side, images, pixels = 256, 1, 16
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device, dtype, memory_format=torch.channels_last)
    x = torch.randn(images, 256, pixels, pixels, device=device, dtype=dtype)
    x = x.to(memory_format=torch.channels_last)
    kernels = {
        f"matmul {side}² @ {side}²": partial(torch.mm, a, b),
        f"conv 3×3, 256 ch, {pixels}², batch {images}, channels-last": partial(conv, x),
    }
    return {name: count_flops(fn) / median_seconds(fn, runs, device) for name, fn in kernels.items()}


def components(
    ours: Txt2ImgPipeline, taesd: TinyVAEDecoder | None, size: int
) -> dict[str, Callable[[], Any]]:
    """Each txt2img component called directly, on prepared inputs for one image of ``size``², on the
    pipeline's device and in its dtype."""
    device, dtype = ours.device, ours.dtype
    input_ids, _ = ours.text_encoder.tokenize([PROMPT])
    input_ids = input_ids.to(device)
    with torch.inference_mode():
        context = ours.text_encoder.model(input_ids).last_hidden_state
    generator = torch.Generator().manual_seed(0)
    side = size // ours.vae.scale_factor
    noise = torch.randn(ours.gan.noise_shape(1, side, side), generator=generator).to(device, dtype)
    latents = torch.randn(1, ours.vae.config.latent_channels, side, side, generator=generator)
    latents = latents.to(device, dtype)
    calls = {
        "text encoder": lambda: ours.text_encoder.model(input_ids),
        "UNet": lambda: ours.gan(noise, 999.0, context),
        "VAE decoder": lambda: ours.vae(latents),
    }
    if taesd is not None:
        calls["TAESD decoder"] = lambda: taesd(latents)
    return calls


def component_rows(
    ours: Txt2ImgPipeline, taesd: TinyVAEDecoder | None, sizes: list[int], runs: int, peak: float
) -> list[str]:
    """Per size and component: GFLOP per image, median seconds, GFLOP/s, fraction of peak, floor; then the
    totals of each pipeline (times summed)."""
    totals = {
        "total, SD VAE": ("text encoder", "UNet", "VAE decoder"),
        "total, TAESD": ("text encoder", "UNet", "TAESD decoder"),
    }
    rows = []
    for size in sizes:
        calls = components(ours, taesd, size)
        measured = {
            name: (count_flops(fn), median_seconds(fn, runs, ours.device)) for name, fn in calls.items()
        }
        for total, parts in totals.items():
            if all(p in measured for p in parts):
                measured[total] = (sum(measured[p][0] for p in parts), sum(measured[p][1] for p in parts))
        for name, (flops, seconds) in measured.items():
            rate = flops / seconds
            rows.append(
                f"| {size}² | {name} | {flops / 1e9:.4g} | {seconds:.3g} | {rate / 1e9:.0f} | "
                f"{100 * rate / peak:.0f}% | {flops / peak:.3g} |"
            )
    return rows


# ---------------------------------------------------------------------------------------------------------
# Report


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_line(loaded_mib: float, device: torch.device) -> str:
    line = (
        f"Peak resident memory of the process (both libraries' pipelines in it): {loaded_mib:.0f} MiB "
        f"after loading, {peak_rss_mib():.0f} MiB in all"
    )
    if device.type == "cuda":
        line += f"; peak GPU memory allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return line


def header(device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    pairs = (line.partition(":") for line in cpuinfo.splitlines())
    fields = {key.strip(): value.strip() for key, _, value in pairs}
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    flags = fields.get("flags", "").split()
    cpu += " (AVX-512)" if "avx512f" in flags else " (AVX2)" if "avx2" in flags else ""
    machine = f"{cpu}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}) with {machine}"
    versions = (
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, txt2img {txt2img.__version__}"
    )
    command = " ".join(["python", *sys.argv])
    precision = str(dtype).removeprefix("torch.")
    return f"{machine}; {precision}; {versions}; {datetime.date.today()}; `{command}`"


def table(title: str, columns: list[str], rows: list[str]) -> None:
    print(f"\n### {title}\n\n| {' | '.join(columns)} |\n|{'---|' * len(columns)}")
    print("\n".join(rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(v) for v in text.split(",")]
    parser.add_argument("--sizes", type=ints, help="image sides in pixels (default 256,512; --tiny: 64)")
    parser.add_argument("--batches", type=ints, help="batch sizes (default 1,4; --tiny: 1)")
    parser.add_argument("--runs", type=int, help="timed runs, after one warm-up (default 5; --tiny: 1)")
    parser.add_argument("--no-taesd", action="store_true", help="skip the TAESD-decoder variant")
    parser.add_argument("--tiny", action="store_true", help="tiny configurations: a smoke run in seconds")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--device", default="cpu", help="where both pipelines run: cpu (default), cuda, cuda:1"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="both pipelines' weights and arithmetic (default float32; half precision is for GPUs: CPUs "
        "emulate it, and txt2img computes it in float32 there)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        help="largest max abs difference of the two libraries' images (in [0, 1]) taken as agreement "
        "(default 2e-3 in float32, 5e-2 in float16, 1e-1 in bfloat16)",
    )
    args = parser.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA GPU ({torch.__version__}).")
    args.dtype = getattr(torch, args.dtype)
    args.tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[args.dtype]
    args.sizes = args.sizes or ([64] if args.tiny else [256, 512])
    args.batches = args.batches or ([1] if args.tiny else [1, 4])
    args.runs = args.runs or (1 if args.tiny else 5)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    print(header(args.device, args.dtype))
    peaks = peak_flops(max(args.runs, 5), args.device, args.dtype, args.tiny)
    peak = max(peaks.values())

    folder = build_folder(args.tiny)
    theirs, ours = load_pair(folder, args.device, args.dtype)
    loaded_mib = peak_rss_mib()
    rows = end_to_end_rows("SD VAE", theirs, ours, args)
    taesd = None
    if not args.no_taesd:
        theirs_taesd, ours_taesd = load_taesd_pair(folder, theirs, ours)
        rows += end_to_end_rows("TAESD", theirs_taesd, ours_taesd, args)
        taesd = ours_taesd.vae
    precision = str(args.dtype).removeprefix("torch.")
    table(
        f"End to end, one step, prompt → np image, {precision} on {args.device} "
        f"(median of {args.runs} runs, seconds; images/s = batch ÷ median)",
        [
            "decoder",
            "size",
            "batch",
            "diffusers",
            "txt2img",
            "txt2img / diffusers",
            "diffusers images/s",
            "txt2img images/s",
            "max abs diff",
        ],
        rows,
    )
    table(
        "Embedded default model, txt2img",
        ["size", "batch", "latency (ms)", "images/s"],
        embedded_rows(args.batches, args.runs, args.device, args.dtype),
    )
    table(
        f"Peak {precision} FLOP/s of this machine ({args.device})",
        ["kernel", "GFLOP/s"],
        [f"| {name} | {rate / 1e9:.0f} |" for name, rate in peaks.items()],
    )
    table(
        f"txt2img components alone, batch 1 (peak = {peak / 1e9:.0f} GFLOP/s; floor = FLOPs ÷ peak)",
        ["size", "component", "GFLOP / image", "time (s)", "GFLOP/s", "of peak", "floor (s)"],
        component_rows(ours, taesd, args.sizes, max(args.runs, 3), peak),
    )
    print(f"\n{memory_line(loaded_mib, args.device)}")


if __name__ == "__main__":
    main()
