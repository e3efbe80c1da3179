"""Hugging Face causal LM of a Q-Sparse model: the megatron-core model of this project, written for inference.

Layout per layer (fused projections, as in the training model, so one top-K mask and one BitNet scale per site):
``self_attn.qkv_proj`` ([q; k; v] rows), ``self_attn.o_proj``, ``mlp.gate_up_proj`` ([gate; up] rows),
``mlp.down_proj``; MoE layers have ``mlp.router`` and ``mlp.experts.<e>.{gate_up_proj,down_proj}``.
Top-K and the quantizers come from ``qsparse_ops`` (the project's one implementation, copied beside exported
weights), so this file needs only torch and transformers.

Each site computes ``F.linear(topk_sparsify(x), W)`` (masked dense). Opt-in, ``use_sparse_kernel`` (config field,
``model.set_sparse_kernel(True)`` or ``generate(..., use_sparse_kernel=True)``) sends the decode steps through
``megatron_qsparse.inference.topk_linear``, which reads only the kept rows of an input-major Wᵀ and equals the
masked dense product up to fp32 summation order. That kernel is the package's (a JIT-compiled C++ op), imported
lazily: the default path still needs nothing but torch and transformers.

Attention goes through transformers' dispatch, as its own models do: ``config._attn_implementation`` ("sdpa" by
default, "eager" for ``eager_attention_forward`` below, or a function registered with ``AttentionInterface``)
picks the function; every one gets the same boolean causal-and-padding mask, built once per forward.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_qsparse import QSparseHFConfig
from .qsparse_ops import (
    activation_by_name,
    normalize,
    quantize_activation_int8,
    quantize_weight_ternary,
    topk_sparsify,
)

SPARSE_KERNEL_MISSING = (
    "use_sparse_kernel=True needs the megatron_qsparse package, whose compiled sparse decode kernel it runs, and "
    "it is not importable here: `pip install` the megatron_qsparse project (e.g. `pip install -e <repo>`), or "
    "leave use_sparse_kernel off to run the default masked dense path (same outputs, only torch and transformers)"
)


def sparse_kernel_ops():
    """``megatron_qsparse.inference``, imported on first use so that this file loads without the package.
    (Inside ``try``: transformers then does not list the package as a requirement of an export's remote code.)"""
    try:
        from megatron_qsparse import inference
    except ImportError as error:
        raise ImportError(SPARSE_KERNEL_MISSING) from error
    return inference


def linear(x, weight, bias):
    """``F.linear``, also fast for a bf16 weight that the kernel path stored input-major: torch's CPU bf16 matmul
    by such a transposed weight takes a slow route (1024→3072 on one core: 1 token 10 ms instead of 0.4, 65 tokens
    620 ms instead of 25), while ``mv`` and ``W @ xᵀ`` read it in storage order as fast as F.linear reads the
    usual layout. fp32 (and every weight not re-laid out) goes to F.linear."""
    if weight.dtype != torch.bfloat16 or weight.is_contiguous() or not weight.t().is_contiguous():
        return F.linear(x, weight, bias)
    tokens = x.reshape(-1, x.shape[-1])
    if tokens.shape[0] == 1:
        y = torch.mv(weight, tokens[0])[None]
    else:
        # Out in F.linear's layout, not a transposed view: torch's CPU SDPA picks its route by the strides of q, k
        # and v, and another route rounds bf16 otherwise (one last bit that can flip a top-K downstream).
        y = torch.mm(weight, tokens.t().contiguous()).t().contiguous()
    y = y if bias is None else y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


class SiteLinear(nn.Linear):
    """A linear projection whose input is a Q-Sparse site (top-K, then BitNet int8 when enabled)."""

    def __init__(self, in_features, out_features, bias, sparsity, config: QSparseHFConfig):
        super().__init__(in_features, out_features, bias=bias)
        self.sparsity, self.block_size, self.bitnet = sparsity, config.block_size, config.bitnet
        self.record = False  # keep the realized input sparsity (zeros, tokens) of each call (evaluation)
        self.zeros = self.entries = 0
        self.use_sparse_kernel = False  # set by QSparseForCausalLM.set_sparse_kernel
        self._ternary_cache = None  # BitNet + kernel: (key of the weight it was made from, ternary Wᵀ)

    def forward(self, x):
        # The kernel has no backward: it takes only calls with autograd off (generate() runs under no_grad), so
        # a forward that may be differentiated, in train or eval mode, keeps the masked dense path.
        if self.use_sparse_kernel and self.sparsity > 0 and not self.record and not torch.is_grad_enabled():
            ops = sparse_kernel_ops()
            # Beyond the kernel's batch (prefill) the tokens' kept rows cover ~all of W: a BLAS matmul wins.
            if x.numel() <= ops.gather_kernel.MAX_KERNEL_BATCH * self.in_features:
                return self.sparse_forward(x, ops)
        return self.masked_dense_forward(x)

    def masked_dense_forward(self, x):
        if self.sparsity > 0:
            x = topk_sparsify(x, self.sparsity, self.block_size)
        if self.record:
            self.zeros += int((x == 0).sum())
            self.entries += x.numel()
        weight = self.weight
        if self.bitnet:
            x = quantize_activation_int8(x)
            weight = quantize_weight_ternary(weight)
        return linear(x, weight, self.bias)

    def sparse_forward(self, x, ops):
        """The masked dense result through ``topk_linear``, reading only the kept rows of Wᵀ."""
        tokens = x.reshape(-1, self.in_features)
        if self.bitnet:
            # x_q is zero off the kept channels, so it has at most k nonzeros (per block with Block Q-Sparse). The
            # kernel's own top-K of x_q keeps all of them (the rest it keeps are zeros, which add nothing), so
            # its product is exactly x_q @ Wq_t, as in the dense path.
            tokens = quantize_activation_int8(topk_sparsify(tokens, self.sparsity, self.block_size))
            weight_t = self.ternary_weight_t()
        else:
            weight_t = self.input_major_weight_t()
        y = ops.topk_linear(tokens, weight_t, self.bias, self.sparsity, self.block_size)
        return y.reshape(*x.shape[:-1], self.out_features)

    def input_major_weight_t(self):
        """Wᵀ [in, out], contiguous, without a copy: on first use the parameter itself is re-laid out as a
        [out, in] view of a contiguous Wᵀ, so F.linear (prefill) and the kernel share one copy of the weight."""
        if not self.weight.t().is_contiguous():
            self.weight.data = self.weight.data.t().contiguous().t()
        return self.weight.t()

    def ternary_weight_t(self):
        """BitNet: ``quantize_weight_ternary(W)`` as the dense path computes it, input-major, made once and
        remade when W changes (moved, reassigned, or modified in place, which bumps its version)."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._ternary_cache is None or self._ternary_cache[0] != key:
            self._ternary_cache = (key, quantize_weight_ternary(self.weight.detach()).t().contiguous())
        return self._ternary_cache[1]

    def _apply(self, fn, *args, **kwargs):
        self._ternary_cache = None  # .to() / .float(): a new weight may reuse the old one's address
        return super()._apply(fn, *args, **kwargs)


class QSparseNorm(nn.Module):
    """RMSNorm, or LayerNorm (with a bias) when ``config.normalization`` is "layernorm", as in training."""

    def __init__(self, config: QSparseHFConfig, size: int):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = None if config.normalization == "rmsnorm" else nn.Parameter(torch.zeros(size))

    def forward(self, x):
        return normalize(x, self.weight, self.bias, self.eps)


class QSparseMLP(nn.Module):
    def __init__(self, config: QSparseHFConfig, intermediate: int):
        super().__init__()
        s = config.sparsity
        self.gate_up_proj = SiteLinear(config.hidden_size, 2 * intermediate, False, s["fc1"], config)
        self.down_proj = SiteLinear(intermediate, config.hidden_size, False, s["fc2"], config)
        self.act = activation_by_name(config.hidden_act)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class QSparseMoE(nn.Module):
    """Top-k routing as megatron-core's default: top-k of the router logits, softmax over the chosen k, outputs
    weighted by those probabilities. The router sees the dense input."""

    def __init__(self, config: QSparseHFConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            QSparseMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)
        )

    def forward(self, x):
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens)
        top_logits, chosen = torch.topk(logits, self.top_k, dim=-1)
        probs = torch.softmax(top_logits.float(), dim=-1).to(x.dtype)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(tokens[rows]) * probs[rows, slot, None])
        return out.reshape(shape)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv_heads, s, d] -> [b, kv_heads * groups, s, d]: each KV head repeated for the query heads it serves.
    Also for groups == 1: the contiguous copy keeps the matmul's summation order (the logits) as they were."""
    return states.repeat_interleave(groups, dim=1)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention in plain torch, with the interface of transformers' attention functions (``sdpa`` and the others
    in ``ALL_ATTENTION_FUNCTIONS``): query [b, heads, t, d], key/value [b, kv_heads, s, d], a boolean mask (True =
    attend, as torch's SDPA takes it) broadcastable to [b, heads, t, s]; returns ([b, t, heads, d], weights).
    Scores and softmax in fp32 whatever the model's dtype."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    # A division by 1 / scaling (= √d in fp32), not a product: it rounds as this model always has, bit for bit.
    scores = (query @ key.transpose(-1, -2)).float() / (1 / scaling)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


class QSparseAttention(nn.Module):
    """Fused [q; k; v] projection (one Q-Sparse site), RoPE, grouped-query attention through the function
    ``config._attn_implementation`` names, output projection (the second site)."""

    is_causal = True  # a decoder's attention (transformers' attention functions read it)

    def __init__(self, config: QSparseHFConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.num_key_value_groups = self.heads // self.kv_heads  # the name transformers' sdpa reads for GQA
        self.scaling = 1 / math.sqrt(self.head_dim)
        s = config.sparsity
        qkv_out = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.qkv_proj = SiteLinear(config.hidden_size, qkv_out, config.attention_bias, s["qkv"], config)
        self.o_proj = SiteLinear(self.heads * self.head_dim, config.hidden_size, False, s["proj"], config)

    def forward(self, x, position_embeddings, attention_mask, past_key_values: Optional[Cache] = None, **kwargs):
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        context, weights = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(context.reshape(b, t, self.heads * self.head_dim)), weights


class QSparseDecoderLayer(nn.Module):
    def __init__(self, config: QSparseHFConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = QSparseNorm(config, config.hidden_size)
        self.self_attn = QSparseAttention(config, layer_idx)
        self.post_attention_layernorm = QSparseNorm(config, config.hidden_size)
        self.mlp = QSparseMoE(config) if config.num_experts else QSparseMLP(config, config.intermediate_size)

    def forward(self, x, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        attended, _ = self.self_attn(
            self.input_layernorm(x), position_embeddings, attention_mask, past_key_values, **kwargs
        )
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_mask(past: int, length: int, attention_mask: Optional[torch.Tensor], device) -> torch.Tensor:
    """Boolean [1 or b, 1, length, past + length], True = attend: query i sees keys up to past + i, and none that
    ``attention_mask`` ([b, past + length], 0 = padding) marks. Every attention implementation gets this one mask,
    so they mask alike."""
    keys = torch.arange(past + length, device=device)
    mask = (keys[None, :] <= keys[past:, None])[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
    return mask


class QSparsePreTrainedModel(PreTrainedModel):
    config_class = QSparseHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["QSparseDecoderLayer"]
    # Attention runs through transformers' dispatch: "eager" (ours, above), "sdpa" (the default), or a function
    # registered with AttentionInterface. Not flash / flex: they take another mask than our boolean one.
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()


class QSparseModel(QSparsePreTrainedModel):
    def __init__(self, config: QSparseHFConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(QSparseDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = QSparseNorm(config, config.hidden_size)
        self.post_init()

    def rope_angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        # Computed per call, not kept as a buffer: from_pretrained builds modules on the meta device, and a
        # non-persistent buffer made in __init__ would come out uninitialized.
        d = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, device=position_ids.device).float() / d))
        angles = position_ids[..., None].float() * inv_freq
        return torch.cat((angles, angles), dim=-1)[:, None]

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False, **kwargs
    ):
        b, t = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, -1)
        angles = self.rope_angles(position_ids)
        x = self.embed_tokens(input_ids)
        position_embeddings = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = causal_mask(past, t, attention_mask, x.device)
        for layer in self.layers:
            x = layer(x, position_embeddings, mask, past_key_values, **kwargs)
        return self.norm(x), past_key_values


class QSparseForCausalLM(QSparsePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: QSparseHFConfig):
        super().__init__(config)
        self.model = QSparseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # full precision, dense
        self.post_init()
        self.set_sparse_kernel(config.use_sparse_kernel)

    def set_sparse_kernel(self, enabled: bool) -> None:
        """Run the decode steps (≤ the kernel's batch of tokens per call, autograd off) of every sparse site
        through the compiled sparse kernel, or (False) the default masked dense path. Needs megatron_qsparse:
        raises ImportError, saying how to fix it, where the package is missing."""
        if enabled:
            sparse_kernel_ops()  # fail now, not in the middle of a generation
        self.config.use_sparse_kernel = bool(enabled)
        for module in self.modules():
            if isinstance(module, SiteLinear):
                module.use_sparse_kernel = bool(enabled)

    def generate(self, *args, use_sparse_kernel: Optional[bool] = None, **kwargs):
        """``GenerationMixin.generate``; ``use_sparse_kernel`` overrides the model's setting for this call."""
        if use_sparse_kernel is None:
            return super().generate(*args, **kwargs)
        previous = self.config.use_sparse_kernel
        self.set_sparse_kernel(use_sparse_kernel)
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.set_sparse_kernel(previous)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        labels=None,
        logits_to_keep=0,
        **kwargs,
    ):
        """Other keyword arguments go on to the attention function (for one registered with AttentionInterface);
        eager and sdpa ignore those they do not know."""
        hidden, cache = self.model(input_ids, attention_mask, position_ids, past_key_values, bool(use_cache), **kwargs)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep]).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
