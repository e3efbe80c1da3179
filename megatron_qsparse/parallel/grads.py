"""Gradient reductions that belong to the model's parallel layout rather than to the optimizer."""

import torch
import torch.distributed as dist


def install_sequence_parallel_grad_hooks(model: torch.nn.Module) -> int:
    """Under sequence parallelism, parameters replicated across TP (norms, the MoE router) see only their
    sequence shard, so each rank's gradient is partial. Sum it over the TP group as backward produces it,
    before any optimizer hook reads it. Returns how many parameters got a hook."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    hooked = 0
    for p in model.parameters():
        if p.requires_grad and getattr(p, "sequence_parallel", False):
            p.register_hook(all_reduce)
            hooked += 1
    return hooked
