"""Our model description (``QSparseConfig``) in Hugging Face terms: as our ``QSparseHFConfig``, from a stock
Llama / Mistral / Qwen2 config.json, and as a stock ``LlamaConfig``."""

from megatron_qsparse.hf.configuration_qsparse import QSparseHFConfig
from megatron_qsparse.model.config import QSparseConfig, SparsityConfig

IMPORTABLE = ("llama", "mistral", "qwen2")


def _llama_fields(cfg: QSparseConfig) -> dict:
    """The fields our HF config shares with a stock ``LlamaConfig``, under their HF names."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_epsilon,
        rope_theta=cfg.rotary_base,
        max_position_embeddings=cfg.seq_length,
        attention_bias=cfg.add_qkv_bias,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def hf_config_from(cfg: QSparseConfig) -> QSparseHFConfig:
    return QSparseHFConfig(
        **_llama_fields(cfg),
        hidden_act=cfg.activation,
        normalization=cfg.normalization,
        sparsity=cfg.sparsity.ratios(),
        block_size=cfg.sparsity.block_size,
        bitnet=cfg.bitnet,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.moe_router_topk,
        moe_intermediate_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
        initializer_range=cfg.init_method_std,
    )


def config_from_stock(hf: dict, source: str = "config.json") -> QSparseConfig:
    """Our model description of a dense Llama / Mistral / Qwen2 checkpoint (SwiGLU, RMSNorm, RoPE)."""
    family = hf.get("model_type")
    if family not in IMPORTABLE:
        raise ValueError(f"{source}: model_type {family!r} is not importable; supported: {IMPORTABLE}")
    if hf.get("rope_scaling"):
        raise ValueError(f"{source}: rope_scaling {hf['rope_scaling']} is not supported (plain RoPE only)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r}: only SwiGLU (silu) models are importable")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return QSparseConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim if head_dim * heads != hf["hidden_size"] else None,
        vocab_size=hf["vocab_size"],
        seq_length=min(hf.get("max_position_embeddings", 4096), 4096),
        activation="silu",
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        rotary_base=float(rope),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        add_qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
        sparsity=SparsityConfig(),
    )


def stock_config_from(cfg: QSparseConfig):
    """A stock ``LlamaConfig`` of a dense model (the caller refuses sparse, BitNet and MoE models)."""
    from transformers import LlamaConfig

    return LlamaConfig(**_llama_fields(cfg))
