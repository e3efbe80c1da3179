"""The sparsity, quantization, activation and norm functions the Hugging Face model uses: the project's own code.

Inside the package this module re-exports ``megatron_qsparse.sparsity``; an export writes the source of those
same modules into this file beside the weights, so the checkpoint runs with only torch and transformers.
"""

from megatron_qsparse.layers.norm_fn import normalize  # noqa: F401
from megatron_qsparse.sparsity.activations import activation_by_name  # noqa: F401
from megatron_qsparse.sparsity.bitnet import quantize_activation_int8, quantize_weight_ternary  # noqa: F401
from megatron_qsparse.sparsity.topk import topk_sparsify  # noqa: F401

EXPORTED_MODULES = (
    "megatron_qsparse.sparsity.topk",
    "megatron_qsparse.sparsity.bitnet",
    "megatron_qsparse.sparsity.activations",
    "megatron_qsparse.layers.norm_fn",
)
