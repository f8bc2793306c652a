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


def _one_image_command(tmp_path: Path, batch: bool) -> list[str]:
    """``txt2img`` arguments for one image, as a prompt or as ``txt2img batch`` of a one-line file."""
    if not batch:
        return ["a red circle", "-o", str(tmp_path / "out.png")]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    return ["batch", str(prompts), "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("batch", [False, True], ids=["generate", "batch"])
def test_compile_option_compiles_the_pipeline_before_generating(
    saved_pipeline: Path, tmp_path: Path, monkeypatch, batch: bool
) -> None:
    calls: list[str] = []
    real_call = Txt2ImgPipeline.__call__

    def fake_compile(self: Txt2ImgPipeline, **kwargs: object) -> Txt2ImgPipeline:
        calls.append("compile")
        return self

    def recording_call(self: Txt2ImgPipeline, *args: object, **kwargs: object):
        calls.append("generate")
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(Txt2ImgPipeline, "compile", fake_compile)
    monkeypatch.setattr(Txt2ImgPipeline, "__call__", recording_call)
    argv = _one_image_command(tmp_path, batch)
    assert main([*argv, "--model", str(saved_pipeline), "--quiet", "--compile"]) == 0
    assert calls[0] == "compile" and calls.count("compile") == 1 and "generate" in calls
    calls.clear()
    assert main([*argv, "--model", str(saved_pipeline), "--quiet"]) == 0
    assert "compile" not in calls


@pytest.mark.parametrize("batch", [False, True], ids=["generate", "batch"])
def test_compile_option_that_cannot_run_is_a_clear_error(
    saved_pipeline: Path, tmp_path: Path, capsys, monkeypatch, batch: bool
) -> None:
    def refuse(self: Txt2ImgPipeline, **kwargs: object) -> Txt2ImgPipeline:
        raise RuntimeError("no C++ compiler was found")

    monkeypatch.setattr(Txt2ImgPipeline, "compile", refuse)
    argv = _one_image_command(tmp_path, batch)
    assert main([*argv, "--model", str(saved_pipeline), "--quiet", "--compile"]) == 1
    assert "txt2img: error: --compile: no C++ compiler was found" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "out").exists()
