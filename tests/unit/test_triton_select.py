"""The Triton selection kernels (``megatron_qsparse.kernels.triton_select``) equal the torch definitions bit for
bit: ``topk_mask_torch``, ``kth_largest``, ``select_by_threshold``, the block (N:M) mask and the candidate step of
the sharded top-K. Under pytest they run in Triton's interpreter on CPU tensors (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``); rows stay small, and ``max_block`` is lowered to drive the long-row (chunked) kernel."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from megatron_qsparse.kernels import triton_routes  # noqa: E402
from megatron_qsparse.kernels import triton_select as ts  # noqa: E402
from megatron_qsparse.sparsity.topk import kth_largest, select_by_threshold, topk_mask_torch  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NAN, INF = float("nan"), float("inf")
SMALL_BLOCK = 256  # a max_block that sends the rows below through the chunked kernel


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two fp32 tensors, any NaN equal to any NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


def block_reference(x: torch.Tensor, keep: int, block_size: int) -> torch.Tensor:
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    return topk_mask_torch(blocks, keep).reshape(x.shape)


def with_specials(x: torch.Tensor, generator: torch.Generator, nan: bool = True) -> torch.Tensor:
    """``x`` with NaN (unless ``nan`` is False), +inf and -inf scattered into its rows (about 5% each)."""
    u = torch.rand(x.shape, generator=generator)
    x = x.clone()
    x[u < 0.05] = NAN if nan else 0.0
    x[(u >= 0.05) & (u < 0.10)] = INF
    x[(u >= 0.10) & (u < 0.15)] = -INF
    return x


def check_selection(x: torch.Tensor, k: int, **kw) -> None:
    """Every route that ranks a whole row, against its torch definition (k = D: the mask keeps everything)."""
    expected_mask = topk_mask_torch(x, k) if k < x.shape[-1] else torch.ones(x.shape, dtype=torch.bool)
    assert torch.equal(ts.topk_mask(x, k, **kw), expected_mask)
    mag = x.abs().float()
    kth, greater = ts.kth_and_greater(x, k, **kw)
    expected_kth = kth_largest(mag, k)
    assert same_bits(kth, expected_kth)
    assert greater.dtype == torch.int64 and torch.equal(greater, (mag > expected_kth).sum(-1, keepdim=True))
    values = ts.topk_values(x, k, **kw)
    expected = torch.topk(mag, k, dim=-1, sorted=False).values
    assert same_bits(values.sort(-1).values, expected.sort(-1).values)


# ---------------------------------------------------------------------------------------------------------------
# the whole-row selection


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 96), (2, 3, 300), (2, 2500)])
def test_triton_selection_matches_torch_on_random_rows(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(dtype)
    size = shape[-1]
    for k in (1, size // 3, size - 1):
        check_selection(x, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_selection_matches_torch_on_heavy_ties(dtype):
    g = torch.Generator().manual_seed(1)
    tiny_set = torch.randint(-2, 3, (5, 200), generator=g).float() * 0.5  # five values, zeros included
    rows = torch.cat([tiny_set, torch.full((1, 200), -3.0), torch.zeros(1, 200), torch.full((1, 200), 1e-30)])
    x = rows.to(dtype)  # 1e-30 flushes to 0 in fp16, stays subnormal in bf16
    for k in (1, 37, 100, 199, 200):
        check_selection(x, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_selection_matches_torch_with_nan_and_inf(dtype):
    g = torch.Generator().manual_seed(2)
    scattered = with_specials(torch.randn(6, 120, generator=g), g)
    many_nans = torch.randn(2, 120, generator=g)
    many_nans[:, :80] = NAN  # at least k NaNs: the k-th is NaN, nothing is kept
    on_inf = torch.randn(2, 120, generator=g)
    on_inf[:, 10:40] = torch.tensor([INF, -INF]).repeat(15)  # the k-th lands on inf, ties among the infs
    on_inf[:, 50:55] = NAN
    x = torch.cat([scattered, many_nans, on_inf]).to(dtype)
    for k in (1, 20, 60, 119, 120):
        check_selection(x, k)


def test_triton_mask_edges_of_k():
    x = torch.randn(3, 50)
    assert torch.equal(ts.topk_mask(x, 50), torch.ones(3, 50, dtype=torch.bool))
    assert torch.equal(ts.topk_mask(x, 77), torch.ones(3, 50, dtype=torch.bool))
    assert torch.equal(ts.topk_mask(x, 0), torch.zeros(3, 50, dtype=torch.bool))
    assert torch.equal(ts.topk_mask(x, -4), torch.zeros(3, 50, dtype=torch.bool))
    assert torch.equal(ts.topk_mask(x, 1).nonzero()[:, 1], x.abs().argmax(-1))  # k = 1: the largest
    assert torch.equal(~ts.topk_mask(x, 49), x.abs() == x.abs().amin(-1, keepdim=True))  # k = D - 1: all but the least


def test_triton_ties_go_to_the_lower_index():
    x = torch.tensor([[1.0, -2.0, 2.0, 2.0, -2.0, 0.5], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    assert ts.topk_mask(x, 3).tolist() == [[False, True, True, True, False, False], [True, True, True] + [False] * 3]


@pytest.mark.parametrize("k", [0, -1, 9])
def test_triton_kth_and_values_refuse_k_outside_the_row(k):
    with pytest.raises(ValueError, match="k="):
        ts.kth_and_greater(torch.randn(2, 8), k)
    with pytest.raises(ValueError, match="k="):
        ts.topk_values(torch.randn(2, 8), k)


def test_triton_k_equal_to_the_row_size():
    g = torch.Generator().manual_seed(3)
    x = with_specials(torch.randn(4, 64, generator=g), g)
    kth, greater = ts.kth_and_greater(x, 64)
    mag = x.abs().float()
    assert same_bits(kth, kth_largest(mag, 64)) and torch.equal(greater, (mag > kth).sum(-1, keepdim=True))
    assert same_bits(ts.topk_values(x, 64).sort(-1).values, mag.sort(-1).values)


def test_triton_refuses_other_dtypes():
    with pytest.raises(TypeError, match="float64"):
        ts.topk_mask(torch.randn(2, 8, dtype=torch.float64), 3)


def test_triton_non_contiguous_input():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(64, 40, generator=g).to(torch.bfloat16)
    for x in (base.t(), base[:, ::2], base.t()[3:11]):
        assert not x.is_contiguous()
        check_selection(x, 7)
        assert torch.equal(ts.block_topk_mask(x, 2, 4), block_reference(x.contiguous(), 2, 4))


def test_triton_empty_leading_dims():
    x = torch.randn(0, 3, 16)
    assert ts.topk_mask(x, 4).shape == (0, 3, 16)
    kth, greater = ts.kth_and_greater(x, 4)
    assert kth.shape == greater.shape == (0, 3, 1)
    assert ts.topk_values(x, 4).shape == (0, 3, 4)


# ---------------------------------------------------------------------------------------------------------------
# rows longer than max_block: the chunked kernel


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_long_rows_take_the_chunk_loop(dtype):
    g = torch.Generator().manual_seed(5)
    random_rows = torch.randn(1, 600, generator=g)  # three chunks of 256, the last one partial
    ties = torch.randint(-2, 3, (1, 600), generator=g).float()  # runs of ties across chunk boundaries
    x = torch.cat([random_rows, with_specials(random_rows, g), ties]).to(dtype)
    for k in (1, 333) if dtype == torch.float32 else (333,):  # k = 333: the k-th values fill two chunks
        check_selection(x, k, max_block=SMALL_BLOCK)
    kth, greater = ts.kth_and_greater(x, 333)
    before = torch.tensor([[0], [5], [40]])
    assert torch.equal(
        ts.threshold_mask(x, kth, 333 - greater, before, max_block=SMALL_BLOCK),
        select_by_threshold(x.abs().float(), kth, 333 - greater, before),
    )
    assert torch.equal(ts.block_topk_mask(x, 100, 300, max_block=SMALL_BLOCK), block_reference(x, 100, 300))


def test_triton_max_block_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        ts.topk_mask(torch.randn(2, 300), 5, max_block=100)


# ---------------------------------------------------------------------------------------------------------------
# block (N:M) masks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep,block_size", [(16, 32), (2, 4), (1, 8), (7, 24), (64, 128), (127, 128)])
def test_triton_block_mask_matches_torch(dtype, keep, block_size):
    g = torch.Generator().manual_seed(keep * 1000 + block_size)
    size = 4 * block_size if block_size > 32 else 12 * block_size
    random_rows = torch.randn(2, 3, size, generator=g)
    ties = torch.randint(-1, 2, (1, 3, size), generator=g).float()  # three values: most blocks are all ties
    x = torch.cat([random_rows, ties, with_specials(random_rows[:1], g)]).to(dtype)
    mask = ts.block_topk_mask(x, keep, block_size)
    assert torch.equal(mask, block_reference(x, keep, block_size))
    assert torch.equal(mask[:2].reshape(-1, block_size).sum(-1), torch.full((2 * 3 * size // block_size,), keep))


def test_triton_block_mask_edges():
    x = torch.randn(3, 64)
    assert torch.equal(ts.block_topk_mask(x, 16, 16), torch.ones(3, 64, dtype=torch.bool))
    assert torch.equal(ts.block_topk_mask(x, 20, 16), torch.ones(3, 64, dtype=torch.bool))
    assert torch.equal(ts.block_topk_mask(x, 0, 16), torch.zeros(3, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(64\).*\(24\)"):
        ts.block_topk_mask(x, 4, 24)


# ---------------------------------------------------------------------------------------------------------------
# threshold masks and the sharded rule


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_threshold_mask_matches_select_by_threshold(dtype):
    g = torch.Generator().manual_seed(6)
    x = torch.randint(-3, 4, (9, 80), generator=g).float()
    x[0, :5] = NAN
    x[1, ::7] = INF
    x = x.to(dtype)
    mag = x.abs().float()
    kth = torch.tensor([[2.0], [1.0], [INF], [NAN], [0.0], [-0.0], [-1.0], [3.0], [2.0]])
    ties_needed = torch.tensor([[4], [0], [3], [2], [10], [5], [1], [100], [-3]])
    ties_before = torch.tensor([[1], [0], [2], [0], [7], [0], [4], [3], [0]])
    assert torch.equal(ts.threshold_mask(x, kth, ties_needed), select_by_threshold(mag, kth, ties_needed))
    assert torch.equal(
        ts.threshold_mask(x, kth, ties_needed, ties_before), select_by_threshold(mag, kth, ties_needed, ties_before)
    )
    assert torch.equal(ts.threshold_mask(x, kth, 3), select_by_threshold(mag, kth, 3))  # a number broadcasts
    lead = x.reshape(3, 3, 80)
    assert torch.equal(
        ts.threshold_mask(lead, kth.reshape(3, 3, 1), ties_needed.reshape(3, 3, 1), ties_before.reshape(3, 3, 1)),
        select_by_threshold(mag, kth, ties_needed, ties_before).reshape(3, 3, 80),
    )


def sharded_mask(x: torch.Tensor, k: int, world: int, triton: bool = True, **kw) -> torch.Tensor:
    """``sharded_topk_mask``'s three steps on ``world`` simulated ranks: through the Triton kernels, or (``triton``
    False) through the torch ops of ``sharded_topk_mask`` itself."""
    shards = x.chunk(world, dim=-1)
    local = shards[0].shape[-1]
    if triton:
        per_rank = torch.stack([ts.topk_values(s, min(k, local), **kw) for s in shards])
    else:
        per_rank = torch.stack([torch.topk(s.abs().float(), min(k, local), sorted=False).values for s in shards])
    pooled = per_rank.movedim(0, -2).flatten(-2)
    if triton:
        kth, greater = ts.kth_and_greater(pooled, k, **kw)
    else:
        kth = torch.topk(pooled, k, dim=-1, sorted=True).values[..., -1:]
        greater = (pooled > kth).sum(-1, keepdim=True)
    masks = []
    for rank, shard in enumerate(shards):
        ties_before = (per_rank[:rank] == kth).sum(dim=(0, -1)).unsqueeze(-1)
        if triton:
            masks.append(ts.threshold_mask(shard, kth, k - greater, ties_before, **kw))
        else:
            masks.append(select_by_threshold(shard.abs().float(), kth, k - greater, ties_before))
    return torch.cat(masks, dim=-1)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_sharded_rule_equals_the_whole_row(world, dtype):
    g = torch.Generator().manual_seed(world)
    random_rows = torch.randn(2, 192, generator=g)
    ties = torch.randint(-2, 3, (2, 192), generator=g).float()  # runs of ties cut across shards
    x = torch.cat([random_rows, ties, with_specials(random_rows, g, nan=False), with_specials(ties, g, nan=False)])
    x = x.to(dtype)
    for k in (1, 30, 48, 100, 191):  # k < shard, = shard, > shard
        assert torch.equal(sharded_mask(x, k, world), topk_mask_torch(x, k)), k
    assert torch.equal(sharded_mask(x[::2], 100, world, max_block=32), topk_mask_torch(x[::2], 100))


def test_triton_sharded_rule_with_nan_equals_its_torch_steps():
    """With NaNs in a row the sharded rule can keep other ties than the whole-row rule (a NaN on one rank displaces
    that rank's ties from its candidate list, so ties_before undercounts them); the Triton steps reproduce the
    torch steps of ``sharded_topk_mask`` there too."""
    g = torch.Generator().manual_seed(2)
    random_rows = torch.randn(3, 192, generator=g)
    ties = torch.randint(-2, 3, (3, 192), generator=g).float()
    x = torch.cat([with_specials(random_rows, g), with_specials(ties, g)])  # (2, 30): the last row's rules differ
    for world, k in ((2, 30), (4, 30), (4, 100)):
        assert torch.equal(sharded_mask(x, k, world), sharded_mask(x, k, world, triton=False))


# ---------------------------------------------------------------------------------------------------------------
# the dispatch table


def test_triton_routes_reach_these_kernels():
    for name, module in triton_routes.ROUTES.items():
        if module == "triton_select":
            assert triton_routes.kernel(name) is getattr(ts, name)


# ---------------------------------------------------------------------------------------------------------------
# the compiler (no GPU needed): what the interpreter accepts, Triton's GPU compiler must accept too

COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_qsparse.kernels import triton_select as ts

OUT = {0: "*u8", 1: "*fp32", 2: "*u8", 3: "*fp32"}
for x_type, low_bit in (("*bf16", 16), ("*fp32", 0), ("*fp16", 13)):
    for mode in range(4):
        pointers = dict(x_ptr=x_type, kth_ptr="*fp32", need_ptr="*i64", before_ptr="*i64", out_ptr=OUT[mode],
                        greater_ptr="*i64")
        flags = dict(MODE=mode, HAS_BEFORE=mode == 2, LOW_BIT=low_bit)
        builds = [
            (ts._select_rows_kernel, dict(n_rows="i32", D="i32", k="i32"), dict(ROWS=rows, BLOCK=block), warps)
            for rows, block, warps in ((1, 16384, 16), (16, 128, 4))
        ]
        builds.append((ts._select_long_rows_kernel, dict(D="i32", k="i32"),
                       dict(CHUNK=4096, NUM_CHUNKS=5, FILL_CHUNKS=2), 8))
        for kernel, scalars, shape, warps in builds:
            signature = {**pointers, **scalars}
            aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name != "k"}
            constants = {**flags, **shape}
            source = ASTSource(kernel, {**signature, **{name: "constexpr" for name in constants}}, constants, aligned)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            assert compiled.asm["cubin"], (kernel, constants)
print("compiled")
"""


def test_triton_kernels_compile_for_hopper(tmp_path):
    """Every kernel variant the launcher can pick compiles to sm_90 machine code (Triton's own ptxas, no GPU)."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton build ships no ptxas")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_HOPPER],
        cwd=Path(__file__).resolve().parents[2],  # the repository root: the package imports from there
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
