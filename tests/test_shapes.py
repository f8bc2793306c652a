"""The Shapes-64 generator follows shared/spec/shapes-64.md: sampling, rendering, captions, data sets."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from txt2img.training.attributes import parse_caption
from txt2img.training.shapes import (
    HELD_OUT,
    IMAGE_SIZE,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    ShapeSpec,
    canonical_caption,
    render,
    sample_batch,
    sample_spec,
    spec_from_attributes,
    swap_shape,
    varied_caption,
)


def specs(seed: int, n: int, held_out: str = "exclude") -> list[ShapeSpec]:
    rng = np.random.default_rng(seed)
    return [sample_spec(rng, held_out=held_out) for _ in range(n)]


@pytest.fixture(scope="module")
def training_specs() -> list[ShapeSpec]:
    return specs(0, 5000)


# ---------------------------------------------------------------------------------------------------------
# Sampling


def test_sampling_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    assert specs(3, 50) == specs(3, 50)
    assert specs(3, 50) != specs(4, 50)
    images, captions, _ = sample_batch(np.random.default_rng(7), 8)
    again, captions_again, _ = sample_batch(np.random.default_rng(7), 8)
    assert torch.equal(images, again) and captions == captions_again


def test_exclude_mode_never_draws_a_held_out_pair_yet_covers_every_colour_and_shape(training_specs) -> None:
    pairs = {(s.color, s.shape) for s in training_specs}
    assert not pairs & HELD_OUT
    assert pairs == {(c, s) for c in PALETTE for s in SHAPES} - HELD_OUT
    assert {s.color for s in training_specs} == set(PALETTE)
    assert {s.shape for s in training_specs} == set(SHAPES)
    assert {s.background for s in training_specs} == set(PALETTE)
    assert {s.size for s in training_specs} == set(SIZES)
    assert {s.position for s in training_specs} == set(POSITIONS)
    assert all(s.color != s.background for s in training_specs)


def test_only_mode_draws_held_out_pairs_and_any_mode_draws_both() -> None:
    assert {(s.color, s.shape) for s in specs(1, 500, "only")} == HELD_OUT
    drawn = {(s.color, s.shape) for s in specs(1, 2000, "any")}
    assert HELD_OUT < drawn and len(drawn) == len(PALETTE) * len(SHAPES)
    with pytest.raises(ValueError, match="held_out"):
        sample_spec(np.random.default_rng(0), held_out="sometimes")


def test_continuous_values_stay_in_their_ranges(training_specs) -> None:
    for s in training_specs:
        low, high = SIZES[s.size]
        assert low <= s.side <= high
        x, y = POSITIONS[s.position]
        assert abs(s.center_x - x) <= 2 and abs(s.center_y - y) <= 2
        half = s.side / 2  # nothing leaves the frame
        assert half <= s.center_x <= IMAGE_SIZE - half and half <= s.center_y <= IMAGE_SIZE - half
        assert all(abs(d) <= 12 for d in s.color_shade + s.background_shade)


def test_spec_from_attributes_checks_its_arguments() -> None:
    rng = np.random.default_rng(0)
    spec = spec_from_attributes("square", "large", "red", "blue", "at the top", rng)
    assert spec.attributes == {
        "shape": "square",
        "color": "red",
        "background": "blue",
        "size": "large",
        "position": "at the top",
    }
    with pytest.raises(ValueError, match="must differ"):
        spec_from_attributes("square", "large", "red", "red", "at the top", rng)
    with pytest.raises(ValueError, match="Unknown shape"):
        spec_from_attributes("hexagon", "large", "red", "blue", "at the top", rng)


# ---------------------------------------------------------------------------------------------------------
# Rendering

IDEAL_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # × side²


def test_render_geometry_and_colours(training_specs) -> None:
    for s in training_specs[:1500]:
        image = render(s)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        background, color = np.array(s.background_rgb), np.array(s.color_rgb)
        assert np.abs(background - PALETTE[s.background]).max() <= 12
        assert np.abs(color - PALETTE[s.color]).max() <= 12
        # Coverage recovered from the blend: the object's whole area is inside the frame (nothing cut off).
        contrast = (color - background).astype(np.float32)
        coverage = (image - background) @ contrast / (contrast @ contrast)  # (64, 64)
        assert coverage.sum() == pytest.approx(IDEAL_AREA[s.shape] * s.side**2, rel=0.04, abs=3)
        # Bounding box of every touched pixel: the drawn side (± anti-aliased edge pixels), the drawn centre.
        rows, cols = np.nonzero(np.abs(coverage) > 0.02)
        extents = ((rows.min(), rows.max() + 1, s.center_y), (cols.min(), cols.max() + 1, s.center_x))
        for low, high, center in extents:
            assert s.side - 1.5 <= high - low <= s.side + 2
            assert abs((low + high) / 2 - center) <= 1
        # The interior is exactly the object's colour; everything off its bounding box the background's.
        inside_y = s.center_y + (s.side / 4 if s.shape == "triangle" else 0)
        assert (image[int(inside_y), int(s.center_x)] == color).all()
        y, x = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] + 0.5  # pixel centres
        outside = np.maximum(np.abs(x - s.center_x), np.abs(y - s.center_y)) > s.side / 2 + 1
        assert (image[outside] == background).all()


def test_render_draws_the_named_shape() -> None:
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        s = spec_from_attributes(shape, "large", "white", "black", "in the center", rng)
        mask = render(s)[..., 0] > 128  # (64, 64)
        rows, cols = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
        assert fill == pytest.approx(IDEAL_AREA[shape], abs=0.05)
        if shape == "triangle":  # pointing up: narrow top row, full-width bottom row
            assert mask[rows.min()].sum() < 4 and mask[rows.max()].sum() >= s.side - 2
    assert render(s)[0, 0].tolist() == list(s.background_rgb)


def test_render_is_anti_aliased() -> None:
    s = spec_from_attributes("circle", "large", "white", "black", "in the center", np.random.default_rng(0))
    values = np.unique(render(s)[..., 0])
    assert len(values) > 5  # intermediate shades on the edge, not just two colours


# ---------------------------------------------------------------------------------------------------------
# Captions


def test_canonical_caption_reads_back_to_the_spec(training_specs) -> None:
    rng = np.random.default_rng(0)
    s = spec_from_attributes("circle", "large", "red", "blue", "in the top left corner", rng)
    assert canonical_caption(s) == "a large red circle in the top left corner on a blue background"
    for s in training_specs[:1000]:
        assert parse_caption(canonical_caption(s)) == s.attributes


def test_varied_captions_are_truthful_and_often_canonical(training_specs) -> None:
    rng = np.random.default_rng(0)
    canonical, forms = 0, set()
    for s in training_specs[:2000]:
        caption = varied_caption(s, rng)
        named = parse_caption(caption)
        assert {"color", "shape"} <= set(named)
        assert all(s.attributes[k] == v for k, v in named.items()), caption
        canonical += caption == canonical_caption(s)
        forms.add((frozenset(named), caption.split()[0] in {"in", "at", "on"}))  # kept phrases, position 1st?
    assert 0.4 <= canonical / 2000 <= 0.75
    assert len(forms) >= 8  # phrases dropped in every combination, and reordered


def test_varied_captions_use_an_where_english_wants_it() -> None:
    rng = np.random.default_rng(0)
    orange_object = spec_from_attributes("circle", "small", "orange", "red", "at the top", rng)
    orange_background = spec_from_attributes("circle", "small", "red", "orange", "at the top", rng)
    captions = {varied_caption(s, rng) for s in (orange_object, orange_background) for _ in range(300)}
    assert any(c.startswith("an orange circle") for c in captions)
    assert any("on an orange background" in c for c in captions)
    assert not any("a orange circle" in c for c in captions)


def test_swap_shape_changes_only_the_shape_and_never_makes_a_held_out_pair(training_specs) -> None:
    rng = np.random.default_rng(0)
    swapped_to: dict[tuple[str, str], set[str]] = {}
    for s in training_specs[:2000]:
        caption = varied_caption(s, rng)
        negative = swap_shape(caption, rng)
        named, negative_named = parse_caption(caption), parse_caption(negative)
        assert negative_named["shape"] != s.shape, (caption, negative)
        assert {k: v for k, v in negative_named.items() if k != "shape"} == {
            k: v for k, v in named.items() if k != "shape"
        }
        assert (s.color, negative_named["shape"]) not in HELD_OUT
        swapped_to.setdefault((s.color, s.shape), set()).add(negative_named["shape"])
    # both other shapes are drawn wherever neither makes a held-out pair
    assert swapped_to[("red", "circle")] == {"square", "triangle"}
    assert swapped_to[("green", "circle")] == {"triangle"}  # green square is held out


def test_swap_shape_needs_a_shape_word() -> None:
    with pytest.raises(ValueError, match="names none of the shapes"):
        swap_shape("a large red blob on a blue background", np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------------
# Data sets


def take(dataset: ShapesDataset, n: int) -> list[tuple[torch.Tensor, str]]:
    return list(itertools.islice(iter(dataset), n))


def test_shapes_dataset_stream() -> None:
    items = take(ShapesDataset(seed=5), 20)
    image, caption = items[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert -1 <= image.min() and image.max() <= 1 and isinstance(caption, str)
    again = take(ShapesDataset(seed=5), 20)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(items, again))
    other_seed = take(ShapesDataset(seed=6), 20)
    assert [c for _, c in items] != [c for _, c in other_seed]
    canonical = take(ShapesDataset(seed=5, canonical_only=True, held_out="only"), 50)
    for _, caption in canonical:
        named = parse_caption(caption)
        assert len(named) == 5 and (named["color"], named["shape"]) in HELD_OUT


def test_shapes_dataset_ranks_draw_distinct_data() -> None:
    ranks = [take(ShapesDataset(seed=5, rank=r, world_size=3), 10) for r in range(3)]
    assert torch.equal(ranks[0][0][0], take(ShapesDataset(seed=5, rank=0, world_size=3), 1)[0][0])
    for a, b in itertools.combinations(ranks, 2):
        assert not any(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="rank"):
        ShapesDataset(rank=2, world_size=2)


def test_shapes_dataset_in_a_dataloader_with_workers() -> None:
    loader = torch.utils.data.DataLoader(ShapesDataset(seed=1), batch_size=4, num_workers=2)
    batches = list(itertools.islice(iter(loader), 2))  # one batch from each worker
    assert batches[0][0].shape == (4, 3, 64, 64)
    assert not torch.equal(batches[0][0], batches[1][0])


def test_sample_batch() -> None:
    rng = np.random.default_rng(0)
    images, captions, batch_specs = sample_batch(rng, 16, held_out="only", canonical=True)
    assert images.shape == (16, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert captions == [canonical_caption(s) for s in batch_specs]
    assert all((s.color, s.shape) in HELD_OUT for s in batch_specs)
    expected = torch.from_numpy(render(batch_specs[3])).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(images[3], expected)
