"""``txt2img batch`` and ``txt2img.batch``: a file of prompts in, a folder of PNG files and a manifest out;
resumable after a kill, and the same files from 2 processes (torchrun, gloo) as from one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from txt2img import Txt2ImgPipeline
from txt2img.batch import (
    SEED_LIMIT,
    PromptSpec,
    generate_batch,
    image_file,
    image_seed,
    plan_images,
    read_prompts,
)
from txt2img.cli import is_batch_command, main
from txt2img.utils import read_png_metadata

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small red square", "a large blue circle"]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TXT2IMG_DISABLE_PROGRESS_BAR": "1"}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def loaded(saved_pipeline: Path) -> Txt2ImgPipeline:
    """The tiny pipeline loaded from its folder, as the command loads it (the model name is its path)."""
    pipe = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Compute as the launched processes do (OMP_NUM_THREADS=1), so files can be compared byte for byte."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(
        "\n".join(PROMPTS[:3]) + "\n\n" + "\n".join(PROMPTS[3:]) + "\n"
    )  # a blank line is skipped
    return path


# ---------------------------------------------------------------------------------------------------------
# The plan


def test_image_seed_is_the_documented_hash() -> None:
    digest = hashlib.sha256(b"7,12,3").digest()
    assert image_seed(7, 12, 3) == int.from_bytes(digest[:8], "big") >> 1
    assert image_seed(0, 0, 0) == 4467769355181330509  # pinned: changing the formula changes every data set
    seeds = {image_seed(s, i, j) for s in range(3) for i in range(20) for j in range(4)}
    assert len(seeds) == 3 * 20 * 4 and all(0 <= s < SEED_LIMIT for s in seeds)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "Expecting property name"),
        ('["a red circle"]', 'a non-empty "prompt" string'),
        ('{"text": "a red circle"}', 'a non-empty "prompt" string'),
        ('{"prompt": "  "}', 'a non-empty "prompt" string'),
        ('{"prompt": 3}', 'a non-empty "prompt" string'),
        ('{"prompt": "a", "seed": "1"}', '"seed" must be an integer'),
        ('{"prompt": "a", "seed": true}', '"seed" must be an integer'),
        ('{"prompt": "a", "num_images": 1.5}', '"num_images" must be an integer'),
    ],
)
def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(f'{{"prompt": "fine"}}\n\n{line}\n')
    with pytest.raises(ValueError, match=match) as info:
        read_prompts(path)
    assert str(info.value).startswith(f"{path}, line 3: ")


def test_plan_orders_images_and_keeps_a_prompts_own_seed() -> None:
    jobs = plan_images(["a", PromptSpec("b", seed=100, num_images=3), "c"], num_images=2, seed=5)
    assert [(j.prompt_index, j.image_index) for j in jobs] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (1, 2),
        (2, 0),
        (2, 1),
    ]
    assert [j.seed for j in jobs if j.prompt == "b"] == [
        100,
        101,
        102,
    ]  # as txt2img b --seed 100 --num-images 3
    assert jobs[0].seed == image_seed(5, 0, 0) and jobs[-1].seed == image_seed(5, 2, 1)
    assert jobs[-1].file == image_file(2, 1) == "0000/0000002-01.png"
    assert image_file(1234, 3) == "0001/0001234-03.png"
    # appending prompts changes no seed before them
    longer = plan_images(["a", PromptSpec("b", seed=100, num_images=3), "c", "d"], num_images=2, seed=5)
    assert longer[: len(jobs)] == jobs
    with pytest.raises(ValueError, match="seed"):
        plan_images(["a"], seed=-1)
    with pytest.raises(ValueError, match="num_images"):
        plan_images([PromptSpec("a", num_images=0)])


def test_read_prompts_text_and_jsonl(tmp_path: Path) -> None:
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n\n  # not a comment, a prompt  \nlast")
    assert read_prompts(text) == [
        PromptSpec("a red circle"),
        PromptSpec("# not a comment, a prompt"),
        PromptSpec("last"),
    ]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a", "id": 3}\n\n{"prompt": "b", "seed": 9, "num_images": 2}\n')
    assert read_prompts(lines) == [PromptSpec("a"), PromptSpec("b", 9, 2)]
    lines.write_text('{"prompt": "a"}\n{"seed": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_prompts(lines)
    lines.write_text('{"prompt": "a", "seed": "1"}\n')
    with pytest.raises(ValueError, match="integer"):
        read_prompts(lines)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts(tmp_path / "empty.txt")


# ---------------------------------------------------------------------------------------------------------
# One process


def test_run_writes_every_image_with_its_parameters_and_a_manifest(
    loaded: Txt2ImgPipeline, tmp_path: Path
) -> None:
    prompts = [*PROMPTS[:2], PromptSpec("a white circle", seed=42, num_images=1)]
    result = generate_batch(
        loaded, prompts, tmp_path / "out", num_images=2, batch_size=3, seed=1, progress=False
    )
    jobs = plan_images(prompts, num_images=2, seed=1)
    assert (result.total, result.written, result.skipped) == (5, 5, 0)
    manifest = [json.loads(line) for line in result.manifest.read_text().splitlines()]
    assert manifest == [
        {
            "prompt": j.prompt,
            "seed": j.seed,
            "file": j.file,
            "model": str(loaded.name_or_path),
            "prompt_index": j.prompt_index,
            "image_index": j.image_index,
        }
        for j in jobs
    ]
    run = json.loads((tmp_path / "out" / "batch.json").read_text())
    assert run["seed"] == 1 and run["images"] == 5 and "sha256" in run["seed_formula"]
    for entry in manifest:
        params = read_png_metadata(tmp_path / "out" / entry["file"])
        assert params is not None and (params.prompt, params.seed) == (entry["prompt"], entry["seed"])
        # made again alone from its seed: the same image (to one 8-bit step: batch size changes float rounding)
        alone = loaded(entry["prompt"], generator=torch.Generator().manual_seed(entry["seed"])).images[0]
        with Image.open(tmp_path / "out" / entry["file"]) as written:
            difference = np.abs(np.asarray(written, dtype=int) - np.asarray(alone, dtype=int))
        assert difference.max() <= 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000", "batch.json", "manifest.jsonl"]


def test_rerun_makes_only_what_is_missing_and_rebuilds_the_manifest(
    loaded: Txt2ImgPipeline, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    generate_batch(loaded, PROMPTS, out, num_images=2, batch_size=4, progress=False)
    first = folder_bytes(out)
    again = generate_batch(loaded, PROMPTS, out, num_images=2, batch_size=4, progress=False)
    assert (again.written, again.skipped) == (0, 10)
    (out / image_file(3, 1)).unlink()
    (out / "manifest.jsonl").write_text('{"truncated": ')
    again = generate_batch(loaded, PROMPTS, out, num_images=2, batch_size=4, progress=False)
    assert (again.written, again.skipped) == (1, 9)
    assert folder_bytes(out) == first


def test_rerun_with_other_parameters_is_refused(loaded: Txt2ImgPipeline, tmp_path: Path) -> None:
    generate_batch(loaded, PROMPTS[:2], tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"0000000-00.png was made with other parameters \(seed"):
        generate_batch(loaded, PROMPTS[:2], tmp_path, seed=1, progress=False)
    with pytest.raises(ValueError, match="prompt 'a blue square' instead of 'a yellow square'"):
        generate_batch(loaded, [PROMPTS[0], "a yellow square"], tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------------------
# The command


def test_batch_is_a_command_only_before_a_file() -> None:
    assert is_batch_command(["batch", "prompts.txt", "--out", "d"])
    assert is_batch_command(["batch", "--help"])
    assert not is_batch_command(["batch"])  # draws "batch", as it always did
    assert not is_batch_command(["batch", "-o", "b.png"])
    assert not is_batch_command(["a batch of cookies", "-o", "b.png"])


def test_the_word_batch_is_still_a_prompt(saved_pipeline: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.png"
    assert main(["batch", "-o", str(out), "--model", str(saved_pipeline), "--seed", "3", "--quiet"]) == 0
    params = read_png_metadata(out)
    assert params is not None and (params.prompt, params.seed) == ("batch", 3)


def test_command_writes_what_the_python_api_writes(
    loaded: Txt2ImgPipeline, saved_pipeline: Path, prompts_file: Path, tmp_path: Path, capsys
) -> None:
    argv = ["batch", str(prompts_file), "--out", str(tmp_path / "cli"), "--model", str(saved_pipeline)]
    assert main([*argv, "--num-images", "2", "--batch-size", "3", "--seed", "4", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path / 'cli' / 'manifest.jsonl'} (10 images)"
    generate_batch(loaded, prompts_file, tmp_path / "api", num_images=2, batch_size=3, seed=4, progress=False)
    assert folder_bytes(tmp_path / "cli") == folder_bytes(tmp_path / "api")


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--batch-size", "0"], "--batch-size must be at least 1"), (["--seed", "-2"], "--seed must be in")],
)
def test_command_bad_arguments_exit_2(
    prompts_file: Path, tmp_path: Path, extra: list[str], message: str, capsys
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["batch", str(prompts_file), "--out", str(tmp_path), *extra])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_command_missing_prompts_file_exits_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["batch", str(tmp_path / "missing.txt"), "--out", str(tmp_path)])
    assert info.value.code == 2 and "missing.txt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Several processes, and a killed process


def test_two_processes_write_the_files_of_one(
    loaded: Txt2ImgPipeline, saved_pipeline: Path, prompts_file: Path, tmp_path: Path, one_thread: None
) -> None:
    generate_batch(loaded, prompts_file, tmp_path / "one", num_images=2, batch_size=3, seed=4, progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "txt2img", "batch", str(prompts_file), "--out", str(tmp_path / "two")]
    command += ["--model", str(saved_pipeline), "--num-images", "2", "--batch-size", "3", "--seed", "4"]
    env = {**SUBPROCESS_ENV, "TXT2IMG_DISABLE_PROGRESS_BAR": "0"}
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("manifest.jsonl (10 images)") == 1  # rank 0 alone reports
    assert "rank 0 of 2" in result.stderr and "rank 1" not in result.stderr  # one progress bar, on rank 0
    assert "images/s on 2 processes" in result.stderr
    one, two = folder_bytes(tmp_path / "one"), folder_bytes(tmp_path / "two")
    assert len(one) == 10 + 2 and one == two


def test_a_killed_run_rerun_gives_the_complete_uncorrupted_set(
    loaded: Txt2ImgPipeline, saved_pipeline: Path, tmp_path: Path, one_thread: None
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a red circle {i}\n" for i in range(150)))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "txt2img", "batch", str(prompts), "--out", str(out)]
    command += ["--model", str(saved_pipeline), "--num-images", "2", "--batch-size", "1", "--quiet"]
    process = subprocess.Popen(
        command, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while len(list(out.glob("*/*.png"))) < 5 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)  # killed, not asked to stop
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    written = list(out.glob("*/*.png"))
    assert 5 <= len(written) < 300 and not (out / "manifest.jsonl").exists()
    for path in written:  # every file in place is whole
        with Image.open(path) as image:
            image.load()
    rerun = subprocess.run(
        command, check=False, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr
    generate_batch(loaded, prompts, tmp_path / "whole", num_images=2, batch_size=1, progress=False)
    assert folder_bytes(out) == folder_bytes(tmp_path / "whole")  # no temporary file left, none missing
