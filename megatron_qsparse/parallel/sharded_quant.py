"""BitNet b1.58 scales reduced over tensor-parallel shards, so a sharded model equals the unsharded one:
alpha = mean|W| over the whole weight, gamma = max|x| over the whole token row."""

import torch
import torch.distributed as dist

from megatron_qsparse.parallel.sharded_topk import group_size
from megatron_qsparse.sparsity.bitnet import abs_sum, absmax_scale, absmean_scale


def sharded_absmean(w_local: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return absmean_scale(w_local)
    total = torch.stack(
        [abs_sum(w_local), torch.tensor(float(w_local.numel()), dtype=torch.float64, device=w_local.device)]
    )
    dist.all_reduce(total, group=group)
    return (total[0] / total[1]).float()


def sharded_absmax(x_local: torch.Tensor, group) -> torch.Tensor:
    gamma = absmax_scale(x_local)
    if group_size(group) > 1:
        dist.all_reduce(gamma, op=dist.ReduceOp.MAX, group=group)
    return gamma
