"""DeepSpeed ZeRO over megatron-core's data-parallel group.

DeepSpeed only holds and shards the optimizer state: the forward/backward is megatron-core's schedule on the
plain module (``engine.module``), in DeepSpeed's unmanaged gradient-accumulation mode, so one ``engine.step()``
per global batch reduces the accumulated gradients over the data-parallel group (ZeRO-1: in the step; ZeRO-2:
reduce-scattered as backward produces them), clips them and updates the parameters. ``torch.optim.AdamW`` is the
client optimizer (no JIT-built kernels needed). LR and weight decay are set on the parameter groups by the trainer
each step (see ``schedules.py``).
"""

import os
from typing import List

import torch


class MegatronMPU:
    """The ``mpu`` interface DeepSpeed queries, answered from megatron-core's parallel_state."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_rank(self):
        return torch.distributed.get_rank(self.ps.get_model_parallel_group())

    def get_model_parallel_world_size(self):
        return torch.distributed.get_world_size(self.ps.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()


def init_deepspeed_comm() -> None:
    """Adopt the existing torch.distributed group. The CPU accelerator would JIT-build a shared-memory
    all-reduce (~45 s) that gloo training never uses: mark it unavailable first."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """Weight decay on matrices only (not on norms and biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "decays": True},
              {"params": no_decay, "weight_decay": 0.0, "decays": False}]
    return [g for g in groups if g["params"]]


def build_engine(model, *, lr, betas, eps, weight_decay, clip_grad, zero_stage, micro_batch_size,
                 num_microbatches, bf16=False):
    """A DeepSpeed engine owning the optimizer state of this rank's model stage."""
    import deepspeed
    from megatron.core import parallel_state as ps

    if zero_stage not in (1, 2):
        raise ValueError(f"optimizer.zero_stage must be 1 or 2, got {zero_stage}")
    if zero_stage == 2 and ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("optimizer.zero_stage=2 is not supported with pipeline parallelism: use 1")
    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        # The schedule already averages over microbatches; DeepSpeed must not scale the gradients again.
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * ps.get_data_parallel_world_size(),
        "managed_gradient_accumulation": False,  # megatron-core's schedule owns the microbatches
        "gradient_clipping": clip_grad,
        "zero_optimization": {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_scatter": True},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=MegatronMPU(),
                                      dist_init_required=False)
    return engine
