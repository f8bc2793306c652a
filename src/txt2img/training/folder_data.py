"""A data set of users' own captioned images, in the Hugging Face ``imagefolder`` convention.

A folder holds images and either

- ``metadata.jsonl``: one JSON object per line with ``file_name`` (a path relative to the folder) and
  ``text`` (the caption), as ``datasets.load_dataset("imagefolder", data_dir=...)`` reads it; or
- a ``.txt`` caption file beside each image, with the same stem (``cat.png`` + ``cat.txt``).

Every caption is read, and every file checked, when the data set is built, so a broken folder fails at
once with the file to fix rather than hours into training.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from txt2img.training.shapes import to_tensor

METADATA_NAME = "metadata.jsonl"
REQUIRED_FIELDS = ("file_name", "text")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_metadata(root: Path) -> list[tuple[Path, str]]:
    """``(image path, caption)`` pairs listed in ``root/metadata.jsonl``.

    Raises:
        ValueError: a line is not a JSON object with string ``file_name`` and ``text``.
        OSError: a listed image does not exist.
    """
    path = root / METADATA_NAME
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error}).") from error
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in REQUIRED_FIELDS):
            raise ValueError(
                f"{path}, line {number}: each line must be a JSON object with string fields "
                f'"file_name" and "text", e.g. {{"file_name": "0001.png", "text": "a red circle"}}; '
                f"got {line.strip()!r}."
            )
        image = root / record["file_name"]
        if not image.is_file():
            raise FileNotFoundError(
                f"{path}, line {number} lists {record['file_name']!r}, but {image} does not exist: "
                "add the image or remove the line."
            )
        items.append((image, record["text"].strip()))
    return items


def read_caption_files(root: Path) -> list[tuple[Path, str]]:
    """``(image path, caption)`` pairs from ``.txt`` files beside the images (same stem), in sorted order.

    Raises:
        ValueError: an image has no caption file.
    """
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    items = []
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise ValueError(
                f"The image {image} has no caption: write it to {caption}, or list every image with its "
                f"caption in {root / METADATA_NAME}."
            )
        items.append((image, caption.read_text(encoding="utf-8").strip()))
    return items


class ImageFolderDataset(torch.utils.data.Dataset):
    """Captioned images from a folder (``metadata.jsonl`` if present, else ``.txt`` files beside the images).

    Items are ``(image, caption)``: float32 (3, size, size) in [-1, 1] (resized so the shorter side is
    ``size``, then centre-cropped) and a str.

    Args:
        root: The folder.
        size: Side of the square images returned, in px.

    Raises:
        OSError: ``root`` is not a folder, or an image listed in ``metadata.jsonl`` is missing.
        ValueError: no images; a bad ``metadata.jsonl`` line; an image without a caption.
    """

    def __init__(self, root: str | os.PathLike, size: int = 64) -> None:
        self.root = Path(root)
        self.size = size
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root} is not a folder of images.")
        has_metadata = (self.root / METADATA_NAME).is_file()
        self.items = read_metadata(self.root) if has_metadata else read_caption_files(self.root)
        if not self.items:
            source = f"{METADATA_NAME} lists no images" if has_metadata else "it holds no images"
            raise ValueError(
                f"{self.root} is empty for training: {source}. Add images "
                f"({', '.join(IMAGE_EXTENSIONS)}) with captions, in {METADATA_NAME} (file_name, text) "
                "or in .txt files beside them."
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, caption, _ = self.read(index)
        return image, caption

    def read(self, index: int) -> tuple[torch.Tensor, str, bytes]:
        """Item ``index`` with the bytes of its file, read once: ``(image, caption, file bytes)``.

        Raises:
            OSError: the image cannot be read.
        """
        path, caption = self.items[index]
        try:
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise OSError(f"Cannot read the image {path} ({error}): replace or remove it.") from error
        square = ImageOps.fit(rgb, (self.size, self.size), method=Image.Resampling.BICUBIC)
        return to_tensor(np.array(square)), caption, data

    def read_all(self) -> tuple[torch.Tensor, list[str], str]:
        """Every item, each file read once, and a SHA-256 of what was read.

        The digest covers each item's file name (relative to the folder), caption and file bytes, in order:
        another image, caption or order gives another digest; ``size`` does not enter.

        Returns:
            ``(images, captions, digest)``: float32 (N, 3, size, size) in [-1, 1], N captions, 64 hex digits.

        Raises:
            OSError: an image cannot be read.
        """
        digest = hashlib.sha256()
        images, captions = [], []
        for index, (path, _) in enumerate(self.items):
            image, caption, data = self.read(index)
            name = Path(path).relative_to(self.root).as_posix()
            digest.update(json.dumps([name, caption]).encode() + b"\0")
            digest.update(data)
            images.append(image)
            captions.append(caption)
        return torch.stack(images), captions, digest.hexdigest()
