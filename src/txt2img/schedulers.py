"""Few-step samplers of distilled Stable Diffusion models (SD-Turbo, SDXS), as small pure functions.

Reimplements, number for number, the diffusers schedulers these models ship with: ``EulerDiscreteScheduler``,
``EulerAncestralDiscreteScheduler``, ``DDIMScheduler`` (eta 0), ``LCMScheduler`` and ``DDPMScheduler``
(diffusers 0.42, ``src/diffusers/schedulers/scheduling_*.py``). A ``Schedule`` is built fresh for each call,
so nothing is shared between calls or threads.

Value conventions (T training timesteps, ``t`` in [0, T - 1], 999 the noisiest):

- ``betas`` (T,): the per-step noise variances; ``alphas_cumprod[t] = prod(1 - betas[:t + 1])`` is the signal
  fraction ``a_t`` of ``x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps``.
- ``sigma_t = sqrt((1 - a_t) / a_t)``: the Euler schedulers' noise level, for ``x = x0 + sigma * eps`` (the
  variance-exploding form, so their initial noise is scaled by ``init_noise_sigma`` = the largest sigma, and
  the model sees ``x / sqrt(sigma^2 + 1)``).
- The model output becomes a clean-sample estimate x0 by prediction type:
  Euler ``epsilon``: ``x0 = x - sigma * eps``; ``v_prediction``: ``x0 = -sigma / sqrt(sigma^2 + 1) * v
  + x / (sigma^2 + 1)``; alpha form ``epsilon``: ``x0 = (x - sqrt(1 - a_t) * eps) / sqrt(a_t)``;
  ``v_prediction``: ``x0 = sqrt(a_t) * x - sqrt(1 - a_t) * v``; ``sample``: ``x0`` = the output.

Coefficients are computed as diffusers computes them (float32 torch, float64 numpy where it uses numpy, 0-d
CPU tensors against the sample), so results match diffusers bit for bit on CPU (tests/test_schedulers.py);
every noise draw diffusers makes is made here too, in the same order, so a shared generator ends in the same
state. Noise is drawn by EulerAncestral on every step, LCM on every step but the last, DDPM on every step with
t > 0; never by Euler (with diffusers' default s_churn = 0) nor DDIM (eta = 0).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from txt2img.generation import GeneratorArg, draw_noise

EULER = "EulerDiscreteScheduler"
EULER_ANCESTRAL = "EulerAncestralDiscreteScheduler"
DDIM = "DDIMScheduler"
LCM = "LCMScheduler"
DDPM = "DDPMScheduler"

_COMMON_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "rescale_betas_zero_snr",
)
_CLIP_KEYS = ("clip_sample", "clip_sample_range")
# The scheduler_config.json keys each class reads that change the math (the rest are ignored).
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    EULER: _COMMON_KEYS,
    EULER_ANCESTRAL: _COMMON_KEYS,
    DDIM: (*_COMMON_KEYS, *_CLIP_KEYS, "set_alpha_to_one"),
    LCM: (*_COMMON_KEYS, *_CLIP_KEYS, "set_alpha_to_one", "original_inference_steps", "timestep_scaling"),
    DDPM: (*_COMMON_KEYS, *_CLIP_KEYS),
}
# diffusers' defaults per class, where they differ from SchedulerConfig's field defaults.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    EULER: {},
    EULER_ANCESTRAL: {},
    DDIM: {"timestep_spacing": "leading", "clip_sample": True},
    LCM: {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "leading",
    },
    DDPM: {"timestep_spacing": "leading", "clip_sample": True},
}
PREDICTION_TYPES: dict[str, tuple[str, ...]] = {
    EULER: ("epsilon", "v_prediction", "sample"),
    EULER_ANCESTRAL: ("epsilon", "v_prediction"),  # diffusers raises NotImplementedError for "sample"
    DDIM: ("epsilon", "v_prediction", "sample"),
    LCM: ("epsilon", "v_prediction", "sample"),
    DDPM: ("epsilon", "v_prediction", "sample"),
}
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")  # LCMScheduler ignores the setting, as diffusers does
# Options txt2img does not implement, per class, with the values at which they are off.
UNSUPPORTED_OPTIONS: dict[str, dict[str, tuple[Any, ...]]] = {
    EULER: {
        "use_karras_sigmas": (False, None),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
        "interpolation_type": ("linear",),
        "final_sigmas_type": ("zero",),
        "timestep_type": ("discrete", "continuous"),  # continuous changes the math only with v_prediction
    },
    EULER_ANCESTRAL: {},
    DDIM: {"thresholding": (False,)},
    LCM: {"thresholding": (False,)},
    DDPM: {"thresholding": (False,), "variance_type": ("fixed_small",)},
}


# ---------------------------------------------------------------------------------------------------------
# The config


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The part of a diffusers ``scheduler_config.json`` that changes the sampling math.

    Build it with ``from_dict`` / ``from_file`` to get each class's diffusers defaults; the field defaults
    below are those of ``EulerDiscreteScheduler`` (LCM's betas, and DDIM's and DDPM's spacing and clipping,
    default differently).

    Attributes:
        kind: The diffusers ``_class_name``, e.g. ``"EulerDiscreteScheduler"``.
        num_train_timesteps: T, the training timesteps.
        beta_start, beta_end: The ends of the beta schedule.
        beta_schedule: ``"scaled_linear"`` (Stable Diffusion's), ``"linear"`` or ``"squaredcos_cap_v2"``.
        trained_betas: Explicit betas (length T), overriding the three above.
        prediction_type: What the model predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (x0).
        timestep_spacing: ``"trailing"`` (the distilled models'), ``"leading"`` or ``"linspace"``.
        steps_offset: Added to the timesteps by ``"leading"`` spacing.
        rescale_betas_zero_snr: Rescale the betas to zero terminal SNR (arXiv 2305.08891, Algorithm 1).
        clip_sample, clip_sample_range: Clamp the x0 estimate to ±range (DDIM, LCM, DDPM).
        set_alpha_to_one: DDIM's last step targets ``a = 1`` (else ``alphas_cumprod[0]``).
        original_inference_steps: LCM's distillation schedule length; its timesteps are a subset of it.
        timestep_scaling: LCM's boundary-condition scale on t.
    """

    kind: str
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    def __post_init__(self) -> None:
        _check_config(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "scheduler_config.json") -> SchedulerConfig:
        """Read a diffusers scheduler config.

        Keys the class does not read, or that do not change the math (``_diffusers_version``,
        ``skip_prk_steps``, ...), are ignored; keys listed in ``_use_default_values`` take the class default,
        as diffusers does.

        Args:
            data: The parsed ``scheduler_config.json``.
            source: Where it came from, for error messages.

        Returns:
            The config, with diffusers' defaults of its class for missing keys.

        Raises:
            ValueError: An unknown class, a bad value, or an option txt2img does not implement.
        """
        kind = data.get("_class_name")
        if kind not in CONFIG_KEYS:
            raise ValueError(
                f"{source}: _class_name {kind!r} is not supported; supported: {', '.join(CONFIG_KEYS)}"
            )
        defaults = set(data.get("_use_default_values") or ())
        given = {key: value for key, value in data.items() if key not in defaults}
        _check_unsupported(kind, given, source)
        fields = {field.name: field for field in dataclasses.fields(cls)}
        values: dict[str, Any] = {**CLASS_DEFAULTS[kind]}
        for key in CONFIG_KEYS[kind]:
            if key in given:
                values[key] = _typed(given[key], str(fields[key].type), key, source)
        try:
            return cls(kind=kind, **values)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SchedulerConfig:
        """Read a ``scheduler_config.json``.

        Args:
            path: The file.

        Returns:
            The config.

        Raises:
            OSError: The file is missing, unreadable or not a JSON object.
            ValueError: As ``from_dict``.
        """
        try:
            with open(path, encoding="utf-8") as file:
                data = json.load(file)
        except json.JSONDecodeError as error:
            raise OSError(f"{os.fspath(path)} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise OSError(f"{os.fspath(path)} is not a JSON object, so not a scheduler config.")
        return cls.from_dict(data, source=os.fspath(path))

    def to_dict(self) -> dict[str, Any]:
        """The config as diffusers writes it: ``_class_name`` and the keys its class reads.

        Returns:
            A JSON-serialisable dict; ``SchedulerConfig.from_dict`` of it equals this config.
        """
        out: dict[str, Any] = {"_class_name": self.kind}
        for key in CONFIG_KEYS[self.kind]:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


def _typed(value: Any, annotation: str, key: str, source: str) -> Any:
    """A JSON value checked (and int → float widened) against a SchedulerConfig field annotation."""
    number = _is_number(value)
    if annotation == "bool" and isinstance(value, bool) or annotation == "str" and isinstance(value, str):
        return value
    if annotation == "int" and number and isinstance(value, int):
        return value
    if annotation == "float" and number:
        return float(value)
    if annotation.startswith("tuple") and value is None:
        return None
    if annotation.startswith("tuple") and isinstance(value, list) and all(_is_number(v) for v in value):
        return tuple(float(v) for v in value)
    raise ValueError(f"{source}: {key} must be of type {annotation}, got {value!r}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_unsupported(kind: str, given: dict[str, Any], source: str) -> None:
    for key, allowed in UNSUPPORTED_OPTIONS[kind].items():
        if key in given and given[key] not in allowed:
            raise ValueError(
                f"{source}: {key}={given[key]!r} is not supported for {kind}; supported: {list(allowed)}"
            )
    continuous_v = (
        given.get("timestep_type") == "continuous" and given.get("prediction_type") == "v_prediction"
    )
    if kind == EULER and continuous_v:
        raise ValueError(
            f"{source}: timestep_type='continuous' with prediction_type='v_prediction' is not supported for "
            f"{kind}; supported: timestep_type='discrete'"
        )


def _check_config(config: SchedulerConfig) -> None:
    def bad(key: str, supported: Any) -> ValueError:
        return ValueError(
            f"{key}={getattr(config, key)!r} is not supported for {config.kind}; supported: {supported}"
        )

    if config.kind not in CONFIG_KEYS:
        raise ValueError(f"kind {config.kind!r} is not supported; supported: {', '.join(CONFIG_KEYS)}")
    if config.prediction_type not in PREDICTION_TYPES[config.kind]:
        raise bad("prediction_type", list(PREDICTION_TYPES[config.kind]))
    if config.beta_schedule not in BETA_SCHEDULES and config.trained_betas is None:
        raise bad("beta_schedule", list(BETA_SCHEDULES))
    if config.timestep_spacing not in TIMESTEP_SPACINGS:
        raise bad("timestep_spacing", list(TIMESTEP_SPACINGS))
    if config.num_train_timesteps < 1:
        raise bad("num_train_timesteps", "at least 1")
    if config.trained_betas is not None and len(config.trained_betas) != config.num_train_timesteps:
        raise ValueError(
            f"trained_betas has {len(config.trained_betas)} values for num_train_timesteps="
            f"{config.num_train_timesteps}; they must match."
        )
    if config.kind == LCM and not 1 <= config.original_inference_steps <= config.num_train_timesteps:
        raise bad("original_inference_steps", f"1 to num_train_timesteps ({config.num_train_timesteps})")


# ---------------------------------------------------------------------------------------------------------
# Noise levels


def betas_for(config: SchedulerConfig) -> torch.Tensor:
    """The (T,) float32 betas of a config, as diffusers' scheduler constructors compute them."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2: Nichol & Dhariwal's cosine schedule, betas capped at 0.999
        betas = torch.tensor(
            [min(1 - _cosine_alpha_bar((i + 1) / n) / _cosine_alpha_bar(i / n), 0.999) for i in range(n)],
            dtype=torch.float32,
        )
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so that ``alphas_cumprod[-1] = 0`` (arXiv 2305.08891, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod_for(config: SchedulerConfig) -> torch.Tensor:
    """The (T,) float32 ``alphas_cumprod`` of a config."""
    alphas_cumprod = torch.cumprod(1.0 - betas_for(config), dim=0)
    if config.rescale_betas_zero_snr and config.kind in (EULER, EULER_ANCESTRAL):
        # The Euler schedulers keep the last sigma finite (diffusers' choice of 2**-24).
        alphas_cumprod[-1] = 2**-24
    return alphas_cumprod


def spaced_timesteps(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """The timesteps of ``config.timestep_spacing`` (arXiv 2305.08891, Table 2), noisiest first, as float64.

    ``trailing`` ends the schedule at T - 1, so one step starts from pure noise: ``[999]``, ``[999, 499]``.
    """
    n, spacing = config.num_train_timesteps, config.timestep_spacing
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / num_inference_steps)) - 1
    if spacing == "leading":
        leading = (np.arange(0, num_inference_steps) * (n // num_inference_steps)).round()[::-1]
        return leading + config.steps_offset
    # linspace: the Euler schedulers keep the float32 values, the others round
    if config.kind in (EULER, EULER_ANCESTRAL):
        return np.linspace(0, n - 1, num_inference_steps, dtype=np.float32)[::-1].astype(np.float64)
    return np.linspace(0, n - 1, num_inference_steps).round()[::-1]


def lcm_timesteps(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """LCM's timesteps: ``num_inference_steps`` picked evenly from its ``original_inference_steps`` ones."""
    k = config.num_train_timesteps // config.original_inference_steps
    origin = (np.arange(1, config.original_inference_steps + 1) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return origin[picks]


def euler_sigmas(alphas_cumprod: torch.Tensor, timesteps: np.ndarray) -> torch.Tensor:
    """(S + 1,) float32 sigmas at float timesteps (linear interpolation), then a final 0."""
    train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()  # float32, as diffusers
    sigmas = np.interp(timesteps.astype(np.float32), np.arange(0, len(train_sigmas)), train_sigmas)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


# ---------------------------------------------------------------------------------------------------------
# The schedule of one call


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """Everything one sampling call needs; built by ``make_schedule``, never modified.

    Attributes:
        config: The scheduler config.
        num_inference_steps: The step count asked for.
        timesteps: (S,) what the model is given at each step, on the CPU: float32 for the Euler schedulers,
            int64 for the others (as diffusers passes them).
        init_noise_sigma: The scale of the initial standard normal noise.
        alphas_cumprod: (T,) float32.
        sigmas: (S + 1,) float32 noise levels ending in 0 (Euler schedulers), else None.
        final_alpha_cumprod: 0-d float32, the ``a`` stepped to past timestep 0.
    """

    config: SchedulerConfig
    num_inference_steps: int
    timesteps: torch.Tensor
    init_noise_sigma: float
    alphas_cumprod: torch.Tensor
    sigmas: torch.Tensor | None
    final_alpha_cumprod: torch.Tensor


def make_schedule(config: SchedulerConfig, num_inference_steps: int) -> Schedule:
    """The schedule of one sampling call (diffusers' ``set_timesteps``).

    Args:
        config: The scheduler config.
        num_inference_steps: Model passes, 1 to T (LCM: 1 to ``original_inference_steps``).

    Returns:
        A fresh schedule.

    Raises:
        ValueError: A step count out of range, or one whose spaced timesteps leave [0, T - 1].
    """
    n = config.num_train_timesteps
    limit = config.original_inference_steps if config.kind == LCM else n
    if not 1 <= num_inference_steps <= limit:
        what = "original_inference_steps" if config.kind == LCM else "num_train_timesteps"
        raise ValueError(
            f"num_inference_steps must be 1 to {what} ({limit}) for {config.kind}: {num_inference_steps}."
        )
    if config.kind == LCM:
        steps = lcm_timesteps(config, num_inference_steps)
    else:
        steps = spaced_timesteps(config, num_inference_steps)
    if steps.min() < 0 or steps.max() > n - 1:
        # e.g. trailing spacing with 61 steps: np.arange yields 62 values, the last rounding to timestep -1
        raise ValueError(
            f"{config.timestep_spacing} spacing with num_inference_steps={num_inference_steps} gives "
            f"timesteps {steps.min():g}..{steps.max():g}, outside 0..{n - 1}; choose another step count."
        )
    alphas_cumprod = alphas_cumprod_for(config)
    final_alpha_cumprod = torch.tensor(1.0)
    if config.kind in (DDIM, LCM) and not config.set_alpha_to_one:
        final_alpha_cumprod = alphas_cumprod[0]
    sigmas, init_noise_sigma = None, 1.0
    if config.kind in (EULER, EULER_ANCESTRAL):
        timesteps = torch.from_numpy(steps.astype(np.float32))
        sigmas = euler_sigmas(alphas_cumprod, steps)
        max_sigma = sigmas.max()
        # Leading spacing starts below sigma_max; diffusers then scales the noise by sqrt(sigma_max² + 1).
        init_noise_sigma = (
            max_sigma if config.timestep_spacing != "leading" else (max_sigma**2 + 1) ** 0.5
        ).item()
    else:
        timesteps = torch.from_numpy(steps.astype(np.int64))
    return Schedule(
        config, num_inference_steps, timesteps, init_noise_sigma, alphas_cumprod, sigmas, final_alpha_cumprod
    )


def scale_model_input(schedule: Schedule, step_index: int, sample: torch.Tensor) -> torch.Tensor:
    """The model input at a step: ``x / sqrt(sigma^2 + 1)`` for the Euler schedulers, else ``x`` unchanged.

    Args:
        schedule: The call's schedule.
        step_index: 0 to S - 1.
        sample: (B, C, h, w) the current sample.

    Returns:
        The model input, in ``sample``'s dtype.
    """
    if schedule.sigmas is None:
        return sample
    sigma = schedule.sigmas[_checked(schedule, step_index)]
    return sample / ((sigma**2 + 1) ** 0.5)


def step(
    schedule: Schedule,
    step_index: int,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    generator: GeneratorArg,
) -> torch.Tensor:
    """One sampler step: the model output at ``timesteps[step_index]`` → the next sample.

    Args:
        schedule: The call's schedule.
        step_index: 0 to S - 1.
        model_output: (B, C, h, w) the model's prediction (of ``config.prediction_type``).
        sample: (B, C, h, w) the current sample.
        generator: Draws the fresh noise of EulerAncestral, LCM (between steps) and DDPM (each t > 0); one
            generator, one per sample, or None.

    Returns:
        The next sample (after the last step, the final one), in ``model_output``'s dtype.
    """
    return _STEPS[schedule.config.kind](
        schedule, _checked(schedule, step_index), model_output, sample, generator
    )


def _checked(schedule: Schedule, step_index: int) -> int:
    if not 0 <= step_index < len(schedule.timesteps):
        raise IndexError(
            f"step_index {step_index} is outside the schedule's {len(schedule.timesteps)} steps."
        )
    return step_index


# ---------------------------------------------------------------------------------------------------------
# The steps: each mirrors its diffusers ``step`` operation for operation.


def _noise_like(tensor: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
    return draw_noise(tuple(tensor.shape), generator, device=tensor.device, dtype=tensor.dtype)


def _euler_x0(
    prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    return model_output


def _euler_step(
    schedule: Schedule, i: int, model_output: torch.Tensor, sample: torch.Tensor, generator: GeneratorArg
) -> torch.Tensor:
    assert schedule.sigmas is not None
    sample = sample.to(torch.float32)
    sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
    x0 = _euler_x0(schedule.config.prediction_type, model_output, sample, sigma)
    derivative = (sample - x0) / sigma
    return (sample + derivative * (sigma_next - sigma)).to(model_output.dtype)


def _euler_ancestral_step(
    schedule: Schedule, i: int, model_output: torch.Tensor, sample: torch.Tensor, generator: GeneratorArg
) -> torch.Tensor:
    assert schedule.sigmas is not None
    sample = sample.to(torch.float32)
    sigma, sigma_to = schedule.sigmas[i], schedule.sigmas[i + 1]
    x0 = _euler_x0(schedule.config.prediction_type, model_output, sample, sigma)
    # Step to sigma_down deterministically, then add fresh noise of sigma_up: down² + up² = sigma_to²
    sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
    # The clamp acts only where rounding makes down² < 0, where diffusers returns NaN (cosine betas, 3 steps)
    sigma_down = (sigma_to**2 - sigma_up**2).clamp(min=0) ** 0.5
    derivative = (sample - x0) / sigma
    prev_sample = sample + derivative * (sigma_down - sigma)
    noise = _noise_like(model_output, generator)  # drawn on every step, the last (sigma_up = 0) included
    return (prev_sample + noise * sigma_up).to(model_output.dtype)


def _alpha_x0(
    schedule: Schedule, model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor
) -> torch.Tensor:
    config, beta_prod_t = schedule.config, 1 - alpha_prod_t
    if config.prediction_type == "epsilon":
        x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
    elif config.prediction_type == "v_prediction":
        x0 = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
    else:
        x0 = model_output
    if config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0


def _ddim_step(
    schedule: Schedule, i: int, model_output: torch.Tensor, sample: torch.Tensor, generator: GeneratorArg
) -> torch.Tensor:
    config = schedule.config
    t = int(schedule.timesteps[i])
    # diffusers steps back by T // N, not to the next timestep (they differ under trailing spacing when N ∤ T)
    prev_t = t - config.num_train_timesteps // schedule.num_inference_steps
    alpha_prod_t = schedule.alphas_cumprod[t]
    alpha_prod_t_prev = schedule.alphas_cumprod[prev_t] if prev_t >= 0 else schedule.final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    x0 = _alpha_x0(schedule, model_output, sample, alpha_prod_t)
    if config.prediction_type == "epsilon":
        epsilon = model_output
    elif config.prediction_type == "v_prediction":
        epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    else:  # from the unclipped x0, as diffusers
        epsilon = (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
    # eta = 0 (the Stable Diffusion pipeline's default): deterministic, no noise drawn
    return alpha_prod_t_prev**0.5 * x0 + (1 - alpha_prod_t_prev) ** 0.5 * epsilon


def _lcm_step(
    schedule: Schedule, i: int, model_output: torch.Tensor, sample: torch.Tensor, generator: GeneratorArg
) -> torch.Tensor:
    timestep = schedule.timesteps[i]
    last = i == len(schedule.timesteps) - 1
    prev_t = int(schedule.timesteps[i + 1]) if not last else int(timestep)
    alpha_prod_t_prev = schedule.alphas_cumprod[prev_t] if prev_t >= 0 else schedule.final_alpha_cumprod
    # Consistency-model boundary condition (sigma_data = 0.5): c_skip -> 1 and c_out -> 0 as t -> 0
    scaled_t = timestep * schedule.config.timestep_scaling
    c_skip = 0.5**2 / (scaled_t**2 + 0.5**2)
    c_out = scaled_t / (scaled_t**2 + 0.5**2) ** 0.5
    x0 = _alpha_x0(schedule, model_output, sample, schedule.alphas_cumprod[int(timestep)])
    denoised = c_out * x0 + c_skip * sample
    if last:
        return denoised
    noise = draw_noise(tuple(model_output.shape), generator, device=model_output.device, dtype=denoised.dtype)
    return alpha_prod_t_prev.sqrt() * denoised + (1 - alpha_prod_t_prev).sqrt() * noise


def _ddpm_step(
    schedule: Schedule, i: int, model_output: torch.Tensor, sample: torch.Tensor, generator: GeneratorArg
) -> torch.Tensor:
    t = int(schedule.timesteps[i])
    prev_t = int(schedule.timesteps[i + 1]) if i + 1 < len(schedule.timesteps) else -1
    alpha_prod_t = schedule.alphas_cumprod[t]
    alpha_prod_t_prev = schedule.alphas_cumprod[prev_t] if prev_t >= 0 else schedule.final_alpha_cumprod
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    x0 = _alpha_x0(schedule, model_output, sample, alpha_prod_t)
    # The posterior mean of x_prev given x0 and x_t (Ho et al. 2020, eq. 7)
    x0_coeff = alpha_prod_t_prev**0.5 * current_beta_t / beta_prod_t
    sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
    prev_sample = x0_coeff * x0 + sample_coeff * sample
    if t == 0:
        return prev_sample
    # Noise on every step with t > 0, the last included (its variance is clamped to 1e-20, not 0)
    noise = _noise_like(model_output, generator)
    variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
    return prev_sample + variance**0.5 * noise


_STEPS: dict[str, Callable[[Schedule, int, torch.Tensor, torch.Tensor, GeneratorArg], torch.Tensor]] = {
    EULER: _euler_step,
    EULER_ANCESTRAL: _euler_ancestral_step,
    DDIM: _ddim_step,
    LCM: _lcm_step,
    DDPM: _ddpm_step,
}
