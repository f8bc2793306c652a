"""Every script and notebook in examples/ runs offline and writes what it says it writes.

Each script runs in a fresh working folder in its own process, with network connections refused, and with
settings small enough for a test where it trains (the defaults are for people: about a minute each).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from txt2img import DEFAULT_MODEL, Txt2ImgPipeline
from txt2img.utils import read_png_metadata

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Runs a script as `python SCRIPT ARGS...` would, after making every network connection fail.
OFFLINE_RUNNER = """
import runpy, socket, sys

def refuse(*args, **kwargs):
    raise OSError("the example tried to reach the network")

socket.socket.connect = refuse
socket.create_connection = refuse
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_example(name: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TXT2IMG_DISABLE_PROGRESS_BAR": "1"}
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_RUNNER, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check:
        assert result.returncode == 0, f"{name} failed:\n{result.stderr[-3000:]}"
    return result


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def default_pipe() -> Txt2ImgPipeline:
    pipe = Txt2ImgPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_example_is_tested() -> None:
    tested = {
        "quickstart.py",
        "quickstart.ipynb",
        "batch_generate.py",
        "swap_decoder.py",
        "train_on_folder.py",
    }
    assert {p.name for p in EXAMPLES.iterdir() if p.suffix in {".py", ".ipynb"}} == tested


# ---------------------------------------------------------------------------------------------------------
# quickstart.py and quickstart.ipynb


def test_quickstart_script(tmp_path: Path, default_pipe: Txt2ImgPipeline) -> None:
    prompt = "a small green square at the bottom on a white background"
    run_example("quickstart.py", prompt, cwd=tmp_path)
    written = pixels(tmp_path / "quickstart.png")
    assert written.shape == (64, 64, 3)
    params = read_png_metadata(tmp_path / "quickstart.png")
    assert params is not None and params.prompt == prompt and params.seed == 0
    expected = default_pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.abs(written - np.round(expected * 255)).max() <= 1


def test_quickstart_notebook_is_stored_without_outputs() -> None:
    notebook = json.loads((EXAMPLES / "quickstart.ipynb").read_text(encoding="utf-8"))
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, "clear the notebook's outputs"


def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits the environment
    monkeypatch.setenv("TXT2IMG_DISABLE_PROGRESS_BAR", "1")
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails

    shown = [
        Image.open(io.BytesIO(base64.b64decode(output["data"]["image/png"])))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    sizes = [image.size for image in shown]
    assert sizes[0] == (64, 64)  # one image, shown by the output itself
    assert (192, 128) in sizes  # the batch of 6 as a grid
    assert sizes[-1] == (256, 192)  # make_image_grid: 3 rows of 4
    seeds = [read_png_metadata(tmp_path / f"shapes-{i}.png").seed for i in range(6)]
    assert seeds == [10, 11, 12, 13, 14, 15]
    assert pixels(tmp_path / "grid.png").shape == (192, 256, 3)


# ---------------------------------------------------------------------------------------------------------
# batch_generate.py


def test_batch_generate(tmp_path: Path, default_pipe: Txt2ImgPipeline) -> None:
    from txt2img.batch import image_seed

    prompts = [
        {"prompt": "a large red circle in the center on a blue background", "seed": 7, "num_images": 3},
        {"prompt": "a small yellow square at the top on a black background"},
    ]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    args = ["--num-images", "2", "--batch-size", "4", "--seed", "100"]
    result = run_example("batch_generate.py", "prompts.jsonl", *args, cwd=tmp_path)
    assert "run again: 0 images made, 5 already there" in result.stdout

    out = tmp_path / "images"
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    expected_seeds = [7, 8, 9, image_seed(100, 1, 0), image_seed(100, 1, 1)]
    assert [entry["seed"] for entry in manifest] == expected_seeds
    for entry in manifest:
        params = read_png_metadata(out / entry["file"])
        assert (params.prompt, params.seed, params.width, params.height) == (
            prompts[entry["prompt_index"]]["prompt"],
            entry["seed"],
            64,
            64,
        )
    # The 4th image came from a batch of four; alone, with its seed, it is the same image.
    fourth = manifest[3]
    generator = torch.Generator().manual_seed(fourth["seed"])
    alone = default_pipe(fourth["prompt"], generator=generator, output_type="np").images[0]
    assert np.abs(pixels(out / fourth["file"]) - np.round(alone * 255)).max() <= 1
    assert not np.array_equal(pixels(out / manifest[3]["file"]), pixels(out / manifest[4]["file"]))
    assert pixels(out / "grid.png").shape == (2 * 64, 3 * 64, 3)  # a row per prompt, 3 columns


# ---------------------------------------------------------------------------------------------------------
# swap_decoder.py


def test_swap_decoder(tmp_path: Path) -> None:
    run_example("swap_decoder.py", "--steps", "40", "--out", "swapped", cwd=tmp_path)
    out = tmp_path / "swapped"
    report = json.loads((out / "report.json").read_text())
    # Even 40 distillation steps bring the tiny decoder much closer to the KL decoder than it started.
    assert report["mean_abs_difference_after"] < 0.5 * report["mean_abs_difference_before"]
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["vae"] == ["txt2img", "TinyVAEDecoder"]
    pipe = Txt2ImgPipeline.from_pretrained(out / "pipeline")
    assert type(pipe.vae).__name__ == "TinyVAEDecoder"
    kl, tiny = pixels(out / "kl.png"), pixels(out / "tiny.png")
    assert kl.shape == tiny.shape == (64, 4 * 64, 3)
    assert np.abs(kl - tiny).mean() < 255 * report["mean_abs_difference_after"]  # [-1, 1] → 0–255 halves it


# ---------------------------------------------------------------------------------------------------------
# train_on_folder.py


def test_train_on_folder_writes_its_own_data_and_a_loadable_model(tmp_path: Path) -> None:
    tiny = ["--vae-steps", "10", "--clip-steps", "5", "--gan-steps", "10"]
    run_example("train_on_folder.py", *tiny, cwd=tmp_path)
    out = tmp_path / "runs" / "folder"
    lines = (out / "data" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 256 and len(list((out / "data").glob("*.png"))) == 256
    pipe = Txt2ImgPipeline.from_pretrained(out / "model")
    image = pipe(json.loads(lines[0])["text"], generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert pixels(out / "samples.png").shape == (4 * 64, 2 * 64, 3)  # a row per prompt, two seeds


def test_train_on_folder_reads_a_users_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, colour in enumerate(["red", "green", "blue", "yellow"] * 2):
        rgb = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}[colour]
        noise = rng.integers(0, 20, size=(40, 48, 3))
        Image.fromarray((np.array(rgb) * 0.9 + noise).astype(np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} picture")
    args = ["--size", "32", "--out", "small", "--vae-steps", "3", "--clip-steps", "3", "--gan-steps", "3"]
    run_example("train_on_folder.py", "mine", *args, cwd=tmp_path)
    pipe = Txt2ImgPipeline.from_pretrained(tmp_path / "small" / "model")
    assert pipe.default_size == 32
    assert pipe("a red picture", output_type="np").images.shape == (1, 32, 32, 3)
    assert not (tmp_path / "small" / "data").exists()  # the user's folder was used, none was written


def test_train_on_folder_refuses_a_broken_folder_before_training(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "broken" / "a.png")
    result = run_example("train_on_folder.py", "broken", "--out", "never", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "has no caption" in result.stderr
    assert not (tmp_path / "never" / "model").exists()
