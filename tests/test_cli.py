"""The ``txt2img`` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from txt2img import Txt2ImgPipeline
from txt2img.cli import main
from txt2img.utils import read_png_metadata


def test_writes_the_pipelines_image_with_metadata(saved_pipeline: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.png"
    code = main(["a red circle", "-o", str(out), "--model", str(saved_pipeline), "--seed", "42", "--quiet"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out)
    pipe = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    expected = pipe("a red circle", generator=torch.Generator().manual_seed(42)).images[0]
    with Image.open(out) as written:
        np.testing.assert_array_equal(np.asarray(written), np.asarray(expected))
        assert "a red circle" in written.info["parameters"]
    meta = read_png_metadata(out)
    assert meta is not None
    assert meta.prompt == "a red circle"
    assert meta.seed == 42
    assert meta.model == str(saved_pipeline)
    assert (meta.width, meta.height) == (32, 32)


def test_several_images_get_consecutive_seeds(saved_pipeline: Path, tmp_path: Path) -> None:
    out = tmp_path / "shapes.png"
    code = main(
        [
            "a blue square",
            "-o",
            str(out),
            "--model",
            str(saved_pipeline),
            "--seed",
            "7",
            "--num-images",
            "2",
            "--quiet",
        ]
    )
    assert code == 0
    seeds = [read_png_metadata(tmp_path / f"shapes-{i}.png").seed for i in range(2)]
    assert seeds == [7, 8]
    single = tmp_path / "single.png"
    main(["a blue square", "-o", str(single), "--model", str(saved_pipeline), "--seed", "8", "--quiet"])
    with Image.open(single) as a, Image.open(tmp_path / "shapes-1.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_embedded_model_is_a_clear_error(tmp_path: Path, capsys, monkeypatch) -> None:
    import txt2img

    monkeypatch.setattr(txt2img, "DEFAULT_MODEL", str(tmp_path / "gone"))
    assert main(["a red circle", "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "embedded default model is missing" in err and "--model" in err
    assert not (tmp_path / "x.png").exists()


def test_model_that_cannot_be_found(tmp_path: Path, capsys) -> None:
    assert main(["a", "--model", str(tmp_path / "missing" / "model"), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "could not load the model" in err and "neither a local folder" in err


def test_bad_size_is_an_error_not_a_traceback(saved_pipeline: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.png"
    code = main(["a", "--model", str(saved_pipeline), "--height", "30", "-o", str(out), "--quiet"])
    assert code == 1
    assert "height=30 is not a multiple" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--device", "gpu"], "device='gpu' is not a device name: use 'cpu', 'cuda'"),
        (["--dtype", "float64"], "dtype='float64' is not supported: use 'float32'"),
    ],
)
def test_bad_device_or_dtype_is_an_error_not_a_traceback(
    saved_pipeline: Path, tmp_path: Path, capsys, option: list[str], message: str
) -> None:
    code = main(["a", "--model", str(saved_pipeline), *option, "-o", str(tmp_path / "x.png"), "--quiet"])
    assert code == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["a", "--num-images", "0"], [""], ["  "]])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_python_dash_m_runs_the_cli(saved_pipeline: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "txt2img",
            "a red circle",
            "-o",
            str(out),
            "--model",
            str(saved_pipeline),
            "--seed",
            "1",
        ],
        check=False,  # the assertion below shows stderr
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file() and read_png_metadata(out).seed == 1
