"""The Triton quantizers (``kernels/triton_bitnet.py``, in Triton's interpreter) equal the torch definitions of
``megatron_qsparse.sparsity.bitnet`` bit for bit: signed zeros included, NaN where torch gives NaN."""

import pytest
import torch

from megatron_qsparse import kernels
from megatron_qsparse.kernels import triton_bitnet as tb
from megatron_qsparse.kernels.triton_routes import kernel, on_cpu_for_tests
from megatron_qsparse.sparsity import bitnet

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# the interpreter computes inf * 0 (a row whose gamma is inf) in numpy, which warns
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
INV_127 = torch.tensor(1 / 127, dtype=torch.float32)  # torch on CUDA divides by 127 as a product with this


@pytest.fixture
def torch_route(monkeypatch):
    """bitnet's functions take their torch route (the definition), not the compiled CPU ops."""
    monkeypatch.setattr(kernels, "compiled_op", lambda name, x: None)


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal dtype, shape and bits (so -0.0 != 0.0), except that NaN only has to meet NaN (torch leaves its
    payload to the hardware)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    view = INT_VIEW[got.dtype]
    assert torch.equal(got[~nan].view(view), expected[~nan].view(view))


def random(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def int8_torch(x, gamma, by_reciprocal=False):
    """bitnet._int8's torch route; ``by_reciprocal``: with gamma / 127 computed as torch does on CUDA."""
    levels = (x.float() * (127 / gamma)).round_().clamp_(-128, 127)
    return levels.mul_(gamma * INV_127 if by_reciprocal else gamma / 127).to(x.dtype)


def test_triton_routes_name_these_functions():
    for name in ("abs_sum", "ternary", "int8_levels", "int8_absmax"):
        assert kernel(name) is getattr(tb, name)


# ---- abs_sum ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_abs_sum_is_the_fp64_sum_and_gives_torchs_alpha(dtype, torch_route):
    big = random((3, 70_001), dtype, 1)  # 4 programs of CHUNK entries, the last one partial
    cases = [big, random((300, 77), dtype, 2), random((64, 96), dtype, 3).t(), big[:, ::3], random((5,), dtype, 4)]
    for w in cases:
        got = tb.abs_sum(w)
        expected = bitnet.abs_sum(w)
        assert got.dtype == torch.float64 and got.dim() == 0 and got.device == w.device
        assert got.item() == pytest.approx(expected.item(), rel=1e-12)
        assert torch.equal((got / w.numel()).float(), bitnet.absmean_scale(w))


def test_triton_abs_sum_of_nan_inf_and_empty():
    w = torch.ones(1000)
    assert tb.abs_sum(w).item() == 1000.0
    w[7] = -float("inf")
    assert tb.abs_sum(w).item() == float("inf")
    w[9] = float("nan")
    assert tb.abs_sum(w).isnan()
    assert tb.abs_sum(torch.empty(0, 4)).item() == 0.0


# ---- ternary ---------------------------------------------------------------------------------------------------


def weights_on_boundaries(dtype, alpha):
    """Random weights, then entries at exactly +-0.5 and +-1.5 alpha (the rounding ties: 0 and +-1 by half to
    even), their neighbours, signed zeros, tiny values, +-inf and NaN."""
    w = random((300, 77), dtype, 5)
    a = alpha.to(dtype).float()
    half = torch.tensor([0.5, -0.5, 1.5, -1.5]) * a
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("inf"), -float("inf"), float("nan")])
    values = torch.cat([half, torch.nextafter(half, half * 2), torch.nextafter(half, half * 0), special])
    w.view(-1)[: values.numel()] = values.to(dtype)
    return w


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_ternary_equals_the_torch_definition_bit_for_bit(dtype, torch_route):
    # alpha = 0.75 makes +-0.5 alpha and +-1.5 alpha exact in every dtype: ties that must round half to even
    for alpha in (torch.tensor(0.75), torch.tensor([0.75]), bitnet.absmean_scale(random((300, 77), dtype, 5))):
        w = weights_on_boundaries(dtype, alpha)
        expected = bitnet._ternary(w, alpha)
        assert_same_bits(tb.ternary(w, alpha), expected)
    quotients = torch.tensor([0.5, -0.5, 1.5, -1.5, -0.25])
    w = (quotients * 0.75).to(dtype)
    assert tb.ternary(w, torch.tensor(0.75)).tolist() == [0.0, -0.0, 0.75, -0.75, -0.0]
    assert tb.ternary(w, torch.tensor(0.75))[[1, 4]].signbit().all()  # round(-0.5) = -0.0, kept


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_ternary_of_zeros_strided_and_leading_dims(dtype, torch_route):
    zeros = torch.zeros(4, 33, dtype=dtype)
    alpha = bitnet.weight_scale(zeros)  # mean |w| = 0, clamped to EPS
    assert alpha.item() == pytest.approx(bitnet.EPS)
    assert_same_bits(tb.ternary(zeros, alpha), bitnet._ternary(zeros, alpha))
    w = random((6, 40, 50), dtype, 6)
    alpha = bitnet.absmean_scale(w)
    for view in (w, w.transpose(0, 2), w[:, ::3, 1:]):
        assert_same_bits(tb.ternary(view, alpha), bitnet._ternary(view, alpha))


