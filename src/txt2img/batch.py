"""Batch generation: a file of prompts in, a folder of PNG files and a manifest out; resumable, and sharded
over the processes of ``torchrun`` when it starts several.

    txt2img batch prompts.txt --out images --num-images 4 --seed 0
    torchrun --nproc_per_node 8 -m txt2img batch prompts.txt --out images --num-images 4 --device cuda

    from txt2img.batch import generate_batch
    generate_batch(pipe, "prompts.txt", "images", num_images=4, seed=0)

Every image is fixed before anything runs: its file name comes from (prompt index, image index) and its
seed from (seed, prompt index, image index) (:func:`image_seed`), so any image can be made again alone
(``txt2img --from-png``) and a rerun knows what is missing. The images are cut into batches of
``batch_size`` in that order, and batch ``k`` goes to rank ``k mod world_size``: every batch is computed
with the same images whatever the number of processes, and whatever was already written, so the files of
a sharded run are byte for byte those of a single-process run on the same kind of device.

Each file is written to a temporary name and renamed into place, so a killed run leaves only complete PNG
files; a rerun skips them (after checking that their parameters are the ones it would use) and makes the
rest. When every rank is done, rank 0 writes ``manifest.jsonl`` and ``batch.json`` from the plan, each by
rename too: a manifest never names a file that is not there.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from txt2img import distributed, logs
from txt2img.utils import GenerationParameters, model_name, read_png_metadata, save_png

if TYPE_CHECKING:
    from PIL import Image

    from txt2img.pipeline import Txt2ImgPipeline

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
RUN_NAME = "batch.json"
PROMPTS_PER_FOLDER = 1000
#: Seeds are below 2**63, the range every torch.Generator and every JSON reader takes.
SEED_LIMIT = 2**63
SEED_FORMULA = (
    "image j of a prompt with its own seed S: S + j; otherwise, for the run's seed and the prompt's index i "
    "(0-based, among the prompts of the file): int.from_bytes(sha256(f'{seed},{i},{j}'.encode()).digest()[:8], "
    "'big') >> 1"
)
#: How long the ranks that finish first wait for the last one before the manifest is written.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


# ---------------------------------------------------------------------------------------------------------
# The plan: prompts, seeds, file names


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """One prompt of a batch run.

    Attributes:
        prompt: What to draw.
        seed: Image ``j`` of this prompt gets seed ``seed + j`` (what ``txt2img PROMPT --seed S
            --num-images N`` gives it); ``None``: seeds derived by :func:`image_seed`.
        num_images: Images of this prompt; ``None``: the run's ``num_images``.
    """

    prompt: str
    seed: int | None = None
    num_images: int | None = None


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """One image of a batch run: which prompt, which image of it, its seed and its file."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    file: str  # relative to the output folder, "/"-separated


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every image of a run shares, besides the model."""

    height: int
    width: int
    num_inference_steps: int
    truncation_psi: float


@dataclasses.dataclass
class BatchResult:
    """What :func:`generate_batch` did, in this process.

    Attributes:
        out_dir: The output folder.
        manifest: ``out_dir/manifest.jsonl``.
        total: Images of the whole run, every process's.
        written: Images this process made.
        skipped: Images of this process's share that a previous run had already written.
        seconds: Time this process spent, loading excluded.
    """

    out_dir: Path
    manifest: Path
    total: int
    written: int
    skipped: int
    seconds: float


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index`` in a run seeded ``seed``: the first 8
    bytes of the SHA-256 of ``"seed,prompt_index,image_index"``, big-endian, less the lowest bit (63 bits).

    A hash rather than ``seed + index``: two runs of nearby seeds share no image, and appending prompts to
    a file changes none of the seeds before them.
    """
    digest = hashlib.sha256(f"{seed},{prompt_index},{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def image_file(prompt_index: int, image_index: int) -> str:
    """Where an image goes, relative to the output folder: a folder per 1000 prompts, e.g. ``0001/0001234-03.png``."""
    return f"{prompt_index // PROMPTS_PER_FOLDER:04d}/{prompt_index:07d}-{image_index:02d}.png"


def read_prompts(path: str | os.PathLike[str]) -> list[PromptSpec]:
    """Read a prompts file: a ``.jsonl`` file holds one JSON object a line (``prompt``, and optionally
    ``seed`` and ``num_images``; other keys are ignored); any other file one prompt a line. Blank lines are
    skipped and do not count as prompts.

    Raises:
        OSError: the file cannot be read.
        ValueError: a line that is not a valid prompt, or no prompt at all.
    """
    path = Path(path)
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line]
    if path.suffix.lower() != ".jsonl":
        specs = [PromptSpec(line) for _, line in lines]
    else:
        specs = []
        for n, line in lines:
            try:
                specs.append(_prompt_from_json(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as error:
                raise ValueError(f"{path}, line {n}: {error}") from error
    if not specs:
        raise ValueError(
            f"{path} holds no prompt: write one prompt a line (or one JSON object a line in .jsonl)."
        )
    return specs


def _prompt_from_json(record: Any) -> PromptSpec:
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("prompt"), str)
        or not record["prompt"].strip()
    ):
        raise ValueError('each line must be a JSON object with a non-empty "prompt" string')
    for key in ("seed", "num_images"):
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f'"{key}" must be an integer, got {value!r}')
    return PromptSpec(record["prompt"], record.get("seed"), record.get("num_images"))


