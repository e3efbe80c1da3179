"""Small host-side values (a loss, flags, per-layer sums) reduced under either backend: NCCL reduces only CUDA
tensors, gloo only CPU ones."""

import torch
import torch.distributed as dist


def collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_host(t: torch.Tensor, **kwargs) -> torch.Tensor:
    """``dist.all_reduce`` of a CPU tensor; returns the reduced values on the CPU (no copy under gloo)."""
    on_device = t.to(collective_device())
    dist.all_reduce(on_device, **kwargs)
    return on_device.cpu()
