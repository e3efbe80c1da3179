"""Exact sharded top-K against the single-process rule, on rows built to defeat per-shard selection."""

import torch
import torch.distributed as dist

from megatron_qsparse.parallel.sharded_quant import sharded_absmax, sharded_absmean
from megatron_qsparse.parallel.sharded_topk import sharded_topk_mask
from megatron_qsparse.sparsity.bitnet import absmax_scale, absmean_scale
from megatron_qsparse.sparsity.topk import topk_mask


def adversarial_rows(world: int, width: int) -> torch.Tensor:
    """Rows whose global top-k sits unevenly across shards, plus rows full of ties across shard borders."""
    d = world * width
    g = torch.Generator().manual_seed(7)
    rows = [
        torch.arange(d, 0, -1).float(),  # all of the top half lives on the first shards
        torch.arange(1, d + 1).float(),  # ... on the last shards
        torch.ones(d),  # every value tied: keep the lowest global indices
        torch.cat([torch.full((d // 2,), 2.0), torch.full((d - d // 2,), 3.0)]),
        torch.randint(-2, 3, (d,), generator=g).float(),  # ties, zeros and signs
        torch.randn(d, generator=g),
    ]
    return torch.stack(rows + [torch.randint(-3, 4, (d,), generator=g).float() for _ in range(26)])


def check_sharded_topk(rank, world_size) -> dict:
    group = dist.group.WORLD
    width = 16
    full = adversarial_rows(world_size, width)
    local = full[:, rank * width : (rank + 1) * width]
    mismatches, per_shard_would_differ = 0, 0
    for k in range(0, world_size * width + 1):
        expected = topk_mask(full, k)[:, rank * width : (rank + 1) * width]
        got = sharded_topk_mask(local, k, group)
        mismatches += int((got != expected).any())
        naive = topk_mask(local, k // world_size)
        per_shard_would_differ += int((naive != expected).any())
    bf16 = full.to(torch.bfloat16)
    bf16_ok = torch.equal(
        sharded_topk_mask(bf16[:, rank * width : (rank + 1) * width], 20, group),
        topk_mask(bf16, 20)[:, rank * width : (rank + 1) * width],
    )
    w = torch.randn(8, world_size * width, generator=torch.Generator().manual_seed(3))
    return {
        "mismatches": mismatches,
        "per_shard_would_differ": per_shard_would_differ,
        "bf16_ok": bf16_ok,
        "absmax_ok": torch.equal(sharded_absmax(local, group), absmax_scale(full)),
        "absmean_err": float(
            (sharded_absmean(w[:, rank * width : (rank + 1) * width], group) - absmean_scale(w)).abs()
        ),
    }


def check_sharded_topk_triton(rank, world_size) -> dict:
    """``sharded_topk_mask`` through its Triton route (the kernels in Triton's interpreter, CPU tensors sent
    there as CUDA tensors are on a GPU) against the single-process rule."""
    from megatron_qsparse.kernels import triton_routes

    calls = []
    kernel = triton_routes.kernel
    triton_routes.kernel = lambda name: calls.append(name) or kernel(name)
    width = 16
    mismatches = 0
    try:
        for dtype in (torch.float32, torch.bfloat16):
            full = adversarial_rows(world_size, width).to(dtype)
            local = full[:, rank * width : (rank + 1) * width]
            for k in (1, 7, width, width + 1, world_size * width - 1):
                expected = topk_mask(full, k)[:, rank * width : (rank + 1) * width]
                with triton_routes.on_cpu_for_tests():
                    got = sharded_topk_mask(local, k, dist.group.WORLD)
                mismatches += int((got != expected).any())
    finally:
        triton_routes.kernel = kernel
    return {"mismatches": mismatches, "routes": sorted(set(calls))}
