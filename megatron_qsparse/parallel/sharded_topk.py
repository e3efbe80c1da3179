"""Exact top-K over a row that tensor parallelism splits across ranks (the RowParallelLinear inputs).

Each rank proposes its ``min(k, D_local)`` largest magnitudes per token; one all-gather pools them; the global
k-th magnitude and the number of ties it must keep follow from the pool. Ties at the threshold are kept in
global index order (rank by rank, then by local position), which is exactly the single-process rule of
``megatron_qsparse.sparsity.topk``: a TP=N run selects the same entries as TP=1.

Why the pool suffices: every entry of the global top-k is among its own rank's local top-k, so the pool holds
the global k-th value and every entry above it; and where a rank's list was cut inside a run of ties, that
rank alone already supplies at least as many ties as are needed, so later ranks correctly keep none.
"""

import torch
import torch.distributed as dist

from megatron_qsparse.sparsity.topk import block_topk_mask, kept_count, select_by_threshold, topk_mask, triton_kernel


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_gather_stacked(t: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``t`` over ``group``, stacked along a new leading rank dim (no autograd)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def sharded_topk_mask(x_local: torch.Tensor, k: int, group) -> torch.Tensor:
    """Mask of this rank's shard of the global per-token top-k; ``x_local`` is ``[..., D / world]``."""
    world = group_size(group)
    if world == 1:
        return topk_mask(x_local, k)
    local_size = x_local.shape[-1]
    if k >= local_size * world:
        return torch.ones_like(x_local, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x_local, dtype=torch.bool)
    if triton_kernel("topk_values", x_local) is not None:
        return _sharded_topk_mask_triton(x_local, k, group)
    mag = x_local.detach().abs().float()
    candidates = torch.topk(mag, min(k, local_size), dim=-1, sorted=False).values
    per_rank = all_gather_stacked(candidates, group)  # [world, ..., k_local]
    pooled = per_rank.movedim(0, -2).flatten(-2)  # [..., world * k_local]
    kth = torch.topk(pooled, k, dim=-1, sorted=True).values[..., -1:]
    ties_needed = k - (pooled > kth).sum(-1, keepdim=True)
    ties_before = (per_rank[: dist.get_rank(group)] == kth).sum(dim=(0, -1)).unsqueeze(-1)
    return select_by_threshold(mag, kth, ties_needed, ties_before)


def _sharded_topk_mask_triton(x_local: torch.Tensor, k: int, group) -> torch.Tensor:
    """The same three steps through the Triton selection kernels (CUDA): no sort of the pool either."""
    from megatron_qsparse.kernels import triton_routes

    candidates = triton_routes.kernel("topk_values")(x_local.detach(), min(k, x_local.shape[-1]))
    per_rank = all_gather_stacked(candidates, group)
    pooled = per_rank.movedim(0, -2).flatten(-2)
    kth, greater = triton_routes.kernel("kth_and_greater")(pooled, k)
    ties_before = (per_rank[: dist.get_rank(group)] == kth).sum(dim=(0, -1)).unsqueeze(-1)
    return triton_routes.kernel("threshold_mask")(x_local.detach(), kth, k - greater, ties_before)


def check_block_fits_shard(shard_size: int, block_size: int, world: int, site: str = "input") -> None:
    """Block N:M sparsity stays local only if every block lies inside one tensor-parallel shard."""
    if shard_size % block_size:
        raise ValueError(
            f"block sparsity at site {site}: the tensor-parallel shard has {shard_size} channels "
            f"({shard_size * world} over {world} ranks), not a multiple of block_size={block_size}; choose a "
            f"block size that divides the shard or a smaller tensor_model_parallel_size"
        )


def sharded_sparsity_mask(x_local: torch.Tensor, sparsity: float, block_size, group) -> torch.Tensor:
    """The site's mask for a row split across ``group``: global top-K, or block N:M (local per shard)."""
    world = group_size(group)
    if block_size:
        check_block_fits_shard(x_local.shape[-1], block_size, world)
        return block_topk_mask(x_local, sparsity, block_size)
    return sharded_topk_mask(x_local, kept_count(sparsity, x_local.shape[-1] * world), group)
