"""Saving and loading txt2img's own models: a typed dataclass config in ``config.json`` and safetensors weights.

``from_pretrained`` is four steps: resolve the folder, read the config, build the module on the meta device
(no memory, no random init), load the weights strictly. Strict means missing keys, unexpected keys and
shape mismatches are all reported together, naming the file, before any weight is touched. Pickle files
are never opened.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from txt2img import hub, offload, precision, saving
from txt2img.placement import place, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------------------------------------------------
# Configs


@dataclasses.dataclass
class ModelConfig:
    """Base of every model config: a dataclass that round-trips through ``config.json``."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Self:
        """Build the config from ``data``, checking names and types; keys starting with ``_`` are metadata.

        Raises:
            ValueError: a required key is missing or a value has the wrong type (naming ``source``).
        """
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in fields and not k.startswith("_"))
        if unknown:
            logger.warning("%s: ignoring keys this version of txt2img does not know: %s", source, unknown)
        missing = [
            name
            for name, f in fields.items()
            if name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"{source} lacks the required keys {missing}.")
        values = {}
        for name, value in data.items():
            if name in fields:
                values[name] = _coerce(value, hints[name], f"{source}: key {name!r}")
        try:
            return cls(**values)
        except (ValueError, TypeError) as error:  # a __post_init__ check across keys
            raise ValueError(f"{source}: {error}") from error

    def save(self, folder: Path, class_name: str) -> None:
        payload = {"_class_name": class_name, **self.to_dict()}
        (folder / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` (parsed JSON) against a type hint; JSON lists become tuples where a tuple is declared."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where} has value {value!r}, expected {hint}.")
    if hint is type(None):
        if value is None:
            return None
        raise ValueError(f"{where} has value {value!r}, expected null.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} has value {value!r}, expected a list.")
        item_hint = args[0] if args else Any
        return tuple(_coerce(v, item_hint, where) for v in value)
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # JSON's NaN and Infinity literals, which Python's json accepts
                raise ValueError(f"{where} has value {value!r}, expected a finite number.")
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ValueError(f"{where} has value {value!r}, expected {getattr(hint, '__name__', hint)}.")


def read_config_json(folder: Path) -> dict[str, Any]:
    """Read ``folder/config.json``.

    Raises:
        OSError: the file is missing or is not a JSON object.
    """
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise OSError(f"{path} does not exist: a model folder needs a config.json next to its weights.")
    data = read_json(path)
    if not isinstance(data, dict):
        raise OSError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


def read_json(path: Path) -> Any:
    """Parse the JSON file ``path``.

    Raises:
        OSError: unreadable, not UTF-8, not JSON, or nested too deeply to parse (naming the file).
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise OSError(f"{path} is not valid JSON ({reason}). Re-download or re-save the model.") from error


# ---------------------------------------------------------------------------------------------------------
# Weights


def weight_files(folder: Path, weights_name: str) -> list[Path]:
    """The safetensors files holding a model's weights: ``weights_name``, or the shards its index lists.

    Raises:
        OSError: no safetensors weights (with advice when only pickle weights are there).
    """
    single = folder / weights_name
    if single.is_file():
        return [single]
    index = folder / f"{weights_name}.index.json"
    if index.is_file():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise OSError(f"{index} is not a valid safetensors index (no 'weight_map' object).")
        names = sorted({str(name) for name in weight_map.values()})
        # A shard is a file beside the index: a path could make loading read any file on the machine.
        outside = [name for name in names if not hub.is_plain_file_name(name)]
        if outside:
            raise OSError(
                f"{index} names shard files outside its folder ({', '.join(map(repr, outside[:3]))}); "
                "shards must be plain file names beside the index. The model folder is damaged or not safe."
            )
        return [folder / name for name in names]
    pickles = hub.find_pickle_files(folder)
    if pickles:
        raise OSError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}), which txt2img never loads because "
            "unpickling can run arbitrary code. Convert them once, in an environment you trust, with "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), "
            f"'{folder / weights_name}')."
        )
    raise OSError(f"{folder} has no weights: expected {weights_name}.")


def load_state_dict_strict(
    files: list[Path],
    expected: dict[str, torch.Tensor],
    rename: Callable[[str], str | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Read the tensors of ``files``, checking keys and shapes against ``expected`` before reading any data.

    Args:
        files: safetensors files, e.g. from :func:`weight_files`.
        expected: the model's state dict (meta tensors are fine: only names and shapes are used).
        rename: An explicit key map from the file's names to the model's (``None`` drops a key).

    Returns:
        The state dict read from ``files``, in their stored dtype, on the CPU.

    Raises:
        OSError: a file is unreadable or corrupt, or keys/shapes differ (all differences listed at once).
    """
    from safetensors import SafetensorError, safe_open

    rename = rename or (lambda key: key)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    name = rename(key)
                    if name is not None:
                        shapes[name] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError) as error:
            raise OSError(
                f"{path} is not a valid safetensors file ({error}). Re-download or re-save it."
            ) from error

    names = ", ".join(str(p) for p in files)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = [
        f"{k}: file {list(shapes[k])} vs model {list(expected[k].shape)}"
        for k in sorted(set(shapes) & set(expected))
        if shapes[k] != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"The weights in {names} do not match the model built from its config.json:"]
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
                lines.append(f"  {len(items)} {label}: {shown}")
        lines.append("Check that config.json and the weights come from the same model.")
        raise OSError("\n".join(lines))

    state: dict[str, torch.Tensor] = {}
    for path in files:
        read: dict[str, torch.Tensor] = {}
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    name = rename(key)
                    if name is not None:
                        read[name] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise OSError(f"{path} is corrupt ({error}). Re-download or re-save it.") from error
        check_finite(read, path)
        state.update(read)
    return state


def check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights holding NaN or infinity: no trained network has them, and a damaged file often does.

    Safetensors files carry no checksum, so this is the one check of the numbers themselves. A sum per tensor
    (NaN and infinity propagate through it; about 5 ms per 200 MB) screens them, and only a tensor whose sum is
    not finite is looked at element by element (a half-precision sum may overflow on sound weights). A flipped
    bit that leaves a finite number goes unnoticed.

    Raises:
        OSError: naming the file and the first tensors with such values.
    """
    bad = [
        k
        for k, t in state.items()
        if t.is_floating_point() and not math.isfinite(t.sum().item()) and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise OSError(
            f"{path} holds NaN or infinite values in {len(bad)} tensors ({', '.join(sorted(bad)[:5])}): "
            "the file is damaged. Re-download or re-save it."
        )


def build_on_meta(build: Callable[[Any], nn.Module], config: Any, source: str) -> Any:
    """``build(config)`` on the meta device (no memory, no random init).

    Raises:
        ValueError: the config's values make no network (negative sizes, channels not divisible by the
            groups, ...), naming ``source``.
    """
    try:
        with torch.device("meta"):
            return build(config)
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError) as error:
        raise ValueError(
            f"{source}: its values do not describe a model that can be built ({error})."
        ) from error


def save_state_dict(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------
# Models


class ModelMixin(nn.Module):
    """Loading, saving and placement for txt2img's own models (``VAEDecoder``, ``GANGenerator``, ...).

    A subclass sets ``config_class`` and takes its config as the only constructor argument.
    """

    config_class: ClassVar[type[ModelConfig]]
    weights_name: ClassVar[str] = WEIGHTS_NAME
    #: Other libraries' ``_class_name`` values whose folders this class loads itself.
    config_aliases: ClassVar[tuple[str, ...]] = ()
    #: ``_class_name`` → ``"module:Class"`` of another architecture that loads such folders instead.
    alternatives: ClassVar[dict[str, str]] = {}
    config: ModelConfig

    @property
    def device(self) -> torch.device:
        """Where the model computes (with offloading, the execution device, not where its weights rest)."""
        return offload.execution_device(self)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (its weights may be stored in a smaller one: ``txt2img.precision``)."""
        return precision.compute_dtype(self)

    @classmethod
    def download_patterns(cls, subfolder: str | None) -> list[str]:
        """The files to fetch from a Hub repo to load this model from ``subfolder``."""
        return hub.component_patterns(subfolder)

    @classmethod
    def from_config(cls, config: ModelConfig | dict[str, Any]) -> Self:
        """Build the model with freshly initialised weights."""
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        return cls(config)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
    ) -> Self:
        """Load a model saved by ``save_pretrained``, from a local folder or a Hub repo.

        Args:
            name_or_path: A local folder or a Hub repo id.
            subfolder: The model's folder inside ``name_or_path``, e.g. ``"vae"``.
            revision: Hub branch, tag or commit sha.
            cache_dir: Hub cache folder.
            local_files_only: Make no network request; use the local folder or the Hub cache only.
            token: Hub token for private or gated repos.
            dtype: Weight dtype (``torch.float32``, ``"float16"``, ...); default ``"auto"`` (float32 on CPUs,
                half precision on GPUs; see ``txt2img.placement``).
            device: Where to put the model; default CPU.
            torch_dtype: Deprecated name of ``dtype``.

        Returns:
            The model in eval mode.

        Raises:
            OSError: missing or corrupt files, weights that do not match the config.
            ValueError: a config with missing keys, wrong types or for another class.
        """
        dtype = resolve_dtype(dtype, torch_dtype, device)
        folder = hub.resolve_folder(
            name_or_path,
            subfolder=subfolder,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        data = read_config_json(folder)
        target = cls.class_for_config(data, folder)
        return target.load_folder(folder, data, dtype=dtype, device=device)  # type: ignore[return-value]

    @classmethod
    def load_folder(
        cls,
        folder: Path,
        data: dict[str, Any],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Self:
        """Build the model from the parsed ``config.json`` ``data`` of ``folder`` and load its weights strictly."""
        source = str(folder / CONFIG_NAME)
        config = cls.config_from_dict(data, source=source)
        files = weight_files(folder, cls.weights_name)
        model = build_on_meta(cls, config, source)
        state = load_state_dict_strict(files, model.state_dict(), rename=cls.checkpoint_key)
        model.load_state_dict(state, strict=True, assign=True)
        return place(model, resolve_device(device), dtype).eval()  # type: ignore[return-value]

    @classmethod
    def class_for_config(cls, data: dict[str, Any], folder: Path) -> type[ModelMixin]:
        """The class that loads a folder whose ``config.json`` says ``_class_name``: this class, or one of
        its ``alternatives`` (another architecture behind the same public name).

        Raises:
            ValueError: the config describes a model this class cannot load.
        """
        class_name = data.get("_class_name")
        if class_name is None or class_name == cls.__name__ or class_name in cls.config_aliases:
            return cls
        if class_name in cls.alternatives:
            module_name, _, attribute = cls.alternatives[class_name].partition(":")
            return getattr(importlib.import_module(module_name), attribute)
        known = sorted({cls.__name__, *cls.config_aliases, *cls.alternatives})
        raise ValueError(
            f"{folder / CONFIG_NAME} describes a {class_name!r}, which {cls.__name__}.from_pretrained cannot load "
            f"(it loads {', '.join(known)}): is this the right folder or subfolder?"
        )

    @classmethod
    def config_from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        """The config from a parsed ``config.json``; subclasses translate other libraries' configs here."""
        return cls.config_class.from_dict(data, source=source)

    @classmethod
    def checkpoint_key(cls, key: str) -> str | None:
        """Map a key of a checkpoint file to this model's parameter name (``None``: not this model's)."""
        return key

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` and the safetensors weights into ``save_directory`` (created if needed), all at
        once: a save that fails or is interrupted leaves the folder as it was (``txt2img.saving``)."""
        with saving.staged_folder(save_directory, marker=CONFIG_NAME) as stage:
            self.save_files(stage)

    def save_files(self, folder: Path) -> None:
        """Write the model's files into the existing empty ``folder`` (subclasses add theirs)."""
        self.config.save(folder, type(self).__name__)
        save_state_dict(self, folder / self.weights_name)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Save the model and upload it to the Hub repo ``repo_id`` (created if needed).

        Returns:
            The URL of the commit.
        """
        return hub.push_folder(
            self.save_pretrained,
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message,
        )
