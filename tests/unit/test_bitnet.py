import pytest
import torch

from megatron_qsparse import kernels
from megatron_qsparse.sparsity import (
    bitnet,
    quantize_activation_int8,
    quantize_weight_ternary,
    squared_relu,
    ternary_codes,
    topk_sparsify,
)

pytestmark = pytest.mark.usefixtures("cpu_route")  # every test: compiled CPU ops, then the torch route


def quantized_by_torch(fn, *args):
    """``fn`` computed by the torch route (the definition), whatever route the test runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "compiled_op", lambda name, x: None)
        return fn(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizers_equal_the_torch_definition_bit_for_bit(dtype):
    """Rounding boundaries included: exact halves of alpha / of gamma / 127, zeros, NaN, a row of zeros."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(300, 77, generator=g) * 3).to(dtype)
    alpha = bitnet.absmean_scale(w)
    w.view(-1)[:6] = torch.tensor([0.5, -0.5, 1.5, -1.5, 0.0, float("nan")]).to(dtype) * alpha.to(dtype)
    x = (torch.randn(5, 9, 64, generator=g) * 4).to(dtype)
    x[0, 0] = 0
    x[1, 1, 0] = float("nan")
    x[2, 2, :4] = torch.tensor([0.5, -0.5, 1.5, 127.0]).to(dtype) * x[2, 2].abs().amax() / 127
    cases = (
        (lambda t: quantize_weight_ternary(t, alpha), w),
        (quantize_weight_ternary, w[1:]),
        (quantize_activation_int8, x),
        (bitnet.absmean_scale, w[1:, :70]),
    )
    for fn, arg in cases:
        got, expected = fn(arg), quantized_by_torch(fn, arg)
        assert not expected.isnan().all()
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    big = torch.randn(3_000_000, generator=g)  # several fp64 chunks in the compiled sum
    assert bitnet.abs_sum(big).item() == pytest.approx(big.double().abs().sum().item(), rel=1e-14)


def test_int8_levels_form_127_over_gamma_as_torch_does():
    """torch forms 127 / gamma as gamma.reciprocal() * 127 (two roundings); for these gammas that differs from the
    one-rounding division, and x sits at the level boundary 0.5 / (127 / gamma) and its neighbours, so a route
    that divides puts some of them on the other level."""
    g = torch.rand(4000, generator=torch.Generator().manual_seed(8)) * 10 + 0.1
    gamma = g[127 / g != torch.full_like(g, 127.0) / g][:48, None]
    mid = 0.5 / (127 / gamma)
    x = torch.cat([torch.nextafter(mid, mid - 1), mid, torch.nextafter(mid, mid + 1)], 1)
    x = torch.cat([x, gamma], 1)  # absmax = gamma exactly
    got, expected = quantize_activation_int8(x), quantized_by_torch(quantize_activation_int8, x)
    assert torch.equal(got, expected)
    divided = (x * (torch.full_like(gamma, 127.0) / gamma)).round().clamp(-128, 127) * (gamma / 127)
    assert not torch.equal(divided, expected)


def test_ternary_weights_take_three_values_scaled_by_absmean():
    w = torch.randn(32, 48)
    alpha = w.abs().mean()
    q = quantize_weight_ternary(w)
    levels = torch.unique(torch.round(q / alpha, decimals=4))
    assert set(levels.tolist()) <= {-1.0, 0.0, 1.0} and len(levels) == 3
    expected = torch.clamp(torch.round(w / alpha), -1, 1) * alpha
    assert torch.allclose(q, expected, atol=1e-6)
    assert set(ternary_codes(w).unique().tolist()) == {-1, 0, 1}


def test_int8_activations_per_token_range_and_error():
    x = torch.randn(10, 64) * torch.linspace(0.1, 10, 10)[:, None]
    q = quantize_activation_int8(x)
    gamma = x.abs().amax(-1, keepdim=True)
    codes = q * 127 / gamma
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= -128 and codes.round().max() <= 127
    # The largest magnitude of each row is represented exactly (code ±127).
    assert torch.allclose(q.abs().amax(-1), gamma.squeeze(-1))
    assert ((q - x).abs() <= gamma / 127 / 2 + 1e-6).all()


def test_quantizers_pass_gradients_straight_through():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    g = torch.randn(8, 8)
    quantize_weight_ternary(w).backward(g)
    assert torch.equal(w.grad, g)
    gx = torch.randn(4, 8)
    quantize_activation_int8(x).backward(gx)
    assert torch.equal(x.grad, gx)


def test_topk_keeps_the_absmax_so_quantization_order_is_free_up_to_ties():
    x = torch.randn(16, 64)
    sparse = topk_sparsify(x, 0.5)
    # The row maximum always survives top-K, so gamma and every kept entry's code are unchanged.
    assert torch.equal(quantize_activation_int8(sparse), quantize_activation_int8(x) * (sparse != 0))


def test_squared_relu():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    assert squared_relu(x).tolist() == [0.0, 0.0, 0.0, 0.25, 9.0]
