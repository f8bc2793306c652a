"""Attention slicing: chunks of queries give the unsliced result, ``"auto"`` slices only where PyTorch's math
path would hold a large score matrix, and slicing lowers the peak memory of that path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from txt2img.attention import (
    AUTO_SLICE_BUDGET,
    MAX_SLICE_QUERIES,
    Attention,
    SpatialSelfAttention,
    attention_chunk_size,
    set_attention_slicing,
)

MiB = 2**20
N = 300  # queries: more than MAX_SLICE_QUERIES, so "max" slices too
SLICE_SIZES = [7, 64, 100, 299, "max"]  # 100 divides N; 7, 64 and 299 leave a shorter last chunk


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The queries of every scaled_dot_product_attention call, which still computes normally."""
    calls: list[torch.Tensor] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(q)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def chunk_lengths(n: int, slice_size: int | str) -> list[int]:
    chunk = MAX_SLICE_QUERIES if slice_size == "max" else int(slice_size)
    return [min(chunk, n - start) for start in range(0, n, chunk)]


# ---------------------------------------------------------------------------------------------------------
# Sliced equals unsliced


@pytest.mark.parametrize("slice_size", SLICE_SIZES)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_sliced_equals_unsliced(slice_size: int | str, masked: bool, cross: bool, sdpa_calls: list) -> None:
    torch.manual_seed(0)
    attn = Attention(16, context_dim=12 if cross else None, heads=2, head_dim=8)
    x = torch.randn(2, N, 16)
    context = torch.randn(2, 9, 12) if cross else None
    keys = 9 if cross else N
    mask = torch.rand(2, keys) > 0.3 if masked else None
    if mask is not None:
        mask[:, 0] = True  # every row keeps a key: no all-masked (NaN) rows
    with torch.no_grad():
        reference = attn(x, context, mask)
        attn.set_slice_size(slice_size)
        sdpa_calls.clear()
        sliced = attn(x, context, mask)
    assert [q.shape[2] for q in sdpa_calls] == chunk_lengths(N, slice_size)
    assert relative_error(sliced, reference) <= 1e-6


def test_upcast_is_kept_when_sliced(sdpa_calls: list) -> None:
    torch.manual_seed(0)
    attn = Attention(16, heads=2, head_dim=8, upcast=True).to(torch.bfloat16)
    x = torch.randn(1, N, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = attn(x)
        attn.set_slice_size(64)
        sdpa_calls.clear()
        sliced = attn(x)
    assert [q.dtype for q in sdpa_calls] == [torch.float32] * 5
    assert sliced.dtype == torch.bfloat16
    assert relative_error(sliced, reference) <= 2**-8  # at most a bfloat16 rounding step


def test_spatial_self_attention_sliced(sdpa_calls: list) -> None:
    torch.manual_seed(0)
    attn = SpatialSelfAttention(8, norm_groups=4)
    x = torch.randn(1, 8, 12, 25)  # N = 300 pixels
    with torch.no_grad():
        reference = attn(x)
        attn.set_slice_size("max")
        sdpa_calls.clear()
        sliced = attn(x)
    assert [q.shape[2] for q in sdpa_calls] == [256, 44]
    assert relative_error(sliced, reference) <= 1e-6


def test_sliced_gradients_equal_unsliced() -> None:
    torch.manual_seed(0)
    attn = Attention(16, heads=2, head_dim=8)
    x = torch.randn(1, 50, 16)
    attn(x).square().sum().backward()
    reference = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    attn.set_slice_size(16)
    attn(x).square().sum().backward()
    for p, expected in zip(attn.parameters(), reference, strict=True):
        assert relative_error(p.grad, expected) <= 1e-5


def test_concurrent_sliced_calls_equal_serial() -> None:
    torch.manual_seed(0)
    attn = Attention(16, heads=2, head_dim=8)
    attn.set_slice_size(64)
    inputs = [torch.randn(1, 200 + 25 * i, 16) for i in range(4)]  # different chunk counts per call
    with torch.no_grad():
        serial = [attn(x) for x in inputs]
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(attn, inputs))
    for got, expected in zip(concurrent, serial, strict=True):
        assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------
# "auto" in a forward pass: a spy that returns zeros lets the score matrix be huge without computing it


