"""Sliced and tiled decoding (``txt2img.vae_tiling``) for both decoders, on small seeded ones: slicing equals
the batched decode; tiles are placed and weighted exactly (a local decoder tiles without any difference);
real decoders tile close to the untiled decode and without seams, by a seam metric that flags a hard cut;
and a tiled decode of 2048 × 2048 (TAESD) or 1024 × 1024 (KL) pixels peaks at under half the memory."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import txt2img
from txt2img.vae import VAEConfig, VAEDecoder
from txt2img.vae_tiling import Tiling, blend_weights, decode_tiled, tile_starts
from txt2img.vae_tiny import TinyVAEConfig, TinyVAEDecoder

# Default init leaves the decoders' outputs nearly flat; this spreads them (as in test_vae_tiny).
SPREAD = 1.5
TILE, OVERLAP = 32, 8
# Latents (56, 72) in tiles of 32 with overlap 8: rows [0, 24] (one regular seam), columns [0, 24, 40]
# (a regular seam, then a last tile pushed back to end flush).
LATENT_SHAPE = (1, 4, 56, 72)
# A border's neighbouring-pixel difference over the typical one (see seam_ratio). Measured: a hard cut scores
# 1.8-2.5 (KL) and 5.3-9.7 (TAESD); blended tiles 1.0-1.3, as the untiled image does at the same positions.
SEAM_RATIO = 1.6

Decoder = VAEDecoder | TinyVAEDecoder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two threads on a busy 2-core machine can wait on each other for seconds; one never does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kl_decoder(**config) -> VAEDecoder:
    torch.manual_seed(0)
    model = VAEDecoder(
        VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, **config)
    )
    return spread(model.eval())


def tiny_decoder(**config) -> TinyVAEDecoder:
    torch.manual_seed(0)
    model = TinyVAEDecoder(
        TinyVAEConfig(decoder_block_out_channels=(8, 8, 8, 8), num_decoder_blocks=(1, 1, 1, 1), **config)
    )
    return spread(model.eval())


def spread(model: Decoder) -> Decoder:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(SPREAD)
    return model


DECODERS: dict[str, Callable[..., Decoder]] = {"kl": kl_decoder, "tiny": tiny_decoder}
# Bounds on |tiled - untiled| / std(untiled), mean and max. The KL decoder's GroupNorm statistics and
# mid-block attention see one tile only, hence its larger difference (measured 0.20 and 2.4; diffusers'
# tiled_decode differs as much). TAESD measured 0.002 and 0.16.
DIFFERENCE_BOUNDS = {"kl": (0.25, 3.0), "tiny": (0.01, 0.4)}


def smooth_latents(shape: tuple[int, ...], seed: int = 1, width: int = 9) -> torch.Tensor:
    """Low-pass filtered Gaussian noise (a box filter), about unit variance."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    box = torch.full((shape[1], 1, width, width), 1.0 / width)  # 1/width, not 1/width²: keeps the variance
    return F.conv2d(F.pad(noise, (width // 2,) * 4, mode="reflect"), box, groups=shape[1])


def decode(model: Decoder, latents: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.decode(latents)


def neighbour_differences(images: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean |x[c + 1] - x[c]| along ``dim`` (2: rows, 3: columns), per position c."""
    return images.diff(dim=dim).abs().mean(dim=[d for d in range(4) if d != dim])


def seam_ratio(images: torch.Tensor, borders: list[int], factor: int, dim: int) -> float:
    """The largest neighbouring difference across a border (between pixels b-1 and b) over the median one at
    the same position within the decoder's f-pixel upsampling period (where upsampled pixels meet)."""
    differences = neighbour_differences(images, dim)
    return max(
        (differences[b - 1] / differences[(b - 1) % factor :: factor].median()).item() for b in borders
    )


def blend_borders(starts: list[int], tile: int, overlap: int, factor: int) -> list[int]:
    """Pixel positions where a tile begins or ends, and where each blend zone begins and ends."""
    ends = [s + tile for s in starts[:-1]]
    return sorted(
        {s * factor for s in starts[1:]} | {e * factor for e in ends} | {(e - overlap) * factor for e in ends}
    )


def naive_tiles(model: Decoder, latents: torch.Tensor, tile: int) -> torch.Tensor:
    """Tiles decoded alone and put side by side: the hard cut that blending avoids."""
    h, w = latents.shape[-2:]
    rows = [
        torch.cat(
            [decode(model, latents[..., y : y + tile, x : x + tile]) for x in range(0, w, tile)], dim=-1
        )
        for y in range(0, h, tile)
    ]
    return torch.cat(rows, dim=-2)


# ---------------------------------------------------------------------------------------------------------
# Tile placement and weights


def test_tile_starts() -> None:
    assert tile_starts(64, 64, 16) == [0]
    assert tile_starts(20, 64, 16) == [0]
    assert tile_starts(56, 32, 8) == [0, 24]
    assert tile_starts(72, 32, 8) == [0, 24, 40]
    for length in range(1, 200):
        for tile, overlap in [(32, 8), (64, 16), (10, 5), (7, 1)]:
            starts = tile_starts(length, tile, overlap)
            assert starts[0] == 0 and starts[-1] == max(length - tile, 0)
            for a, b in itertools.pairwise(starts):
                assert a + tile - b >= overlap and 1 <= b - a <= tile - overlap


@pytest.mark.parametrize("scale", [1, 8])
def test_blend_weights_sum_to_one_and_ramp_linearly(scale: int) -> None:
    for length in range(1, 120):
        for tile, overlap in [(32, 8), (64, 16), (10, 5), (7, 1), (16, 8)]:
            starts = tile_starts(length, tile, overlap)
            size = min(tile, length)
            weights = blend_weights(starts, size, overlap, scale)
            total = torch.zeros(length * scale, dtype=torch.float64)
            for start, weight in zip(starts, weights):
                total[start * scale : (start + size) * scale] += weight
            assert torch.allclose(total, torch.ones_like(total), atol=1e-12), (length, tile, overlap)
            assert ((weights >= 0) & (weights <= 1)).all()
    weights = blend_weights([0, 24], 32, 8, scale)
    ramp = weights[1, : 8 * scale]  # where tile 1 fades in over the last 8 latent pixels of tile 0
    assert torch.allclose(ramp.diff(), torch.full_like(ramp.diff(), 1 / (8 * scale)))
    assert torch.allclose(weights[0, 24 * scale :], 1 - ramp)


@pytest.mark.parametrize("shape", [(2, 3, 56, 72), (1, 3, 20, 100), (1, 3, 100, 20), (1, 3, 33, 33)])
def test_a_local_decoder_tiles_without_difference(shape: tuple[int, ...]) -> None:
    """A decoder without spatial context (each latent pixel → its own 4 × 4 pixels): tiling must change
    nothing, which proves the placement of the tiles and that the weights sum to 1 in 2-D."""

    def local(z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z, scale_factor=4, mode="nearest") * 2 + 1

    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    tiled = decode_tiled(latents, local, Tiling(TILE, OVERLAP))
    assert tiled.shape == (shape[0], shape[1], shape[2] * 4, shape[3] * 4)
    torch.testing.assert_close(tiled, local(latents), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# The decoders


@pytest.mark.parametrize("kind", DECODERS)
def test_slicing_equals_the_batched_decode(kind: str) -> None:
    model = DECODERS[kind]()
    latents = smooth_latents((3, 4, 12, 10))
    batched = decode(model, latents)
    model.enable_slicing()
    sliced = decode(model, latents)
    model.enable_tiling(8, 2)  # composes: tiles, image by image
    sliced_tiles = decode(model, latents)
    model.disable_slicing()
    batched_tiles = decode(model, latents)
    # Convolutions pick other kernels for another batch size: equal up to float32 rounding (~20 ulp) only.
    tolerance = 1e-5 * batched.abs().max()
    assert (sliced - batched).abs().max() <= tolerance
    assert (sliced_tiles - batched_tiles).abs().max() <= tolerance
    model.disable_tiling()
    assert torch.equal(decode(model, latents), batched)


@pytest.mark.parametrize("kind", DECODERS)
def test_latents_within_one_tile_decode_exactly_as_untiled(kind: str) -> None:
    model = DECODERS[kind](scaling_factor=0.5, shift_factor=0.25)
    for shape in [(2, 4, TILE, TILE), (1, 4, 20, 12)]:
        latents = smooth_latents(shape)
        untiled = decode(model, latents)
        model.enable_tiling(TILE, OVERLAP)
        assert torch.equal(decode(model, latents), untiled)
        model.disable_tiling()


@pytest.fixture(scope="module", params=list(DECODERS))
def decodes(request: pytest.FixtureRequest) -> dict[str, torch.Tensor | int | str]:
    """One decoder's images of ``LATENT_SHAPE`` latents: untiled, blended tiles and hard-cut tiles."""
    model = DECODERS[request.param]()
    latents = smooth_latents(LATENT_SHAPE)
    untiled = decode(model, latents)
    model.enable_tiling(TILE, OVERLAP)
    tiled = decode(model, latents)
    cut = naive_tiles(model, latents, TILE)
    return {"kind": request.param, "f": model.scale_factor, "untiled": untiled, "tiled": tiled, "cut": cut}


def test_tiles_blend_close_to_the_untiled_decode(decodes: dict) -> None:
    untiled, tiled = decodes["untiled"], decodes["tiled"]
    difference = (tiled - untiled).abs() / untiled.std()
    mean_bound, max_bound = DIFFERENCE_BOUNDS[decodes["kind"]]
    assert difference.mean() < mean_bound and difference.max() < max_bound, (
        difference.mean(),
        difference.max(),
    )


@pytest.mark.parametrize("dim", [2, 3])
def test_blended_tiles_show_no_seam(decodes: dict, dim: int) -> None:
    f, length = decodes["f"], LATENT_SHAPE[dim]
    borders = blend_borders(tile_starts(length, TILE, OVERLAP), TILE, OVERLAP, f)
    assert seam_ratio(decodes["tiled"], borders, f, dim) < SEAM_RATIO
    # the untiled image varies as evenly there: the metric's baseline is sound
    assert seam_ratio(decodes["untiled"], borders, f, dim) < SEAM_RATIO


@pytest.mark.parametrize("dim", [2, 3])
def test_the_seam_metric_flags_tiles_cut_without_blending(decodes: dict, dim: int) -> None:
    f, length = decodes["f"], LATENT_SHAPE[dim]
    borders = [b * f for b in range(TILE, length, TILE)]
    assert seam_ratio(decodes["cut"], borders, f, dim) > SEAM_RATIO


def test_tiling_arguments_are_checked() -> None:
    model = tiny_decoder()
    for tile_size, overlap, message in [
        (0, 0, "'tile_size' must be a positive int"),
        (-64, 16, "'tile_size' must be a positive int"),
        (64.0, 16, "'tile_size' must be a positive int"),
        (True, 1, "'tile_size' must be a positive int"),
        (64, 0, "'overlap' must be a positive int"),
        (64, "16", "'overlap' must be a positive int"),
        (64, 64, "must be less than 'tile_size'"),
        (64, 33, r"at most half of it \(32\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.enable_tiling(tile_size, overlap)  # type: ignore[arg-type]
    assert model.tiling is None
    model.enable_tiling()
    assert model.tiling == Tiling(64, 16)
    model.enable_tiling(64, 32)  # half the tile is the most
    assert model.tiling == Tiling(64, 32)


def test_settings_are_not_saved(tmp_path: Path) -> None:
    model = tiny_decoder()
    keys = set(model.state_dict())
    model.enable_tiling()
    model.enable_slicing()
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    assert "tiling" not in json.loads((tmp_path / "config.json").read_text())
    loaded = TinyVAEDecoder.from_pretrained(tmp_path)
    assert loaded.tiling is None and not loaded.slicing


def test_concurrent_tiled_decodes_equal_serial_ones() -> None:
    model = tiny_decoder()
    model.enable_tiling(16, 4)
    latents = [smooth_latents((1, 4, 24, 40), seed=seed) for seed in range(4)]
    serial = [decode(model, z) for z in latents]
    results: list[torch.Tensor | None] = [None] * len(latents)

    def run(i: int) -> None:
        results[i] = decode(model, latents[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(latents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, expected in zip(results, serial):
        assert got is not None and torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------
# Memory

MEMORY_SCRIPT = """
import sys, torch
from txt2img.vae import VAEConfig, VAEDecoder
from txt2img.vae_tiny import TinyVAEConfig, TinyVAEDecoder

def status(key):  # KiB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

kind, side, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
torch.manual_seed(0)
if kind == "kl":
    model = VAEDecoder(VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4))
else:
    model = TinyVAEDecoder(TinyVAEConfig(decoder_block_out_channels=(8,) * 4, num_decoder_blocks=(1,) * 4))
if tile:
    model.enable_tiling(tile, tile // 4)
latents = torch.randn(1, 4, side // 8, side // 8)
with torch.inference_mode():
    model.decode(latents[..., :8, :8])  # page in the code the decode runs: the rise is then data
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    images = model.decode(latents)
assert images.shape == (1, 3, side, side)
print(status("VmHWM") - before)
"""


def decode_peak_rss_mib(kind: str, side: int, tile: int) -> float:
    """The rise of the peak resident memory (VmHWM) of a fresh process while it decodes one side × side image.

    Not ``ru_maxrss``: Linux carries it over from the forking process (here pytest) through ``exec``.
    """
    src = str(Path(txt2img.__file__).parents[1])
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, kind, str(side), str(tile)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": src},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1]) / 1024


@pytest.mark.parametrize(("kind", "side", "tile"), [("tiny", 2048, 64), ("kl", 1024, 32)])
def test_tiled_decode_peak_memory_is_bounded(kind: str, side: int, tile: int) -> None:
    tiled, untiled = decode_peak_rss_mib(kind, side, tile), decode_peak_rss_mib(kind, side, 0)
    assert tiled < 0.5 * untiled, f"{kind} {side}²: tiled {tiled:.0f} MiB, untiled {untiled:.0f} MiB"
