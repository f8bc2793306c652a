"""Storage dtype vs compute dtype: keep a model's weights in a small type, compute each layer in another.

On CPUs PyTorch emulates float16/bfloat16 arithmetic at a large cost (a small VAE decode: 0.28 s in float32,
65 s in float16 on our 2-core test machines), yet half-precision *storage* still halves the memory. So a model
can store its weights in half precision and compute in float32: every submodule that owns weights gets a
forward pre-hook that swaps in float32 copies of its own weights and casts its floating inputs, and a forward
hook that puts the stored weights back. Only one layer's float32 weights exist at a time, so memory stays
close to the half-precision size. The same mechanism lets a GPU user store weights in a smaller type.

Thread safety: a submodule's weights are swapped only while its lock is held (taken in the pre-hook, released
in the post-hook, also when the forward raises), so concurrent calls through one model wait for each other
layer by layer instead of seeing each other's swaps.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from txt2img.offload import own_tensors, set_own_tensor

_STATE = "_txt2img_compute"  # per submodule: (compute dtype, lock, hook handles, stashed weights)
_ROOT = "_txt2img_compute_dtype"  # on the root module: its compute dtype


class _Compute:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.lock = threading.RLock()
        self.handles: list[Any] = []
        self.stored: dict[str, torch.Tensor] = {}
        self.depth = 0


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _pre_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    state: _Compute = module.__dict__[_STATE]
    state.lock.acquire()
    state.depth += 1
    if state.depth == 1:  # re-entrant calls of the same module keep the weights already swapped in
        for name, tensor in own_tensors(module).items():
            if tensor.is_floating_point() and tensor.dtype != state.dtype:
                state.stored[name] = tensor
                set_own_tensor(module, name, tensor.detach().to(state.dtype))
    return _cast(args, state.dtype), {k: _cast(v, state.dtype) for k, v in kwargs.items()}


def _post_hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
    state: _Compute = module.__dict__[_STATE]
    try:
        state.depth -= 1
        if state.depth == 0:
            for name, tensor in state.stored.items():
                if name in module._parameters:
                    module._parameters[name] = tensor  # type: ignore[assignment]  # the stored Parameter itself
                else:
                    module._buffers[name] = tensor
            state.stored.clear()
    finally:
        state.lock.release()


def computes_in_copies(module: nn.Module) -> bool:
    """Whether ``module``'s weights are, right now, the copies in its compute dtype swapped in for one call."""
    state = module.__dict__.get(_STATE)
    return state is not None and bool(state.stored)


def set_compute_dtype(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Compute every layer of ``module`` in ``dtype`` whatever its weights are stored in (``None``: off).

    Idempotent; returns ``module``. Inputs of each weighted layer are cast to ``dtype``, so the model's output
    is in ``dtype`` too.
    """
    for sub in module.modules():
        old = sub.__dict__.pop(_STATE, None)
        if old is not None:
            for handle in old.handles:
                handle.remove()
        if dtype is not None and own_tensors(sub):
            state = _Compute(dtype)
            sub.__dict__[_STATE] = state
            state.handles = [
                sub.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                sub.register_forward_hook(_post_hook, with_kwargs=True, always_call=True),
            ]
    if dtype is None:
        module.__dict__.pop(_ROOT, None)
    else:
        module.__dict__[_ROOT] = dtype
    return module


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: the one set by :func:`set_compute_dtype`, else its weights' dtype."""
    dtype = module.__dict__.get(_ROOT)
    if dtype is not None:
        return dtype
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def float32_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of a txt2img model (built from its ``config``), with its plain settings (slicing,
    tiling, ...) and without hooks; the original is untouched, so concurrent calls are unaffected."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    state = {k: v.detach().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    copy.load_state_dict(state, strict=True, assign=True)
    copy.__dict__.update({k: v for k, v in model.__dict__.items() if not k.startswith("_") and k != "config"})
    return copy.eval()
