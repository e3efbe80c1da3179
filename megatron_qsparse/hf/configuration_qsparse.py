"""Hugging Face configuration of a Q-Sparse model. Its own ``model_type`` ("qsparse"): no stock transformers
class loads it, so an export can never be run dense by accident.

``use_sparse_kernel`` (default False) is a runtime switch, not part of the model: decode through the compiled
sparse kernel of ``megatron_qsparse.inference`` (needs the package installed). It is set at load time
(``from_pretrained(path, trust_remote_code=True, use_sparse_kernel=True)``) and never written to config.json, so
an export reads the same wherever it is loaded.
"""

from transformers import PretrainedConfig

SITES = ("qkv", "proj", "fc1", "fc2")


class QSparseHFConfig(PretrainedConfig):
    model_type = "qsparse"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="relu2",
        normalization="rmsnorm",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        attention_bias=False,
        tie_word_embeddings=False,
        sparsity=None,
        block_size=None,
        bitnet=False,
        num_experts=None,
        num_experts_per_tok=2,
        moe_intermediate_size=None,
        initializer_range=0.02,
        use_sparse_kernel=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.normalization = normalization
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.sparsity = {site: float((sparsity or {}).get(site, 0.0)) for site in SITES}
        self.block_size = block_size
        self.bitnet = bitnet
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.initializer_range = initializer_range
        self.use_sparse_kernel = use_sparse_kernel
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        out.pop("use_sparse_kernel", None)  # this process's choice of route, not a property of the weights
        return out