@pytest.fixture
def sdpa_shapes(monkeypatch: pytest.MonkeyPatch) -> list[torch.Size]:
    """The query shapes of every scaled_dot_product_attention call, which returns zeros without computing."""
    shapes: list[torch.Size] = []

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
        shapes.append(q.shape)
        return q.new_zeros(*q.shape[:-1], v.shape[-1])

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return shapes


def test_auto_leaves_the_fused_cpu_kernel_alone(sdpa_shapes: list) -> None:
    n = 8500  # float32 scores: 8500² × 4 bytes = 276 MiB > AUTO_SLICE_BUDGET, were they materialised
    attn = Attention(8, heads=1, head_dim=8)
    attn.set_slice_size("auto")
    with torch.no_grad():
        attn(torch.zeros(1, n, 8), mask=torch.ones(1, n, dtype=torch.bool))
    assert len(sdpa_shapes) == 1


def test_auto_slices_the_math_path(sdpa_shapes: list) -> None:
    n = 8500
    attn = Attention(8, heads=1, head_dim=8)
    attn.set_slice_size("auto")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        attn(torch.zeros(1, n, 8))
    chunk = AUTO_SLICE_BUDGET // (n * 4)
    assert [shape[2] for shape in sdpa_shapes] == [chunk, n - chunk]


def test_auto_leaves_small_math_calls_alone(sdpa_shapes: list) -> None:
    attn = Attention(8, heads=1, head_dim=8)
    attn.set_slice_size("auto")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        attn(torch.zeros(1, 4000, 8))  # 61 MiB of scores
    assert len(sdpa_shapes) == 1


# ---------------------------------------------------------------------------------------------------------
# Setting it


def test_set_attention_slicing_counts_and_sets() -> None:
    tree = nn.Sequential(
        Attention(8, heads=2, head_dim=4),
        nn.Linear(8, 8),
        nn.ModuleList([Attention(8, context_dim=4), nn.Sequential(SpatialSelfAttention(8, norm_groups=2))]),
    )
    layers = [m for m in tree.modules() if isinstance(m, Attention)]
    assert [layer.slice_size for layer in layers] == [None] * 3
    assert set_attention_slicing(tree, "auto") == 3
    assert [layer.slice_size for layer in layers] == ["auto"] * 3
    assert set_attention_slicing(tree, 32) == 3
    assert [layer.slice_size for layer in layers] == [32] * 3
    assert set_attention_slicing(tree, None) == 3
    assert [layer.slice_size for layer in layers] == [None] * 3
    assert set_attention_slicing(nn.Linear(2, 2), "max") == 0


