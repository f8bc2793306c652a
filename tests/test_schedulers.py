"""Parity of txt2img.schedulers with diffusers' schedulers: timesteps, noise scale, whole sampling loops, and
the generator state they leave (every noise draw diffusers makes must be made too, in the same order)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from txt2img.schedulers import CONFIG_KEYS, SchedulerConfig, make_schedule, scale_model_input, step

CLASSES: dict[str, Any] = {
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    "DDIMScheduler": DDIMScheduler,
    "LCMScheduler": LCMScheduler,
    "DDPMScheduler": DDPMScheduler,
}
# stabilityai/sd-turbo's scheduler/scheduler_config.json
SD_TURBO: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
PREDICTIONS: dict[str, tuple[str, ...]] = {
    "EulerDiscreteScheduler": ("epsilon", "v_prediction", "sample"),
    "EulerAncestralDiscreteScheduler": ("epsilon", "v_prediction"),
    "DDIMScheduler": ("epsilon", "v_prediction", "sample"),
    "LCMScheduler": ("epsilon", "v_prediction", "sample"),
    "DDPMScheduler": ("epsilon", "v_prediction", "sample"),
}
SHAPE = (2, 4, 8, 8)
# diffusers calls np.array on tensors, which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def fake_model(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
    """A deterministic stand-in for the UNet: depends on its input, the timestep and the step."""
    offsets = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i)).to(x.dtype)
    return 0.5 * torch.tanh(x) + 1e-3 * t.to(x.dtype) + 0.5 * offsets


def run_diffusers(
    data: dict[str, Any], n: int, noise: torch.Tensor, generator: Any
) -> tuple[Any, torch.Tensor]:
    scheduler = CLASSES[data["_class_name"]].from_config(data)
    scheduler.set_timesteps(n)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        output = fake_model(scheduler.scale_model_input(x, t), t, i)
        x = scheduler.step(output, t, x, generator=generator, return_dict=False)[0]
    return scheduler, x


def run_ours(data: dict[str, Any], n: int, noise: torch.Tensor, generator: Any) -> tuple[Any, torch.Tensor]:
    schedule = make_schedule(SchedulerConfig.from_dict(data), n)
    x = noise * schedule.init_noise_sigma
    for i, t in enumerate(schedule.timesteps):
        output = fake_model(scale_model_input(schedule, i, x), t, i)
        x = step(schedule, i, output, x, generator)
    return schedule, x


def assert_parity(
    data: dict[str, Any],
    n: int,
    dtype: torch.dtype = torch.float32,
    seeds: tuple[int, ...] = (0,),
    diffusers_nan: bool = False,
) -> None:
    """Same timesteps, noise scale, final sample (≤ 1e-5) and generator end state as diffusers.

    ``diffusers_nan``: diffusers' result is NaN (a rounding bug), ours must be finite instead.
    """
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(42)).to(dtype)
    theirs_gens = [torch.Generator().manual_seed(s) for s in seeds]
    ours_gens = [torch.Generator().manual_seed(s) for s in seeds]
    theirs_arg = theirs_gens[0] if len(seeds) == 1 else theirs_gens
    ours_arg = ours_gens[0] if len(seeds) == 1 else ours_gens
    scheduler, theirs = run_diffusers(data, n, noise, theirs_arg)
    schedule, ours = run_ours(data, n, noise, ours_arg)

    assert schedule.timesteps.dtype == scheduler.timesteps.dtype
    torch.testing.assert_close(schedule.timesteps, scheduler.timesteps, rtol=0, atol=0)
    assert schedule.init_noise_sigma == float(scheduler.init_noise_sigma)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.isfinite(ours).all()
    if diffusers_nan:
        assert torch.isnan(theirs).all()
    else:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    for mine, reference in zip(ours_gens, theirs_gens):
        assert torch.equal(mine.get_state(), reference.get_state()), "generator states differ: draws differ"


# ---------------------------------------------------------------------------------------------------------
# Sampling loops


MATRIX = [
    (kind, spacing, prediction)
    for kind, predictions in PREDICTIONS.items()
    for spacing in (("trailing",) if kind == "LCMScheduler" else ("trailing", "leading", "linspace"))
    for prediction in predictions
]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize(("kind", "spacing", "prediction"), MATRIX)
def test_sampling_matches_diffusers(kind: str, spacing: str, prediction: str, n: int) -> None:
    data = {"_class_name": kind, **SD_BETAS, "timestep_spacing": spacing, "prediction_type": prediction}
    assert_parity(data, n)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_sd_turbo_config_matches_diffusers(n: int) -> None:
    assert_parity(SD_TURBO, n)


def test_sd_turbo_one_step_is_the_documented_math() -> None:
    schedule = make_schedule(SchedulerConfig.from_dict(SD_TURBO), 1)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)[999]
    sigma = ((1 - a) / a).sqrt().item()
    assert schedule.timesteps.tolist() == [999.0]
    assert schedule.init_noise_sigma == pytest.approx(sigma, rel=1e-4)
    x, eps = torch.randn(SHAPE) * sigma, torch.randn(SHAPE)
    torch.testing.assert_close(scale_model_input(schedule, 0, x), x / (sigma**2 + 1) ** 0.5)
    torch.testing.assert_close(step(schedule, 0, eps, x, None), x - sigma * eps, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_a_generator_per_sample_matches_diffusers(kind: str) -> None:
    data = {"_class_name": kind, **SD_BETAS, "timestep_spacing": "trailing"}
    assert_parity(data, 3, seeds=(0, 1))


@pytest.mark.parametrize("kind", list(CLASSES))
def test_bfloat16_samples_match_diffusers(kind: str) -> None:
    assert_parity({"_class_name": kind, **SD_BETAS, "timestep_spacing": "trailing"}, 2, dtype=torch.bfloat16)


OPTIONS: dict[str, dict[str, Any]] = {
    "linear": {"beta_schedule": "linear"},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"num_train_timesteps": 100, "trained_betas": torch.linspace(1e-3, 0.05, 100).tolist()},
    "zero_snr": {**SD_BETAS, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    "clip_x0": {**SD_BETAS, "clip_sample": True, "clip_sample_range": 0.5, "prediction_type": "sample"},
    "clip_eps": {**SD_BETAS, "clip_sample": True, "clip_sample_range": 0.5},
}
OPTION_CASES = [
    pytest.param(kind, options, id=f"{name}-{kind}")
    for name, options in OPTIONS.items()
    for kind in CLASSES
    if options.get("prediction_type", "epsilon") in PREDICTIONS[kind]
]


@pytest.mark.parametrize(("kind", "options"), OPTION_CASES)
def test_options_match_diffusers(kind: str, options: dict[str, Any]) -> None:
    data = {"_class_name": kind, "timestep_spacing": "trailing", **options}
    if kind == "LCMScheduler" and "num_train_timesteps" in options:
        data["original_inference_steps"] = 10
    # diffusers' EulerAncestral computes sqrt(sigma_to² - sigma_up²) of a rounding-negative number there
    nan = kind == "EulerAncestralDiscreteScheduler" and options.get("beta_schedule") == "squaredcos_cap_v2"
    assert_parity(data, 3, diffusers_nan=nan)


@pytest.mark.parametrize(
    "data",
    [
        {
            "_class_name": "DDIMScheduler",
            **SD_BETAS,
            "timestep_spacing": "trailing",
            "set_alpha_to_one": False,
        },
        {"_class_name": "DDIMScheduler", **SD_BETAS, "timestep_spacing": "leading", "set_alpha_to_one": True},
        {"_class_name": "DDIMScheduler", **SD_BETAS, "timestep_spacing": "leading", "steps_offset": 0},
        {"_class_name": "LCMScheduler", "original_inference_steps": 4, "timestep_scaling": 0.01},
        {"_class_name": "LCMScheduler", "original_inference_steps": 4, "set_alpha_to_one": False},
        {"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "timestep_type": "continuous"},
        {
            "_class_name": "EulerDiscreteScheduler",
            **SD_BETAS,
            "timestep_spacing": "leading",
            "steps_offset": 0,
        },
        # keys named in _use_default_values take the class default, as diffusers reads them
        {
            "_class_name": "DDIMScheduler",
            "timestep_spacing": "trailing",
            "_use_default_values": ["timestep_spacing"],
        },
    ],
)
@pytest.mark.parametrize("n", [1, 4])
def test_class_options_match_diffusers(data: dict[str, Any], n: int) -> None:
    assert_parity(data, n)


def test_schedules_are_independent_of_each_other() -> None:
    config = SchedulerConfig.from_dict(SD_TURBO)
    first, second = make_schedule(config, 2), make_schedule(config, 2)
    assert first.timesteps is not second.timesteps and first.sigmas is not second.sigmas
    torch.testing.assert_close(first.timesteps, second.timesteps)


# ---------------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("kind", list(CLASSES))
def test_defaults_are_diffusers_defaults(kind: str) -> None:
    ours = SchedulerConfig.from_dict({"_class_name": kind}).to_dict()
    reference = dict(CLASSES[kind]().config)
    for key in CONFIG_KEYS[kind]:
        assert ours[key] == reference[key], key


@pytest.mark.parametrize(
    "data",
    [
        SD_TURBO,
        {
            "_class_name": "LCMScheduler",
            "original_inference_steps": 8,
            "timestep_scaling": 5.0,
            "clip_sample": True,
        },
        {
            "_class_name": "DDIMScheduler",
            **SD_BETAS,
            "set_alpha_to_one": False,
            "rescale_betas_zero_snr": True,
        },
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 3, "trained_betas": [0.1, 0.2, 0.3]},
        {"_class_name": "EulerAncestralDiscreteScheduler", "prediction_type": "v_prediction"},
    ],
)
def test_to_dict_round_trips_and_diffusers_reads_it(data: dict[str, Any]) -> None:
    config = SchedulerConfig.from_dict(data)
    written = config.to_dict()
    assert written["_class_name"] == data["_class_name"]
    assert SchedulerConfig.from_dict(json.loads(json.dumps(written))) == config
    reread = CLASSES[data["_class_name"]].from_config(written).config
    original = CLASSES[data["_class_name"]].from_config(data).config
    for key in CONFIG_KEYS[data["_class_name"]]:
        assert reread[key] == original[key], key


def test_from_file_reads_a_scheduler_config(tmp_path: Path) -> None:
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD_TURBO))
    assert SchedulerConfig.from_file(path) == SchedulerConfig.from_dict(SD_TURBO)


def test_from_file_names_a_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="missing.json"):
        SchedulerConfig.from_file(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(OSError, match="broken.json"):
        SchedulerConfig.from_file(broken)


@pytest.mark.parametrize(
    ("data", "name"),
    [
        ({"_class_name": "PNDMScheduler"}, "PNDMScheduler"),
        ({}, "_class_name"),
        ({**SD_TURBO, "use_karras_sigmas": True}, "use_karras_sigmas"),
        ({**SD_TURBO, "use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ({**SD_TURBO, "final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
        ({**SD_TURBO, "interpolation_type": "log_linear"}, "interpolation_type"),
        ({**SD_TURBO, "timestep_type": "continuous", "prediction_type": "v_prediction"}, "timestep_type"),
        ({**SD_TURBO, "timestep_spacing": "karras"}, "timestep_spacing"),
        ({**SD_TURBO, "prediction_type": "flow"}, "prediction_type"),
        ({**SD_TURBO, "num_train_timesteps": "1000"}, "num_train_timesteps"),
        ({"_class_name": "EulerAncestralDiscreteScheduler", "prediction_type": "sample"}, "prediction_type"),
        ({"_class_name": "DDIMScheduler", "thresholding": True}, "thresholding"),
        ({"_class_name": "DDPMScheduler", "variance_type": "fixed_large"}, "variance_type"),
        ({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"_class_name": "DDPMScheduler", "trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"_class_name": "LCMScheduler", "original_inference_steps": 2000}, "original_inference_steps"),
    ],
)
def test_unsupported_settings_raise_naming_the_setting(data: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name) as info:
        SchedulerConfig.from_dict(data, source="sd-turbo/scheduler/scheduler_config.json")
    assert "sd-turbo/scheduler/scheduler_config.json" in str(info.value)


def test_ignored_keys_do_not_change_the_config() -> None:
    extra = {**SD_TURBO, "skip_prk_steps": False, "thresholding": True, "_diffusers_version": "9.9"}
    assert SchedulerConfig.from_dict(extra) == SchedulerConfig.from_dict(SD_TURBO)


@pytest.mark.parametrize(
    ("data", "n"),
    [(SD_TURBO, 0), (SD_TURBO, 1001), ({"_class_name": "LCMScheduler"}, 51)],
)
def test_step_counts_out_of_range_raise(data: dict[str, Any], n: int) -> None:
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_schedule(SchedulerConfig.from_dict(data), n)


def test_a_step_count_whose_trailing_timesteps_leave_the_range_raises() -> None:
    data = {"_class_name": "DDIMScheduler", **SD_BETAS, "timestep_spacing": "trailing"}
    reference = DDIMScheduler.from_config(data)
    reference.set_timesteps(61)  # diffusers: 62 timesteps, the last one -1
    assert len(reference.timesteps) == 62 and reference.timesteps[-1] == -1
    with pytest.raises(ValueError, match="outside 0..999"):
        make_schedule(SchedulerConfig.from_dict(data), 61)


def test_step_index_out_of_range_raises() -> None:
    schedule = make_schedule(SchedulerConfig.from_dict(SD_TURBO), 2)
    with pytest.raises(IndexError, match="step_index 2"):
        step(schedule, 2, torch.zeros(SHAPE), torch.zeros(SHAPE), None)
