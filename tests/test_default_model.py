"""The embedded default model: shipped inside the package, loaded offline, and good at its prompts."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import txt2img
from txt2img import DEFAULT_MODEL, Txt2ImgPipeline
from txt2img.training.evaluate import evaluate, pipeline_generator
from txt2img.utils import EMBEDDED_MODEL_NAME, read_png_metadata


@pytest.fixture(scope="module")
def default_pipe() -> Txt2ImgPipeline:
    pipe = Txt2ImgPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_default_model_is_a_pipeline_folder_inside_the_package() -> None:
    folder = Path(DEFAULT_MODEL)
    assert folder.is_relative_to(Path(txt2img.__file__).parent)
    assert (folder / "model_index.json").is_file()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 30 * 2**20, f"the embedded model is {size / 2**20:.1f} MB; the budget is 30 MB"


def test_default_model_loads_with_sockets_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    pipe = Txt2ImgPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.default_size == 64
    image = pipe(
        "a large red circle in the center on a blue background", generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


def test_default_model_follows_prompts(default_pipe: Txt2ImgPipeline) -> None:
    # A small sample of the evaluation; the full table (600 images per split) is in docs/training.md.
    report = evaluate(
        pipeline_generator(default_pipe), num_images=48, seed=1, variety_prompts=4, variety_seeds=2
    )
    # The full evaluation gives all five 0.99 seen / 0.95 held-out: these floors leave room for sampling alone.
    assert report.seen["all five"] >= 0.85 and report.held_out["all five"] >= 0.7, report.to_markdown()
    assert report.variety is not None and report.variety > 0.5, report.to_markdown()


def test_default_models_card_runs_and_reports_its_evaluation(tmp_path: Path) -> None:
    card = (Path(DEFAULT_MODEL) / "README.md").read_text()
    assert "library_name: txt2img" in card and "## Evaluation" in card and "| shape |" in card
    (block,) = re.findall(r"```python\n(.*?)```", card, re.DOTALL)
    assert "from_pretrained(DEFAULT_MODEL)" in block
    subprocess.run([sys.executable, "-c", block], cwd=tmp_path, check=True, timeout=120, capture_output=True)
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (64, 64)


def test_cli_without_model_uses_the_default(tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "txt2img",
            "a small green circle at the top on a white background",
            "-o",
            str(out),
            "--seed",
            "3",
        ],
        check=False,  # the assertion below shows stderr
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    meta = read_png_metadata(out)
    assert meta is not None and meta.seed == 3 and meta.model == EMBEDDED_MODEL_NAME


def test_wheel_carries_the_default_model(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("txt2img-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        str(p.relative_to(Path(txt2img.__file__).parent.parent)).replace("\\", "/")
        for p in Path(DEFAULT_MODEL).rglob("*")
        if p.is_file()
    }
    assert expected and expected <= names, sorted(expected - names)
