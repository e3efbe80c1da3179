"""The Triton sparse decode GEMV (``kernels/triton_decode.py``, in Triton's interpreter) against the torch route of
``megatron_qsparse.inference.sparse_linear`` (``gather_inputs`` + ``index_select`` + ``mm``, fp32 accumulation).

Tolerances. fp32 results (x in fp32, or ``out_dtype=torch.float32`` for bf16 / fp16 inputs, the sum before its
final cast): within 1e-5 of the largest |y| of the torch route's fp32 result. Both accumulate exact products in
fp32, in different orders: here ~3e-7 of max|y| is seen; a missing or extra row moves y by |x w| ~ 1e-2 of
max|y| at these sizes. bf16 / fp16 outputs: exactly the fp32 result rounded to the dtype (same kernel), and within
one ulp of the torch route's output (2**-7 |y| for bf16, 2**-10 |y| for fp16) plus the same 1e-5 max|y|: two fp32
sums a hair apart can round to neighbouring values.
"""

import pytest
import torch
import triton

from megatron_qsparse.inference.sparse_linear import gather_inputs
from megatron_qsparse.kernels import triton_decode as td
from megatron_qsparse.kernels.triton_routes import kernel

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RTOL_OF_MAX = 1e-5
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def torch_route(x, mask, weight_t, bias=None):
    """sparse_linear's torch route: the union of kept rows gathered, then one fp32 product (+ bias), in fp32."""
    rows, values = gather_inputs(x, mask)
    y = values @ weight_t.index_select(0, rows).float()
    return y if bias is None else y + bias.float()


def problem(tokens, n_in, n_out, dtype, kept, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g).to(dtype)
    mask = torch.rand(tokens, n_in, generator=g) < kept
    weight_t = (torch.randn(n_in, n_out, generator=g) / n_in**0.5).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    return x, mask, weight_t, b


def assert_matches_torch_route(x, mask, weight_t, bias=None, **kwargs):
    expected = torch_route(x, mask, weight_t, bias)
    scale = expected.abs().max().item()
    got32 = td.sparse_gemv(x, mask, weight_t, bias, out_dtype=torch.float32, **kwargs)
    assert got32.dtype == torch.float32 and got32.shape == expected.shape
    assert (got32 - expected).abs().max().item() <= RTOL_OF_MAX * scale
    got = td.sparse_gemv(x, mask, weight_t, bias, **kwargs)
    assert got.dtype == x.dtype
    assert torch.equal(got, got32.to(x.dtype))
    limit = ULP[x.dtype] * expected.abs() + RTOL_OF_MAX * scale
    assert ((got.float() - expected.to(x.dtype).float()).abs() <= limit).all()
    return got32


def test_triton_route_names_sparse_gemv():
    assert kernel("sparse_gemv") is td.sparse_gemv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("kept", [0.0, 0.5, 0.9, 1.0])