def test_triton_ternary_takes_an_fp32_alpha_only():
    with pytest.raises(TypeError):
        tb.ternary(torch.ones(3), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError):
        tb.ternary(torch.ones(3), torch.ones(2))


# ---- int8_levels -----------------------------------------------------------------------------------------------


def activations(dtype, seed=7):
    """[5, 9, 64] rows of very different magnitudes, with ties, a zero row, rows below EPS, NaN and inf."""
    x = random((5, 9, 64), dtype, seed, scale=1.0)
    x = (x.float() * torch.logspace(-6, 6, 45).reshape(5, 9, 1)).to(dtype)
    x[0, 0] = 0
    x[0, 1] = (torch.randn(64) * 1e-7).to(dtype)  # absmax below EPS: gamma clamps
    x[1, 1, 0] = float("nan")
    x[1, 2, 3] = float("inf")
    x[2, 2, :5] = (torch.tensor([0.5, -0.5, 1.5, -2.5, 127.0]) * x[2, 2].abs().amax().float() / 127).to(dtype)
    return x


def tie_rows(dtype):
    """gamma = 127 and 508 give 127 / gamma = 1 and 1/4 exactly: x * (127 / gamma) = m + 0.5 exactly, every tie
    from -130.5 to 129.5 (half to even, then the clamp to [-128, 127]); bf16 holds them exactly up to 63.5."""
    top = 64 if dtype == torch.bfloat16 else 130
    ties = torch.arange(-top - 1, top, dtype=torch.float32) + 0.5
    x = torch.stack([ties, ties * 4]).to(dtype)
    return x, torch.tensor([[127.0], [508.0]])


def near_reciprocal_ties(count=48):
    """gammas where torch's 127 / gamma (gamma.reciprocal() * 127) differs from the division fl(127 / gamma),
    and x at 0.5 / (127 / gamma) and its neighbours: the product lands on either side of 0.5 depending on
    which of the two a kernel computes."""
    g = torch.rand(4000, generator=torch.Generator().manual_seed(8)) * 10 + 0.1
    by = 127 / g
    gamma = g[by != torch.full_like(g, 127.0) / g][:count]
    mid = 0.5 / (127 / gamma)
    x = torch.stack([torch.nextafter(mid, mid - 1), mid, torch.nextafter(mid, mid + 1)], 1)
    return x, gamma[:, None]


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_int8_levels_equals_the_torch_definition_bit_for_bit(dtype, torch_route):
    x = activations(dtype)
    absmax = bitnet.absmax_scale(x).clamp(min=bitnet.EPS)
    for gamma in (absmax, absmax / 2, absmax.reshape(5, 9)):  # / 2: levels clamp at -128 and 127
        assert_same_bits(tb.int8_levels(x, gamma), bitnet._int8(x, gamma.reshape(absmax.shape)))
    x, gamma = tie_rows(dtype)
    expected = bitnet._int8(x, gamma)
    assert_same_bits(tb.int8_levels(x, gamma), expected)
    level = dict(zip(x[0].float().tolist(), expected[0].float().tolist()))
    assert [level[v] for v in (-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 63.5)] == [-2, -2, 0, 0, 2, 2, 64]
    assert expected[0][x[0] == -0.5].signbit().all()
    if dtype != torch.bfloat16:
        assert level[-130.5] == level[-128.5] == -128 and level[127.5] == level[129.5] == 127


