"""megatron-core ModuleSpecs for a Q-Sparse GPT: the local (non-TransformerEngine) layer with the four block
linears replaced by Q-Sparse linears, each bound to its site's settings through the spec's ``params``."""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_qsparse.layers.linear import QSparseColumnParallelLinear, QSparseRowParallelLinear
from megatron_qsparse.layers.norm import Norm
from megatron_qsparse.model.config import QSparseConfig


def qsparse_layer_spec(cfg: QSparseConfig) -> ModuleSpec:
    sites = cfg.sites()

    def column(site):
        return ModuleSpec(module=QSparseColumnParallelLinear, params={"site": sites[site]})

    def row(site):
        return ModuleSpec(module=QSparseRowParallelLinear, params={"site": sites[site]})

    ffn = MLPSubmodules(linear_fc1=column("fc1"), linear_fc2=row("fc2"))
    if cfg.num_experts:
        # The router is megatron-core's own and sees the dense input (project choice).
        mlp = ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=ModuleSpec(SequentialMLP, submodules=ffn)))
    else:
        mlp = ModuleSpec(module=MLP, submodules=ffn)

    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=column("qkv"),
            core_attention=DotProductAttention,
            linear_proj=row("proj"),
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def qsparse_block_spec(cfg: QSparseConfig, transformer_config) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage: identical Q-Sparse layers and a final Norm."""
    layers = get_num_layers_to_build(transformer_config)
    return TransformerBlockSubmodules(layer_specs=[qsparse_layer_spec(cfg)] * layers, layer_norm=Norm)
