"""One decoder layer's decode step (new tokens attending over a KV cache), dense or Q-Sparse, for benchmarks.

What a step includes: RMSNorm (unit weight) → fused QKV projection → writing the new K, V into an fp32 KV
cache → attention of the new token over ``kv_cache_len`` cached positions plus itself (GQA aware, fp32) →
output projection → residual → RMSNorm → fused gate+up projection → ``act(gate) · up`` → down projection →
residual. Not included: RoPE, embeddings, LM head; every repeat writes the same cache slot, so it does identical
work. The four projections are callables, so the same step runs dense (``F.linear``) or sparse
(``SparseDecodeLinear``); everything else costs the same in both.
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from megatron_qsparse.inference.sparse_linear import SparseDecodeLinear
from megatron_qsparse.layers.site import SITES
from megatron_qsparse.model.config import QSparseConfig
from megatron_qsparse.sparsity.activations import activation_by_name

Projection = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    ffn: int  # GLU size (each of gate and up)
    heads: int
    kv_heads: int
    head_dim: int
    activation: str  # "relu2" or "silu"

    @classmethod
    def from_config(cls, cfg: QSparseConfig) -> "LayerShape":
        return cls(
            cfg.hidden_size,
            cfg.ffn_hidden_size,
            cfg.num_attention_heads,
            cfg.query_groups,
            cfg.head_dim,
            cfg.activation,
        )

    def projection_sizes(self) -> Dict[str, tuple]:
        """(in, out) of each projection, by site name."""
        attention = self.heads * self.head_dim
        return {
            "qkv": (self.hidden, attention + 2 * self.kv_heads * self.head_dim),
            "proj": (attention, self.hidden),
            "fc1": (self.hidden, 2 * self.ffn),
            "fc2": (self.ffn, self.hidden),
        }


def random_weights(shape: LayerShape, dtype: torch.dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    """[out, in] weights per site, N(0, 1/in) so that activations keep a unit scale through the layer."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for site, (fan_in, fan_out) in shape.projection_sizes().items():
        w = torch.randn(fan_out, fan_in, generator=generator).mul_(1.0 / math.sqrt(fan_in))
        weights[site] = w.to(dtype)
    return weights


def dense_projections(weights: Dict[str, torch.Tensor]) -> Dict[str, Projection]:
    return {site: partial(F.linear, weight=w) for site, w in weights.items()}


def sparse_projections(
    weights: Dict[str, torch.Tensor], sparsity: float, block_size: Optional[int] = None
) -> Dict[str, SparseDecodeLinear]:
    """One ``SparseDecodeLinear`` per site (each stores its Wᵀ); ``set_sparsity`` changes the ratio later."""
    return {site: SparseDecodeLinear(w, sparsity, block_size) for site, w in weights.items()}


def rms_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    # One fused op: at decode every extra small op costs tens of microseconds on both sides of the comparison.
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class DecodeLayer:
    """A decoder layer's step for ``batch`` new tokens ``x`` [batch, hidden] (one sequence each)."""

    def __init__(
        self,
        shape: LayerShape,
        projections: Dict[str, Projection],
        batch: int = 1,
        kv_cache_len: int = 128,
        dtype: torch.dtype = torch.float32,
        seed: int = 1,
    ):
        missing = set(SITES) - set(projections)
        if missing:
            raise ValueError(f"projections missing for sites {sorted(missing)}")
        self.shape, self.projections = shape, projections
        self.activation = activation_by_name(shape.activation)
        generator = torch.Generator().manual_seed(seed)
        # fp32 cache with one free slot at the end for the new token, written in place at every step.
        cache_shape = (batch, shape.kv_heads, kv_cache_len + 1, shape.head_dim)
        self.keys = torch.randn(cache_shape, generator=generator)
        self.values = torch.randn(cache_shape, generator=generator)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        s = self.shape
        batch = qkv.shape[0]
        q, k, v = qkv.float().split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1)
        self.keys[:, :, -1] = k.reshape(batch, s.kv_heads, s.head_dim)
        self.values[:, :, -1] = v.reshape(batch, s.kv_heads, s.head_dim)
        q = q.reshape(batch, s.heads, 1, s.head_dim)  # query head h reads KV head h // (heads / kv_heads)
        context = F.scaled_dot_product_attention(q, self.keys, self.values, enable_gqa=s.heads != s.kv_heads)
        return context.reshape(batch, s.heads * s.head_dim).to(qkv.dtype)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.projections
        x = x + p["proj"](self.attend(p["qkv"](rms_norm(x))))
        gate, up = p["fc1"](rms_norm(x)).chunk(2, dim=-1)
        return x + p["fc2"](self.activation(gate) * up)
