"""Running on several processes with PyTorch's own distributed engine (``torchrun`` / ``torch.distributed``).

txt2img has no launcher of its own. ``torchrun`` (or ``accelerate launch``, which drives it) starts one
process per device and tells each, in environment variables, its ``RANK`` among ``WORLD_SIZE`` processes,
its ``LOCAL_RANK`` on its machine and where to meet the others; :func:`process_group` joins them. Without
a launcher every helper here is the single-process identity: rank 0 of 1, nothing to wait for, modules
called as they are, seeds unchanged.

    with distributed.process_group():                   # under torchrun: joins; alone: does nothing
        run = distributed.data_parallel(model)          # DistributedDataParallel when joined
        loss = loss_fn(run(model, batch))               # gradients averaged over the processes in backward
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

#: What each rank adds to a seed (see :func:`rank_seed`): 2**32 / golden ratio, so the ranks' seeds lie far
#: apart in the 32 bits a CPU generator keeps.
RANK_SEED_STRIDE = 0x9E3779B9


# ---------------------------------------------------------------------------------------------------------
# Where this process stands


def is_initialized() -> bool:
    """True when this process has joined a process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the process group; 0 without one."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """How many processes the process group holds; 1 without one."""
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, the process that writes what is written once (checkpoints, manifests, progress)."""
    return rank() == 0


def launched_world_size() -> int:
    """The number of processes a launcher (``torchrun``) started, from ``WORLD_SIZE``; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its own machine (``LOCAL_RANK``), which picks its GPU; 0 without a launcher."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device(device: torch.device | str | None) -> torch.device | str | None:
    """The device this process computes on: a bare ``"cuda"`` becomes ``cuda:LOCAL_RANK`` under a launcher,
    so each process takes its own GPU; anything else is returned as it is."""
    if device is not None and str(device) == "cuda" and launched_world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


# ---------------------------------------------------------------------------------------------------------
# The process group


def default_backend() -> str:
    """``gloo`` for CPU tensors, with ``nccl`` for CUDA tensors where this build and machine have it."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


@contextlib.contextmanager
def process_group(backend: str | None = None, timeout: datetime.timedelta | None = None) -> Iterator[None]:
    """Join the process group a launcher describes for the ``with`` block, and leave it after.

    Does nothing when the process was started alone (``WORLD_SIZE`` unset or 1) or has already joined a
    group (its own code, or ``accelerate``, did): then that group is used and left alone.

    Args:
        backend: ``torch.distributed`` backend; default :func:`default_backend`.
        timeout: How long a collective (a barrier) waits for the slowest process; default PyTorch's.
    """
    if launched_world_size() <= 1 or is_initialized():
        yield
        return
    backend = backend or default_backend()
    if "nccl" in backend:
        torch.cuda.set_device(local_rank())
    options: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend, **options)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here; nothing to wait for without a process group."""
    if is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (an all-reduce every rank must call); ``flag`` itself without a
    process group. So that all ranks stop together where one alone would leave the others waiting."""
    if not is_initialized():
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_from_main(values: list[Any]) -> list[Any]:
    """Rank 0's ``values`` (picklable objects) on every rank: one value where each rank computed its own.
    ``values`` unchanged without a process group."""
    if not is_initialized():
        return values
    values = list(values)
    dist.broadcast_object_list(values, src=0)
    return values


# ---------------------------------------------------------------------------------------------------------
# Distinct data per rank


def rank_seed(seed: int) -> int:
    """The seed of this rank's random draws: ``seed`` itself on rank 0 and in a process alone (so a single
    process draws exactly what it drew before distributed training), ``(seed + rank * 0x9E3779B9) mod 2**32``
    on the others.

    Modulo 2**32 because ``torch.manual_seed`` keeps only the low 32 bits for CPU generators: seeds that
    differ by a multiple of 2**32 draw the same numbers. The golden-ratio stride keeps the ranks' seeds (and
    ``seed + step`` after them) millions apart for up to a thousand ranks.
    """
    return seed if rank() == 0 else (seed + rank() * RANK_SEED_STRIDE) % 2**32


def rank_entropy(entropy: Sequence[int]) -> list[int]:
    """The entropy of this rank's ``numpy.random.default_rng``: ``[*entropy, rank]``, and ``entropy`` itself
    on rank 0 and alone (the draws of a single process are unchanged)."""
    return [*entropy, rank()] if rank() else list(entropy)


# ---------------------------------------------------------------------------------------------------------
# Gradients averaged over the processes


class _Computation(nn.Module):
    """The modules a computation uses, with the computation as forward pass: what DistributedDataParallel
    wraps, so that methods other than ``forward`` (``generate``, ``encode``) and several modules together
    take part in its gradient averaging."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.modules_used = nn.ModuleList(modules)

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def data_parallel(*modules: nn.Module, find_unused_parameters: bool = False) -> Callable[..., Any]:
    """A function ``run(fn, *args, **kwargs)`` that returns ``fn(*args, **kwargs)``, computed on ``modules``.

    When a process group is initialised, the modules are wrapped in one ``DistributedDataParallel`` (which
    copies rank 0's weights to every rank now) and ``fn`` runs as its forward pass, so the next backward
    pass through the result averages the modules' gradients over the processes: every rank then takes the
    same optimizer step and the replicas stay identical. Without a process group ``run`` is a plain call,
    so single-process training computes exactly what it computed without it.

        run_d = data_parallel(discriminator)
        logits = run_d(discriminator, images, text)     # a forward pass of the wrapped discriminator
        run_g = data_parallel(generator)
        fake = run_g(generator.generate, noise, embeds)  # any method, not only forward

    Each backward pass must reach every parameter of the modules that requires grad (else pass
    ``find_unused_parameters=True``); a module frozen for a pass (``requires_grad_(False)``) is called
    directly, not through ``run``.
    """
    if not is_initialized():
        return _call
    from torch.nn.parallel import DistributedDataParallel

    # No device_ids: the modules already sit on this process's device, and the inputs are left as they are.
    return DistributedDataParallel(_Computation(modules), find_unused_parameters=find_unused_parameters)