@pytest.mark.parametrize("bad", [0, -4, True, 2.5, "Auto", "min", "16"])
def test_bad_slice_sizes_are_refused(bad: object) -> None:
    attn = Attention(8)
    tree = nn.Sequential(attn)
    set_attention_slicing(tree, 4)
    with pytest.raises(ValueError, match="slice_size"):
        attn.set_slice_size(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slice_size"):
        set_attention_slicing(tree, bad)  # type: ignore[arg-type]
    assert attn.slice_size == 4
    attn.slice_size = bad  # type: ignore[assignment]
    with pytest.raises(ValueError, match="slice_size"):
        attn(torch.zeros(1, 3, 8))


def test_slice_size_is_not_saved() -> None:
    attn = Attention(8)
    keys = set(attn.state_dict())
    attn.set_slice_size(16)
    assert set(attn.state_dict()) == keys


# ---------------------------------------------------------------------------------------------------------
# The "auto" rule

# SD 1.5 at 512 px with classifier-free guidance: B·h = 10, N = L = 4096, 640 MiB of float32 scores
BATCH_HEADS, QUERIES, KEYS = 10, 4096, 4096

# (device, bytes per element, masked, head size, fused kernels on, sliced)
RULE_TABLE = [
    ("cpu", 4, False, 64, True, False),  # flash on CPU
    ("cpu", 2, True, 64, True, False),  # flash on CPU takes bfloat16 and a mask
    ("cpu", 8, False, 64, True, False),
    ("cpu", 4, False, 64, False, True),  # sdpa_kernel(MATH)
    ("cuda", 2, False, 64, True, False),  # flash
    ("cuda", 4, True, 64, True, False),  # memory-efficient
    ("cuda", 2, False, 20, True, False),  # flash: any head size up to 256
    ("cuda", 2, True, 20, True, True),  # masked: memory-efficient only, which needs d % 8 == 0
    ("cuda", 4, False, 20, True, True),
    ("cuda", 2, False, 512, True, False),  # memory-efficient (VAE mid-block attention)
    ("cuda", 8, False, 64, True, True),  # float64: math
    ("cuda", 2, False, 64, False, True),
    ("mps", 2, False, 64, True, True),
    ("mps", 4, True, 64, True, True),
    ("xla", 4, False, 64, True, True),  # unknown devices: assume the math path
]


@pytest.mark.parametrize(("device", "element_size", "masked", "head_dim", "fused", "sliced"), RULE_TABLE)
def test_auto_rule(
    device: str, element_size: int, masked: bool, head_dim: int, fused: bool, sliced: bool
) -> None:
    chunk = attention_chunk_size(
        BATCH_HEADS, QUERIES, KEYS, head_dim, element_size, device, masked, fused_enabled=fused
    )
    if not sliced:
        assert chunk is None
        return
    row_bytes = BATCH_HEADS * KEYS * max(element_size, 4)
    assert chunk is not None and 1 <= chunk < QUERIES
    assert chunk * row_bytes <= AUTO_SLICE_BUDGET < (chunk + 1) * row_bytes  # the largest chunk that fits


@pytest.mark.parametrize(
    ("batch_heads", "queries", "keys", "budget", "expected"),
    [
        (10, 4096, 4096, 256 * MiB, 1638),  # 640 MiB of float32 scores → 3 chunks
        (10, 4096, 77, 256 * MiB, None),  # cross-attention to text: 12 MiB
        (1, 4096, 4096, 64 * MiB, None),  # exactly the budget
        (1, 4097, 4096, 64 * MiB, 4096),
        (8, 100, 10**8, 64 * MiB, 1),  # one query row is over budget: still one row at a time
    ],
)
def test_auto_rule_sizes(
    batch_heads: int, queries: int, keys: int, budget: int, expected: int | None
) -> None:
    args = (batch_heads, queries, keys, 64, 2, "mps", False)
    assert attention_chunk_size(*args, budget=budget) == expected


@pytest.mark.skipif(not hasattr(torch, "_fused_sdp_choice"), reason="PyTorch does not expose its SDPA choice")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("head_dim", [7, 64, 512])
def test_cpu_rule_matches_pytorch_dispatch(dtype: torch.dtype, masked: bool, head_dim: int) -> None:
    """The rule says CPU always runs fused; ask PyTorch's own dispatcher, with Attention's layouts."""
    b, heads, n, length = 2, 3, 40, 9
    q = torch.zeros(b, n, heads, head_dim, dtype=dtype).transpose(1, 2)  # (B, h, N, d), as Attention has it
    k = torch.zeros(b, length, heads, head_dim, dtype=dtype).transpose(1, 2)
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool) if masked else None
    rule = attention_chunk_size(b * heads, n, length, head_dim, q.element_size(), "cpu", masked, budget=0)
    fused = torch._fused_sdp_choice(q, k, k, mask, 0.0, False) != int(SDPBackend.MATH)
    assert (rule is None) == fused


# ---------------------------------------------------------------------------------------------------------
# Peak memory of the math path, in fresh processes

PEAK_CODE = """
import json, sys, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from txt2img.attention import Attention

def hwm_bytes():  # VmHWM: this process's own peak (ru_maxrss would carry over from the forking parent)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

slice_size = json.loads(sys.argv[1])
torch.manual_seed(0)
attn = Attention(128, heads=4, head_dim=32)  # self-attention over N = L = 2048: 64 MiB of float32 scores
x = torch.randn(1, 2048, 128)
with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
    attn(x[:, :64])  # load the kernels first
    open("/proc/self/clear_refs", "w").write("5")  # the peak restarts from the current resident size
    before = hwm_bytes()
    attn.set_slice_size(slice_size)
    attn(x)
print(json.dumps(hwm_bytes() - before))
"""


def peak_bytes(slice_size: int | None) -> int:
    code = textwrap.dedent(PEAK_CODE)
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(slice_size)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_slicing_lowers_the_peak_memory_of_the_math_path() -> None:
    scores = 4 * 2048 * 2048 * 4
    unsliced = peak_bytes(None)
    sliced = peak_bytes(128)  # scores of 4 MiB per chunk
    assert unsliced >= scores, f"the math path should hold the scores: peak {unsliced / MiB:.0f} MiB"
    assert sliced < 0.6 * unsliced, f"sliced {sliced / MiB:.0f} MiB vs unsliced {unsliced / MiB:.0f} MiB"
