"""The ``txt2img`` logger's verbosity, and the progress bars of loading and generating."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import txt2img
from txt2img import Txt2ImgPipeline
from txt2img.logs import PROGRESS_ENV


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    logger = logging.getLogger("txt2img")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers
    txt2img.enable_progress_bars()


@pytest.mark.parametrize(
    ("level", "number"),
    [
        ("info", logging.INFO),
        ("DEBUG", logging.DEBUG),
        (" Warning ", logging.WARNING),
        ("warn", logging.WARNING),
    ]
    + [(logging.ERROR, logging.ERROR), (25, 25), ("critical", logging.CRITICAL)],
)
def test_set_verbosity_takes_levels_and_names(level: int | str, number: int) -> None:
    txt2img.set_verbosity(level)
    assert txt2img.get_verbosity() == number
    assert logging.getLogger("txt2img.pipeline").getEffectiveLevel() == number


@pytest.mark.parametrize("level", ["verbose", "", -1, 2.5, None, True])
def test_set_verbosity_refuses_what_is_not_a_level(level: object) -> None:
    with pytest.raises(ValueError, match="level"):
        txt2img.set_verbosity(level)  # type: ignore[arg-type]


def test_info_reports_what_is_loaded_and_saved(
    saved_pipeline: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    txt2img.set_verbosity("info")
    with caplog.at_level(logging.INFO, logger="txt2img"):
        pipe = Txt2ImgPipeline.from_pretrained(saved_pipeline)
        pipe.save_pretrained(tmp_path / "copy")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("txt2img")]
    assert any(m.startswith("Loading text_encoder, gan, vae from") for m in messages), messages
    assert f"Saved the pipeline to {tmp_path / 'copy'}" in messages
    txt2img.set_verbosity("warning")
    caplog.clear()
    Txt2ImgPipeline.from_pretrained(saved_pipeline)
    assert not [r for r in caplog.records if r.name.startswith("txt2img")]


def test_set_verbosity_shows_messages_when_logging_is_not_configured(saved_pipeline: Path) -> None:
    code = (
        "import txt2img\n"
        "txt2img.set_verbosity('info')\n"
        f"txt2img.Txt2ImgPipeline.from_pretrained({str(saved_pipeline)!r})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "txt2img.pipeline: INFO: Loading text_encoder, gan, vae from" in result.stderr


def bars(
    capsys: pytest.CaptureFixture[str], saved_pipeline: Path, disable_calls: bool = False
) -> tuple[bool, bool]:
    """Whether loading and a call of the pipeline showed their progress bars."""
    capsys.readouterr()
    pipe = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    loading = "Loading pipeline components" in capsys.readouterr().err
    if disable_calls:
        pipe.set_progress_bar_config(disable=True)
    pipe("a red circle", generator=torch.Generator().manual_seed(0))
    return loading, "txt2img:" in capsys.readouterr().err


def test_progress_bars_on_loading_and_generating(
    saved_pipeline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bars(capsys, saved_pipeline) == (True, True)
    assert bars(capsys, saved_pipeline, disable_calls=True) == (True, False)


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_environment_variable_turns_every_bar_off(
    value: str, saved_pipeline: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PROGRESS_ENV, value)
    assert bars(capsys, saved_pipeline) == (False, False)
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert bars(capsys, saved_pipeline) == (True, True)


def test_disable_progress_bars_turns_every_bar_off(
    saved_pipeline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    txt2img.disable_progress_bars()
    assert bars(capsys, saved_pipeline) == (False, False)
    txt2img.enable_progress_bars()
    assert bars(capsys, saved_pipeline) == (True, True)


def test_cli_quiet_shows_no_bar_and_leaves_the_setting_as_it_was(
    saved_pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from txt2img.cli import main

    assert (
        main(["a red circle", "--model", str(saved_pipeline), "-o", str(tmp_path / "a.png"), "--quiet"]) == 0
    )
    assert "Loading pipeline components" not in capsys.readouterr().err
    level = logging.getLogger("txt2img").level
    assert main(["a red circle", "--model", str(saved_pipeline), "-o", str(tmp_path / "b.png"), "-v"]) == 0
    assert "Loading pipeline components" in capsys.readouterr().err
    assert logging.getLogger("txt2img").level == level  # -v set INFO for the run only
    assert bars(capsys, saved_pipeline) == (True, True)  # --quiet did not leave bars off