def plan_images(prompts: Sequence[str | PromptSpec], *, num_images: int = 1, seed: int = 0) -> list[ImageJob]:
    """Every image of a run, in order (prompt by prompt, image by image), with its seed and file.

    Raises:
        ValueError: a seed outside [0, 2**63), or a count of images below 1.
    """
    _check_seed(seed, "seed")
    jobs = []
    for i, item in enumerate(prompts):
        spec = PromptSpec(item) if isinstance(item, str) else item
        count = num_images if spec.num_images is None else spec.num_images
        if count < 1:
            raise ValueError(f"prompt {i} ({spec.prompt!r}): num_images must be at least 1, got {count}")
        if spec.seed is not None:
            _check_seed(spec.seed, f"prompt {i} ({spec.prompt!r}): seed")
            _check_seed(spec.seed + count - 1, f"prompt {i} ({spec.prompt!r}): seed + num_images - 1")
        for j in range(count):
            image = spec.seed + j if spec.seed is not None else image_seed(seed, i, j)
            jobs.append(ImageJob(i, j, spec.prompt, image, image_file(i, j)))
    return jobs


def _check_seed(seed: int, name: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {seed!r}")


# ---------------------------------------------------------------------------------------------------------
# The run


def generate_batch(
    pipe: Txt2ImgPipeline,
    prompts: str | os.PathLike[str] | Sequence[str | PromptSpec],
    out_dir: str | os.PathLike[str],
    *,
    num_images: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 1,
    truncation_psi: float = 1.0,
    progress: bool = True,
) -> BatchResult:
    """Make every image of ``prompts`` that ``out_dir`` does not hold yet, then write the manifest.

    Under ``torchrun`` call it on every rank with the same arguments, ``pipe`` on each rank's own device
    (``pipe.to(f"cuda:{distributed.local_rank()}")``): each rank makes its share of the batches, and rank 0
    writes the manifest once all are done. A process group already initialised is used; otherwise, when a
    launcher started several processes, one is joined (gloo) for the call.

    Args:
        pipe: The pipeline.
        prompts: A prompts file (:func:`read_prompts`), or the prompts themselves.
        out_dir: The output folder (created); rerunning into it makes only what is missing.
        num_images: Images per prompt, unless a prompt says otherwise.
        batch_size: Images per pipeline call.
        seed: The run's seed (:func:`image_seed`).
        height: Image height in pixels; default the model's.
        width: Image width in pixels; default the model's.
        num_inference_steps: Generator passes.
        truncation_psi: Below 1, less variety.
        progress: A progress bar on rank 0, with images/s.

    Returns:
        What this process did.

    Raises:
        ValueError: bad arguments or prompts, or a file in ``out_dir`` made with other parameters (another
            seed, prompt, size or model): use a new folder, or delete the file.
        OSError: the prompts file cannot be read, or ``out_dir`` cannot be written.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    specs = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else list(prompts)
    jobs = plan_images(specs, num_images=num_images, seed=seed)
    settings = Settings(
        height if height is not None else pipe.default_size,
        width if width is not None else pipe.default_size,
        num_inference_steps,
        truncation_psi,
    )
    with distributed.process_group("gloo", timeout=BARRIER_TIMEOUT):
        return _run(pipe, jobs, Path(out_dir), batch_size, settings, progress=progress, seed=seed)


def _run(
    pipe: Txt2ImgPipeline,
    jobs: list[ImageJob],
    out: Path,
    batch_size: int,
    settings: Settings,
    *,
    progress: bool,
    seed: int,
) -> BatchResult:
    from txt2img.generation import seeded_generators

    start = time.perf_counter()
    rank, world = distributed.rank(), distributed.world_size()
    out.mkdir(parents=True, exist_ok=True)
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    # 1. This rank's share: every world-th batch, less the images already written
    todo = []
    for batch in batches[rank::world]:
        missing = [job for job in batch if not _already_written(out, job, _parameters(pipe, job, settings))]
        if missing:
            todo.append((batch, missing))
    share = sum(len(batch) for batch in batches[rank::world])
    count = sum(len(missing) for _, missing in todo)
    if rank == 0:
        logger.info(
            "%d images in all; rank 0 makes %d of its %d (the rest were there)", len(jobs), count, share
        )
    # 2. Generate whole batches (the same ones as any other run), write the missing images
    bar = logs.progress_bar(
        count,
        desc="batch" if world == 1 else f"rank 0 of {world}",
        unit=" images",
        disable=not progress or rank != 0,
    )
    made_since = time.perf_counter()
    with bar, logs.progress_bars_off():  # the bar above is already made: only the pipeline's are off
        for batch, missing in todo:
            output = pipe(
                [job.prompt for job in batch],
                generator=seeded_generators([job.seed for job in batch]),
                height=settings.height,
                width=settings.width,
                num_inference_steps=settings.num_inference_steps,
                truncation_psi=settings.truncation_psi,
            )
            assert output.parameters is not None  # prompts were given
            made = dict(zip(batch, zip(output.pil_images(), output.parameters, strict=True), strict=True))
            for job in missing:
                _write_png(*made[job], out / job.file)
            bar.update(len(missing))
            if world > 1 and not bar.disable:  # the other ranks go about as fast
                rate = bar.n / (time.perf_counter() - made_since)
                bar.set_postfix_str(f"about {rate * world:.1f} images/s on {world} processes")
    # 3. Once every rank is done, rank 0 writes the manifest (all of the plan: every file now exists)
    distributed.barrier()
    if rank == 0:
        _write_manifest(out, jobs, model_name(pipe.name_or_path), seed, settings)
    distributed.barrier()  # the manifest is there for every rank when the call returns
    return BatchResult(out, out / MANIFEST_NAME, len(jobs), count, share - count, time.perf_counter() - start)


def _parameters(pipe: Txt2ImgPipeline, job: ImageJob, settings: Settings) -> GenerationParameters:
    """The parameters the pipeline writes into the image's PNG."""
    return pipe.describe_images(
        job.prompt,
        1,
        [job.seed],
        settings.height,
        settings.width,
        settings.num_inference_steps,
        settings.truncation_psi,
    )[0]


def _already_written(out: Path, job: ImageJob, expected: GenerationParameters) -> bool:
    """True when the image's file is there with the parameters this run would write.

    Raises:
        ValueError: the file is there but was made with other parameters.
    """
    path = out / job.file
    if not path.is_file():
        return False
    try:
        found = read_png_metadata(path)
    except (OSError, ValueError):
        return False  # not a readable PNG (not written by a batch run): made again
    fields = ("prompt", "seed", "width", "height", "steps", "model", "truncation_psi")
    differ = [f for f in fields if found is None or getattr(found, f) != getattr(expected, f)]
    if differ:
        shown = ", ".join(
            f"{f} {getattr(found, f, None)!r} instead of {getattr(expected, f)!r}" for f in differ
        )
        raise ValueError(
            f"{path} was made with other parameters ({shown}): write this run into a new folder, or delete "
            "the files to make them again."
        )
    return True


def _write_png(image: Image.Image, parameters: GenerationParameters, path: Path) -> None:
    """Write a PNG file by rename, so that a killed process leaves the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")  # one name per image: a rerun overwrites a stale one
    save_png(image, temporary, parameters)
    os.replace(temporary, path)


def _write_manifest(
    out: Path, jobs: list[ImageJob], model: str | None, seed: int, settings: Settings
) -> None:
    """``manifest.jsonl`` (a line per image, in plan order) and ``batch.json`` (the run's settings and seed
    formula), each written by rename."""
    from txt2img import __version__

    lines = [
        json.dumps(
            {
                "prompt": job.prompt,
                "seed": job.seed,
                "file": job.file,
                "model": model,
                "prompt_index": job.prompt_index,
                "image_index": job.image_index,
            },
            ensure_ascii=False,
        )
        for job in jobs
    ]
    run = {
        "version": f"txt2img {__version__}",
        "model": model,
        "seed": seed,
        **dataclasses.asdict(settings),
        "prompts": jobs[-1].prompt_index + 1 if jobs else 0,
        "images": len(jobs),
        "seed_formula": SEED_FORMULA,
    }
    _replace_text(out / MANIFEST_NAME, "".join(line + "\n" for line in lines))
    _replace_text(out / RUN_NAME, json.dumps(run, indent=2) + "\n")


def _replace_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
