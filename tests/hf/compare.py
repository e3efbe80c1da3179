"""Comparisons shared by the tests of the Hugging Face model's kernel path and of the decode engine."""

import copy

from megatron_qsparse.hf.modeling_qsparse import QSparseForCausalLM, SiteLinear


def unmasked(model) -> QSparseForCausalLM:
    """The wrong path on purpose (a negative control): the same weights with every site dense."""
    dense = copy.deepcopy(model)
    for module in dense.modules():
        if isinstance(module, SiteLinear):
            module.sparsity = 0.0
    return dense


def relative_error(a, b) -> float:
    """The largest difference, relative to the largest magnitude of the reference ``b``."""
    return float((a - b).abs().max() / b.abs().max())
