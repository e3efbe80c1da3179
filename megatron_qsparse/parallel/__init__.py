"""Process-group aware pieces: exact sharded top-K, sharded BitNet scales, megatron-core on CPU/gloo."""

from megatron_qsparse.parallel.sharded_quant import sharded_absmax, sharded_absmean
from megatron_qsparse.parallel.sharded_topk import sharded_sparsity_mask, sharded_topk_mask
