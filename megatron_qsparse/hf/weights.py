"""Tensor mappings between our megatron-core state dict (TP=PP=EP=1 view), our Hugging Face model, and the stock
Llama / Mistral / Qwen2 layout; and reading a directory of safetensors.

Megatron keeps QKV fused and grouped per query group (``view(G, H/G + 2, d, hidden)``: the group's query heads,
then its key head, then its value head); our HF model keeps it fused as [q; k; v]; Llama keeps three matrices.
fc1 is [gate; up] in both of ours. The embedding is padded to ``vocab_divisible_by`` in megatron and trimmed to
the tokenizer's vocabulary in HF.
"""

from pathlib import Path
from typing import Dict

import torch

from megatron_qsparse.model.config import QSparseConfig

Tensors = Dict[str, torch.Tensor]


def _qkv_grouped_to_plain(t: torch.Tensor, cfg: QSparseConfig) -> torch.Tensor:
    g, per = cfg.query_groups, cfg.num_attention_heads // cfg.query_groups
    w = t.reshape(g, per + 2, cfg.head_dim, *t.shape[1:])
    q, k, v = w[:, :per], w[:, per], w[:, per + 1]
    return torch.cat([x.reshape(-1, *t.shape[1:]) for x in (q, k, v)])


def _qkv_plain_to_grouped(t: torch.Tensor, cfg: QSparseConfig) -> torch.Tensor:
    g, per, d = cfg.query_groups, cfg.num_attention_heads // cfg.query_groups, cfg.head_dim
    q, k, v = t.split([g * per * d, g * d, g * d])
    rest = t.shape[1:]
    grouped = torch.cat([q.reshape(g, per, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)], dim=1)
    return grouped.reshape(-1, *rest)


def _layer_map(cfg: QSparseConfig, i: int) -> Dict[str, str]:
    """megatron key -> our HF key, for layer i (transforms for qkv applied separately)."""
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    out = {
        m + "input_layernorm.weight": h + "input_layernorm.weight",
        m + "pre_mlp_layernorm.weight": h + "post_attention_layernorm.weight",
        m + "self_attention.linear_qkv.weight": h + "self_attn.qkv_proj.weight",
        m + "self_attention.linear_proj.weight": h + "self_attn.o_proj.weight",
    }
    if cfg.normalization == "layernorm":
        out[m + "input_layernorm.bias"] = h + "input_layernorm.bias"
        out[m + "pre_mlp_layernorm.bias"] = h + "post_attention_layernorm.bias"
    if cfg.add_qkv_bias:
        out[m + "self_attention.linear_qkv.bias"] = h + "self_attn.qkv_proj.bias"
    if cfg.num_experts:
        out[m + "mlp.router.weight"] = h + "mlp.router.weight"
        for e in range(cfg.num_experts):
            out[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = h + f"mlp.experts.{e}.gate_up_proj.weight"
            out[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = h + f"mlp.experts.{e}.down_proj.weight"
    else:
        out[m + "mlp.linear_fc1.weight"] = h + "mlp.gate_up_proj.weight"
        out[m + "mlp.linear_fc2.weight"] = h + "mlp.down_proj.weight"
    return out


def _key_map(cfg: QSparseConfig) -> Dict[str, str]:
    out = {
        "embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "decoder.final_layernorm.weight": "model.norm.weight",
    }
    if cfg.normalization == "layernorm":
        out["decoder.final_layernorm.bias"] = "model.norm.bias"
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        out.update(_layer_map(cfg, i))
    return out


def megatron_to_hf(state: Tensors, cfg: QSparseConfig) -> Tensors:
    out = {}
    for mkey, hkey in _key_map(cfg).items():
        t = state[mkey]
        if "linear_qkv" in mkey:
            t = _qkv_grouped_to_plain(t, cfg)
        elif mkey in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = t[: cfg.vocab_size]
        out[hkey] = t.detach().clone().contiguous()
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def hf_to_megatron(state: Tensors, cfg: QSparseConfig) -> Tensors:
    out = {}
    for mkey, hkey in _key_map(cfg).items():
        t = state[hkey]
        if "linear_qkv" in mkey:
            t = _qkv_plain_to_grouped(t, cfg)
        elif mkey in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = torch.cat([t, t.new_zeros(cfg.padded_vocab_size - t.shape[0], t.shape[1])])
        out[mkey] = t.contiguous()
    return out


def stock_to_hf(state: Tensors, cfg: QSparseConfig) -> Tensors:
    """Llama/Mistral/Qwen2 tensors -> our HF layout (fuse q/k/v and gate/up)."""
    out = {}
    for key, t in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight", "k_proj.bias", "v_proj.bias")):
            continue
        if ".q_proj." in key:
            k, v = state[key.replace("q_proj", "k_proj")], state[key.replace("q_proj", "v_proj")]
            out[key.replace("q_proj", "qkv_proj")] = torch.cat([t, k, v])
        elif key.endswith("gate_proj.weight"):
            out[key.replace("gate_proj", "gate_up_proj")] = torch.cat([t, state[key.replace("gate_proj", "up_proj")]])
        else:
            out[key] = t
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def hf_to_stock(state: Tensors, cfg: QSparseConfig) -> Tensors:
    """Our HF layout -> Llama/Mistral/Qwen2 tensors (split fused projections). Dense models only."""
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.query_groups * cfg.head_dim
    out = {}
    for key, t in state.items():
        if ".qkv_proj." in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.split([q_rows, kv_rows, kv_rows])):
                out[key.replace("qkv_proj", name)] = part
        elif ".gate_up_proj." in key:
            gate, up = t.chunk(2)
            out[key.replace("gate_up_proj", "gate_proj")], out[key.replace("gate_up_proj", "up_proj")] = gate, up
        elif not (cfg.tie_embeddings and key == "lm_head.weight"):
            out[key] = t
    return out


def read_safetensors_dir(path: Path) -> Tensors:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (save the model with safe_serialization)")
    state: Tensors = {}
    for f in files:
        state.update(load_file(str(f)))
    return state
