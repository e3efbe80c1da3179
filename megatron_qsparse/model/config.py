"""The model description: ``QSparseConfig`` (shape, sparsity per site, BitNet, MoE) and its presets.

A ``QSparseConfig`` plus a parallel layout gives megatron-core's ``TransformerConfig`` (``to_transformer_config``).
Everything here is plain data, so configs load from YAML and ``--set dotted.key=value`` overrides.
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional

import torch

from megatron_qsparse.config_types import ConfigError, build
from megatron_qsparse.layers.site import SITES, SiteConfig
from megatron_qsparse.parallel.layout import ParallelLayout
from megatron_qsparse.sparsity.activations import activation_by_name
from megatron_qsparse.sparsity.topk import check_sparsity

NORMALIZATIONS = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}  # ours -> megatron-core's names


@dataclass
class SparsityConfig:
    """One global ratio by default; ``qkv``, ``proj``, ``fc1``, ``fc2`` override it per site."""

    default: float = 0.0
    qkv: Optional[float] = None
    proj: Optional[float] = None
    fc1: Optional[float] = None
    fc2: Optional[float] = None
    block_size: Optional[int] = None  # Block Q-Sparse (N:M with M = block_size)
    ste: bool = True  # straight-through estimator; False masks the gradient too

    def ratio(self, site: str) -> float:
        value = getattr(self, site)
        return self.default if value is None else value

    def ratios(self) -> Dict[str, float]:
        return {site: self.ratio(site) for site in SITES}


@dataclass
class QSparseConfig:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int  # the GLU size (each of gate and up)
    num_attention_heads: int
    num_query_groups: Optional[int] = None  # GQA; None = multi-head attention
    kv_channels: Optional[int] = None  # head dim; None = hidden_size / heads
    vocab_size: int = 32000
    vocab_divisible_by: int = 128  # the embedding is padded to a multiple of this (independent of TP)
    seq_length: int = 2048
    activation: str = "relu2"  # "relu2" (from scratch) or "silu" (imported SwiGLU models)
    normalization: str = "rmsnorm"  # "rmsnorm" or "layernorm"
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    tie_embeddings: bool = False
    add_qkv_bias: bool = False  # Qwen2-style biased QKV
    num_experts: Optional[int] = None  # MoE when set
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # None = ffn_hidden_size
    moe_aux_loss_coeff: float = 0.0
    bitnet: bool = False  # BitNet b1.58: ternary weights, int8 activations in the four block linears
    init_method_std: float = 0.02
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)

    def __post_init__(self):
        if isinstance(self.sparsity, dict):
            self.sparsity = build(SparsityConfig, self.sparsity, "model.sparsity")
        self.validate()

    # ---- derived shape -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_divisible_by
        return -(-self.vocab_size // m) * m

    def sites(self) -> Dict[str, SiteConfig]:
        s = self.sparsity
        return {name: SiteConfig(name, s.ratio(name), s.block_size, s.ste, self.bitnet) for name in SITES}

    def block_linear_params(self) -> Dict[str, int]:
        """Weights of the four block projections summed over layers (and over all experts for MoE)."""
        h, d = self.hidden_size, self.head_dim
        qkv_out = (self.num_attention_heads + 2 * self.query_groups) * d
        ffn = self.moe_ffn_hidden_size or self.ffn_hidden_size
        experts = self.num_experts or 1
        per_layer = {
            "qkv": h * qkv_out,
            "proj": self.num_attention_heads * d * h,
            "fc1": experts * h * 2 * ffn,
            "fc2": experts * ffn * h,
        }
        return {site: self.num_layers * n for site, n in per_layer.items()}

    def activated_block_linear_params(self) -> Dict[str, float]:
        """Per-site weights a token uses: MoE counts only its top-k experts."""
        params = self.block_linear_params()
        if self.num_experts:
            for site in ("fc1", "fc2"):
                params[site] = params[site] * self.moe_router_topk / self.num_experts
        return params

    # ---- checks ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Ranges and shapes, each error naming the ``model.<key>`` to fix (values are typed by ``from_dict``)."""

        def need(ok: bool, key: str, message: str):
            if not ok:
                raise ConfigError(f"model.{key}: {message}")

        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        for name in ("vocab_divisible_by", "seq_length", "num_query_groups", "kv_channels", "moe_ffn_hidden_size"):
            value = getattr(self, name)  # a divisor or a size: 0 would divide by zero or build empty tensors
            need(value is None or value >= 1, name, f"must be >= 1, got {value}")
        for name in ("norm_epsilon", "rotary_base", "init_method_std"):
            need(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        need(self.moe_aux_loss_coeff >= 0, "moe_aux_loss_coeff", f"must be >= 0, got {self.moe_aux_loss_coeff}")
        need(
            self.hidden_size % self.num_attention_heads == 0 or self.kv_channels is not None,
            "hidden_size",
            f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            " (or set kv_channels)",
        )
        need(
            self.num_attention_heads % self.query_groups == 0,
            "num_query_groups",
            f"num_attention_heads={self.num_attention_heads} is not divisible by num_query_groups={self.query_groups}",
        )
        try:
            activation_by_name(self.activation)
        except ValueError as err:
            raise ConfigError(f"model.activation: {err}") from None
        need(
            self.normalization in NORMALIZATIONS,
            "normalization",
            f"{self.normalization!r} must be one of {sorted(NORMALIZATIONS)}",
        )
        # Check the ratios the user wrote (default, then each override), not the per-site values derived from them.
        for name in ("default",) + SITES:
            value = getattr(self.sparsity, name)
            try:
                if value is not None:
                    check_sparsity(value, f"model.sparsity.{name}")
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if self.sparsity.block_size is not None:
            b = self.sparsity.block_size
            need(b > 0, "sparsity.block_size", f"must be positive, got {b}")
        if self.num_experts is not None:
            need(
                self.num_experts > 0,
                "num_experts",
                f"must be positive (or null for a dense model), got {self.num_experts}",
            )
            need(
                0 < self.moe_router_topk <= self.num_experts,
                "moe_router_topk",
                f"moe_router_topk={self.moe_router_topk} must lie in [1, num_experts={self.num_experts}]",
            )

    def validate_layout(self, layout: ParallelLayout) -> None:
        """Errors a parallel layout would otherwise hit deep inside megatron-core, stated up front."""
        tp, pp, ep, vpp = layout.tp, layout.pp, layout.ep, layout.vpp

        def need(ok: bool, message: str):
            if not ok:
                named = f"TP={tp} PP={pp}" + (f" VPP={vpp}" if vpp > 1 else "") + f" EP={ep}"
                raise ValueError(f"parallel layout {named}: {message}")

        need(
            self.num_attention_heads % tp == 0,
            f"num_attention_heads={self.num_attention_heads} is not divisible by tensor_model_parallel_size",
        )
        need(
            self.query_groups % tp == 0,
            f"num_query_groups={self.query_groups} is not divisible by tensor_model_parallel_size",
        )
        need(
            self.ffn_hidden_size % tp == 0,
            f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by tensor_model_parallel_size",
        )
        need(
            self.padded_vocab_size % tp == 0,
            f"padded vocab {self.padded_vocab_size} is not divisible by "
            "tensor_model_parallel_size (raise vocab_divisible_by)",
        )
        need(
            self.num_layers % pp == 0, f"num_layers={self.num_layers} is not divisible by pipeline_model_parallel_size"
        )
        need(
            self.num_layers % (pp * vpp) == 0,
            f"num_layers={self.num_layers} is not divisible by pp × vpp = {pp * vpp} (every model chunk holds the "
            "same number of layers)",
        )
        if self.num_experts:
            need(
                self.num_experts % ep == 0,
                f"expert_model_parallel_size (parallel.ep) must divide model.num_experts ({self.num_experts})",
            )
            need(
                tp == 1 or layout.sp,
                "MoE with tensor parallelism needs sequence_parallel=True (megatron-core requires it)",
            )
        else:
            need(
                ep == 1,
                "expert parallelism needs experts: expert_model_parallel_size > 1 needs num_experts "
                "(set model.num_experts or parallel.ep=1)",
            )
        block = self.sparsity.block_size
        if block:
            ffn = self.moe_ffn_hidden_size or self.ffn_hidden_size
            for site, width in (
                ("proj", self.num_attention_heads * self.head_dim // tp),
                ("fc2", ffn // tp),
                ("qkv", self.hidden_size),
                ("fc1", self.hidden_size),
            ):
                need(
                    width % block == 0,
                    f"sparsity.block_size={block} does not divide the {site} input "
                    f"shard ({width} channels per rank); choose a divisor or a smaller TP",
                )

    # ---- megatron-core -----------------------------------------------------------------------------------
    def to_transformer_config(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        expert_model_parallel_size: int = 1,
        sequence_parallel: bool = False,
        params_dtype: torch.dtype = torch.float32,
        virtual_pipeline_model_parallel_size: int = 1,
        **overrides,
    ):
        from megatron.core.transformer.transformer_config import TransformerConfig

        layout = ParallelLayout(
            tensor_model_parallel_size,
            pipeline_model_parallel_size,
            expert_model_parallel_size,
            sequence_parallel,
            virtual_pipeline_model_parallel_size,
        )
        self.validate_layout(layout)
        kwargs = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            gated_linear_unit=True,
            activation_func=activation_by_name(self.activation),
            normalization=NORMALIZATIONS[self.normalization],
            layernorm_epsilon=self.norm_epsilon,
            add_bias_linear=False,
            add_qkv_bias=self.add_qkv_bias,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_method_std,
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=layout.virtual_pipeline_size,
            # Interleaved at PP=2, both neighbours are one rank: batched send/recv pairs then match an activation
            # with a gradient of the same shape (measured: wrong losses from the third microbatch on).
            # megatron-core's unbatched path sends each direction over its own group.
            batch_p2p_comm=layout.vpp == 1,
            expert_model_parallel_size=expert_model_parallel_size,
            sequence_parallel=sequence_parallel,
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            # Fusions that need TransformerEngine/apex or that cannot see the sparsified inputs stay off.
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            use_cpu_initialization=not torch.cuda.is_available(),
        )
        if self.num_experts:
            kwargs.update(
                num_moe_experts=self.num_experts,
                moe_router_topk=self.moe_router_topk,
                moe_ffn_hidden_size=self.moe_ffn_hidden_size or self.ffn_hidden_size,
                moe_aux_loss_coeff=self.moe_aux_loss_coeff,
                moe_router_load_balancing_type="aux_loss" if self.moe_aux_loss_coeff > 0 else "none",
                moe_token_dispatcher_type="allgather",
                moe_grouped_gemm=False,
                moe_permute_fusion=False,
                moe_router_fusion=False,
            )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)

    # ---- plain data --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> "QSparseConfig":
        """From plain data (YAML, ``--set``, a checkpoint): values converted to the field types, then validated;
        errors name ``<where>.<key>``."""
        return build(cls, copy.deepcopy(data), where)


def _paper(num_layers, hidden, ffn, heads) -> QSparseConfig:
    return QSparseConfig(
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        vocab_size=32000,
        seq_length=2048,
        activation="relu2",
    )


PRESETS = {
    # CPU-sized model for the default pretraining run and the tests.
    "tiny": lambda: QSparseConfig(
        num_layers=4,
        hidden_size=256,
        ffn_hidden_size=688,
        num_attention_heads=4,
        vocab_size=8192,
        seq_length=256,
        tie_embeddings=True,
    ),
    # The paper's from-scratch shapes (method doc, section 6).
    "300m": lambda: _paper(24, 1024, 2730, 16),
    "700m": lambda: _paper(24, 1536, 4096, 24),
    "1.3b": lambda: _paper(24, 2048, 5460, 32),
    "7b": lambda: _paper(32, 4096, 11008, 32),
    # Shapes of imported dense models (SwiGLU, untied) for continue-training and finetuning.
    "llama2-7b": lambda: QSparseConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_attention_heads=32,
        vocab_size=32000,
        seq_length=4096,
        activation="silu",
        norm_epsilon=1e-5,
    ),
    "mistral-7b": lambda: QSparseConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=32000,
        seq_length=4096,
        activation="silu",
        norm_epsilon=1e-5,
    ),
    "qwen1.5-7b": lambda: QSparseConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_attention_heads=32,
        vocab_size=151936,
        seq_length=4096,
        activation="silu",
        norm_epsilon=1e-6,
        rotary_base=1000000.0,
        add_qkv_bias=True,
    ),
}


def parse_value(text: str):
    """A ``--set`` value read as YAML, like the config file (lists too); ``from_dict`` and the training config then
    convert it to the field's type (``megatron_qsparse.config_types``)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:  # e.g. an unbalanced "[": the text itself, refused later unless the field is a string
        return text


def apply_overrides(data: dict, assignments: Iterable[str]) -> dict:
    """Apply ``dotted.key=value`` strings to a nested dict (in place) and return it."""
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects dotted.key=value, got {assignment!r}")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"--set {assignment!r}: {part!r} is not a section")
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"--set {assignment!r}: unknown key {key!r}; known here: {sorted(node)}")
        node[parts[-1]] = parse_value(value)
    return data


def preset(name: str, overrides: Iterable[str] = ()) -> QSparseConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    data = apply_overrides(PRESETS[name]().to_dict(), overrides)
    return QSparseConfig.from_dict(data)
