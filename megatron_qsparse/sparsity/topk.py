"""Top-K activation sparsity (Q-Sparse), the one implementation used everywhere in the project.

Per token (each row over the last dim) exactly ``k = floor((1 - sparsity) * D)`` entries survive. Ranking is
done on ``|x|`` in fp32 whatever the input dtype, and ties at the k-th magnitude are broken by position: the
lower index wins. The same selection rule, written against a threshold, is what the tensor-parallel version in
``megatron_qsparse.parallel.sharded_topk`` evaluates over shards, so both produce identical masks.
"""

import math
from typing import Optional

import torch


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """The one check of a sparsity ratio: it lies in [0, 1) (1 would keep nothing). ``name`` says which."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{name}={sparsity} must lie in [0, 1)")
    return sparsity


def kept_count(sparsity: float, size: int) -> int:
    """Entries kept out of ``size`` at ``sparsity``: floor((1 - s) * size), robust to float error."""
    check_sparsity(sparsity)
    # round() first so that e.g. (1 - 0.7) * 10 = 2.9999999999999996 counts as 3.
    return int(math.floor(round((1.0 - sparsity) * size, 9)))


def select_by_threshold(
    mag: torch.Tensor,
    kth: torch.Tensor,
    ties_needed: torch.Tensor,
    ties_before: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean mask of ``mag > kth`` plus the first ``ties_needed`` entries equal to ``kth``.

    ``ties_before`` counts the tied entries that sit at lower global positions (on lower tensor-parallel
    ranks); it is zero for an unsharded row. All shapes broadcast over the leading dims; the last dim is the row.
    """
    equal = mag == kth
    tie_position = equal.cumsum(-1)
    if ties_before is not None:
        tie_position = tie_position + ties_before
    return (mag > kth) | (equal & (tie_position <= ties_needed))


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of each row (last dim, kept), NaN ranking above everything as in ``topk``.

    On CPU a selection (``kthvalue``, same value and NaN order) replaces the sorted ``topk``: it is about 2.5x
    cheaper there, and the sort was the largest cost of a Q-Sparse training step. Accelerators keep ``topk``.
    """
    if mag.device.type == "cpu":
        return torch.kthvalue(mag, mag.shape[-1] - k + 1, dim=-1, keepdim=True).values
    return torch.topk(mag, k, dim=-1, sorted=True).values[..., -1:]


def compiled(name: str, x: torch.Tensor):
    """The package's compiled CPU op ``name`` for ``x`` (``megatron_qsparse.kernels``), else None: no compiler,
    not a CPU fp32/bf16 tensor, or this file running standalone beside an exported Hugging Face model."""
    try:
        from megatron_qsparse.kernels import compiled_op
    except ImportError:
        return None
    return compiled_op(name, x)


def triton_kernel(name: str, x: torch.Tensor):
    """The package's Triton route ``name`` for ``x`` (a CUDA tensor, Triton installed: see
    ``megatron_qsparse.kernels.triton_routes``), else None, as in a standalone exported Hugging Face model."""
    try:
        from megatron_qsparse.kernels.triton_routes import triton_op
    except ImportError:
        return None
    return triton_op(name, x)


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mask keeping exactly the ``k`` largest ``|x|`` of each row (last dim), lower index first on ties.

    On CPU the compiled selection runs when available (3-5x cheaper than ``kthvalue``, which was most of a
    Q-Sparse training step's overhead), on CUDA the Triton selection (one pass per row instead of topk's sort);
    both are tested equal to the torch route, which stays the definition."""
    size = x.shape[-1]
    if k >= size:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    kernel = triton_kernel("topk_mask", x)
    if kernel is not None:
        return kernel(x.detach(), k)
    if x.device.type == "cpu":  # the compiled selection ranks fp32 magnitudes too: fp16 / fp64 are converted
        ranked = x.detach() if x.dtype in (torch.float32, torch.bfloat16) else x.detach().float()
        op = compiled("topk_mask", ranked)
        if op is not None:
            return op(ranked.contiguous(), k, size)
    return topk_mask_torch(x, k)


def topk_mask_torch(x: torch.Tensor, k: int) -> torch.Tensor:
    """``topk_mask`` in torch ops (0 < k < row size): accelerators, and CPUs without the compiled ops."""
    size = x.shape[-1]
    mag = x.detach().abs().float()
    kth = kth_largest(mag, k)
    if mag.device.type != "cpu":  # the branch below would cost an accelerator a host sync per call
        return select_by_threshold(mag, kth, k - (mag > kth).sum(-1, keepdim=True))
    mask = (mag >= kth).reshape(-1, size)
    # A row where exactly k entries reach the k-th value has no tie to break: ``>= kth`` is its answer.
    # Only the other rows (ties at the threshold, NaNs) pay for the position-ordered tie break (a cumsum).
    tied = (mask.sum(-1) != k).nonzero().squeeze(1)
    if tied.numel():
        mag_tied, kth_tied = mag.reshape(-1, size)[tied], kth.reshape(-1, 1)[tied]
        mask[tied] = select_by_threshold(mag_tied, kth_tied, k - (mag_tied > kth_tied).sum(-1, keepdim=True))
    return mask.reshape(x.shape)


def block_topk_mask(x: torch.Tensor, sparsity: float, block_size: int) -> torch.Tensor:
    """N:M mask: in each block of ``block_size`` consecutive entries keep ``floor((1-s)*M)``."""
    size = x.shape[-1]
    if size % block_size:
        raise ValueError(f"block sparsity needs the hidden size ({size}) to be a multiple of block_size ({block_size})")
    kernel = triton_kernel("block_topk_mask", x)
    if kernel is not None:
        return kernel(x.detach(), kept_count(sparsity, block_size), block_size)
    blocks = x.reshape(*x.shape[:-1], size // block_size, block_size)
    return topk_mask(blocks, kept_count(sparsity, block_size)).reshape(x.shape)


class _MaskWithSTE(torch.autograd.Function):
    """Forward ``x * mask``; backward passes the gradient unmasked (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, mask):
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def apply_mask(x: torch.Tensor, mask: torch.Tensor, ste: bool = True) -> torch.Tensor:
    """``x ⊙ mask`` in x's dtype; with ``ste`` the gradient reaches x as if no mask had been applied."""
    mask = mask.to(x.dtype)
    return _MaskWithSTE.apply(x, mask) if ste else x * mask


def topk_sparsify(x: torch.Tensor, sparsity: float, block_size: Optional[int] = None, ste: bool = True) -> torch.Tensor:
    """Q-Sparse top-K over the last dim (or within blocks of ``block_size``). ``sparsity=0`` returns x."""
    if check_sparsity(sparsity) == 0:
        return x
    if block_size:
        mask = block_topk_mask(x, sparsity, block_size)
    else:
        mask = topk_mask(x, kept_count(sparsity, x.shape[-1]))
    return apply_mask(x, mask, ste)
