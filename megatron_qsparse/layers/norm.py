"""RMSNorm / LayerNorm for the transformer layers: plain torch, and sequence-parallel aware.

megatron-core's local norm wrapper refuses sequence parallelism; this one marks its parameters
``sequence_parallel`` so that their gradients (partial per sequence shard) are all-reduced over the TP group.
The kind follows ``TransformerConfig.normalization`` ("RMSNorm" or "LayerNorm").
"""

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_qsparse.layers.norm_fn import normalize


class Norm(MegatronModule):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(config)
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization must be RMSNorm or LayerNorm, got {config.normalization!r}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = (
            None
            if config.normalization == "RMSNorm"
            else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        )
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.weight, self.bias, self.eps)
