"""The attribute reader is checked against ground-truth renderings before it judges any model."""

from __future__ import annotations

import numpy as np
import pytest

from txt2img.training.attributes import ATTRIBUTE_NAMES, Attributes, parse_caption, read_attributes
from txt2img.training.reader_check import PERTURBATIONS, perturb, reader_accuracy
from txt2img.training.reader_check import main as reader_check_main
from txt2img.training.shapes import HELD_OUT, PALETTE, render, sample_spec, spec_from_attributes

NUM_IMAGES = 3000


@pytest.fixture(scope="module")
def readings() -> list[tuple[dict[str, str], dict[str, str | None], bool]]:
    """(truth, reading, held out) for renderings of seen and held-out pairs alike."""
    rng = np.random.default_rng(1234)
    result = []
    for i in range(NUM_IMAGES):
        spec = sample_spec(rng, held_out="only" if i % 3 == 0 else "exclude")
        reading = read_attributes(render(spec)).as_dict()
        result.append((spec.attributes, reading, (spec.color, spec.shape) in HELD_OUT))
    return result


def test_reader_reads_ground_truth_all_five_at_once(readings) -> None:
    for held_out in (False, True):
        subset = [(truth, read) for truth, read, h in readings if h == held_out]
        assert len(subset) >= 900
        all_five = np.mean([truth == read for truth, read in subset])
        assert all_five >= 0.99, f"held_out={held_out}: {all_five:.4f}"


@pytest.mark.parametrize("name", ATTRIBUTE_NAMES)
def test_reader_reads_each_attribute(readings, name: str) -> None:
    accuracy = np.mean([truth[name] == read[name] for truth, read, _ in readings])
    assert accuracy >= 0.995


@pytest.mark.parametrize(("blur", "noise"), [(0.0, 1.0), (0.0, 4.0), (0.6, 2.0)])
def test_reader_is_not_thrown_by_invisible_noise_or_a_slight_blur(blur: float, noise: float) -> None:
    # Generated images are never exact renderings. One grey level of noise once turned 10% of small squares
    # into circles: a half-covered edge row gained a few pixels over one half, and with them a whole row.
    accuracy = reader_accuracy(1200, blur, noise, seed=7)
    assert min(accuracy.values()) >= 0.99, accuracy


def test_perturb_blurs_then_adds_noise() -> None:
    image = np.zeros((1, 16, 16, 3), np.uint8)
    image[0, :, 8:] = 200  # a vertical edge
    rng = np.random.default_rng(0)
    assert np.array_equal(perturb(image, 0.0, 0.0, rng), image)
    blurred = perturb(image, 1.0, 0.0, rng)[0, 8, :, 0]
    assert blurred[0] == 0 and blurred[-1] == 200 and 0 < blurred[7] < 100 < blurred[8] < 200
    noisy = perturb(np.full((1, 64, 64, 3), 100, np.uint8), 0.0, 4.0, rng).astype(float)
    assert abs(noisy.mean() - 100) < 0.2 and 3.5 < noisy.std() < 4.5


def test_a_square_whose_edges_fall_mid_pixel_reads_square() -> None:
    # A 16 px square with a row above and a column to its left 45% covered, three pixels of each at 55%:
    # counting pixels over one half gives a 17 × 17 box that the square fills to 0.91, a circle's fill.
    coverage = np.zeros((64, 64))
    coverage[24:40, 24:40] = 1.0
    coverage[23, 24:40] = coverage[24:40, 23] = 0.45
    coverage[23, [26, 31, 37]] = coverage[[25, 30, 36], 23] = 0.55
    assert read_attributes(_red_on_green(coverage)) == Attributes(
        "square", "small", "red", "green", "in the center"
    )


def _red_on_green(coverage: np.ndarray) -> np.ndarray:
    green, red = np.array(PALETTE["green"], np.float64), np.array(PALETTE["red"], np.float64)
    return np.rint(green + coverage[..., None] * (red - green)).astype(np.uint8)


