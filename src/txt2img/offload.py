"""Model offloading: components rest off the execution device and come onto it only for their own forward pass.

Two granularities (``Txt2ImgPipeline.enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``):
- *model*: a whole component wakes when it is called and the previously awake one goes back to rest, so one
  component at a time occupies the execution device; the last one rests again when the call ends. A UNet
  called once per step is moved once per call, not once per step.
- *sequential*: every submodule that owns weights wakes just for its own forward and rests right after:
  the lowest memory, at the cost of a move per layer per call.

Where components rest:
- with an accelerator (CUDA, MPS), in CPU memory (``DeviceStore``);
- without one, on disk (``DiskStore``): each component's tensors are written once to a safetensors file in a
  private temporary folder and the module keeps only meta tensors; waking memory-maps the file (tensors are
  views of the mapping, no copy), resting drops the views. The peak resident memory is then about that of the
  largest awake component instead of the whole pipeline.

Hooks are PyTorch forward pre-hooks (prepended, so they run before ``txt2img.precision``'s); state about what is
awake lives in one ``Offloader`` per pipeline, guarded by a lock that also serialises the pipeline's calls
(concurrent calls would otherwise move each other's components away).
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXECUTION_DEVICE = "_txt2img_execution_device"  # set on every offloaded component: where it computes

_TORCH_DTYPES = {  # safetensors dtype names
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "BOOL": torch.bool,
    "U8": torch.uint8,
}


# ---------------------------------------------------------------------------------------------------------
# Tensors of a module, by owner


def own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers ``module`` itself owns (not its children's), persistent or not."""
    tensors: dict[str, torch.Tensor] = {k: v for k, v in module._parameters.items() if v is not None}
    tensors.update({k: v for k, v in module._buffers.items() if v is not None})
    return tensors


def set_own_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace ``module``'s own parameter or buffer ``name``, keeping its kind."""
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[name] = tensor


