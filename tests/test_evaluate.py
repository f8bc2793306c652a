"""The Shapes-64 evaluation, with fake generators whose answers are known, and the pipeline adapter."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from txt2img import Txt2ImgPipeline
from txt2img.training import evaluate as evaluation
from txt2img.training.attributes import ATTRIBUTE_NAMES, parse_caption
from txt2img.training.evaluate import EvalReport, canonical_prompts, evaluate, pipeline_generator
from txt2img.training.shapes import HELD_OUT, render, spec_from_attributes

ROWS = (*ATTRIBUTE_NAMES, "all five")


def true_images(prompts: list[str], seeds: list[int]) -> np.ndarray:
    """A perfect model: each prompt's ground-truth rendering, its jitter and shades drawn from its seed."""
    rngs = [np.random.default_rng(seed) for seed in seeds]
    specs = [spec_from_attributes(**parse_caption(p), rng=rng) for p, rng in zip(prompts, rngs)]
    return np.stack([render(spec) for spec in specs])


def blank_images(prompts: list[str], seeds: list[int]) -> np.ndarray:
    return np.zeros((len(prompts), 64, 64, 3), np.uint8)


def test_canonical_prompts_are_deterministic_and_split_seen_from_held_out() -> None:
    seen, held_out = canonical_prompts(300, 0, False), canonical_prompts(300, 0, True)
    assert seen == canonical_prompts(300, 0, False) and seen != canonical_prompts(300, 1, False)
    assert all(len(parse_caption(p)) == 5 for p in seen + held_out)
    assert not any((parse_caption(p)["color"], parse_caption(p)["shape"]) in HELD_OUT for p in seen)
    assert {(parse_caption(p)["color"], parse_caption(p)["shape"]) for p in held_out} == HELD_OUT


def test_a_perfect_model_scores_about_one() -> None:
    report = evaluate(true_images, num_images=200, batch_size=50)
    for split in (report.seen, report.held_out):
        assert set(split) == set(ROWS)
        assert min(split.values()) >= 0.98
    assert report.variety is not None and report.variety > 0
    assert report.images_per_second > 0 and report.num_images == 200


def test_a_blank_model_scores_zero() -> None:
    report = evaluate(blank_images, num_images=100, variety_prompts=4, variety_seeds=2)
    for split in (report.seen, report.held_out):
        for name in ("shape", "color", "size", "position", "all five"):
            assert split[name] == 0
        assert split["background"] < 0.3  # right only when the prompt asks for black
    assert report.variety == 0


def test_evaluate_is_deterministic_and_passes_one_seed_per_image() -> None:
    calls = []

    def recording(prompts: list[str], seeds: list[int]) -> np.ndarray:
        calls.append((list(prompts), list(seeds)))
        return true_images(prompts, seeds)

    first = evaluate(recording, num_images=30, batch_size=16, variety_prompts=3, variety_seeds=3)
    recorded, calls[:] = list(calls), []
    second = evaluate(recording, num_images=30, batch_size=16, variety_prompts=3, variety_seeds=3)
    assert calls == recorded and first.seen == second.seen and first.variety == second.variety
    assert max(len(p) for p, _ in calls) == 16 and all(len(p) == len(s) for p, s in calls)
    variety_call = calls[-1][0]
    assert variety_call[:3] == [variety_call[0]] * 3  # each variety prompt under several seeds


def test_evaluate_rejects_images_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="uint8 images of shape"):
        evaluate(lambda p, s: np.zeros((len(p), 32, 32, 3), np.uint8), num_images=4)
    with pytest.raises(ValueError, match="uint8"):
        evaluate(lambda p, s: np.zeros((len(p), 64, 64, 3), np.float32), num_images=4)
    with pytest.raises(ValueError, match="2 seeds"):
        evaluate(true_images, num_images=4, variety_seeds=1)


