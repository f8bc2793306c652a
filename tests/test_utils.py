"""``txt2img.utils``: image grids and where saved images go."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from txt2img.utils import grid_shape, make_image_grid, output_paths


def solid(value: int, size: tuple[int, int] = (4, 3)) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


def test_grid_places_images_row_by_row() -> None:
    images = [solid(v) for v in (10, 20, 30, 40, 50, 60)]
    grid = make_image_grid(images, rows=2, cols=3)
    assert grid.size == (12, 6)
    pixels = np.asarray(grid)[:, :, 0]
    # each image's top-left pixel, row by row
    assert [pixels[y, x] for y in (0, 3) for x in (0, 4, 8)] == [10, 20, 30, 40, 50, 60]


def test_grid_of_one_image_is_that_image() -> None:
    image = Image.fromarray(np.arange(36, dtype=np.uint8).reshape(3, 4, 3))
    np.testing.assert_array_equal(np.asarray(make_image_grid([image], 1, 1)), np.asarray(image))


@pytest.mark.parametrize(("rows", "cols"), [(2, 2), (1, 2), (3, 2)])
def test_grid_needs_rows_times_cols_images(rows: int, cols: int) -> None:
    with pytest.raises(ValueError, match=f"rows={rows} × cols={cols} holds {rows * cols} images, but 3"):
        make_image_grid([solid(0)] * 3, rows, cols)


def test_grid_of_images_of_different_sizes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"differ in size \(4x3, 5x3\)"):
        make_image_grid([solid(0), solid(0, (5, 3))], 1, 2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_grid_rows_must_be_positive_integers(bad: object) -> None:
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        make_image_grid([solid(0)], bad, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("count", "shape"),
    [(1, (1, 1)), (2, (1, 2)), (4, (2, 2)), (6, (2, 3)), (7, (1, 7)), (8, (2, 4)), (9, (3, 3))],
)
def test_grid_shape_is_nearly_square_without_empty_cells(count: int, shape: tuple[int, int]) -> None:
    assert grid_shape(count) == shape


def test_output_paths_one_several_and_patterns(tmp_path: Path) -> None:
    assert output_paths(tmp_path / "cat.png", 1) == [tmp_path / "cat.png"]
    assert output_paths(tmp_path / "cat.png", 2) == [tmp_path / "cat-0.png", tmp_path / "cat-1.png"]
    assert output_paths(tmp_path / "cat", 1) == [tmp_path / "cat.png"]
    assert output_paths(str(tmp_path / "cat-{i:02d}.png"), 2) == [
        tmp_path / "cat-00.png",
        tmp_path / "cat-01.png",
    ]
    assert output_paths(str(tmp_path / "{i}"), 2) == [tmp_path / "0.png", tmp_path / "1.png"]


def test_output_paths_refuse_other_formats_and_bad_patterns() -> None:
    with pytest.raises(ValueError, match=r"cat\.jpg does not end in \.png"):
        output_paths("cat.jpg", 1)
    with pytest.raises(ValueError, match="several images one name"):
        output_paths("cat-{i!s:.0}.png", 2)  # the index cut to nothing
    with pytest.raises(ValueError, match=r"not a valid pattern: use \{i\}"):
        output_paths("cat-{n}.png", 2)