def weighted_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, submodule)`` for every submodule of ``root`` (itself included) owning tensors."""
    return [(name, m) for name, m in root.named_modules() if own_tensors(m)]


# ---------------------------------------------------------------------------------------------------------
# Where resting tensors live


class DeviceStore:
    """Resting tensors stay in memory on ``offload_device`` (the CPU); waking copies them to the device."""

    def __init__(self, execution_device: torch.device, offload_device: torch.device | str = "cpu") -> None:
        self.execution_device = execution_device
        self.offload_device = torch.device(offload_device)

    def add(self, key: str, module: nn.Module) -> None:
        self._move(module, self.offload_device)

    def wake(self, key: str, module: nn.Module) -> None:
        self._move(module, self.execution_device)

    def rest(self, key: str, module: nn.Module) -> None:
        self._move(module, self.offload_device)

    def restore(self, key: str, module: nn.Module) -> None:
        self._move(module, self.execution_device)

    @staticmethod
    def _move(module: nn.Module, device: torch.device) -> None:
        for name, tensor in own_tensors(module).items():
            if tensor.device != device:
                set_own_tensor(module, name, tensor.detach().to(device, non_blocking=True))


class DiskStore:
    """Resting tensors live in safetensors files of a private temporary folder (deleted with the store);
    the module holds meta tensors. Waking memory-maps the file: the tensors are views of the mapping."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="txt2img-offload-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
        self.execution_device = torch.device("cpu")

    def add(self, key: str, module: nn.Module) -> None:
        tensors = own_tensors(module)
        write_safetensors(self.folder / f"{key}.safetensors", tensors)
        self.rest(key, module)

    def wake(self, key: str, module: nn.Module) -> None:
        for name, tensor in read_safetensors_mmap(self.folder / f"{key}.safetensors").items():
            set_own_tensor(module, name, tensor)

    def rest(self, key: str, module: nn.Module) -> None:
        for name, tensor in own_tensors(module).items():
            set_own_tensor(module, name, torch.empty_like(tensor, device="meta"))

    def restore(self, key: str, module: nn.Module) -> None:
        """Wake for good, copying out of the mapping so the file can go."""
        for name, tensor in read_safetensors_mmap(self.folder / f"{key}.safetensors").items():
            set_own_tensor(module, name, tensor.clone(memory_format=torch.preserve_format))

    def close(self) -> None:
        self._finalizer()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors as a safetensors file, each in its physical memory order: a channels-last weight is stored
    as its NHWC bytes (named in the metadata) so that it maps back channels-last, without a copy."""
    from safetensors.torch import save_file

    stored, permuted = {}, []
    for name, tensor in tensors.items():
        data = tensor.detach().cpu()
        if (
            data.dim() == 4
            and data.is_contiguous(memory_format=torch.channels_last)
            and not data.is_contiguous()
        ):
            data = data.permute(0, 2, 3, 1)
            permuted.append(name)
        stored[name] = data.contiguous()
    save_file(stored, str(path), metadata={"format": "pt", "channels_last": json.dumps(permuted)})


def read_safetensors_mmap(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a file written by :func:`write_safetensors`, as views of a private memory map."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    permuted = set(json.loads(header.pop("__metadata__", {}).get("channels_last", "[]")))
    start = 8 + size
    tensors = {}
    for name, info in header.items():
        dtype = _TORCH_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        if end == begin:
            tensor = torch.empty(info["shape"], dtype=dtype)
        else:
            tensor = torch.frombuffer(mapping, dtype=torch.uint8, count=end - begin, offset=start + begin)
            tensor = tensor.view(dtype).view(info["shape"])
        tensors[name] = tensor.permute(0, 3, 1, 2) if name in permuted else tensor
    return tensors


# ---------------------------------------------------------------------------------------------------------
# The hooks


class Offloader:
    """Owns the offload hooks of a pipeline's components.

    Args:
        components: The components by name.
        store: A :class:`DeviceStore` or :class:`DiskStore`.
        sequential: Per-submodule instead of per-component.
    """

    def __init__(
        self, components: dict[str, nn.Module], store: DeviceStore | DiskStore, *, sequential: bool
    ) -> None:
        self.components = components
        self.store = store
        self.sequential = sequential
        self.lock = threading.RLock()
        self.awake: str | None = None
        self._handles: list[Any] = []
        self._units: dict[str, list[tuple[str, nn.Module]]] = {}
        for name, component in components.items():
            component.__dict__[EXECUTION_DEVICE] = store.execution_device
            self._units[name] = [
                (f"{name}.{sub}" if sub else name, m) for sub, m in weighted_modules(component)
            ]
            for key, module in self._units[name]:
                store.add(key, module)
                if sequential:
                    self._handles.append(
                        module.register_forward_pre_hook(self._wake_module(key), prepend=True)
                    )
                    self._handles.append(
                        module.register_forward_hook(self._rest_module(key), always_call=True)
                    )
            if not sequential:
                self._handles.append(
                    component.register_forward_pre_hook(self._wake_component(name), prepend=True)
                )

    @property
    def execution_device(self) -> torch.device:
        return self.store.execution_device

    def _wake_component(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            with self.lock:
                if self.awake == name:
                    return
                self.rest_all()
                for key, sub in self._units[name]:
                    self.store.wake(key, sub)
                self.awake = name

        return hook

    def _wake_module(self, key: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self.store.wake(key, module)

        return hook

    def _rest_module(self, key: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.store.rest(key, module)

        return hook

    def rest_all(self) -> None:
        """Put the awake component (model offload) back to rest."""
        with self.lock:
            if self.awake is not None:
                for key, sub in self._units[self.awake]:
                    self.store.rest(key, sub)
                self.awake = None

    def remove(self) -> None:
        """Remove the hooks and bring every component back for good onto the execution device."""
        with self.lock:
            self.rest_all()
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            for name, units in self._units.items():
                for key, sub in units:
                    self.store.restore(key, sub)
                self.components[name].__dict__.pop(EXECUTION_DEVICE, None)
            if isinstance(self.store, DiskStore):
                self.store.close()


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its offload execution device, else where its weights are."""
    device = module.__dict__.get(EXECUTION_DEVICE)
    if device is not None:
        return device
    return next((t.device for t in module.parameters()), torch.device("cpu"))


def default_execution_device() -> torch.device:
    """The accelerator to offload onto: CUDA, else MPS, else the CPU (which offloads to disk)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
