"""One pipeline, many threads and long runs: threaded calls give exactly the images of the same calls made one
after another (plain, offloaded, sliced), nothing deadlocks, a failed call leaves the pipeline working, memory
stays flat over hundreds of calls, and an image does not depend on the batch it is part of."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from txt2img import Txt2ImgPipeline
from txt2img.packed_weights import set_cpu_weight_packing

THREADS, CALLS = 8, 10
PROMPTS = [
    "a red circle",
    "a blue square",
    "two green triangles",
    "",
    "🟦",
    "a yellow star",
    "x" * 40,
    "a dog",
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def call(pipe: Txt2ImgPipeline, thread: int, i: int) -> np.ndarray:
    """Call ``i`` of thread ``thread``: its own prompts, seeds, batch and size, so that a mix-up would show."""
    n = 1 + (thread + i) % 2
    size = 8 * (1 + (thread + i) % 2)
    prompts = [PROMPTS[(thread + i) % len(PROMPTS)], PROMPTS[(thread * 3 + i) % len(PROMPTS)]][:n]
    seeds = [1000 * thread + 10 * i + k for k in range(n)]
    return pipe(prompts, generator=[gen(s) for s in seeds], height=size, width=size, output_type="np").images  # type: ignore[return-value]


def run_threads(
    pipe: Txt2ImgPipeline, work: Callable[[Txt2ImgPipeline, int, int], np.ndarray], calls: int = CALLS
) -> dict[tuple[int, int], np.ndarray]:
    """``THREADS`` threads making ``calls`` calls each, started together; fails on any error or a thread still
    running after two minutes (a deadlock)."""
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def worker(thread: int) -> None:
        try:
            barrier.wait()
            for i in range(calls):
                results[thread, i] = work(pipe, thread, i)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not [t for t in threads if t.is_alive()], "deadlock: threads still running after 120 s"
    assert not errors, errors
    return results


@pytest.fixture
def fresh(saved_pipeline: Path) -> Txt2ImgPipeline:
    pipe = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def serial(saved_pipeline: Path) -> dict[bool, dict[tuple[int, int], np.ndarray]]:
    """The same 80 calls, one after another, on a plain pipeline: with convolution weights packed (the
    default) and without (as under offloading, which packs none; the two differ by float32 rounding)."""
    pipe = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for packed in (True, False):
        set_cpu_weight_packing(packed)
        results[packed] = {(t, i): call(pipe, t, i) for t in range(THREADS) for i in range(CALLS)}
    set_cpu_weight_packing(None)
    return results


SETUPS: dict[str, Callable[[Txt2ImgPipeline], None]] = {
    "plain": lambda pipe: None,
    "model-offload": lambda pipe: pipe.enable_model_cpu_offload(),
    "sequential-offload": lambda pipe: pipe.enable_sequential_cpu_offload(),
    "offload-and-slicing": lambda pipe: (
        pipe.enable_model_cpu_offload(),
        pipe.enable_attention_slicing(3),
        pipe.vae.enable_slicing(),
        pipe.vae.enable_tiling(tile_size=4, overlap=1),
    ),
}
SAME_ARITHMETIC = {"plain", "model-offload", "sequential-offload"}  # as the plain serial calls, bit for bit


@pytest.mark.parametrize("setup", list(SETUPS))
def test_threads_give_the_images_of_serial_calls(fresh: Txt2ImgPipeline, serial, setup: str) -> None:
    SETUPS[setup](fresh)
    # Sliced attention and tiles add in another order: compared with the same calls, serially, same knobs.
    if setup in SAME_ARITHMETIC:
        expected = serial[setup == "plain"]
    else:
        expected = {key: call(fresh, *key) for key in serial[True]}
    threaded = run_threads(fresh, call)
    assert threaded.keys() == expected.keys()
    for key, images in expected.items():
        np.testing.assert_array_equal(threaded[key], images, err_msg=f"thread {key[0]}, call {key[1]}")


def test_a_failing_call_leaves_the_pipeline_working_for_the_others(fresh: Txt2ImgPipeline, serial) -> None:
    """Every third call of each thread fails inside the generator; under offload, with its lock held."""
    fresh.enable_model_cpu_offload()
    failures = 0
    lock = threading.Lock()

    def maybe_fail(module: torch.nn.Module, args: object) -> None:
        nonlocal failures
        if getattr(threading.current_thread(), "fail_next", False):
            threading.current_thread().fail_next = False  # type: ignore[attr-defined]
            with lock:
                failures += 1
            raise RuntimeError("a failure inside the generator")

    fresh.gan.register_forward_pre_hook(maybe_fail)

    def work(pipe: Txt2ImgPipeline, thread: int, i: int) -> np.ndarray:
        if i % 3 == 0:
            threading.current_thread().fail_next = True  # type: ignore[attr-defined]
            with pytest.raises(RuntimeError, match="inside the generator"):
                call(pipe, thread, i)
        return call(pipe, thread, i)

    threaded = run_threads(fresh, work, calls=4)
    assert failures == THREADS * 2
    for key, images in threaded.items():
        np.testing.assert_array_equal(images, serial[False][key])  # offloaded: nothing packed


# ---------------------------------------------------------------------------------------------------------
# Long runs


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_two_hundred_calls_do_not_grow_memory(fresh: Txt2ImgPipeline) -> None:
    prompts = [f"prompt number {i}" for i in range(50)]  # more than the prompt cache keeps

    def calls(start: int, count: int) -> None:
        for i in range(start, start + count):
            fresh(
                prompts[i % 50],
                generator=gen(i),
                height=64,
                width=64,
                num_images_per_prompt=1 + i % 2,
                output_type="np",
            )

    calls(0, 40)  # warm-up: the caches fill, the allocator settles
    gc.collect()
    before, threads, files = resident_mib(), threading.active_count(), len(os.listdir("/proc/self/fd"))
    calls(50, 200)
    gc.collect()
    grown = resident_mib() - before
    assert grown < 8, f"resident memory grew by {grown:.1f} MiB over 200 calls"
    assert threading.active_count() == threads and len(os.listdir("/proc/self/fd")) <= files


def test_same_seed_same_image_whatever_the_batch(pipe: Txt2ImgPipeline) -> None:
    """Image i of a batch equals the same prompt and seed alone, and in another batch, within float rounding:
    batched matrix products add in another order (measured differences: at most 2e-6 on [0, 1])."""
    prompts = PROMPTS[:4]
    seeds = [7, 8, 9, 10]
    batch = pipe(prompts, generator=[gen(s) for s in seeds], output_type="np").images
    other = pipe(
        prompts[::-1] + ["filler"], generator=[gen(s) for s in seeds[::-1] + [0]], output_type="np"
    ).images
    as_pil = pipe(prompts, generator=[gen(s) for s in seeds]).images
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        alone = pipe(prompt, generator=gen(seed), output_type="np").images[0]
        assert np.abs(batch[i] - alone).max() < 1e-5
        assert np.abs(other[3 - i] - alone).max() < 1e-5
        alone_pil = np.asarray(pipe(prompt, generator=gen(seed)).images[0], dtype=np.int16)
        assert (
            np.abs(np.asarray(as_pil[i], dtype=np.int16) - alone_pil).max() <= 1
        )  # 8 bits: at most one level
    assert np.abs(batch[0] - batch[1]).max() > 1e-3  # and the images do differ
