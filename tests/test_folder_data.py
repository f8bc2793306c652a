"""Users' own captioned images, in the Hugging Face imagefolder convention."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from txt2img.training.folder_data import ImageFolderDataset


def write_image(path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, ...] = (255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_metadata(folder: Path, records: list[dict | str]) -> None:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_metadata_jsonl(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", color=(255, 255, 255))
    write_image(tmp_path / "sub" / "b.jpg", size=(20, 50), color=(0, 0, 0))
    records = [
        {"file_name": "a.png", "text": "a white image"},
        "",  # blank lines are skipped
        {"file_name": "sub/b.jpg", "text": " black ", "extra": 1},
    ]
    write_metadata(tmp_path, records)
    dataset = ImageFolderDataset(tmp_path, size=16)
    assert len(dataset) == 2
    image, caption = dataset[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and caption == "a white image"
    torch.testing.assert_close(image, torch.ones(3, 16, 16))
    image, caption = dataset[1]
    assert caption == "black" and image.max() < -0.9


def test_txt_captions_beside_images(tmp_path: Path) -> None:
    for name in ("b", "a"):
        write_image(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"caption {name}\n")
    dataset = ImageFolderDataset(tmp_path)
    assert [dataset[i][1] for i in range(2)] == ["caption a", "caption b"]
    assert dataset[0][0].shape == (3, 64, 64)


def test_read_all_gives_every_item_and_a_digest_of_the_files_and_captions_not_the_size(
    tmp_path: Path,
) -> None:
    for name in ("a", "b"):
        write_image(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"caption {name}")

    def digest(size: int = 64) -> str:
        return ImageFolderDataset(tmp_path, size=size).read_all()[2]

    dataset = ImageFolderDataset(tmp_path, size=16)
    images, captions, first = dataset.read_all()
    assert captions == ["caption a", "caption b"] and images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images, torch.stack([dataset[0][0], dataset[1][0]]))
    assert len(first) == 64 and digest(size=32) == first
    (tmp_path / "b.txt").write_text("another caption")
    recaptioned = digest()
    write_image(tmp_path / "a.png", color=(0, 255, 0))
    repainted = digest()
    write_image(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("caption c")
    assert len({first, recaptioned, repainted, digest()}) == 4


def test_resize_and_centre_crop(tmp_path: Path) -> None:
    pixels = np.zeros((20, 60, 3), np.uint8)  # wide: black, white, black thirds
    pixels[:, 20:40] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("stripes")
    image, _ = ImageFolderDataset(tmp_path, size=20)[0]
    assert image.shape == (3, 20, 20)
    assert image[:, :, 4:16].min() > 0.9  # the centre third fills the crop


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataset(tmp_path)
    write_metadata(tmp_path, [""])
    with pytest.raises(ValueError, match="lists no images"):
        ImageFolderDataset(tmp_path)


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="not a folder"):
        ImageFolderDataset(tmp_path / "missing")


@pytest.mark.parametrize(
    "record",
    [{"text": "no file name"}, {"file_name": "a.png"}, {"file_name": "a.png", "text": 3}, "[1]", "{not json"],
)
def test_bad_metadata_line(tmp_path: Path, record: dict | str) -> None:
    write_image(tmp_path / "a.png")
    write_metadata(tmp_path, [{"file_name": "a.png", "text": "fine"}, record])
    with pytest.raises(ValueError, match="metadata.jsonl, line 2"):
        ImageFolderDataset(tmp_path)


def test_listed_file_missing(tmp_path: Path) -> None:
    write_metadata(tmp_path, [{"file_name": "gone.png", "text": "x"}])
    with pytest.raises(OSError, match="gone.png.*does not exist"):
        ImageFolderDataset(tmp_path)


def test_image_without_caption(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("ok")
    write_image(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"b\.png has no caption: write it to .*b\.txt"):
        ImageFolderDataset(tmp_path)


def test_unreadable_image(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "a.txt").write_text("broken")
    dataset = ImageFolderDataset(tmp_path)
    with pytest.raises(OSError, match="Cannot read the image .*a.png"):
        dataset[0]
