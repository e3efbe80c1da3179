"""The library's layers reach the Triton routes where a GPU would (CPU tensors sent there with
``on_cpu_for_tests``, kernels in Triton's interpreter), and give what their torch routes give: Q-Sparse masks and
BitNet quantizers bit for bit, the decode product within the GEMV tests' tolerance (1e-5 of max|y| in fp32)."""

import pytest
import torch

pytest.importorskip("triton")

from megatron_qsparse import kernels  # noqa: E402
from megatron_qsparse.inference.sparse_linear import topk_linear  # noqa: E402
from megatron_qsparse.kernels import triton_routes  # noqa: E402
from megatron_qsparse.sparsity import quantize_activation_int8, quantize_weight_ternary, topk_sparsify  # noqa: E402


@pytest.fixture
def routes_taken(monkeypatch):
    """The names of the Triton routes called; the torch routes are the reference (no compiled CPU ops)."""
    calls = []
    kernel = triton_routes.kernel
    monkeypatch.setattr(triton_routes, "kernel", lambda name: calls.append(name) or kernel(name))
    monkeypatch.setattr(kernels, "compiled_op", lambda name, x: None)
    return calls


def inputs(dtype, shape=(6, 96), seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[0, :8] = 1.0  # ties: the lower index is kept first
    x[1, 3] = float("inf")
    return x.to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 32])
def test_triton_route_of_topk_sparsify_forward_and_ste(dtype, block_size, routes_taken):
    x = inputs(dtype)
    expected = topk_sparsify(x, 0.6, block_size)
    (expected_grad,) = torch.autograd.grad(expected.float().square().sum(), x)
    with triton_routes.on_cpu_for_tests():
        got = topk_sparsify(x, 0.6, block_size)
        (grad,) = torch.autograd.grad(got.float().square().sum(), x)
    assert routes_taken == ["block_topk_mask" if block_size else "topk_mask"]
    assert torch.equal(got, expected) and torch.equal(grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_route_of_the_bitnet_layer_quantizers(dtype, routes_taken):
    w, x = inputs(dtype, (48, 96), 1).detach(), inputs(dtype, (3, 5, 96), 2).detach()
    x[1, 1, 1] = float("nan")
    expected = quantize_weight_ternary(w), quantize_activation_int8(x)
    with triton_routes.on_cpu_for_tests():
        got = quantize_weight_ternary(w), quantize_activation_int8(x)
    assert set(routes_taken) == {"abs_sum", "ternary", "int8_absmax"}
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("block_size", [None, 16])
def test_triton_route_of_the_decode_product(tokens, block_size, routes_taken):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 128, generator=g)
    weight_t, bias = torch.randn(128, 96, generator=g) / 128**0.5, torch.randn(96, generator=g)
    expected = topk_linear(x, weight_t, bias, 0.5, block_size)
    with triton_routes.on_cpu_for_tests():
        got = topk_linear(x, weight_t, bias, 0.5, block_size)
    assert routes_taken == ["sparse_gemv", "block_topk_mask" if block_size else "topk_mask"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    wrong = topk_linear(x, weight_t, bias, 0.4, block_size)  # another selection is far off
    assert (wrong - expected).abs().max() > 1e-2 * expected.abs().max()
