"""Q-Sparse at decode time: linears that read only the rows of Wᵀ their top-K mask keeps.

``decode_layer`` (one decoder layer's step, dense or sparse, for ``tools/bench_decode.py``) is imported on its
own: it pulls in the model config and with it megatron-core.
"""

from megatron_qsparse.inference.gather_kernel import backend
from megatron_qsparse.inference.sparse_linear import SparseDecodeLinear, kept_channel_mask, topk_linear

__all__ = ["SparseDecodeLinear", "backend", "kept_channel_mask", "topk_linear"]
