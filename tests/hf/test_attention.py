"""Attention through transformers' dispatch: "sdpa" (the default) and our "eager" give the same logits in fp32
(within 1e-5 of the largest logit: only the summation order differs) on GQA and MHA models, with a padding mask
and through the KV cache. Negative control: the padding mask changes the logits it should, in both."""

import copy

import pytest
import torch

from hf.compare import TINY_SHAPE, relative_error
from megatron_qsparse.hf.configuration_qsparse import QSparseHFConfig
from megatron_qsparse.hf.modeling_qsparse import QSparseForCausalLM

TOLERANCE = 1e-5
SPARSITY = {"qkv": 0.5, "proj": 0.5, "fc1": 0.5, "fc2": 0.8}


def pair(kv_heads: int):
    """The same random model under "sdpa" and under "eager"."""
    config = QSparseHFConfig(**dict(TINY_SHAPE, num_key_value_heads=kv_heads), sparsity=SPARSITY)
    torch.manual_seed(0)
    sdpa = QSparseForCausalLM(config).eval()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    return sdpa, eager


@torch.no_grad()
def runs(model, ids, padding) -> dict:
    prefill = model(ids[:, :8], use_cache=True)
    step = model(ids[:, 8:], past_key_values=prefill.past_key_values, use_cache=True)
    return {
        "plain": model(ids).logits,
        "padded": model(ids, attention_mask=padding).logits,
        "cached": torch.cat([prefill.logits, step.logits], dim=1),
    }


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_sdpa_equals_eager(kv_heads):
    sdpa, eager = pair(kv_heads)
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    padding = torch.ones_like(ids)
    padding[1, 9:] = 0  # right padding: every query still sees a key
    got, expected = runs(sdpa, ids, padding), runs(eager, ids, padding)
    for case in expected:
        assert relative_error(got[case], expected[case]) <= TOLERANCE, case
    for result in (got, expected):
        assert relative_error(result["padded"][0], result["plain"][0]) <= TOLERANCE  # the unpadded row: as is
        assert relative_error(result["padded"][1, 9:], result["plain"][1, 9:]) > 1e-2  # padding keys are masked
