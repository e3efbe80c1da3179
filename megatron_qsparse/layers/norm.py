"""RMSNorm for the transformer layers: plain torch, and sequence-parallel aware.

megatron-core's local norm wrapper refuses sequence parallelism; this one marks its weight
``sequence_parallel`` so that its gradient (partial per sequence shard) is all-reduced over the TP group.
"""

import torch
from megatron.core.transformer.module import MegatronModule


class RMSNorm(MegatronModule):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)
