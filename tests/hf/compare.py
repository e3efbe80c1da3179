"""Comparisons shared by the tests of the Hugging Face model's kernel path and of the decode engine."""

import copy

from megatron_qsparse.hf.modeling_qsparse import QSparseForCausalLM, SiteLinear

# The tiny model shape the HF-model, attention and engine tests build (GQA: 4 query heads, 2 KV heads).
TINY_SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,
)


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
