"""The one call that sets megatron-core's process groups up for a ``ParallelLayout``, and its teardown."""

import contextlib
import os

import torch.distributed as dist

from megatron_qsparse.parallel import cpu_compat
from megatron_qsparse.parallel.layout import ParallelLayout


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
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_size,
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