def test_pieces_stripes_and_dots_fill_their_box_as_little_as_they_look() -> None:
    # Rows or columns with nothing in them, inside the object, count in full in its height or width.
    two_squares, striped, dots = np.zeros((3, 64, 64))
    two_squares[26:38, 17:29] = two_squares[26:38, 35:47] = 1.0  # two 12 px squares, 6 px apart
    striped[24:40:2, 24:40] = 1.0  # a 16 px square, every other row empty
    dots[17:47:5, 17:47] = 1.0
    dots[:, [c for c in range(64) if (c - 17) % 5 != 0]] = 0.0  # 6 × 6 dots over 26 px
    for coverage in (two_squares, striped, dots):
        assert read_attributes(_red_on_green(coverage)).shape != "square"


def test_a_speck_away_from_the_object_does_not_stretch_its_box() -> None:
    coverage = np.zeros((64, 64))
    coverage[24:40, 24:40] = 1.0  # a 16 px square in the center
    coverage[5, 58] = coverage[6, 58] = 1.0  # a two-pixel speck near the top right corner
    assert read_attributes(_red_on_green(coverage)) == Attributes(
        "square", "small", "red", "green", "in the center"
    )


def test_reader_reads_every_value() -> None:
    rng = np.random.default_rng(0)
    for color in PALETTE:  # each colour as object and background, including the closest pair (orange, yellow)
        for background in PALETTE:
            if color != background:
                spec = spec_from_attributes("square", "small", color, background, "in the center", rng)
                read = read_attributes(render(spec))
                assert (read.color, read.background) == (color, background)


def test_blank_and_flat_images_have_no_object() -> None:
    assert read_attributes(np.zeros((64, 64, 3), np.uint8)) == Attributes(background="black")
    flat = np.full((64, 64, 3), PALETTE["blue"], np.uint8)
    assert read_attributes(flat) == Attributes(background="blue")
    noisy = (flat + np.random.default_rng(0).integers(-8, 9, flat.shape)).astype(np.uint8)
    assert read_attributes(noisy).shape is None


def test_a_lone_stray_pixel_is_not_an_object() -> None:
    image = np.full((64, 64, 3), PALETTE["white"], np.uint8)
    image[10, 10] = PALETTE["black"]
    assert read_attributes(image).shape is None


def test_hand_made_shapes() -> None:
    image = np.full((64, 64, 3), PALETTE["green"], np.uint8)
    image[40:60, 4:24] = PALETTE["red"]  # a 20 px square: small, centred at (14, 50)
    expected = Attributes("square", "small", "red", "green", "in the bottom left corner")
    assert read_attributes(image) == expected
    image[:] = PALETTE["black"]
    image[16:48, 16:48] = PALETTE["yellow"]
    image[16:18, 16:48] = PALETTE["black"]  # a rectangle 30 × 32 still reads as a large square
    assert read_attributes(image) == Attributes("square", "large", "yellow", "black", "in the center")


def test_an_object_covering_most_of_the_border_loses_to_the_background_colour() -> None:
    image = np.full((64, 64, 3), PALETTE["purple"], np.uint8)
    image[:, :20] = PALETTE["orange"]  # a third of the border: purple still dominates
    assert read_attributes(image).background == "purple"


def test_reader_rejects_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="64, 64, 3"):
        read_attributes(np.zeros((32, 32, 3), np.uint8))


def test_parse_caption() -> None:
    assert parse_caption("a large red circle in the top left corner on a blue background") == {
        "size": "large",
        "color": "red",
        "shape": "circle",
        "position": "in the top left corner",
        "background": "blue",
    }
    assert parse_caption("on the left, an orange triangle on an orange background") == {
        "color": "orange",
        "shape": "triangle",
        "position": "on the left",
        "background": "orange",
    }
    assert parse_caption("a small black square at the bottom") == {
        "size": "small",
        "color": "black",
        "shape": "square",
        "position": "at the bottom",
    }
    for bad in ("a red hexagon", "a pink circle", "a red circle with stripes", ""):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_reader_check_prints_a_row_per_perturbation(capsys) -> None:
    assert reader_check_main(["--num-images", "30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| blur σ (px) | noise σ (0–255) | small circle |") and "all five" in lines[0]
    assert len(lines) == 2 + len(PERTURBATIONS)
    assert lines[2].startswith("| 0 | 0 |") and lines[2].endswith("| 1.000 |")  # clean renderings


def test_reader_check_refuses_no_images(capsys) -> None:
    with pytest.raises(SystemExit):
        reader_check_main(["--num-images", "0"])
    assert "--num-images must be 1 or more" in capsys.readouterr().err
