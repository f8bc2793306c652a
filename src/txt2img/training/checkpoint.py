"""Training checkpoints without pickle: tensors in one safetensors file, everything else in JSON.

A checkpoint folder holds ``tensors.safetensors`` (every module's state and every optimizer's per-parameter
state, under prefixed keys) and ``state.json`` (the step, the optimizers' hyper-parameters, any extra
values). Resuming loads both back strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def save_checkpoint(
    folder: str | os.PathLike,
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    extra: dict[str, Any],
) -> None:
    """Write modules, optimizers and JSON-able ``extra`` values into ``folder`` (atomically: temp, then rename)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, Any] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"module.{name}.{key}"] = value.detach().cpu().contiguous()
    for name, optimizer in optimizers.items():
        state = optimizer.state_dict()
        groups[name] = state["param_groups"]
        for index, param_state in state["state"].items():
            for key, value in param_state.items():
                value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"optim.{name}.{index}.{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"param_groups": groups, "extra": extra}, indent=2))
    if folder.exists():
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()
    tmp.rename(folder)


def load_checkpoint(
    folder: str | os.PathLike,
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> dict[str, Any]:
    """Load what :func:`save_checkpoint` wrote into ``modules`` and ``optimizers``; returns ``extra``.

    Raises:
        OSError: the folder or one of its files is missing.
        ValueError: the checkpoint holds other modules than ``modules`` (a run with other settings).
    """
    tensors, meta = _read(folder)
    saved = _module_names(tensors)
    if saved != set(modules):
        raise ValueError(
            f"{folder} holds the modules {sorted(saved)}, but this run has {sorted(modules)}: resume with the "
            "settings the checkpoint was written with, or start the run in another folder."
        )
    for name, module in modules.items():
        _load_module(tensors, name, module)
    for name, optimizer in optimizers.items():
        prefix = f"optim.{name}."
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith(prefix):
                index, field = key[len(prefix) :].split(".", 1)
                state.setdefault(int(index), {})[field] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"][name]})
    return meta["extra"]


def load_checkpoint_module(folder: str | os.PathLike, name: str, module: nn.Module) -> dict[str, Any]:
    """Load one module of a checkpoint, strictly, leaving the rest (for example a GAN run's EMA generator,
    to evaluate it mid-training).

    Args:
        folder: A folder :func:`save_checkpoint` wrote.
        name: The module's name in it (the GAN stage's: ``generator``, ``generator_ema``, ``discriminator``).
        module: Receives the weights; it must have the architecture they were saved from.

    Returns:
        The checkpoint's ``extra`` values (the GAN stage's: ``step``).

    Raises:
        OSError: the folder or one of its files is missing.
        ValueError: the checkpoint holds no module ``name``, or its weights do not fit ``module``.
    """
    tensors, meta = _read(folder)
    saved = _module_names(tensors)
    if name not in saved:
        raise ValueError(f"{folder} holds the modules {sorted(saved)}, not {name!r}.")
    try:
        _load_module(tensors, name, module)
    except RuntimeError as error:  # missing, unexpected or differently shaped weights
        raise ValueError(
            f"The {name!r} weights in {folder} do not fit the {type(module).__name__} given: it must have the "
            f"architecture of the run that wrote the checkpoint. {error}"
        ) from error
    return meta["extra"]


def read_extra(folder: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's ``extra`` values (the GAN stage's: ``step``), without loading its tensors.

    Raises:
        OSError: the folder or its ``state.json`` is missing.
    """
    path = Path(folder) / "state.json"
    if not path.is_file():
        raise OSError(f"{folder} is not a txt2img training checkpoint: it has no state.json.")
    extra: dict[str, Any] = json.loads(path.read_text())["extra"]
    return extra


def _read(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "tensors.safetensors").is_file() or not (folder / "state.json").is_file():
        raise OSError(f"{folder} is not a txt2img training checkpoint (tensors.safetensors + state.json).")
    return load_file(str(folder / "tensors.safetensors")), json.loads((folder / "state.json").read_text())


def _module_names(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {key.split(".", 2)[1] for key in tensors if key.startswith("module.")}


def _load_module(tensors: dict[str, torch.Tensor], name: str, module: nn.Module) -> None:
    prefix = f"module.{name}."
    module.load_state_dict(
        {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True
    )
