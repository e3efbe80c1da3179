"""The math of Q-Sparse and BitNet b1.58, free of process groups."""

from megatron_qsparse.sparsity.activations import activation_by_name, squared_relu
from megatron_qsparse.sparsity.bitnet import (
    absmax_scale,
    absmean_scale,
    quantize_activation_int8,
    quantize_weight_ternary,
    ternary_codes,
)
from megatron_qsparse.sparsity.stats import activated_parameters, realized_sparsity
from megatron_qsparse.sparsity.topk import (
    apply_mask,
    block_topk_mask,
    kept_count,
    select_by_threshold,
    topk_mask,
    topk_sparsify,
)