def test_triton_int8_levels_rounds_127_over_gamma_as_torch_does(torch_route):
    x, gamma = near_reciprocal_ties()
    expected = bitnet._int8(x, gamma)
    assert_same_bits(tb.int8_levels(x, gamma), expected)
    divided = (x * (torch.full_like(gamma, 127.0) / gamma)).round().mul(gamma / 127)
    assert not torch.equal(divided, expected)  # the inputs do tell the two orders apart


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_int8_scale_as_torch_on_cuda(dtype):
    """scale_by_reciprocal (the CUDA default): gamma / 127 as torch CUDA's gamma * fl(1 / 127), which differs
    from the division for the gammas chosen here."""
    g = torch.rand(2000, generator=torch.Generator().manual_seed(9)) * 100 + 1e-3
    gamma = g[g / 127 != g * INV_127][:16, None]
    x = (torch.rand(16, 100, generator=torch.Generator().manual_seed(10)) * 2 - 1) * gamma
    x = x.to(dtype)
    assert_same_bits(tb.int8_levels(x, gamma, scale_by_reciprocal=True), int8_torch(x, gamma, by_reciprocal=True))
    assert_same_bits(tb.int8_levels(x, gamma, scale_by_reciprocal=False), int8_torch(x, gamma))
    if dtype == torch.float32:
        assert not torch.equal(int8_torch(x, gamma, by_reciprocal=True), int8_torch(x, gamma))


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_int8_levels_strided(dtype, torch_route):
    x = activations(dtype)
    for view in (x[:, :, ::2], x.transpose(0, 1), x[1:3, 4]):
        gamma = bitnet.absmax_scale(view).clamp(min=bitnet.EPS)
        assert_same_bits(tb.int8_levels(view, gamma), bitnet._int8(view, gamma))


def test_triton_int8_levels_checks_gamma():
    with pytest.raises(ValueError):
        tb.int8_levels(torch.ones(4, 8), torch.ones(3, 1))
    with pytest.raises(TypeError):
        tb.int8_levels(torch.ones(4, 8), torch.ones(4, 1, dtype=torch.bfloat16))


# ---- int8_absmax -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_tile", [tb.MAX_ROW_TILE, 16])  # the row in registers; a loop over 16-entry chunks
def test_triton_int8_absmax_equals_int8_of_the_clamped_absmax(dtype, max_tile, torch_route):
    x = activations(dtype)
    cases = [x, x[:, :, 1:60], x.transpose(0, 1)[:, :, ::3], x[3, 3], torch.zeros(2, 7, dtype=dtype)]
    ties, _ = tie_rows(dtype)
    cases.append(ties)
    for t in cases:
        expected = bitnet._int8(t, bitnet.absmax_scale(t).clamp(min=bitnet.EPS))
        got = tb.int8_absmax(t, max_tile=max_tile)
        assert_same_bits(got, expected)
    nan_row, inf_row = tb.int8_absmax(x, max_tile=max_tile)[1, 1:3]
    assert nan_row.isnan().all() and inf_row.isnan().all()  # gamma NaN / inf: the whole row NaN, as torch


@pytest.mark.parametrize("max_tile", [tb.MAX_ROW_TILE, 16])
def test_triton_int8_absmax_scale_as_torch_on_cuda(max_tile):
    x = activations(torch.float32)
    gamma = bitnet.absmax_scale(x).clamp(min=bitnet.EPS)
    got = tb.int8_absmax(x, scale_by_reciprocal=True, max_tile=max_tile)
    assert_same_bits(got, int8_torch(x, gamma, by_reciprocal=True))


# ---- through bitnet's dispatch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_routes_of_the_bitnet_quantizers(dtype, torch_route):
    """bitnet's public quantizers on the Triton routes (CPU tensors sent there for the test) equal their torch
    routes."""
    w, x = weights_on_boundaries(dtype, torch.tensor(0.75)), activations(dtype)
    cases = [
        (bitnet.quantize_weight_ternary, w),
        (lambda t: bitnet.quantize_weight_ternary(t, torch.tensor(0.75)), w),
        (bitnet.quantize_activation_int8, x),
        (bitnet.absmean_scale, w[1:, :70]),
    ]
    for fn, arg in cases:
        expected = fn(arg)
        with on_cpu_for_tests():
            got = fn(arg)
        assert_same_bits(got, expected)