def test_triton_sparse_gemv_equals_the_torch_route(dtype, tokens, kept):
    """In / out sizes off every block size; with and without bias; the planned split and one split (the
    product kernel writes y itself) and four (the combine kernel adds the partial sums)."""
    x, mask, weight_t, bias = problem(tokens, 300, 333, dtype, kept, seed=tokens)
    for split_k in (None, 1, 4):
        assert_matches_torch_route(x, mask, weight_t, bias, split_k=split_k)
    assert_matches_torch_route(x, mask, weight_t, None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_sparse_gemv_of_nothing_kept_is_the_bias(dtype):
    x, mask, weight_t, bias = problem(3, 200, 90, dtype, 0.0, seed=1)
    assert not mask.any()
    for split_k in (1, 3):
        assert torch.equal(td.sparse_gemv(x, mask, weight_t, bias, split_k=split_k), bias.expand(3, -1))
        assert torch.equal(td.sparse_gemv(x, mask, weight_t, split_k=split_k), torch.zeros(3, 90, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_sparse_gemv_applies_each_tokens_own_mask(dtype):
    """Token 0 keeps the even channels, token 1 the odd ones: every row is read (the union), and each token
    multiplies only its own channels: token 1's inputs on even channels are huge and must not count."""
    x, _, weight_t, bias = problem(2, 256, 130, dtype, 1.0, seed=2)
    channels = torch.arange(256)
    mask = torch.stack([channels % 2 == 0, channels % 2 == 1])
    x[1, ::2] = 1e4
    got = assert_matches_torch_route(x, mask, weight_t, bias, split_k=2)
    for token in (0, 1):
        alone = td.sparse_gemv(x[token : token + 1], mask[token : token + 1], weight_t, bias, out_dtype=torch.float32)
        assert (got[token] - alone[0]).abs().max() <= RTOL_OF_MAX * alone.abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 4])
def test_triton_sparse_gemv_never_reads_dropped_rows(dtype, tokens):
    """NaN in every weight row no token keeps, and in the inputs no token keeps: y stays finite and equals the
    product over the kept rows alone (a kernel multiplying dropped rows by zero would give NaN)."""
    x, mask, weight_t, bias = problem(tokens, 300, 200, dtype, 0.3, seed=3)
    union = mask.any(0)
    weight_t[~union] = float("nan")
    x[:, ~union] = float("nan")
    kept_rows = union.nonzero().squeeze(1)
    expected = (x[:, kept_rows].float() * mask[:, kept_rows]) @ weight_t[kept_rows].float() + bias.float()
    for split_k in (None, 1, 3):
        got = td.sparse_gemv(x, mask, weight_t, bias, out_dtype=torch.float32, split_k=split_k)
        assert got.isfinite().all()
        assert (got - expected).abs().max() <= RTOL_OF_MAX * expected.abs().max()


def test_triton_sparse_gemv_small_and_odd_shapes():
    for tokens, n_in, n_out in ((1, 1, 1), (2, 17, 5), (16, 70, 300), (5, 513, 3)):
        x, mask, weight_t, bias = problem(tokens, n_in, n_out, torch.float32, 0.5, seed=n_in)
        assert_matches_torch_route(x, mask, weight_t, bias)
    x, mask, weight_t, bias = problem(2, 64, 0, torch.float32, 0.5, seed=4)
    assert td.sparse_gemv(x, mask, weight_t, bias).shape == (2, 0)


@pytest.mark.parametrize("n_in, n_out", [(4096, 4096), (4096, 11008), (4096, 14336), (11008, 4096), (14336, 4096)])
@pytest.mark.parametrize("tokens", [1, 4])
def test_triton_sparse_gemv_plan_fills_an_h200(n_in, n_out, tokens):
    """At the 7B shapes on 132 SMs: at least 2 programs per SM, every program at least MIN_CHUNKS chunks, the
    splits covering the input rows exactly once."""
    block_k, block_out, splits, iters = td._plan(tokens, n_in, n_out, 2, torch.device("cpu"))
    programs = splits * triton.cdiv(n_out, block_out)
    assert programs >= 2 * td.DEFAULT_SMS
    assert iters >= td.MIN_CHUNKS
    assert (splits - 1) * iters * block_k < n_in <= splits * iters * block_k
    assert block_out * 2 % 16 == 0  # whole 16-byte vectors along out


def test_triton_sparse_gemv_checks_its_arguments():
    x, mask, weight_t, _ = problem(17, 32, 8, torch.float32, 0.5, seed=5)
    with pytest.raises(ValueError):
        td.sparse_gemv(x, mask, weight_t)  # 17 tokens
    with pytest.raises(ValueError):
        td.sparse_gemv(x[:2], mask[:2], weight_t.t().contiguous().t())  # not contiguous
    with pytest.raises(TypeError):
        td.sparse_gemv(x[:2], mask[:2], weight_t.to(torch.bfloat16))
    with pytest.raises(ValueError):
        td.sparse_gemv(x[:2], mask[:2].float(), weight_t)
