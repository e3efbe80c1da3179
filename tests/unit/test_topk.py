import pytest
import torch

from megatron_qsparse.sparsity import block_topk_mask, kept_count, topk_mask, topk_sparsify

pytestmark = pytest.mark.usefixtures("cpu_route")  # every test: compiled CPU ops, then the torch route


def reference_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sort-based definition: stable descending sort of |x| in fp32 (lower index first on ties)."""
    order = torch.sort(-x.abs().float(), dim=-1, stable=True).indices[..., :k]
    return torch.zeros_like(x, dtype=torch.bool).scatter(-1, order, True)


@pytest.mark.parametrize("sparsity,size,kept", [(0.5, 64, 32), (0.8, 64, 12), (0.7, 10, 3), (0.6, 2730, 1092)])
def test_kept_count_is_floor(sparsity, size, kept):
    assert kept_count(sparsity, size) == kept


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        topk_sparsify(torch.ones(2, 4), bad)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
def test_exactly_k_per_row_and_largest_kept(sparsity):
    x = torch.randn(3, 5, 96)
    y = topk_sparsify(x, sparsity)
    k = kept_count(sparsity, 96)
    assert ((y != 0).sum(-1) == k).all()
    assert torch.equal(y != 0, reference_mask(x, k))
    kept_min = torch.where(y != 0, x.abs(), torch.inf).amin(-1)
    dropped_max = torch.where(y == 0, x.abs(), 0).amax(-1)
    assert (kept_min >= dropped_max).all()
    assert torch.equal(y[y != 0], x[y != 0])  # no rescaling


def test_ties_keep_exactly_k_lower_index_first():
    x = torch.tensor([[1.0, -2.0, 2.0, 2.0, -2.0, 0.5], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    mask = topk_mask(x, 3)
    assert mask.tolist() == [[False, True, True, True, False, False], [True, True, True, False, False, False]]
    # A ">= k-th value" threshold would keep all four 2's; the rule keeps exactly k.
    assert (mask.sum(-1) == 3).all()


def test_many_ties_match_stable_sort_definition():
    x = torch.randint(-3, 4, (64, 40)).float()  # heavy ties, zeros included
    for k in (1, 7, 20, 39):
        assert torch.equal(topk_mask(x, k), reference_mask(x, k))


def test_bf16_input_is_ranked_in_fp32():
    x = torch.randn(16, 128, dtype=torch.bfloat16)
    y = topk_sparsify(x, 0.5)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y != 0, reference_mask(x.float(), 64))


def test_zero_sparsity_returns_input_unchanged():
    x = torch.randn(4, 8)
    assert topk_sparsify(x, 0.0) is x


def test_ste_passes_gradient_unmasked_and_masked_otherwise():
    x = torch.randn(4, 32, requires_grad=True)
    upstream = torch.randn(4, 32)
    topk_sparsify(x, 0.5, ste=True).backward(upstream)
    assert torch.equal(x.grad, upstream)
    x.grad = None
    y = topk_sparsify(x, 0.5, ste=False)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream * (y != 0))


def test_weight_gradient_uses_sparse_input():
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(5, 16, requires_grad=True)
    xs = topk_sparsify(x, 0.5)
    (xs @ w.t()).sum().backward()
    assert torch.allclose(w.grad, torch.ones(6, 5).t() @ xs.detach())


@pytest.mark.parametrize("sparsity,block,kept", [(0.5, 32, 16), (0.75, 8, 2), (0.5, 4, 2)])
def test_block_keeps_exactly_n_per_block(sparsity, block, kept):
    x = torch.randn(7, 128)
    y = topk_sparsify(x, sparsity, block_size=block)
    per_block = (y != 0).reshape(7, 128 // block, block).sum(-1)
    assert (per_block == kept).all()
    blocks = x.reshape(7, -1, block)
    assert torch.equal(block_topk_mask(x, sparsity, block).reshape(7, -1, block), reference_mask(blocks, kept))


def test_block_size_must_divide_hidden():
    with pytest.raises(ValueError, match="multiple of block_size"):
        topk_sparsify(torch.randn(2, 48), 0.5, block_size=32)
