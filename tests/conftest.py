from __future__ import annotations

from pathlib import Path

import pytest

from tiny import make_pipeline
from txt2img import Txt2ImgPipeline


@pytest.fixture(scope="session")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Txt2ImgPipeline:
    """A tiny pipeline with seeded random weights. Shared: tests must not modify it."""
    return make_pipeline(tmp_path_factory.mktemp("pipe"))


@pytest.fixture(scope="session")
def saved_pipeline(pipe: Txt2ImgPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline saved with save_pretrained. Shared: tests must copy it before changing files."""
    folder = tmp_path_factory.mktemp("saved") / "tiny-pipe"
    pipe.save_pretrained(folder)
    return folder