def test_report_markdown_and_dict() -> None:
    report = evaluate(true_images, num_images=20, variety_prompts=2, variety_seeds=2)
    table = report.to_markdown()
    for row in ROWS:
        assert f"| {row} |" in table
    assert "| seen | held-out |" in table and "variety" in table and "images/s" in table
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == {"seen", "held_out", "variety", "images_per_second", "num_images", "shape_by_object"}
    zeros = dict.fromkeys(ROWS, 0.0)
    assert "not measured" in EvalReport(zeros, zeros, None, 1.0, 1).to_markdown()


def test_shape_by_object_shows_which_objects_fail() -> None:
    def squares_as_circles(prompts: list[str], seeds: list[int]) -> np.ndarray:
        return true_images([p.replace("square", "circle") for p in prompts], seeds)

    report = evaluate(squares_as_circles, num_images=120, variety_prompts=0)
    for split, prompts in (
        ("seen", canonical_prompts(120, 0, False)),
        ("held_out", canonical_prompts(120, 0, True)),
    ):
        objects = report.shape_by_object[split]
        wanted = [parse_caption(p) for p in prompts]
        assert set(objects) == {f"{w['size']} {w['color']} {w['shape']}" for w in wanted}
        assert sum(counts["images"] for counts in objects.values()) == 120
        for name, counts in objects.items():
            assert counts["shape"] == (0.0 if name.endswith("square") else 1.0)
    table = report.to_markdown(by_object=True).split("| object | split | images | shape right |")[1]
    first_row = table.strip().splitlines()[1]
    assert "square" in first_row and first_row.endswith("| 0.000 |")  # worst first
    assert "| object |" not in report.to_markdown()


def test_pipeline_generator_adapts_a_pipeline(pipe: Txt2ImgPipeline) -> None:
    generate = pipeline_generator(pipe)
    prompt = "a small red circle at the top on a blue background"
    images = generate([prompt, "a large green square"], [0, 1])
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8  # the tiny test pipeline makes 32 × 32
    np.testing.assert_array_equal(generate([prompt], [0])[0], images[0])  # image i depends on seeds[i] only


class FakePipeline:
    """Stands in for Txt2ImgPipeline.from_pretrained in the CLI test: perfect images, as floats in [0, 1]."""

    def __init__(self) -> None:
        self.truncation_psis: list[float] = []  # one per call

    def set_progress_bar_config(self, **kwargs: object) -> None:
        self.progress = kwargs

    def __call__(
        self, prompts: list[str], *, generator: list, output_type: str, truncation_psi: float
    ) -> SimpleNamespace:
        assert output_type == "np"
        self.truncation_psis.append(truncation_psi)
        images = true_images(prompts, [g.initial_seed() for g in generator]).astype(np.float32) / 255
        return SimpleNamespace(images=images)


def test_cli_prints_the_table_and_writes_json(monkeypatch, tmp_path: Path, capsys) -> None:
    loaded: list[str] = []
    pipes: list[FakePipeline] = []

    def from_pretrained(name: str, **kwargs: object) -> FakePipeline:
        loaded.append(name)
        pipes.append(FakePipeline())
        return pipes[-1]

    monkeypatch.setattr(Txt2ImgPipeline, "from_pretrained", from_pretrained)
    out = tmp_path / "report.json"
    assert evaluation.main(["some/model", "--num-images", "20", "--seed", "3", "--json", str(out)]) == 0
    assert loaded == ["some/model"]
    assert "| all five |" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["num_images"] == 20 and report["seen"]["all five"] >= 0.95
    assert sum(counts["images"] for counts in report["shape_by_object"]["held_out"].values()) == 20
    assert set(pipes[0].truncation_psis) == {1.0}  # off unless asked for
    assert evaluation.main(["some/model", "--num-images", "20", "--by-object"]) == 0
    assert "| object | split | images | shape right |" in capsys.readouterr().out
    assert evaluation.main(["some/model", "--num-images", "20", "--truncation-psi", "0.6"]) == 0
    assert set(pipes[-1].truncation_psis) == {0.6}
