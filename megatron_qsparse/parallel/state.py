"""A parallel layout and the one call that sets megatron-core's process groups up for it."""

import contextlib
import os
from dataclasses import dataclass

import torch.distributed as dist

from megatron_qsparse.parallel import cpu_compat


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1  # tensor model parallel
    pp: int = 1  # pipeline model parallel
    ep: int = 1  # expert model parallel (carved out of data parallel)
    sp: bool = False  # sequence parallel (needs tp > 1)

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not divisible by TP×PP = {self.tp}×{self.pp}")
        dp = world_size // model_parallel
        if dp % self.ep and self.ep > 1:
            raise ValueError(f"data-parallel size {dp} is not divisible by EP = {self.ep}")
        return dp

    def __str__(self) -> str:
        parts = [f"tp{self.tp}"] + ([f"pp{self.pp}"] if self.pp > 1 else []) + ([f"ep{self.ep}"] if self.ep > 1 else [])
        return "".join(parts) + ("+sp" if self.sp else "")


def initialize_model_parallel(layout: ParallelLayout, seed: int = 1234) -> None:
    """Create megatron-core's TP/PP/DP/EP groups over the already initialized default process group, and
    seed the model-parallel RNG tracker. Installs the CPU compatibility layer first when there is no CUDA."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    cpu_compat.apply()
    layout.data_parallel_size(dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


@contextlib.contextmanager
def single_process_model_parallel(seed: int = 1234):
    """TP=PP=EP=1 in this process (a one-rank gloo group on the loopback if none exists): for tools that
    load, convert or evaluate a whole model."""
    from megatron_qsparse.parallel.ports import free_port

    cpu_compat.apply()
    created = not dist.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    initialize_model_parallel(ParallelLayout(), seed)
    try:
        yield
    finally:
        destroy_model_parallel()
        if created:
            dist.destroy_process_group()
