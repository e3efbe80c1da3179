"""DeepSpeed ZeRO over megatron-core's data-parallel group.

DeepSpeed only holds and shards the optimizer state: the forward/backward is megatron-core's schedule on the
plain module (``engine.module``), in DeepSpeed's unmanaged gradient-accumulation mode, so one ``engine.step()``
per global batch reduces the accumulated gradients over the data-parallel group (ZeRO-1: in the step; ZeRO-2:
reduce-scattered as backward produces them), clips them and updates the parameters. ``torch.optim.AdamW`` is the
client optimizer (no JIT-built kernels needed). LR and weight decay are set on the parameter groups by the trainer
each step (see ``schedules.py``). Every DeepSpeed adaptation of the project lives here.
"""

import contextlib
import os
from typing import List, Set

import torch

EXPERT_GROUP = "megatron_experts"  # DeepSpeed's name for megatron-core's expert data-parallel group


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


def expert_parameters(model: torch.nn.Module) -> Set[torch.nn.Parameter]:
    """Expert weights sharded by expert parallelism: megatron-core marks them ``allreduce=False`` (their gradients
    are reduced over the expert-data-parallel group, the ranks that hold the same experts)."""
    return {p for p in model.parameters() if not getattr(p, "allreduce", True)}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """Weight decay on matrices only (not on norms and biases); expert-parallel weights in groups of their own,
    marked as DeepSpeed MoE groups so that ZeRO partitions and reduces them over the expert-data-parallel group."""
    experts = expert_parameters(model)
    groups = []
    for moe in (False, True):
        params = [p for p in model.parameters() if p.requires_grad and (p in experts) == moe]
        for decays in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decays]
            group = {"params": chosen, "weight_decay": weight_decay if decays else 0.0, "decays": decays}
            if moe:
                group.update(moe=True, name=EXPERT_GROUP)
            groups.append(group)
    return [g for g in groups if g["params"]]


@contextlib.contextmanager
def deepspeed_sees_megatron_experts(model: torch.nn.Module):
    """Expert parallelism under DeepSpeed ZeRO: DeepSpeed handles MoE parameters (its ``allreduce=False`` test is
    megatron's marking) only for its own MoE layers and expert groups. Register megatron-core's expert-parallel
    and expert-data-parallel groups under one DeepSpeed group name, name it on the expert weights, and let the
    engine's MoE-layer detection, while it initializes, also match megatron's ``MoELayer``."""
    experts = expert_parameters(model)
    if not experts:
        yield
        return
    from deepspeed.runtime import engine as ds_engine
    from deepspeed.utils import groups
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for table, ranks, group in (
        (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS, ps.get_expert_model_parallel_group()),
        (
            groups._EXPERT_DATA_PARALLEL_GROUP,
            groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
            ps.get_expert_data_parallel_group(),
        ),
    ):
        table[EXPERT_GROUP], ranks[EXPERT_GROUP] = group, torch.distributed.get_process_group_ranks(group)
    for p in experts:
        p.group_name = EXPERT_GROUP
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.num_experts = module.config.num_moe_experts  # the attribute DeepSpeed's detection reads
    detected = ds_engine.MoE
    ds_engine.MoE = (detected, MoELayer)  # an isinstance() target during deepspeed.initialize only
    try:
        yield
    finally:
        ds_engine.MoE = detected


def deepspeed_safe_globals() -> list:
    """The plain DeepSpeed classes inside a ZeRO optimizer state dict, allowed for weights_only loading."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def save_zero_partition(engine, path) -> None:
    """This rank's ZeRO optimizer partition (moments, fp32 master weights, step counts)."""
    torch.save(engine.optimizer.state_dict(), path)


def load_zero_partition(engine, path) -> None:
    """The partition ``save_zero_partition`` wrote, for the same layout and world size; ``weights_only`` (with
    the plain DeepSpeed classes allowed): a refused or unreadable file is a CheckpointError naming it."""
    from megatron.core import parallel_state as ps

    from megatron_qsparse.model.safe_load import load_weights_only

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        state = load_weights_only(path, str(path))
    states = [None] * ps.get_data_parallel_world_size()  # DeepSpeed takes one entry per data-parallel rank
    states[ps.get_data_parallel_rank()] = state
    engine.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)


def discard_step(engine) -> None:
    """Drop this step's gradients without touching parameters or optimizer moments (a non-finite loss): run the
    engine's step, which finalizes and clears the ZeRO gradient state, with the inner optimizer's update
    disabled. DeepSpeed's own overflow skip does not apply: it looks at the gradients, not at the loss."""
    inner = engine.optimizer.optimizer
    inner.step = lambda *args, **kwargs: None
    try:
        engine.step()
    finally:
        del inner.step


def build_engine(
    model, *, lr, betas, eps, weight_decay, clip_grad, zero_stage, micro_batch_size, num_microbatches, bf16=False
):
    """A DeepSpeed engine owning the optimizer state of this rank's model stage."""
    import deepspeed
    from megatron.core import parallel_state as ps

    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        # The schedule already averages over microbatches; DeepSpeed must not scale the gradients again.
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * ps.get_data_parallel_world_size(),
        "managed_gradient_accumulation": False,  # megatron-core's schedule owns the microbatches
        "gradient_clipping": clip_grad,
        "zero_optimization": {
            "stage": zero_stage,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_scatter": True,
        },
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    with deepspeed_sees_megatron_experts(model):
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, mpu=MegatronMPU(), dist_init_required=False
        )
    return engine
