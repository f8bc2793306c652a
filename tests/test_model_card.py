"""Model cards: the README.md of ``save_pretrained`` and ``push_to_hub``."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from txt2img import Txt2ImgPipeline
from txt2img.model_card import ModelCard


def front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, text[:200]
    data = yaml.safe_load(match.group(1))
    assert isinstance(data, dict)
    return data


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def test_card_has_the_hub_front_matter(saved_pipeline: Path) -> None:
    data = front_matter((saved_pipeline / "README.md").read_text())
    assert data == {
        "library_name": "txt2img",
        "pipeline_tag": "text-to-image",
        "license": "other",
        "tags": ["txt2img", "text-to-image"],
    }


def test_cards_usage_example_runs(saved_pipeline: Path, tmp_path: Path) -> None:
    (block,) = python_blocks((saved_pipeline / "README.md").read_text())
    subprocess.run([sys.executable, "-c", block], cwd=tmp_path, check=True, timeout=120, capture_output=True)
    pipe = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    expected = pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0)).images[0]
    with Image.open(tmp_path / "out.png") as written:
        np.testing.assert_array_equal(np.asarray(written), np.asarray(expected))


def test_card_with_training_and_evaluation(pipe: Txt2ImgPipeline, tmp_path: Path) -> None:
    card = {
        "license": "apache-2.0",
        "tags": ["shapes", "yes", "1.0"],
        "datasets": ["Shapes-64 (procedural)"],
        "example_prompt": "a small blue square, 'quoted'",
        "training": "Shapes-64, 2,500 GAN steps on a 2-core CPU.",
        "evaluation": "| attribute | seen |\n|---|---|\n| shape | 0.742 |",
    }
    pipe.save_pretrained(tmp_path / "model", model_card=card, repo_id="org/shapes")
    text = (tmp_path / "model" / "README.md").read_text()
    data = front_matter(text)
    assert data["license"] == "apache-2.0" and data["datasets"] == ["Shapes-64 (procedural)"]
    assert data["tags"] == [
        "txt2img",
        "text-to-image",
        "shapes",
        "yes",
        "1.0",
    ]  # strings, not a bool and a float
    assert "## Training\n\nShapes-64, 2,500 GAN steps" in text
    assert "## Evaluation\n\n| attribute | seen |" in text
    (block,) = python_blocks(text)
    assert 'Txt2ImgPipeline.from_pretrained("org/shapes")' in block
    assert "pipe(\n    \"a small blue square, 'quoted'\",\n" in block
    assert "`txt2img 'a small blue square, '\"'\"'quoted'\"'\"'' --model org/shapes -o out.png`" in text


def test_an_existing_readme_is_kept_unless_asked(pipe: Txt2ImgPipeline, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text("my own card\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.save_pretrained(folder)  # no card asked for: kept quietly
    assert (folder / "README.md").read_text() == "my own card\n"
    assert (folder / "model_index.json").is_file()
    with pytest.warns(UserWarning, match="already exists and was kept; pass overwrite_model_card=True"):
        pipe.save_pretrained(folder, model_card={"license": "mit"})
    assert (folder / "README.md").read_text() == "my own card\n"
    pipe.save_pretrained(folder, model_card={"license": "mit"}, overwrite_model_card=True)
    assert front_matter((folder / "README.md").read_text())["license"] == "mit"


@pytest.mark.parametrize(
    ("card", "error"), [({"licence": "mit"}, r"unknown keys \['licence'\]"), ("mit", "not str")]
)
def test_bad_model_card_is_refused_before_writing(
    pipe: Txt2ImgPipeline, tmp_path: Path, card: Any, error: str
) -> None:
    with pytest.raises(TypeError, match=error):
        pipe.save_pretrained(tmp_path / "model", model_card=card)
    assert not (tmp_path / "model").exists()


class FakeHfApi:
    """Records what push_to_hub asks of the Hub; ``existing`` are the files the repo already has."""

    existing: ClassVar[set[str]] = set()
    uploads: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def create_repo(self, repo_id: str, private: bool | None = None, exist_ok: bool = False) -> None:
        pass

    def file_exists(self, repo_id: str, filename: str, revision: str | None = None) -> bool:
        return filename in self.existing

    def upload_folder(
        self, *, folder_path: str, ignore_patterns: list[str] | None = None, **kwargs: Any
    ) -> str:
        files = {
            p.relative_to(folder_path).as_posix(): p.read_bytes()
            for p in Path(folder_path).rglob("*")
            if p.is_file()
        }
        self.uploads.append({"files": files, "ignore_patterns": ignore_patterns, **kwargs})
        return "https://hub.example/commit/1"


@pytest.mark.parametrize("overwrite", [False, True])
def test_push_to_hub_keeps_the_repos_readme_unless_asked(
    pipe: Txt2ImgPipeline, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "uploads", [])
    for existing in (set(), {"README.md"}):
        monkeypatch.setattr(FakeHfApi, "existing", existing)
        pipe.push_to_hub("org/shapes", model_card=ModelCard(license="mit"), overwrite_model_card=overwrite)
    new_repo, old_repo = FakeHfApi.uploads
    assert new_repo["ignore_patterns"] is None
    assert old_repo["ignore_patterns"] == (None if overwrite else ["README.md"])
    card = new_repo["files"]["README.md"].decode()
    assert front_matter(card)["license"] == "mit" and 'from_pretrained("org/shapes")' in card
    assert {"model_index.json", "gan/config.json", "vae/config.json"} <= set(new_repo["files"])
